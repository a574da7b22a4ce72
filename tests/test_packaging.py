"""A plain (non-editable) install works: the wheel carries the recipes, the `trtllm-pipeline` console command lists
them, has help on every subcommand, and builds and runs a model (tiny random weights, two ranks) outside the
source tree. No network: the wheel is built without isolation and installed without dependencies into a fresh
venv that sees this venv's site-packages through a .pth line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env, venv_on_these_packages

pytestmark = pytest.mark.slow

SOURCES = ["pipeline", "recipes", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.lock"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The venv's bin/ after `pip install <wheel>`."""
    work = tmp_path_factory.mktemp("packaging")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:  # a copy, so the build's scratch folders stay out of the worktree
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(work / "dist"), str(src)], check=True, timeout=120)
    wheel = next((work / "dist").glob("trtllm_pipeline-*.whl"))
    venv = work / "venv"
    venv_python = venv_on_these_packages(venv)  # the dependencies: this venv's
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, timeout=120)
    return venv / "bin"


def cli(bin_dir: Path, home: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # this venv's bin/ after the new one's: the Open MPI wheel's mpirun, as `[mpi]` would install it
    env = child_env(home, PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    env.pop("PIPELINE_RECIPES", None)
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(bin_dir / "trtllm-pipeline"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_installed_package_is_not_the_source_tree(installed, tmp_path):
    proc = subprocess.run([installed / "python", "-c", "import pipeline; print(pipeline.__file__)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert Path(proc.stdout.strip()).is_relative_to(installed.parent), proc.stdout + proc.stderr


def test_console_command_lists_every_recipe(installed, tmp_path):
    proc = cli(installed, tmp_path / "home", tmp_path, "ls")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines()}
    assert listed == {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert "INVALID" not in proc.stdout


def test_every_subcommand_has_help(installed, tmp_path):
    from pipeline.cli import COMMANDS

    top = cli(installed, tmp_path, tmp_path, "--help")
    assert top.returncode == 0 and top.stdout.startswith("usage: trtllm-pipeline"), top.stdout + top.stderr
    for command in COMMANDS:
        proc = cli(installed, tmp_path, tmp_path, command, "--help", timeout=60)
        assert proc.returncode == 0, (command, proc.stderr)
        first_lines = proc.stdout.split("\n\n")
        assert first_lines[0].startswith(f"usage: trtllm-pipeline {command}"), proc.stdout
        assert len(first_lines[1].strip()) > 10, (command, proc.stdout)  # a description, not just usage
        assert f"\n    {command}" in top.stdout, command


def test_console_command_builds_and_runs_outside_the_source_tree(installed, tmp_path):
    home = tmp_path / "home"
    override = ["model.random=gpt2-tiny", "model.tokenizer=null", "precision.dtype=float32", "parallel.tp=2",
                "build.max_seq_len=null", "build.max_input_len=64"]
    build = cli(installed, home, tmp_path, "build", "gpt2-random", *override)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "artifact: " + str(home) in build.stdout + build.stderr
    run = cli(installed, home, tmp_path, "run", "gpt2-random", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
              "--json", str(tmp_path / "out.json"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 rank(s) tp=2" in run.stderr
    assert (tmp_path / "out.json").is_file()
