"""The README's commands run as written: every `python -m pipeline ...` line of its code blocks (no GPU and no
network needed) runs here and exits as the README shows (0, or 2 where the block shows its `error:`). Lines that
need a GPU, the network, a build of a Hub model or `make` (which installs into .venv) are listed in SKIP by their
first word, so a new kind of command has to be placed on one side or the other."""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.slow

# first words of README commands this test does not run, and why
SKIP = {
    "make": "installs into .venv (make setup) before it runs; the same commands run here as python -m pipeline",
    "mpirun": "needs the latest build of the right world size (tests/test_run_mpi.py runs mpirun)",
    "curl": "needs a running server (tests/test_serve.py)",
    "pip": "needs the network (tests/test_packaging.py installs the wheel offline)",
}


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
            current.append(line)
    commands = []
    for lines in blocks:
        for i, line in enumerate(lines):
            shown = line.startswith("$ ")
            command = line[2:] if shown else line
            command = re.sub(r"\s+#.*$", "", command).strip()
            if not command or command.startswith(("pipeline/", "bench/", "recipes/", "tests/", "error:", "- ")):
                continue
            if line.startswith(" "):  # a continued line or a tree in a layout block
                continue
            if command.split()[0] not in ("python", *SKIP):
                raise AssertionError(f"README command {command!r}: neither run by this test nor in SKIP")
            errors = shown and any(x.startswith("error:") for x in lines[i + 1:i + 2])
            commands.append((command, 2 if errors else 0))
    return commands


COMMANDS = [c for c in readme_commands() if c[0].split()[0] == "python"]


def test_readme_commands_are_all_accounted_for():
    kinds = {c.split()[0] for c, _ in readme_commands()}
    assert kinds <= {"python", *SKIP}, kinds
    assert len(COMMANDS) >= 4


@pytest.mark.parametrize("command,expected", COMMANDS, ids=[c for c, _ in COMMANDS])
def test_readme_command_runs_as_written(command, expected, home):
    import subprocess

    argv = shlex.split(command)
    argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == expected, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
