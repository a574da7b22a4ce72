"""The offline default recipe carries golden tokens that the current code reproduces: `verify --run` exits 0."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_verify_run_reproduces_the_demo_recipes_golden_tokens(home, smollm2_dir):
    build = run_cli(home, "build", "smollm2-135m-bf16-pp2", f"model.local={smollm2_dir}")
    assert build.returncode == 0, build.stdout + build.stderr
    artifact = json.loads((home / "builds" / "smollm2-135m-bf16-pp2.json").read_text())["artifact"]
    proc = run_cli(home, "verify", artifact, "--run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 golden output(s) reproduced" in proc.stdout
