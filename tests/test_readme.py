"""The README's shell lines run as written. Every command line of its plain code blocks is either run here or listed
in NOT_RUN with the reason, so a new line has to be placed on one side or the other:

- `python -m pipeline ...` lines run in the repo and exit as the README shows (0, or 2 where the block shows its
  `error:`);
- `make build`, `make run` and `mpirun ... python -m pipeline.run` lines run in a copy of the repo whose .venv is
  what `make setup` leaves (this venv's packages), with that venv's `python` and `mpirun` first on PATH as after
  `source .venv/bin/activate`; a line that needs an earlier build gets it first (STAND_INS);
- `curl` lines run against `python -m pipeline serve RECIPE` of the recipe they name, on a free port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env, venv_on_these_packages

pytestmark = pytest.mark.slow

# README lines this test does not run, and why
NOT_RUN = {
    "make demo": "runs `make setup`, which installs into .venv; a fresh clone's first command (CI runs it)",
    "make test": "the test suite itself (recursion)",
    "make build RECIPE=gpt2-tp2": "fetches GPT-2 from the Hugging Face Hub (network); builds engines on a GPU",
    "pip install -e '.[tensorrt-llm]' --extra-index-url https://pypi.nvidia.com":
        "NVIDIA's package index (network) and a GPU; tests/test_packaging.py installs the package offline",
}

# `mpirun -n N python -m pipeline.run` runs the latest build; where the README's build before it is not run here
# (NOT_RUN), an offline recipe of N ranks stands in
STAND_INS = {1: "gpt2-random", 2: "smollm2-135m-bf16-pp2", 3: "smollm2-135m-fp16-tp3"}
BUILD_TIMEOUT_S = 600
RUN_TIMEOUT_S = 300


def readme_commands() -> list[tuple[str, int]]:
    """(command, expected exit code) for each command line in the README's plain code blocks."""
    blocks, current, language = [], None, ""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("", "bash", "sh"):
                    blocks.append(current)
                current = None
        elif current is not None:
            if current and current[-1].endswith("\\"):  # a continued command line
                current[-1] = current[-1][:-1] + line.strip()
            elif current and kind(current[-1].removeprefix("$ ")) and not balanced(current[-1]):
                current[-1] += "\n" + line  # a quoted argument over several lines
            else:
                current.append(line)
    commands = []
    for lines in blocks:
        for i, line in enumerate(lines):
            shown = line.startswith("$ ")
            command = line[2:] if shown else line
            command = re.sub(r"\s+#.*$", "", command).strip()
            if not command or command.startswith(("pipeline/", "bench/", "recipes/", "tests/", "error:", "- ")):
                continue
            if line.startswith(" "):  # a tree in a layout block
                continue
            errors = shown and any(x.startswith("error:") for x in lines[i + 1:i + 2])
            commands.append((command, 2 if errors else 0))
    return commands


