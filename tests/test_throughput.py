"""`python -m pipeline.throughput` end to end on a tiny built model (CPU): every request's tokens counted, the
static-batching run beside the in-flight one, and the engine's own account of where its time went."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, child_env
from tests.test_engine import build


def test_the_throughput_benchmark_reports_every_token_and_the_engine_time(home, tmp_path):
    _, artifact = build("llama-tiny")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.throughput", "--engine", str(artifact), "--requests", "6", "--input-len",
         "70", "--output-len", "5", "--max-batch-size", "4", "--static", "--device", "cpu", "--out", str(out)],
        cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = out.glob("throughput-*.json")
    result = json.loads(report.read_text())
    assert result["requests"] == 6 and result["max_batch_size"] == 4
    for name in ("engine, rate inf", "engine, static batches"):
        run = result["runs"][name]
        assert run["output_tokens"] == 6 * 5 and run["input_tokens"] == 6 * 70
        # 6 prompts through a batch of 4 need at least two prefill steps, then decoding steps
        assert run["steps"]["mixed"] >= 2 and run["steps"]["decode"] >= 4
        times = run["engine_time_s"]
        assert set(times) == {"schedule", "decode_forward", "mixed_forward", "launch", "outputs", "deliver"}
        assert all(v >= 0 for v in times.values()) and times["decode_forward"] > 0
        assert times["launch"] <= times["decode_forward"] + times["mixed_forward"]
        assert sum(times.values()) - times["launch"] <= run["seconds"] + 0.1  # the two clocks' windows differ
    assert "in-flight / static batching" in result["ratios"]
    # the static run repeats the in-flight run's prompts: it must compute them again, not find them cached
    assert result["kv"]["prefix_reused_tokens"] == 0
    assert "engine thread:" in proc.stdout
