"""Where the engine's throughput run loses GPU time: `pipeline.throughput`'s 1,000 x 128/128 at an infinite rate on
random weights of a real shape, once plain (its tok/s), then once under torch.profiler with the engine's phases
labelled (schedule, launch of a decoding / mixed step, collect, outputs, deliver). From the trace it reports how
long the GPU ran and how long it sat idle, which host phases the idle gaps overlapped (so which host work the GPU
waited for), and the kernels that took the GPU's time, per kind of step. One GPU:

    python bench/engine_profile.py llama-3-8b --quant none --max-batch-size 512 --out DIR

Writes DIR/profile-<quant>.md (and .json). The profiler adds host time to every eager launch, so idle time under
it is an upper bound; the plain run's tok/s is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import throughput  # noqa: E402
from pipeline.engine import core, runner, scheduler  # noqa: E402
from pipeline.engine import llm as llm_module

PHASES = ("schedule", "launch decode", "launch mixed", "collect", "outputs", "deliver")


def label_phases() -> None:
    """Wrap the engine's phases in profiler ranges (this script only; the product code carries no labels)."""
    record = torch.profiler.record_function

    def wrap(owner, name, label):
        original = getattr(owner, name)

        @functools.wraps(original)
        def labelled(*args, **kwargs):
            text = label(*args) if callable(label) else label
            with record(text):
                return original(*args, **kwargs)

        setattr(owner, name, labelled)

    wrap(scheduler.Scheduler, "schedule", "schedule")
    wrap(runner.ModelRunner, "launch", lambda self, plan, *a: f"launch {plan.kind}")
    wrap(runner.ModelRunner, "execute", lambda self, plan, *a: f"launch {plan.kind}")
    wrap(runner.ModelRunner, "collect", "collect")
    wrap(core.Engine, "_outputs", "outputs")
    wrap(llm_module, "_hand_over", "deliver")


def all_threads():
    """torch.profiler's switch to record every thread (torch 2.8 and later), else None."""
    try:
        return torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    except TypeError:
        print("[profile] this torch records the calling thread only: no phase will show", file=sys.stderr)
        return None


def merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def overlap(a: tuple[float, float], spans: list[tuple[float, float]], starts: list[float]) -> float:
    """Length of interval a covered by sorted, merged spans."""
    import bisect

    total, i = 0.0, max(0, bisect.bisect_right(starts, a[0]) - 1)
    while i < len(spans) and spans[i][0] < a[1]:
        total += max(0.0, min(a[1], spans[i][1]) - max(a[0], spans[i][0]))
        i += 1
    return total


def analyse(trace_path: Path) -> dict:
    events = json.loads(trace_path.read_text())["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    labels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
              and e.get("name") in PHASES]
    if not gpu:
        return {"error": "no GPU activity in the trace"}
    busy = merge([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    first, last = busy[0][0], busy[-1][1]
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] > 0]
    by_phase = {}
    for phase in PHASES:
        spans = merge([(e["ts"], e["ts"] + e["dur"]) for e in labels if e["name"] == phase])
        starts = [s for s, _ in spans]
        by_phase[phase] = {"host_ms": sum(b - a for a, b in spans) / 1e3, "calls": sum(e["name"] == phase for e in labels),
                           "gpu_idle_during_ms": sum(overlap(g, spans, starts) for g in gaps) / 1e3}
    idle = sum(b - a for a, b in gaps)
    labelled = merge([(e["ts"], e["ts"] + e["dur"]) for e in labels])
    starts = [s for s, _ in labelled]
    unlabelled = idle - sum(overlap(g, labelled, starts) for g in gaps)
    # kernels by name, split by the kind of step whose launch issued them (the runtime call's correlation id)
    runtime_at = {e["args"].get("correlation"): e["ts"] for e in events
                  if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "args" in e}
    launches = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in labels if e["name"].startswith("launch"))
    launch_starts = [s for s, _, _ in launches]
    import bisect

    kernels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e in gpu:
        at = runtime_at.get(e.get("args", {}).get("correlation"))
        kind = "other"
        if at is not None:
            i = bisect.bisect_right(launch_starts, at) - 1
            if i >= 0 and launches[i][1] >= at:
                kind = launches[i][2].removeprefix("launch ")
        kernels[kind][e["name"][:90]] += e["dur"] / 1e3
    top = {kind: sorted(((round(ms, 2), name) for name, ms in names.items()), reverse=True)[:15]
           for kind, names in kernels.items()}
    gap_sizes = sorted(b - a for a, b in gaps)
    return {
        "span_ms": (last - first) / 1e3, "gpu_busy_ms": sum(b - a for a, b in busy) / 1e3, "gpu_idle_ms": idle / 1e3,
        "gaps": len(gaps), "gaps_over_100us": sum(g > 100 for g in gap_sizes),
        "idle_in_gaps_over_100us_ms": sum(g for g in gap_sizes if g > 100) / 1e3,
        "largest_gaps_ms": [round(g / 1e3, 3) for g in gap_sizes[-10:]],
        "phases": by_phase, "idle_outside_phases_ms": unlabelled / 1e3,
        "gpu_ms_by_step_kind": {k: round(sum(v.values()), 1) for k, v in kernels.items()}, "top_kernels": top,
    }


