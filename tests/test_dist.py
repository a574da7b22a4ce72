"""Rank-to-GPU mapping on one node and on several: the local rank from mpirun's or Slurm's variables (or from the
ranks' host names), one GPU per local rank, and the serve launch line with a host file."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pipeline.dist import gpu_index, local_rank
from pipeline.errors import RunError
from pipeline.serve import serve_command
from tests.conftest import PYTHON, REPO, child_env, mpirun_binary

LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK")


class FakeComm:
    """Ranks spread over hosts as a multi-node job would be: allgather returns every rank's host name."""

    def __init__(self, hosts: list[str], rank: int):
        self.hosts, self.rank = hosts, rank

    def allgather(self, _value):
        return list(self.hosts)

    def Get_rank(self) -> int:
        return self.rank


@pytest.fixture
def no_launcher_env(monkeypatch):
    for var in LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("var", LOCAL_RANK_VARS)
def test_local_rank_comes_from_the_launchers_variable(no_launcher_env, var):
    no_launcher_env.setenv(var, "5")
    assert local_rank(None) == 5


def test_mpirun_wins_over_slurm_when_both_are_set(no_launcher_env):
    no_launcher_env.setenv("SLURM_LOCALID", "0")  # mpirun started inside a Slurm allocation
    no_launcher_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    assert local_rank(None) == 3


def test_without_variables_two_nodes_of_four_ranks_count_from_0_on_each(no_launcher_env):
    hosts = ["node-a"] * 4 + ["node-b"] * 4
    assert [local_rank(FakeComm(hosts, r)) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [gpu_index(local_rank(FakeComm(hosts, r)), 4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_one_gpu_per_rank_and_no_sharing(no_launcher_env):
    assert [gpu_index(r, 8) for r in range(8)] == list(range(8))
    assert gpu_index(3, 1) == 0  # srun --gpus-per-task=1: each rank sees only its own GPU
    with pytest.raises(RunError, match=r"local rank 8 .* no GPU of its own \(8 visible\); place at most 8 ranks per "
                                       r"node \(mpirun --map-by ppr:8:node, or srun --ntasks-per-node=8\)"):
        gpu_index(8, 8)


def test_local_ranks_under_mpirun(home, tmp_path):
    script = ("import json, sys; from pipeline.dist import local_rank, mpi_world; r, w, c = mpi_world(); "
              "open(sys.argv[1] + f'/{r}.json', 'w').write(json.dumps([r, w, local_rank(c)]))")
    proc = subprocess.run([mpirun_binary(), "-n", "3", "--oversubscribe", PYTHON, "-c", script, str(tmp_path)],
                          cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = sorted(json.loads(f.read_text()) for f in tmp_path.glob("*.json"))
    assert [r[:2] for r in results] == [[0, 3], [1, 3], [2, 3]]
    assert sorted(r[2] for r in results) == [0, 1, 2]  # one host: each rank its own GPU (Open MPI's order)


def test_the_serve_launch_line_with_a_host_file():
    cmd = serve_command(Path("/a/art"), 16, ["--port", "9000"], ["--hostfile", "hosts", "--map-by", "ppr:8:node"])
    assert cmd[1:7] == ["--hostfile", "hosts", "--map-by", "ppr:8:node", "-n", "16"]
    assert cmd[-6:] == ["-m", "pipeline.serve", "--engine", "/a/art", "--port", "9000"]
    assert serve_command(Path("/a/art"), 1, [])[1:] == ["-m", "pipeline.serve", "--engine", "/a/art"]


def test_a_stopped_watchdog_has_no_thread_left_in_a_store_call():
    """A daemon thread still inside a TCPStore call when the interpreter exits is ended in C++ code, which aborts
    the rank (SIGABRT after its output, seen on a 3-rank run); stop() waits for both threads."""
    import threading
    from datetime import timedelta

    import torch.distributed as torch_dist

    from pipeline.dist import Watchdog

    store = torch_dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False,
                                timeout=timedelta(seconds=2))
    watchdog = Watchdog(0, 2, store, timeout_s=60)
    assert {t.name for t in threading.enumerate()} >= {"watchdog_beat", "watchdog_judge"}
    while not store.check(["beat/0"]):  # the beat thread is at work
        threading.Event().wait(0.01)
    watchdog.stop()
    assert not {t.name for t in threading.enumerate()} & {"watchdog_beat", "watchdog_judge"}
