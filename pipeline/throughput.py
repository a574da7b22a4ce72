"""`python -m pipeline.throughput`: the engine's throughput and latency on a request set, as trtllm-bench and
vLLM's throughput benchmark measure them.

A request set has fixed lengths (--input-len/--output-len) or lengths drawn with a seed from ranges
(--input-range 32,1024 --output-range 16,512). Requests are sent at an infinite rate (all at once) or at Poisson
rates (--rate 4,16: requests per second). Every request ignores EOS so it produces exactly its output length.
Reported per rate: output tok/s, requests/s, TTFT, TPOT and inter-token latency p50/p90/p99, from the time the
engine made each token (each request gets its last output only, with those times, unless --stream: an output per
token, as a server's streaming clients get them). In the same run:
`--static` static batching as `pipeline.run` did it before the engine (batches of max_batch_size, every prompt
padded to the batch's longest, every request decoding until the batch's longest output is done: the padded tokens
and the extra steps are computed, only each request's own tokens count), `--static-groups` the same groups without
padding (each request leaves when done, the next group starts when all have left), and `--baseline transformers`
transformers' continuous batching (`generate_batch`) on the same requests. Writes JSON and Markdown.

    python -m pipeline.throughput --recipe gpt2-random --requests 64 --static
    mpirun -n 1 python -m pipeline.throughput --random-shape llama-3-8b --dtype bfloat16 --requests 1000 \
        --max-batch-size 256 --baseline transformers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from pipeline.bench import ratio_text, repeat_until_stable
from pipeline.bench_serve import percentiles
from pipeline.params import SamplingParams


def request_set(count: int, input_len: int, output_len: int, vocab: int, seed: int,
                input_range: tuple[int, int] | None = None, output_range: tuple[int, int] | None = None,
                ) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request, drawn with `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n_in = rng.randint(*input_range) if input_range else input_len
        n_out = rng.randint(*output_range) if output_range else output_len
        out.append(([rng.randrange(1, vocab) for _ in range(n_in)], n_out))
    return out


def padded_batch(batch: list[tuple[list[int], int]], vocab: int, seed: int) -> list[tuple[list[int], int, int]]:
    """A static batch as one padded batch computes it: (prompt left-padded to the batch's longest with random
    tokens -- random, so no two share a prefix the KV cache could reuse --, the batch's longest output, the
    request's own output length)."""
    rng = random.Random(seed)
    width, longest = max(len(p) for p, _ in batch), max(n for _, n in batch)
    return [([rng.randrange(1, vocab) for _ in range(width - len(p))] + p, longest, n) for p, n in batch]


async def _run_requests(llm, requests, rate: float, seed: int, group: int | None = None,
                        padded: bool = False, stream: bool = False) -> dict:
    """Send the requests at `rate` per second (inf: all at once; `group`: static batches of that size, `padded`
    as padded_batch computes them); time every token of each request's own output (when the engine made it: from
    each output as it comes with `stream`, else from the last output's token_times)."""
    rng = random.Random(seed)
    records = []

    async def one(prompt, n_out, own=None):
        own = n_out if own is None else own
        sent = time.perf_counter()
        times = []
        params = SamplingParams(max_tokens=n_out, ignore_eos=True)
        async for out in llm.generate_async(prompt, params, stream=stream):
            times.extend(out.token_times if out.token_times is not None else [out.made_s] * len(out.delta_ids))
        records.append({"sent": sent, "times": times[:own], "output": min(own, len(times)), "input": len(prompt)})

    start = time.perf_counter()
    if group:
        for i in range(0, len(requests), group):
            batch = requests[i:i + group]
            if padded:
                await asyncio.gather(*(one(p, n, own) for p, n, own in
                                       padded_batch(batch, llm.config["vocab_size"], seed + i)))
            else:
                await asyncio.gather(*(one(p, n) for p, n in batch))
    else:
        tasks = []
        for prompt, n_out in requests:
            tasks.append(asyncio.create_task(one(prompt, n_out)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    return summarize(records, seconds)


def _engine_run(llm, requests, rate: float, seed: int, group: int | None = None, padded: bool = False,
                stream: bool = False) -> dict:
    """One run through the engine, with where rank 0's time went during it (the engine's step accounting)."""
    before = llm.stats()
    result = asyncio.run(_run_requests(llm, requests, rate, seed, group, padded, stream))
    if padded:  # the input counted is the requests' own (the padding is computed, not asked for)
        result["input_tokens"] = sum(len(p) for p, _ in requests)
    after = llm.stats()
    result["steps"] = {k: after["step_counts"][k] - before["step_counts"][k] for k in after["step_counts"]}
    result["tokens_computed"] = after["tokens_computed"] - before["tokens_computed"]
    result["engine_time_s"] = {k: round(after["time_s"][k] - before["time_s"][k], 4) for k in after["time_s"]}
    return result


def summarize(records: list[dict], seconds: float) -> dict:
    def percentiles_s(values: list[float]) -> dict:  # the serving benchmark's nearest-rank percentiles, in seconds
        return percentiles(values, scale=1.0) if values else {}

    ttft = [r["times"][0] - r["sent"] for r in records if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in records if len(r["times"]) > 1]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    output = sum(r["output"] for r in records)
    return {"requests": len(records), "seconds": seconds, "output_tokens": output,
            "input_tokens": sum(r["input"] for r in records), "output_tok_s": output / seconds,
            "requests_s": len(records) / seconds, "ttft_s": percentiles_s(ttft), "tpot_s": percentiles_s(tpot),
            "itl_s": percentiles_s(itl)}


def transformers_generate_batch(model_source, requests, dtype: torch.dtype, device: torch.device) -> dict:
    """transformers' continuous batching (`generate_batch`, paged attention) on the same requests; wall time
    of the whole set after a warm-up."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    with torch.device(device):
        model = model_source(dtype) if callable(model_source) else \
            AutoModelForCausalLM.from_pretrained(model_source, dtype=dtype)
    model.eval()
    longest = max(n for _, n in requests)
    config = GenerationConfig(max_new_tokens=longest, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with torch.no_grad():
        model.generate_batch([p for p, _ in requests[:4]], generation_config=config)  # warm-up
        outputs = {}

        def run_s(model=model) -> float:
            start = time.perf_counter()
            outputs.update(model.generate_batch([p for p, _ in requests], generation_config=config))
            return time.perf_counter() - start

        timing = repeat_until_stable(run_s, min_runs=2, max_runs=5)
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    del model
    return {"requests": len(requests), "seconds": timing["best_s"], "runs_s": timing["runs_s"],
            "spread": timing["spread"], "stable": timing["stable"], "output_tokens": tokens,
            "output_tok_s": tokens / timing["best_s"],
            "note": f"every request generates {longest} tokens (generate_batch takes one max_new_tokens)"}


def markdown(result: dict) -> str:
    lines = [f"# Engine throughput: {result['model']} on {result['device']}", "",
             f"{result['requests']} requests, input {result['lengths']['input']}, output "
             f"{result['lengths']['output']}; max_batch_size {result['max_batch_size']}, max_num_tokens "
             f"{result['max_num_tokens']}; outputs {'streamed' if result.get('stream') else 'at the end'}", "",
             "| run | output tok/s | req/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
             "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        ms = {k: r.get(k, {}) for k in ("ttft_s", "tpot_s", "itl_s")}

        def pair(d):
            return f"{d['p50'] * 1e3:.1f} / {d['p99'] * 1e3:.1f}" if d else "-"

        lines.append(f"| {name} | {r['output_tok_s']:.1f} | {r.get('requests_s', 0):.2f} | {pair(ms['ttft_s'])} | "
                     f"{pair(ms['tpot_s'])} | {pair(ms['itl_s'])} |")
    for name, r in result["runs"].items():
        if "engine_time_s" in r:
            parts = ", ".join(f"{k} {v:.2f} s" for k, v in r["engine_time_s"].items())
            steps = ", ".join(f"{v} {k}" for k, v in r["steps"].items())
            lines.append(f"\n{name}: {r['seconds']:.2f} s; steps: {steps}; engine thread: {parts}")
    for name, ratio in result.get("ratios", {}).items():
        lines.append(f"\n{name}: {ratio}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.throughput", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", type=Path, help="a built artifact folder")
    src.add_argument("--recipe", help="the latest build of a recipe")
    src.add_argument("--random-shape", help="random weights of a named shape, made on the device (no artifact)")
    p.add_argument("--dtype", default="bfloat16", help="with --random-shape")
    p.add_argument("--quant", default="none", help="with --random-shape: a weight format with a device quantizer "
                   "(fp8), calibrated on random token ids")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--input-range", help="draw input lengths from LO,HI")
    p.add_argument("--output-range", help="draw output lengths from LO,HI")
    p.add_argument("--rate", default="inf", help="requests per second, comma-separated; inf = all at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-num-tokens", type=int)
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=float, default=0.9)
    p.add_argument("--static", action="store_true",
                   help="also static batching of the same requests (padded batches, as pipeline.run did)")
    p.add_argument("--static-groups", action="store_true",
                   help="also the same batches without padding (requests leave when done, no refill)")
    p.add_argument("--prefix-reuse", action="store_true",
                   help="keep KV prefix reuse on (off by default: the runs repeat the same prompts)")
    p.add_argument("--stream", action="store_true", help="every request streams (an output per token, as a "
                   "server's streaming clients get them); by default each gets its last output only, with every "
                   "token's time in it, as trtllm-bench and vLLM's throughput benchmark run")
    p.add_argument("--baseline", choices=("none", "transformers"), default="none")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("bench/results/throughput"), help="folder for JSON and Markdown")
    return p.parse_args(argv)


def _range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    lo, hi = (int(v) for v in text.split(","))
    return lo, hi


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.dist import Comm, mpi_world, pick_device
    from pipeline.engine.llm import LLM
    from pipeline.mapping import Mapping

    rank, world, mpi_comm = mpi_world()
    options = {k: v for k, v in {"max_batch_size": args.max_batch_size, "max_num_tokens": args.max_num_tokens,
                                 "kv_cache_free_gpu_memory_fraction": args.kv_cache_free_gpu_memory_fraction}.items()
               if v is not None}
    # Every run sends the same prompts: with prefix reuse a later run would find them cached and skip the prefill.
    options["enable_prefix_reuse"] = args.prefix_reuse
    start = time.perf_counter()
    if args.random_shape:
        from pipeline.random_weights import random_rank_model

        device = pick_device(mpi_comm, args.device)
        comm = Comm.create(Mapping(world, 1, rank), device, mpi_comm)
        model, _, _ = random_rank_model(args.random_shape, comm, device, args.dtype, args.quant)
        build = {"max_batch_size": args.max_batch_size or 256, "max_num_tokens": args.max_num_tokens or 8192}
        llm = LLM.from_rank_model(model, mpi_comm, build_spec=build, **options)
        name = f"{args.random_shape} (random, {args.dtype}{', ' + args.quant if args.quant != 'none' else ''})"
    else:
        llm = LLM(args.engine or args.recipe, device=args.device, **options)
        name = str(llm.artifact)
    load_s = time.perf_counter() - start
    vocab = llm.config["vocab_size"]
    requests = request_set(args.requests, args.input_len, args.output_len, vocab, args.seed,
                           _range(args.input_range), _range(args.output_range))
    runs = {}
    try:
        asyncio.run(_run_requests(llm, requests[:min(8, len(requests))], math.inf, args.seed))  # warm-up
        for text in args.rate.split(","):
            rate = float(text)
            runs[f"engine, rate {text}"] = _engine_run(llm, requests, rate, args.seed, stream=args.stream)
            print(f"[throughput] rate {text}: {runs[f'engine, rate {text}']['output_tok_s']:.1f} output tok/s",
                  file=sys.stderr, flush=True)
        group = llm.scheduler.max_batch_size
        if args.static:
            runs["engine, static batches"] = _engine_run(llm, requests, math.inf, args.seed, group, padded=True,
                                                         stream=args.stream)
        if args.static_groups:
            runs["engine, static groups"] = _engine_run(llm, requests, math.inf, args.seed, group,
                                                        stream=args.stream)
        stats = llm.stats()
    finally:
        llm.shutdown()
    if args.baseline == "transformers":
        runs["transformers generate_batch"] = transformers_generate_batch(_hf_source(args, llm), requests,
                                                                          llm.model_dtype, llm.device)
    best = runs[next(iter(runs))]
    ratios = {}
    for run, label in (("engine, static batches", "in-flight / static batching"),
                       ("engine, static groups", "in-flight / static groups")):
        if run in runs:
            ratios[label] = ratio_text(best["output_tok_s"] / runs[run]["output_tok_s"], runs[run])
    if "transformers generate_batch" in runs:
        base = runs["transformers generate_batch"]
        ratios["engine / transformers generate_batch"] = ratio_text(best["output_tok_s"] / base["output_tok_s"], base)
    device = torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu"
    result = {"model": name, "device": device, "world_size": world, "requests": len(requests),
              "lengths": {"input": args.input_range or args.input_len, "output": args.output_range or args.output_len},
              "max_batch_size": llm.scheduler.max_batch_size, "max_num_tokens": llm.scheduler.max_num_tokens,
              "stream": args.stream, "load_s": load_s, "kv": stats, "runs": runs, "ratios": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _hf_source(args: argparse.Namespace, llm):
    if args.random_shape:
        from transformers import AutoConfig, AutoModelForCausalLM

        from pipeline.shapes import SHAPES

        config = AutoConfig.for_model(**SHAPES[args.random_shape])
        return lambda dtype: AutoModelForCausalLM.from_config(config, dtype=dtype)
    from pipeline.build import recipe_for

    source = recipe_for(llm.artifact).get("model", {})
    return source.get("local") or llm.artifact


if __name__ == "__main__":
    sys.exit(main())
