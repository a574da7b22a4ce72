"""`python -m pipeline bench RECIPE`: latency and throughput of a build, with transformers as the baseline.

    python -m pipeline bench gpt2-random --batch-sizes 1,8,32 --input-len 128 --output-len 128
    python -m pipeline bench llama-3-8b-random-bf16 --device-random          # GPU machines without the checkpoint

Each batch of B requests (random token ids, input_len tokens each, or lengths drawn around it) is prefilled
together and decoded for output_len tokens (EOS ignored; or a length drawn around it per request), repeated. B is
the concurrency: B requests in flight at once, batched statically (each repeat is a wave that starts when the
previous one has ended, and a request that is done waits for the batch's longest). Reported per batch size:
- TTFT (time to first token), TPOT (time per output token after the first), ITL (inter-token latency, per step),
  E2E (request latency: until the request's own last token), as p50/p90/p99 over requests and repeats, and output
  tokens/s (the batch's output tokens / the time until all of them are on the host);
- on CUDA, each decode path (CUDA graph, torch.compile, Triton GEMV) at batch 1, and the copy bandwidth measured in
  the same run, which bounds batch-1 decoding: tokens/s <= bandwidth / bytes of weights read per token;
- transformers' generate on the same GPU in the same run (dynamic cache; static cache for batch >= 8) and the ratio.

The ranks run under mpirun (tp > 1 spans GPUs over NCCL); rank 0 writes the results as JSON (and a PNG when
matplotlib is installed) beside the artifact, or where --out says.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.progress import stage
from pipeline.random_weights import make_prompts

DEFAULT_BATCH_SIZES = "1,8,32"
# The decode paths measured at batch 1 by default, slowest first (DecodeOptions.from_label reads them); the last is
# DecodeOptions' default, which pipeline.run uses
ALL_VARIANTS = ("eager+cublas+fused-mlp", "graph+cublas+fused-mlp", "graph+triton-gemv+fused-mlp",
                "graph+compile+cublas+fused-mlp", "graph+compile+triton-gemv+fused-mlp",
                "graph+triton-gemv+fused-mlp+fused-step", "graph+compile+triton-gemv+fused-mlp+fused-step+pdl")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def output_lengths(batch: int, output_len: int, seed: int, spread: float = 0.0) -> list[int]:
    """Each request's output length: output_len, or drawn uniformly within +-spread of it (at least 1)."""
    if spread == 0.0:
        return [output_len] * batch
    rng = random.Random(f"output {seed}")
    return [max(1, round(output_len * (1 + rng.uniform(-spread, spread)))) for _ in range(batch)]


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median of 20)."""
    from pipeline.backends.cuda_decode import timing_event

    n = int((gib if device.type == "cuda" else min(gib, 0.25)) * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = timing_event(device), timing_event(device)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * n / statistics.median(times[5:])


def weight_bytes(model) -> int:
    """Bytes a decode step reads from this rank's weights (every GEMM weight, embeddings' one row excluded)."""
    total = 0
    for layer in model.layers:
        for value in layer.values():
            for t in (getattr(value, "weight", None), getattr(value, "q", None)):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    if model.lm_head is not None:
        total += model.lm_head.numel() * model.lm_head.element_size()
    return total


# ------------------------------------------------------------------------------------------------ worker


def measure(decoder, prompts: list[list[int]], output_len: int | list[int], repeats: int,
            desc: str = "measuring") -> dict:
    """Prefill, then max(lengths) - 1 decode steps launched back to back, each followed by a CUDA event.
    output_len: every request's output length, or one per request.

    TTFT is host time until the first tokens are on the host; ITL is the GPU time between consecutive steps'
    events (the first from the end of prefill); a request's E2E is its TTFT plus the GPU time from the end of
    prefill to the step of its last token; tokens/s counts the requests' own tokens over the host time until every
    token is on the host. The tokens of the decode steps are read once at the end (a streaming server would read
    them one step behind)."""
    from pipeline.backends.cuda_decode import synchronize, timing_event
    from pipeline.progress import progress

    lengths = [output_len] * len(prompts) if isinstance(output_len, int) else list(output_len)
    if len(lengths) != len(prompts) or min(lengths) < 1:
        raise ValueError(f"measure: {len(prompts)} prompts need as many output lengths >= 1, not {lengths}")
    steps = max(lengths)
    ttft, e2e, tpot, itl, batch_e2e, tokens = [], [], [], [], [], None
    width = max(len(p) for p in prompts)
    device = decoder.model.device
    # the first round warms up: it compiles and captures the prefill at this prompt width
    for r in progress(range(repeats + 1), desc=f"{desc}: warm-up round, then {repeats} timed", unit="round"):
        synchronize(device)
        start = time.perf_counter()
        first = decoder.prefill(prompts)
        after_prefill = timing_event(device)
        after_prefill.record()
        first_tokens = first.tolist()
        first_at = time.perf_counter()
        events = [after_prefill]
        decoder.run_steps(steps - 1, events)
        rest = decoder.history[:, width:width + steps - 1].tolist()
        end = time.perf_counter()
        if r == 0:
            tokens = [[f, *r_][:n] for f, r_, n in zip(first_tokens, rest, lengths)]
            continue
        request_ttft = first_at - start
        since_prefill = [0.0] + [events[0].elapsed_time(e) / 1e3 for e in events[1:]]  # seconds, per step
        for n in lengths:
            ttft.append(request_ttft)
            e2e.append(request_ttft + since_prefill[n - 1])
            if n > 1:
                tpot.append(since_prefill[n - 1] / (n - 1))
        batch_e2e.append(end - start)
        itl.extend(a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:]))
    return {"batch": len(prompts), "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
            "itl_s": percentiles(itl), "e2e_s": percentiles(e2e), "batch_e2e_s": percentiles(batch_e2e),
            "output_lens": lengths, "output_tokens_per_s": sum(lengths) / statistics.median(batch_e2e),
            "tokens": tokens}


class Progress:
    """A rank's progress lines on stderr, and a watchdog: with `seconds` > 0, a rank that makes no progress for
    that long prints every thread's stack (where it waits) and exits, so that mpirun ends instead of hanging."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds, self.start = rank, seconds, time.perf_counter()
        self._arm()

    def _arm(self) -> None:
        if self.seconds > 0:
            faulthandler.dump_traceback_later(self.seconds, exit=True)

    def __call__(self, message: str) -> None:
        print(f"[bench rank {self.rank} +{time.perf_counter() - self.start:.0f}s] {message}", file=sys.stderr,
              flush=True)
        self._arm()

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()


