"""Check tensor-parallel collectives on this GPU host, stage by stage, before a long tp > 1 benchmark:

    mpirun -n 2 python bench/nccl_check.py

Each rank prints a line per stage (NCCL set-up through pipeline.dist.Comm, an all-reduce, an all-gather, and the
same all-reduce captured in a CUDA graph and replayed, then the teardown with that graph alive); a rank that waits for 60 s prints its stack and exits.
"""

import faulthandler
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.dist import Comm, exit_now, mpi_world, pick_device  # noqa: E402
from pipeline.mapping import Mapping  # noqa: E402


def main() -> int:
    rank, world, mpi_comm = mpi_world()
    start = time.perf_counter()

    def stage(message: str) -> None:
        print(f"[rank {rank} +{time.perf_counter() - start:.1f}s] {message}", flush=True)
        faulthandler.dump_traceback_later(60, exit=True)

    stage("started")
    device = pick_device(mpi_comm)
    comm = Comm.create(Mapping(world, 1, rank), device, mpi_comm)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stage(f"{'NCCL' if cuda else 'gloo'} group on {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'})")
    x = torch.full((4096,), float(rank + 1), device=device, dtype=torch.bfloat16)
    comm.all_reduce_tp(x)
    sync()
    want = world * (world + 1) / 2
    stage(f"all-reduce: {x[0].item()} (want {want})")
    gathered = comm.all_gather_tp(torch.full((1, 1, 8), float(rank), device=device))
    sync()
    stage(f"all-gather: {gathered[0, 0, ::8].tolist()} (want {list(map(float, range(world)))})")
    y = torch.full((4096,), float(world), device=device, dtype=torch.bfloat16)
    graph = graph_check(comm, y, stage) if cuda else None
    ok = x[0].item() == want and y[0].item() == world
    # the decode step's situation at the end of a run: a graph that captured NCCL work is still alive
    stage(f"teardown with {'a captured graph alive' if graph is not None else 'no graph'}")
    closed = comm.close(timeout_s=20)
    stage("teardown finished" if closed else "teardown stuck after 20 s; leaving with exit_now")
    faulthandler.cancel_dump_traceback_later()
    del graph
    if not closed:
        exit_now(0 if ok else 1)
    return 0 if ok else 1


def graph_check(comm: Comm, y: torch.Tensor, stage) -> torch.cuda.CUDAGraph:
    """The all-reduce as the decode step runs it: warmed up on a side stream, captured, replayed."""
    y.fill_(1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        comm.all_reduce_tp(y)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        comm.all_reduce_tp(y)
    stage("all-reduce captured in a CUDA graph")
    y.fill_(1)
    graph.replay()
    torch.cuda.synchronize()
    stage(f"graph replay: {y[0].item()} (want {float(comm.mapping.tp)})")
    return graph


if __name__ == "__main__":
    sys.exit(main())