def markdown(result: dict) -> str:
    a = result["analysis"]
    lines = [f"# Engine profile: {result['model']}, max_batch {result['max_batch_size']}, max_num_tokens "
             f"{result.get('max_num_tokens', 8192)}, "
             f"{result['requests']} x {result['input_len']}/{result['output_len']} on {result['device']}", "",
             f"Plain run: {result['plain']['output_tok_s']:.1f} output tok/s in {result['plain']['seconds']:.2f} s; "
             f"profiled run: {result['profiled']['output_tok_s']:.1f} tok/s in {result['profiled']['seconds']:.2f} s.",
             ""]
    if "error" in a:
        return "\n".join(lines + [a["error"]]) + "\n"
    lines += [f"Profiled run's GPU span {a['span_ms']:.0f} ms: busy {a['gpu_busy_ms']:.0f} ms, idle "
             f"{a['gpu_idle_ms']:.0f} ms in {a['gaps']} gaps ({a['gaps_over_100us']} over 100 us holding "
             f"{a['idle_in_gaps_over_100us_ms']:.0f} ms; largest {a['largest_gaps_ms']} ms).", "",
             "| host phase | calls | host ms | GPU idle during it (ms) |", "|---|---|---|---|"]
    for phase, p in a["phases"].items():
        lines.append(f"| {phase} | {p['calls']} | {p['host_ms']:.0f} | {p['gpu_idle_during_ms']:.0f} |")
    lines.append(f"| (none of these: the loop, the GIL, the client) | | | {a['idle_outside_phases_ms']:.0f} |")
    lines += ["", f"GPU ms by the kind of step that launched it: {a['gpu_ms_by_step_kind']}"]
    for kind, rows in a["top_kernels"].items():
        lines += ["", f"Top kernels, {kind} steps (ms, name):", ""] + [f"- {ms} {name}" for ms, name in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", default="llama-3-8b", nargs="?")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none")
    p.add_argument("--max-batch-size", type=int, default=512)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--stream", action="store_true", help="every request streams (an output per token)")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine-profile"))
    args = p.parse_args()
    from pipeline.dist import Comm, mpi_world, pick_device
    from pipeline.engine.llm import LLM
    from pipeline.mapping import Mapping
    from pipeline.random_weights import random_rank_model

    label_phases()
    rank, world, mpi_comm = mpi_world()
    device = pick_device(mpi_comm, "auto")
    comm = Comm.create(Mapping(world, 1, rank), device, mpi_comm)
    model, _, _ = random_rank_model(args.shape, comm, device, args.dtype, args.quant)
    llm = LLM.from_rank_model(model, mpi_comm, build_spec={"max_batch_size": args.max_batch_size,
                                                           "max_num_tokens": args.max_num_tokens},
                              max_batch_size=args.max_batch_size, enable_prefix_reuse=False)
    requests = throughput.request_set(args.requests, args.input_len, args.output_len, llm.config["vocab_size"], 0)
    try:
        asyncio.run(throughput._run_requests(llm, requests[:8], math.inf, 0))  # warm-up
        plain = throughput._engine_run(llm, requests, math.inf, 0, stream=args.stream)
        print(f"[profile] plain run: {plain['output_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # the engine's ranges are recorded on its own thread: without profile_all_threads only this one's would be
        with torch.profiler.profile(activities=activities, experimental_config=all_threads()) as prof:
            profiled = throughput._engine_run(llm, requests, math.inf, 1, stream=args.stream)
    finally:
        llm.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"trace-{args.quant}.json"
    prof.export_chrome_trace(str(trace))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"model": f"{args.shape} ({args.dtype}, quant {args.quant})", "device": name,
              "max_batch_size": args.max_batch_size, "max_num_tokens": args.max_num_tokens,
              "requests": args.requests, "input_len": args.input_len, "output_len": args.output_len,
              "plain": {"output_tok_s": plain["output_tok_s"], "seconds": plain["seconds"],
                        "engine_time_s": plain["engine_time_s"], "steps": plain["steps"]},
              "profiled": {"output_tok_s": profiled["output_tok_s"], "seconds": profiled["seconds"],
                           "engine_time_s": profiled["engine_time_s"]},
              "analysis": analyse(trace)}
    trace.unlink()  # hundreds of MB; the analysis is what comes back
    (args.out / f"profile-{args.quant}.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (args.out / f"profile-{args.quant}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