def load_model(args: argparse.Namespace, comm, device: torch.device):
    """This rank's model: device-random weights of a named shape (quantized on the device), or the artifact's."""
    if args.device_random:
        from pipeline.random_weights import random_rank_model

        model, config, _ = random_rank_model(args.device_random, comm, device, args.dtype, args.quant)
        return model, config
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config

    config = read_checkpoint_config(args.artifact)
    return load_rank_model(args.artifact, config, comm, device), config


class VariantRunner:
    """Sets up, warms up and measures one decode path at a batch size on every rank."""

    def __init__(self, model, mpi_comm, args: argparse.Namespace, max_len: int, progress: Progress):
        self.model, self.mpi_comm, self.args, self.max_len, self.progress = model, mpi_comm, args, max_len, progress

    def run(self, options, prompts: list[list[int]], lengths: list[int] | None = None) -> dict:
        """The measurement, or {"error": ...} if any rank could not set the path up. Every rank learns of a
        failure on any rank before the next collective: a rank that went on alone would wait for the others
        forever."""
        from pipeline.backends.cuda_decode import CudaDecoder, set_triton_gemv
        from pipeline.dist import all_ok

        batch, progress = len(prompts), self.progress
        tag = options.label if batch == 1 else f"batch {batch} {options.label}"
        set_triton_gemv(self.model, options.triton_gemv)
        decoder, problem = None, None
        try:
            t0 = time.perf_counter()
            # compilation (torch.compile, Triton), tuning and graph capture: tens of seconds of one opaque call
            with stage(f"{tag}: compiling, tuning and capturing the decode step", log=progress):
                decoder = CudaDecoder(self.model, batch, self.max_len, options)
                decoder.warm_up()
            setup_s = time.perf_counter() - t0
            progress(f"{tag}: decode step: {decoder.path}")
        except Exception as exc:  # a variant that cannot run here (compile or capture failure) is reported
            problem = f"{type(exc).__name__}: {exc}"[:500]
        failed = all_ok(self.mpi_comm, problem)
        if failed:
            error = "; ".join(f"rank {r}: {p}" for r, p in failed)
            progress(f"{tag}: failed: {error[:300]}")
            decoder = None
            torch.cuda.empty_cache()
            return {"error": error}
        try:
            m = measure(decoder, prompts, lengths or self.args.output_len, self.args.repeats, desc=tag)
            m.update(variant=options.label, step=decoder.path, setup_s=setup_s)
            # which config tuning (or autotuning) chose per GEMM shape: the fused step's GEMVs, the batched GEMMs
            from pipeline.kernels import gemv, int4_gemm, tuning

            m["kernel_configs"] = {**gemv.autotuned_configs(), **int4_gemm.autotuned_configs(),
                                   **tuning.chosen_configs()}
            progress(f"{tag}: {m['output_tokens_per_s']:.1f} tok/s")
        finally:
            decoder = None
            torch.cuda.empty_cache()
        return m


