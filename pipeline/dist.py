"""Ranks from MPI, collectives from torch.distributed.

`mpirun -n N python -m pipeline.run` starts N processes; mpi4py tells each its rank and the world size, and
rank 0 publishes a rendezvous address over MPI so that torch.distributed (gloo on CPU, NCCL on GPU) can join
without any environment set up by hand. MPI also carries the pre-flight agreement: every rank checks what it
alone can see (its own rank file), and all ranks learn of any failure before anyone enters a collective, so a
bad file is an error on every rank instead of a hang.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from pipeline.mapping import Mapping


def mpi_world() -> tuple[int, int, object | None]:
    """(rank, world size, communicator) of this process; (0, 1, None) when MPI is not available."""
    try:
        from mpi4py import MPI
    except ImportError:
        return 0, 1, None
    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm


def all_ok(mpi_comm, problem: str | None) -> list[tuple[int, str]]:
    """Every rank reports its problem (or None); all ranks get the list of (rank, problem)."""
    if mpi_comm is None:
        return [(0, problem)] if problem else []
    problems = mpi_comm.allgather(problem)
    return [(r, p) for r, p in enumerate(problems) if p]


def abort(mpi_comm, code: int = 1) -> None:
    if mpi_comm is not None and mpi_comm.Get_size() > 1:
        mpi_comm.Abort(code)
    raise SystemExit(code)


def mpirun_command(ranks: int, module_args: list[str]) -> list[str]:
    """`mpirun -n N <this python> -m ...`, with the flags Open MPI needs here (as root, more ranks than cores)."""
    import shutil
    import sys
    from pathlib import Path

    local = Path(sys.executable).parent / "mpirun"
    binary = str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")
    flags = ["--oversubscribe"] if ranks > (os.cpu_count() or 1) else []
    return [binary, "-n", str(ranks), *flags, sys.executable, *module_args]


def mpirun_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_rank(mpi_comm) -> int:
    """This process's index among the ranks on its host (for choosing a GPU)."""
    for var in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    if mpi_comm is None:
        return 0
    hosts = mpi_comm.allgather(socket.gethostname())
    rank = mpi_comm.Get_rank()
    return sum(1 for r in range(rank) if hosts[r] == hosts[rank])


def gpu_index(local: int, device_count: int) -> int:
    """The GPU of the rank with this local rank: one GPU each, in order (several nodes: the same on each host).
    With one visible GPU per rank (Slurm's --gpus-per-task=1 sets CUDA_VISIBLE_DEVICES so) it is always 0."""
    if device_count == 1:
        return 0
    if local >= device_count:
        from pipeline.errors import RunError

        raise RunError(f"local rank {local} on {socket.gethostname()} has no GPU of its own ({device_count} visible); "
                       f"place at most {device_count} ranks per node (mpirun --map-by ppr:{device_count}:node, or "
                       f"srun --ntasks-per-node={device_count})")
    return local


def pick_device(mpi_comm, prefer: str = "auto") -> torch.device:
    if prefer == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    index = gpu_index(local_rank(mpi_comm), torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@dataclass
class Comm:
    """The collectives one rank needs for tensor and pipeline parallelism."""

    mapping: Mapping
    device: torch.device
    tp_group: object | None = None
    mpi_comm: object | None = None

    @classmethod
    def create(cls, mapping: Mapping, device: torch.device, mpi_comm) -> Comm:
        if mapping.world_size == 1:
            return cls(mapping, device)
        if not torch_dist.is_initialized():
            hosts = mpi_comm.allgather(socket.gethostname())
            addr = "127.0.0.1" if len(set(hosts)) == 1 else socket.gethostbyname(socket.gethostname())
            port = _free_port() if mapping.rank == 0 else None
            addr, port = mpi_comm.bcast((addr, port), root=0)
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            torch_dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=mapping.rank,
                                          world_size=mapping.world_size, **kwargs)
        tp_group = None
        for stage in range(mapping.pp):  # every rank must create every group, in the same order
            ranks = [stage * mapping.tp + t for t in range(mapping.tp)]
            group = torch_dist.new_group(ranks) if mapping.tp > 1 else None
            if mapping.rank in ranks:
                tp_group = group
        return cls(mapping, device, tp_group, mpi_comm)

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        if self.mapping.tp > 1:
            torch_dist.all_reduce(x, group=self.tp_group)
        return x

    def all_gather_tp(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the tp ranks' shards along the last dim."""
        if self.mapping.tp == 1:
            return x
        tp = self.mapping.tp
        out = torch.empty((tp * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        torch_dist.all_gather_into_tensor(out, x.contiguous(), group=self.tp_group)
        return torch.cat(out.view(tp, *x.shape).unbind(0), dim=-1)

    def send_next(self, x: torch.Tensor) -> None:
        torch_dist.send(x.contiguous(), self.mapping.peer_in_stage(self.mapping.pp_rank + 1))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        torch_dist.recv(x, self.mapping.peer_in_stage(self.mapping.pp_rank - 1))
        return x

    @property
    def sampler_rank(self) -> int:
        """The rank that samples next tokens: the last stage's first tp rank (it holds the full logits)."""
        return (self.mapping.pp - 1) * self.mapping.tp

    def broadcast_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.mapping.world_size > 1:
            torch_dist.broadcast(tokens, src=self.sampler_rank)
        return tokens

    def barrier(self) -> None:
        if self.mapping.world_size > 1:
            torch_dist.barrier()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Tear torch.distributed down once every rank is done; False if the teardown did not finish.

        NCCL's teardown can wait forever once a CUDA graph has captured its collectives (pytorch/pytorch#115388),
        after all the work is done and the results written. So the ranks first meet over MPI, then the teardown
        runs in a helper thread for at most `timeout_s` (the same for gloo, where it is quick). When it does not
        finish, the caller must leave with `exit_now` (a normal interpreter exit would wait in it again).
        """
        if not torch_dist.is_initialized():
            return True
        gc.collect()  # CUDA graphs no longer referenced go first: they hold the communicators' captured work
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.mpi_comm is not None:
            self.mpi_comm.Barrier()
        done = threading.Event()

        def teardown() -> None:
            torch_dist.destroy_process_group()
            done.set()

        threading.Thread(target=teardown, name="dist-teardown", daemon=True).start()
        if done.wait(timeout_s):
            return True
        print(f"[rank {self.mapping.rank}] the process group's teardown did not finish in {timeout_s:g} s (with "
              f"NCCL, a known PyTorch issue after CUDA graph capture: pytorch/pytorch#115388); all work is done, "
              f"leaving without it", file=sys.stderr, flush=True)
        return False


def finish(comm: Comm, code: int) -> int:
    """Close the process group and return `code`; if the teardown is stuck (NCCL after CUDA graph capture), leave
    the process at once with it."""
    if not comm.close():
        exit_now(code)
    return code


def exit_now(code: int) -> None:
    """Leave the process at once, skipping the interpreter's teardown of a stuck NCCL group. MPI is finalized
    first (mpirun counts a rank that exits without it as failed), and the output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    except ImportError:
        pass
    os._exit(code)
