"""`python -m pipeline.throughput` end to end on a tiny built model (CPU): every request's tokens counted, the
static-batching run beside the in-flight one, and the engine's own account of where its time went."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env
from tests.test_engine import build


@pytest.mark.parametrize("stream", [False, True])
def test_the_throughput_benchmark_reports_every_token_and_the_engine_time(home, tmp_path, stream):
    """Outputs at the end (each token's time inside, the default) or streamed: every token timed either way."""
    _, artifact = build("llama-tiny")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.throughput", "--engine", str(artifact), "--requests", "6", "--input-len",
         "70", "--output-len", "5", "--max-batch-size", "4", "--static", "--static-groups", "--device", "cpu",
         "--out", str(out), *(["--stream"] if stream else [])],
        cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = out.glob("throughput-*.json")
    result = json.loads(report.read_text())
    assert result["requests"] == 6 and result["max_batch_size"] == 4 and result["stream"] == stream
    for name in ("engine, rate inf", "engine, static batches", "engine, static groups"):
        run = result["runs"][name]
        assert run["output_tokens"] == 6 * 5 and run["input_tokens"] == 6 * 70
        assert run["itl_s"]["p50"] > 0 and run["ttft_s"]["p50"] > 0  # every token's time, in both modes
        # 6 prompts through a batch of 4 need at least two prefill steps, then decoding steps
        assert run["steps"]["mixed"] >= 2 and run["steps"]["decode"] >= 4
        times = run["engine_time_s"]
        assert set(times) == {"schedule", "decode_forward", "mixed_forward", "launch", "outputs", "deliver"}
        assert all(v >= 0 for v in times.values()) and times["decode_forward"] > 0
        assert times["launch"] <= times["decode_forward"] + times["mixed_forward"]
        assert sum(times.values()) - times["launch"] <= run["seconds"] + 0.1  # the two clocks' windows differ
    assert {"in-flight / static batching", "in-flight / static groups"} <= set(result["ratios"])
    # the static run repeats the in-flight run's prompts: it must compute them again, not find them cached
    assert result["kv"]["prefix_reused_tokens"] == 0
    assert "engine thread:" in proc.stdout


def test_static_batches_compute_the_padding_and_the_longest_output_and_count_only_each_requests_own(home, tmp_path):
    """The padded static baseline: prompts padded to the batch's longest, every request decoding to the batch's
    longest output; the tokens reported are each request's own."""
    from pipeline.throughput import padded_batch, request_set

    requests = request_set(5, 0, 0, vocab=1000, seed=3, input_range=(4, 30), output_range=(2, 9))
    batch = padded_batch(requests, vocab=1000, seed=0)
    width, longest = max(len(p) for p, _ in requests), max(n for _, n in requests)
    assert [len(p) for p, _, _ in batch] == [width] * 5 and [n for _, n, _ in batch] == [longest] * 5
    assert [p[width - len(q):] for (p, _, _), (q, _) in zip(batch, requests)] == [q for q, _ in requests]
    assert [own for _, _, own in batch] == [n for _, n in requests]
    assert len({tuple(p[:width - len(q)]) for (p, _, _), (q, _) in zip(batch, requests) if len(q) < width}) == \
        sum(len(q) < width for q, _ in requests)  # no two paddings alike: nothing for prefix reuse to share

    _, artifact = build("llama-tiny")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.throughput", "--engine", str(artifact), "--requests", "4",
         "--input-range", "4,40", "--output-range", "2,8", "--max-batch-size", "4", "--static", "--device", "cpu",
         "--out", str(out)], cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(out.glob("throughput-*.json")).read_text())
    in_flight, static = result["runs"]["engine, rate inf"], result["runs"]["engine, static batches"]
    assert static["output_tokens"] == in_flight["output_tokens"] and static["input_tokens"] == in_flight["input_tokens"]
    # one padded batch computes more than the requests ask: the padding and the outputs beyond each one's own
    assert static["tokens_computed"] > in_flight["tokens_computed"]
    assert in_flight["tokens_computed"] == in_flight["input_tokens"] + in_flight["output_tokens"] - 4