def measure_batch1(runner: VariantRunner, result: dict, vocab: int):
    """Every asked variant at batch 1 into result["variants"]; returns the fastest one's DecodeOptions."""
    from pipeline.backends.cuda_decode import DecodeOptions

    args = runner.args
    labels = ALL_VARIANTS if args.variants == "all" else args.variants.split(",")
    prompts = make_prompts(1, args.input_len, vocab, seed=1)
    best = None
    for options in map(DecodeOptions.from_label, labels):
        m = runner.run(options, prompts)
        result["variants"][options.label] = m
        if "error" in m:
            continue
        m["percent_of_roofline"] = 100 * m["output_tokens_per_s"] / result["roofline_tokens_per_s_batch1"]
        if best is None or m["output_tokens_per_s"] > result["variants"][best.label]["output_tokens_per_s"]:
            best = options
    ran = [k for k, v in result["variants"].items() if "tokens" in v]
    reference_tokens = result["variants"][ran[0]]["tokens"] if ran else None
    result["variants_agree_on_tokens"] = all(result["variants"][k]["tokens"] == reference_tokens for k in ran)
    if best is None:
        raise PipelineError(f"no decode variant ran: {result['variants']}")
    result["best_variant"] = best.label
    return best


def measure_batches(runner: VariantRunner, result: dict, vocab: int, best) -> None:
    """Every batch size into result["batches"], each with the variants asked (--batched-variants), else the fastest
    compiled variant of batch 1 (the fused step runs batch 1 only)."""
    from pipeline.backends.cuda_decode import DecodeOptions

    args = runner.args
    ran = [k for k, v in result["variants"].items() if "tokens" in v]
    compiled = [o for o in map(DecodeOptions.from_label, ran) if o.compile]
    batched = max(compiled, key=lambda o: result["variants"][o.label]["output_tokens_per_s"]) if compiled else best
    batched_labels = [batched.label] if args.batched_variants == "auto" else args.batched_variants.split(",")
    result["batched_variant"] = ",".join(batched_labels)
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if batch == 1 and args.input_spread == 0.0 and args.output_spread == 0.0:  # measured already (same seed)
            result["batches"].append({k: v for k, v in result["variants"][best.label].items()
                                      if k not in ("setup_s", "percent_of_roofline")})
            continue
        prompts = make_prompts(batch, args.input_len, vocab, seed=batch, spread=args.input_spread)
        lengths = output_lengths(batch, args.output_len, seed=batch, spread=args.output_spread)
        rows = {}
        for label in batched_labels:
            m = runner.run(DecodeOptions.from_label(label), prompts, lengths)
            if "error" not in m:
                rows[label] = m
        if not rows:
            raise PipelineError(f"no decode variant ran at batch {batch}: {batched_labels}")
        fastest = max(rows.values(), key=lambda m: m["output_tokens_per_s"])
        fastest["tokens_per_s_by_variant"] = {label: m["output_tokens_per_s"] for label, m in rows.items()}
        fastest["variants_agree_on_tokens"] = all(m["tokens"] == fastest["tokens"] for m in rows.values())
        result["batches"].append(fastest)