def balanced(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:  # no closing quotation
        return False
    return True


def kind(command: str) -> str | None:
    """Which of this test's runners runs `command` (None: none does)."""
    if command.startswith("python -m pipeline "):
        return "python"
    if re.fullmatch(r"make (build|run)( [A-Z_]+=(\S+|\"[^\"]*\"))*", command):
        return "make"
    if re.fullmatch(r"mpirun -n \d+ python -m pipeline\.run", command):
        return "mpirun"
    if command.startswith("curl "):
        return "curl"
    return None


COMMANDS = readme_commands()
PYTHON_LINES = [c for c in COMMANDS if kind(c[0]) == "python"]
# in README order, repeated lines once
SANDBOX_LINES = list(dict.fromkeys(c for c, _ in COMMANDS if kind(c) in ("make", "mpirun") and c not in NOT_RUN))
CURL_LINES = [c for c, _ in COMMANDS if kind(c) == "curl"]


def test_every_readme_line_is_run_or_listed_with_its_reason():
    unplaced = [c for c, _ in COMMANDS if c not in NOT_RUN and kind(c) is None]
    assert not unplaced, f"README lines neither run by this test nor in NOT_RUN: {unplaced}"
    stale = set(NOT_RUN) - {c for c, _ in COMMANDS}
    assert not stale, f"NOT_RUN lists lines the README no longer has: {stale}"
    assert len(PYTHON_LINES) >= 4 and len(SANDBOX_LINES) >= 6 and CURL_LINES


@pytest.mark.parametrize("command,expected", PYTHON_LINES, ids=[c for c, _ in PYTHON_LINES])
def test_readme_command_runs_as_written(command, expected, home):
    argv = shlex.split(command)
    argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expected, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr


class Sandbox:
    """A copy of the repo (tracked and untracked, not ignored, files) after `make setup`, with its own checkpoints."""

    def __init__(self, root: Path, home: Path):
        self.root, self.home = root, home
        venv = root / ".venv"
        self.env = child_env(home, PATH=os.pathsep.join([str(venv / "bin"), os.environ["PATH"]]),
                             VIRTUAL_ENV=str(venv))
        for name in ("PYTHONPATH", "PIPELINE_RECIPES", "MAKEFLAGS", "MFLAGS"):
            self.env.pop(name, None)

    def sh(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", command], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert "Traceback" not in proc.stderr, f"{command}\n{proc.stderr[-3000:]}"
        return proc

    def ok(self, command: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
        proc = self.sh(command, timeout)
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def latest_world_size(self) -> int | None:
        latest = self.home / "latest.json"
        return json.loads(latest.read_text())["world_size"] if latest.is_file() else None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, smollm2_dir, gpt2_tokenizer_dir) -> Sandbox:
    tokenizer = gpt2_tokenizer_dir
    work = tmp_path_factory.mktemp("readme")
    root = work / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           text=True, check=True, timeout=60).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, root / name)
    venv = root / ".venv"
    venv_on_these_packages(venv)
    for top in ("bin", "lib", "etc", "share"):  # what the wheels put beside site-packages: mpirun, libmpi, ...
        for entry in (Path(sys.prefix) / top).glob("*"):
            if not entry.name.startswith("python") and not (venv / top / entry.name).exists():
                (venv / top).mkdir(exist_ok=True)
                (venv / top / entry.name).symlink_to(entry)
    (root / ".venv" / ".installed").touch()  # what `make setup` leaves, newer than the files it depends on
    past = time.time() - 3600
    for name in ("pyproject.toml", "requirements.lock"):
        os.utime(root / name, (past, past))
    home = work / "checkpoints"
    (home / "sources").mkdir(parents=True)
    for source in (smollm2_dir, tokenizer):
        (home / "sources" / source.name).symlink_to(source)
    box = Sandbox(root, home)
    python = box.ok("command -v python; python -c 'import pipeline; print(pipeline.__file__)'", 60).stdout.split()
    assert python[0] == str(root / ".venv" / "bin" / "python") and Path(python[1]).is_relative_to(root), python
    return box


def prepare(box: Sandbox, command: str) -> None:
    """Make what `command` needs that the README built before it, or builds in a line this test does not run."""
    ranks = re.fullmatch(r"mpirun -n (\d+) .*", command)
    if ranks and box.latest_world_size() != int(ranks.group(1)):
        box.ok(f"make build RECIPE={STAND_INS[int(ranks.group(1))]}")
    recipe = re.search(r"\bRECIPE=(\S+)", command)
    if command.startswith("make run") and recipe and not (box.home / "builds" / f"{recipe.group(1)}.json").is_file():
        box.ok(f"make build RECIPE={recipe.group(1)}")
    if command == "make run" and box.latest_world_size() is None:
        box.ok(f"make build RECIPE={STAND_INS[2]}")


@pytest.mark.parametrize("command", SANDBOX_LINES)
def test_readme_make_and_mpirun_lines_run_as_written(command, sandbox):
    prepare(sandbox, command)
    proc = sandbox.ok(command, BUILD_TIMEOUT_S if command.startswith("make build") else RUN_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    if command.startswith("make build"):
        assert f"artifact: {sandbox.home}" in out, out[-3000:]
        return
    # a run: the build it names (else the latest), on as many ranks as that build needs, and rank 0's text
    recipe = re.search(r"\bRECIPE=(\S+)", command)
    record = json.loads((sandbox.home / (f"builds/{recipe.group(1)}.json" if recipe else "latest.json")).read_text())
    assert f"{record['artifact']}" in out, out[-3000:]
    if "backend torch" in out:
        assert f"{record['world_size']} rank(s)" in out, out[-3000:]
    assert proc.stdout.strip(), out[-3000:]
    if record["recipe"].startswith("smollm2"):  # the real model answers the recipe's question
        assert "Paris" in proc.stdout, out[-3000:]


@pytest.mark.parametrize("command", CURL_LINES)
def test_readme_curl_lines_get_an_answer_from_the_server(command, sandbox):
    from tests.test_serve import free_port, kill_tree

    recipe = json.loads(re.search(r"-d '([^']*)'", command).group(1))["model"]
    port = free_port()
    log = open(sandbox.home / f"serve-{port}.log", "w+")
    server = subprocess.Popen(["python", "-m", "pipeline", "serve", recipe, "--port", str(port)], cwd=sandbox.root,
                              env=sandbox.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + BUILD_TIMEOUT_S
        while sandbox.sh(f"curl -sf localhost:{port}/health", 10).returncode != 0:
            log.seek(0)
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{log.read()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not start in {BUILD_TIMEOUT_S} s"
            time.sleep(1)
        proc = sandbox.ok(command.replace("localhost:8000", f"localhost:{port}"), RUN_TIMEOUT_S)
        answer = json.loads(proc.stdout)
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
    finally:
        kill_tree(server)
        log.close()