def worker(args: argparse.Namespace) -> int:
    """One rank of the benchmark: load, measure every variant at batch 1 and the batch sizes, write the JSON."""
    from pipeline.backends.cuda_decode import DecodeOptions, accelerate
    from pipeline.dist import Comm, finish, mpi_world, pick_device
    from pipeline.mapping import Mapping

    rank, world, mpi_comm = mpi_world()
    progress = Progress(rank, args.watchdog)
    device = pick_device(mpi_comm)
    comm = Comm.create(Mapping(world, 1, rank), device, mpi_comm)
    torch.manual_seed(0)
    started = time.perf_counter()
    model, config = load_model(args, comm, device)
    load_s = time.perf_counter() - started
    progress(f"model ready on {device} in {load_s:.1f} s")
    accelerate(model, DecodeOptions())
    bandwidth = copy_bandwidth(device)
    read_bytes = weight_bytes(model)
    # room for the longest prompt (a drawn one is shorter than twice input_len) and the longest drawn output
    max_len = args.input_len * 2 + math.ceil(args.output_len * (1 + args.output_spread))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"  # CPU: tests, tiny shapes
    result = {"rank": rank, "world_size": world, "device": name,
              "load_s": load_s, "copy_bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_rank": read_bytes,
              "roofline_tokens_per_s_batch1": bandwidth / read_bytes, "variants": {}, "batches": []}
    runner = VariantRunner(model, mpi_comm, args, max_len, progress)
    best = measure_batch1(runner, result, config["vocab_size"])
    measure_batches(runner, result, config["vocab_size"], best)
    if rank == 0:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    progress("done; closing the process group")  # the watchdog stays armed through the teardown
    code = finish(comm, 0)  # the results are written: a stuck NCCL teardown must not hold mpirun
    progress.stop()
    return code


# ------------------------------------------------------------------------------------------------ baseline

# A baseline is repeated until its slowest run is within this factor of its fastest (or MAX_BASELINE_RUNS ran);
# a ratio against one that never settles is not printed.
STABLE_SPREAD = 1.1
MAX_BASELINE_RUNS = 8


def repeat_until_stable(run_s: Callable[[], float], min_runs: int = 2, max_runs: int = MAX_BASELINE_RUNS,
                        max_spread: float = STABLE_SPREAD) -> dict:
    """Call `run_s` (one timed run, seconds) at least `min_runs` times and until the fastest `min_runs` of the runs
    so far agree within `max_spread`; {"runs_s", "best_s" (median of those), "spread", "stable"}."""
    times: list[float] = []
    while True:
        times.append(run_s())
        fastest = sorted(times)[:max(min_runs, 2)]
        spread = fastest[-1] / fastest[0] if len(times) >= 2 else math.inf
        if (len(times) >= min_runs and spread <= max_spread) or len(times) >= max(max_runs, min_runs):
            return {"runs_s": times, "best_s": statistics.median(fastest), "spread": spread,
                    "stable": spread <= max_spread}


def ratio_text(value: float, baseline: dict) -> str:
    """`value / baseline` as "N.NNx", or why there is none (an unstable baseline)."""
    if not baseline.get("stable", True):
        return (f"baseline unstable: runs {', '.join(f'{t:.2f}' for t in baseline['runs_s'])} s, spread "
                f"{baseline['spread']:.2f}x > {STABLE_SPREAD}; no ratio")
    return f"{value:.2f}x"


def transformers_baseline(shape: str | None, source: Path | None, batch_sizes: list[int], input_len: int,
                          output_len: int, repeats: int = 2, input_spread: float = 0.0,
                          output_spread: float = 0.0) -> dict:
    """transformers' generate on one GPU, bfloat16, greedy, EOS ignored: dynamic cache, and static for B >= 8.
    The same requests as the worker's batches: with spreads, the same drawn prompt lengths (left-padded) and
    output lengths, the batch generating the longest and its tokens/s counting each request's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.backends.cuda_decode import synchronize
    from pipeline.generate import left_pad
    from pipeline.shapes import SHAPES

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    with torch.device(device):
        if shape is not None:
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPES[shape]), dtype=torch.bfloat16)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    model.eval()
    vocab = model.config.vocab_size
    out = {}
    for batch in batch_sizes:
        ids, mask = left_pad(make_prompts(batch, input_len, vocab, seed=batch, spread=input_spread), 0, device)
        lengths = output_lengths(batch, output_len, seed=batch, spread=output_spread)
        longest = max(lengths)
        for cache in ("dynamic", "static") if batch >= 8 else ("dynamic",):
            kwargs = {"do_sample": False, "attention_mask": mask.long(), "pad_token_id": 0, "eos_token_id": None}
            if cache == "static":
                kwargs["cache_implementation"] = "static"
            with torch.no_grad():
                # the warm-up runs the whole length: transformers compiles a static cache's forward on first use, and
                # a short warm-up left the dynamic cache's first timed run three times slower
                with stage(f"transformers baseline, batch {batch}, {cache} cache: warm-up"):
                    model.generate(ids, max_new_tokens=longest, min_new_tokens=longest, **kwargs)

                def run_s(model=model) -> float:
                    synchronize(device)
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=longest, min_new_tokens=longest, **kwargs)
                    synchronize(device)
                    return time.perf_counter() - start

                timing = repeat_until_stable(run_s, min_runs=repeats)
            out[f"{batch}/{cache}"] = {"batch": batch, "cache": cache, "e2e_s": timing["best_s"],
                                       "runs_s": timing["runs_s"], "spread": timing["spread"],
                                       "stable": timing["stable"],
                                       "output_tokens_per_s": sum(lengths) / timing["best_s"]}
    del model
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ driver


def summarize(result: dict, baseline: dict | None) -> str:
    lines = [f"{result['device']}: copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s, "
             f"{result['weight_bytes_per_rank'] / 1e9:.3f} GB of weights per rank -> batch-1 roofline "
             f"{result['roofline_tokens_per_s_batch1']:.0f} tok/s ({result['world_size']} rank(s))",
             "", "| decode path (batch 1) | tok/s | % of roofline | ITL p50 (ms) | setup (s) | step |",
             "|---|---|---|---|---|---|"]
    for label, v in result["variants"].items():
        if "error" in v:
            lines.append(f"| {label} | failed: {v['error'][:80]} | | | | |")
        else:
            lines.append(f"| {label} | {v['output_tokens_per_s']:.1f} | {v['percent_of_roofline']:.1f}% | "
                         f"{v['itl_s']['p50'] * 1e3:.3f} | {v['setup_s']:.1f} | {v.get('step', '')} |")
    lines += ["", f"best: {result['best_variant']}; variants agree on greedy tokens: "
                  f"{result['variants_agree_on_tokens']}; batches > 1 run {result.get('batched_variant')}"]
    for m in result["batches"]:
        if len(m.get("tokens_per_s_by_variant", {})) > 1:
            lines.append(f"batch {m['batch']}: " + ", ".join(
                f"{label} {v:.1f} tok/s" for label, v in m["tokens_per_s_by_variant"].items())
                + f"; same greedy tokens: {m['variants_agree_on_tokens']}")
    lines += ["",
              "| batch | tok/s | TTFT p50 (ms) | TPOT p50 (ms) | ITL p50/p90/p99 (ms) | E2E p50 (s) | transformers tok/s "
              "(dynamic / static) | ratio vs best transformers |", "|---|---|---|---|---|---|---|---|"]
    for m in result["batches"]:
        b = m["batch"]
        base = {c: baseline.get(f"{b}/{c}", {}).get("output_tokens_per_s") for c in ("dynamic", "static")} \
            if baseline else {}
        best_cache = max((c for c, v in base.items() if v), key=lambda c: base[c], default=None)
        base_text = " / ".join(f"{v:.1f}" if v else "-" for v in (base.get("dynamic"), base.get("static")))
        ratio = ratio_text(m["output_tokens_per_s"] / base[best_cache], baseline[f"{b}/{best_cache}"]) \
            if best_cache else "-"  # 1.98 is not 2.0
        itl = m["itl_s"]
        lines.append(f"| {b} | {m['output_tokens_per_s']:.1f} | {m['ttft_s']['p50'] * 1e3:.2f} | "
                     f"{m['tpot_s']['p50'] * 1e3:.3f} | {itl['p50'] * 1e3:.3f} / {itl['p90'] * 1e3:.3f} / "
                     f"{itl['p99'] * 1e3:.3f} | {m['e2e_s']['p50']:.3f} | {base_text} | {ratio} |")
    settings = result.get("settings", {})
    drawn = [f"{what} lengths drawn within +-{100 * settings[key]:.0f}% of {settings[length]}"
             for what, key, length in (("prompt", "input_spread", "input_len"), ("output", "output_spread", "output_len"))
             if settings.get(key)]
    if drawn:
        lines += ["", "; ".join(drawn) + " (seeded per batch size; tok/s counts each request's own output tokens, "
                  "E2E ends at a request's own last token)"]
    return "\n".join(lines)


def plot(result: dict, baseline: dict | None, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    batches = [m["batch"] for m in result["batches"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(batches, [m["output_tokens_per_s"] for m in result["batches"]], "o-", label="pipeline (torch backend)")
    if baseline:
        for cache in ("dynamic", "static"):
            pts = [(b, baseline[f"{b}/{cache}"]["output_tokens_per_s"]) for b in batches if f"{b}/{cache}" in baseline]
            if pts:
                ax1.plot(*zip(*pts), "s--", label=f"transformers ({cache} cache)")
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="output tokens/s", title="throughput")
    ax1.legend()
    ax2.plot(batches, [m["itl_s"]["p50"] * 1e3 for m in result["batches"]], "o-", label="ITL p50")
    ax2.plot(batches, [m["ttft_s"]["p50"] * 1e3 for m in result["batches"]], "^-", label="TTFT p50")
    ax2.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms", title="latency")
    ax2.legend()
    fig.suptitle(f"{result.get('recipe', '')} on {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def bench_command(recipe, args: argparse.Namespace) -> int:
    from pipeline.backends.cuda_decode import DecodeOptions
    from pipeline.dist import mpirun_command, mpirun_env

    batch_sizes = args.batch_sizes or DEFAULT_BATCH_SIZES
    input_len, output_len = args.input_len or 128, args.output_len or 128
    for flag, labels, default in (("--variants", args.variants, "all"),
                                  ("--batched-variants", args.batched_variants, "auto")):
        for label in labels.split(",") if labels != default else []:
            try:
                DecodeOptions.from_label(label)
            except ValueError as exc:  # before any rank starts: a bad label is the user's to fix
                raise PipelineError(f"{flag}: {exc}") from None
    for flag, spread in (("--input-spread", args.input_spread), ("--output-spread", args.output_spread)):
        if not 0.0 <= spread < 1.0:
            raise PipelineError(f"{flag} {spread}: give a fraction in [0, 1) (0.25: lengths within +-25%)")
    if recipe.parallel.pp != 1:
        raise PipelineError("bench measures the CUDA decode path, which runs pp = 1; set parallel.pp=1")
    artifact = None
    worker_args = []
    if args.device_random:
        if not recipe.model.random:
            raise PipelineError("--device-random needs a recipe with model.random (a named shape)")
        from pipeline.quantize.registry import weight_formats

        q = recipe.precision.quantization.quant
        runnable = [f.name for f in weight_formats() if f.quant_algo is None or f.device_quantizer is not None]
        runnable.sort(key=lambda name: name != "none")
        if q not in runnable:
            raise PipelineError(f"--device-random benchmarks {' or '.join(runnable)}, not {q}")
        dtype = recipe.precision.dtype if recipe.precision.dtype != "auto" else "bfloat16"
        worker_args = ["--device-random", recipe.model.random, "--dtype", dtype, "--quant", q]
    else:
        from pipeline.build import Builder
        from pipeline.storage import Hold

        # no build record: a benchmark's overrides must not replace the user's build of this recipe
        artifact = Builder(recipe, show_progress=False).run(gate=False, record=False).artifact
        atexit.register(Hold(artifact).release)  # kept from gc while the benchmark runs on it
        worker_args = ["--artifact", str(artifact)]
    out_dir = Path(args.out) if args.out else (artifact.parent if artifact else Path("bench/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{recipe.name}-tp{recipe.parallel.tp}"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "worker.json"
        cmd = mpirun_command(recipe.world_size, ["-m", "pipeline.bench", *worker_args, "--batch-sizes", batch_sizes,
                                                 "--input-len", str(input_len), "--output-len", str(output_len),
                                                 "--repeats", str(args.repeats), "--variants", args.variants,
                                                 "--batched-variants", args.batched_variants,
                                                 "--input-spread", str(args.input_spread),
                                                 "--output-spread", str(args.output_spread), "--json", str(raw),
                                                 "--watchdog", str(args.watchdog)])
        print("$ " + " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, env=mpirun_env())
        if proc.returncode != 0:
            raise PipelineError(f"the benchmark ranks failed (exit {proc.returncode})")
        result = json.loads(raw.read_text())
    baseline = None
    if not args.no_baseline:
        baseline = transformers_baseline(recipe.model.random if args.device_random else None,
                                         None if args.device_random else _source_of(recipe),
                                         [m["batch"] for m in result["batches"]], input_len, output_len,
                                         input_spread=args.input_spread, output_spread=args.output_spread)
    result.update(recipe=recipe.name, recipe_resolved=recipe.to_dict(), baseline_transformers=baseline,
                  settings={"batch_sizes": batch_sizes, "input_len": input_len, "output_len": output_len,
                            "repeats": args.repeats, "input_spread": args.input_spread,
                            "output_spread": args.output_spread,
                            "weights": "device-random" if args.device_random else str(artifact)},
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__)
    text = summarize(result, baseline)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(f"# bench {recipe.name} (tp={recipe.parallel.tp})\n\n{text}\n")
    plotted = plot(result, baseline, Path(f"{stem}.png"))
    print(text)
    print(f"results: {stem}.json{' and .png' if plotted else ''}", file=sys.stderr)
    return 0


def _source_of(recipe) -> Path:
    from pipeline.build import Builder

    return Builder(recipe, log=lambda _: None, show_progress=False).fetch()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description="benchmark worker (run under mpirun)")
    p.add_argument("--artifact", type=Path)
    p.add_argument("--device-random")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCH_SIZES)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--input-spread", type=float, default=0.0)
    p.add_argument("--output-spread", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="all")
    p.add_argument("--batched-variants", default="auto")
    p.add_argument("--json", required=True)
    p.add_argument("--watchdog", type=float, default=0.0,
                   help="seconds without progress after which a rank prints its stacks and exits (0: off)")
    args = p.parse_args(argv)
    try:
        return worker(args)
    except Exception:  # one rank's error must end every rank (the others may wait in a collective)
        from pipeline.dist import abort, mpi_world

        traceback.print_exc()
        abort(mpi_world()[2])


if __name__ == "__main__":
    sys.exit(main())
