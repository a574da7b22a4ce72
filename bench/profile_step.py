"""Where a batch-1 decode step's time goes, on one GPU: GEMV bandwidth per weight shape, and a kernel profile.

    python bench/profile_step.py llama-3-8b [--quant fp8] [--variants LABEL,...] [--steps 20] [--sweep qkv,dense]

1. For each GEMM of a layer (and lm_head), the bandwidth of the GEMV over all layers' weights of that shape, in a
   CUDA graph (so the weights stream from HBM, not L2): cuBLAS, the plain Triton GEMV (pipeline::gemv), and the
   fused GEMV as the fused step calls it (residual + norm prologue, activation epilogue).
   With --sweep, every fused-GEMV config of the named GEMMs, timed the same way.
2. For each decode path: the step time (CUDA events over graph replays), the GPU kernel time per step from the
   profiler, their difference (idle gaps between kernels), and the kernels that take the most time.
3. With --prefill, the same for the prefill of one 128-token prompt (TTFT's GPU part), and each GEMM of a layer at
   128 rows through cuBLAS (torch._scaled_mm for FP8, the input's quantization included), as the prefill runs it.

Device-random weights (pipeline.random_weights.device_random_model); prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.backends.cuda_decode import (  # noqa: E402
    CudaDecoder,
    DecodeOptions,
    _layernorm_gelu,
    accelerate,
    quantize_model_fp8,
    set_triton_gemv,
)
from pipeline.bench import copy_bandwidth, weight_bytes  # noqa: E402
from pipeline.dist import Comm  # noqa: E402
from pipeline.kernels import attention, gemv, tuning  # noqa: E402
from pipeline.kernels.common import ACT_GELU, ACT_NONE, ACT_SILU_GATE, NORM_LAYER, NORM_NONE, NORM_RMS  # noqa: E402
from pipeline.mapping import Mapping  # noqa: E402
from pipeline.quantize.formats import fp8_linear  # noqa: E402
from pipeline.quantize.runtime import FP8Linear  # noqa: E402
from pipeline.random_weights import calibrate_on_device, device_random_model, make_prompts  # noqa: E402


def graph_time(fn, replays: int = 20) -> float:
    """Median seconds of one call of fn, captured in a CUDA graph (as FusedStep.tune times its candidates)."""
    return tuning.graph_seconds(fn, replays)


def gemv_table(model, bandwidth: float, batch: int = 1) -> list[str]:
    """Per GEMM shape: cuBLAS, the plain Triton GEMV and the fused GEMV (those two at batch 1 only), over `batch`
    input rows."""
    hidden = model.hidden
    x = torch.randn(batch, hidden, device=model.device).to(model.dtype)
    r = torch.randn(batch, hidden, device=model.device).to(model.dtype)
    g = torch.ones(hidden, device=model.device, dtype=model.dtype)
    rows = ["| GEMM | shape | bytes (all layers) | cuBLAS GB/s | Triton GEMV GB/s | fused GEMV GB/s | fused % of copy "
            "| Inductor max-autotune mm GB/s |", "|---|---|---|---|---|---|---|---|"]
    keys = [k for k in ("qkv", "dense", "fc_gate", "fc", "proj") if k in model.layers[0]]
    for key in keys + ["lm_head"]:
        linears = [model.head] if key == "lm_head" else [layer[key] for layer in model.layers]
        weight = linears[0].weight
        n, k = weight.shape
        fp8 = isinstance(linears[0], FP8Linear)
        total = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        inp = torch.randn(batch, k, device=model.device).to(model.dtype)
        prologue = key in ("qkv", "fc_gate", "fc", "lm_head")
        act = ACT_SILU_GATE if key == "fc_gate" else (ACT_GELU if key == "fc" and _layernorm_gelu(model) else ACT_NONE)
        norm = (NORM_LAYER if _layernorm_gelu(model) else NORM_RMS) if prologue else NORM_NONE

        def cublas():
            for lin in linears:
                if fp8:  # torch._scaled_mm (cuBLAS FP8), input quantized first
                    fp8_linear(inp, lin.weight, lin.act_scale, lin.weight_scale, None, model.dtype)
                else:
                    torch.mm(inp, lin.weight.t())

        def triton_gemv():
            if batch > 1:
                raise ValueError("the plain Triton GEMV takes one row")
            for lin in linears:
                gemv.linear_1row(inp, lin.weight, None, getattr(lin, "act_scale", None),
                                 getattr(lin, "weight_scale", None), model.dtype)

        def fused():
            if batch > 1:
                raise ValueError("the fused GEMV takes one row")
            src = x if prologue else inp
            for lin in linears:
                gemv.fused_gemv(src, r if prologue else None, g if prologue else None,
                                g if norm == NORM_LAYER else None, lin.weight, None,
                                getattr(lin, "act_scale", None), getattr(lin, "weight_scale", None), 1e-5, norm, act,
                                torch.float32 if key == "lm_head" else model.dtype)

        autotuned_mm = torch.compile(torch.mm, mode="max-autotune-no-cudagraphs", dynamic=False)

        def inductor():
            if fp8 or batch == 1:
                raise ValueError("timed for unquantized weights at batch > 1 only")
            for lin in linears:
                autotuned_mm(inp, lin.weight.t())

        speeds = []
        for fn in (cublas, triton_gemv, fused, inductor):
            try:
                speeds.append(total / graph_time(fn) / 1e9)
            except Exception as exc:  # a path that does not run here is shown, not fatal
                print(f"{key} {fn.__name__}: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
                speeds.append(float("nan"))
        rows.append(f"| {key} | {n}x{k}{' fp8' if fp8 else ''} | {total / 1e9:.3f} GB | {speeds[0]:.0f} | "
                    f"{speeds[1]:.0f} | {speeds[2]:.0f} | {100 * speeds[2] * 1e9 / bandwidth:.1f}% | {speeds[3]:.0f} |")
    return rows


def sweep_table(model, bandwidth: float, keys: list[str]) -> list[str]:
    """Every fused-GEMV config of gemv.CONFIGS (each form, tile and split-K) for each GEMM shape of `keys`,
    timed as gemv_table times the fused GEMV (over all layers' weights, in a CUDA graph), fastest first."""
    hidden = model.hidden
    x = torch.randn(hidden, device=model.device).to(model.dtype)
    r = torch.randn(hidden, device=model.device).to(model.dtype)
    g = torch.ones(hidden, device=model.device, dtype=model.dtype)
    lines = []
    for key in keys:
        linears = [model.head] if key == "lm_head" else [layer[key] for layer in model.layers]
        n, k = linears[0].weight.shape
        fp8 = isinstance(linears[0], FP8Linear)
        total = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        act = ACT_SILU_GATE if key == "fc_gate" else ACT_NONE
        rows = n // 2 if act == ACT_SILU_GATE else n
        prologue = key in ("qkv", "fc_gate", "lm_head")
        inp = x if prologue else torch.randn(k, device=model.device).to(model.dtype)
        timed = []
        for config in gemv.CONFIGS:
            c = config.kwargs
            split = c.get("SPLIT_K", 1)
            if split > 1 and (not fp8 or k % c["BLOCK_K"] or (k // c["BLOCK_K"]) % split):
                continue
            if rows // c["BLOCK_N"] * split < 32 or (k >= 2048 and c["BLOCK_N"] <= 4 and c["BLOCK_K"] == 256):
                continue

            def run(config=config):
                for lin in linears:
                    gemv.launch_fused_gemv(inp, r if prologue else None, g if prologue else None, None, lin.weight,
                                           None, getattr(lin, "act_scale", None), getattr(lin, "weight_scale", None),
                                           1e-5, NORM_RMS if prologue else NORM_NONE, act,
                                           torch.float32 if key == "lm_head" else model.dtype, config=config)

            try:
                speed = total / graph_time(run) / 1e9
            except Exception as exc:  # a config this GPU cannot run (shared memory) is listed, not fatal
                print(f"{key} {config}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
                continue
            label = ", ".join(f"{name} {value}" for name, value in c.items())
            timed.append((speed, f"{label}, warps {config.num_warps}, stages {config.num_stages}"))
        lines += [f"#### {key} {n}x{k}{' fp8' if fp8 else ''}: {total / 1e9:.3f} GB, {len(timed)} configs", "",
                  "| config | GB/s | % of copy |", "|---|---|---|"]
        lines += [f"| {label} | {speed:.0f} | {100 * speed * 1e9 / bandwidth:.1f}% |"
                  for speed, label in sorted(timed, reverse=True)[:8]]
        lines.append("")
    return lines


def attention_table(model, bandwidth: float, batch: int, max_len: int, slot: int, configs: list[tuple]) -> list[str]:
    """decode_attention over all layers' caches (batch sequences, max_len slots, the new token at `slot`, every
    slot before it valid), in a CUDA graph, for each (splits, block_s, warps, stages) of `configs` (stages None:
    Triton's default); fastest first, with the bandwidth of the cache bytes it reads."""
    kv, hd = model.kv_heads, model.head_size
    dtype, device = model.dtype, model.device
    caches = [(torch.randn(batch, kv, max_len, hd, device=device).to(dtype),
               torch.randn(batch, kv, max_len, hd, device=device).to(dtype)) for _ in model.layers]
    valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    valid[:, : slot + 1] = True
    qkv = torch.randn(batch, (model.heads + 2 * kv) * hd, device=device).to(dtype)
    positions = torch.full((batch,), slot, device=device)
    slot_t = torch.tensor(slot, device=device)
    inv_freq = None if _layernorm_gelu(model) else model.inv_freq.float().contiguous()
    read = 2 * batch * kv * slot * hd * caches[0][0].element_size() * len(caches)
    timed = []
    for splits, block_s, warps, stages in configs:
        def run(splits=splits, block_s=block_s, warps=warps, stages=stages):
            for k, v in caches:
                attention.launch_decode_attention(qkv, k, v, valid, positions, slot_t, inv_freq, model.heads, kv, hd,
                                                  False, splits, block_s, warps, stages)

        try:
            seconds = graph_time(run)
        except Exception as exc:  # a config this GPU cannot run is listed, not fatal
            print(f"attention {splits, block_s, warps, stages}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
            continue
        timed.append((seconds, f"splits {splits}, block {block_s}, warps {warps}, stages {stages}"))
    chosen = attention.attention_splits(batch, kv, max_len)
    lines = [f"#### decode attention, batch {batch}, {max_len} slots, new token at {slot}: {read / 1e6:.1f} MB of "
             f"cache over {len(caches)} layers; attention_splits gives {chosen}", "",
             "| config | us per layer | GB/s | % of copy |", "|---|---|---|---|"]
    lines += [f"| {label} | {1e6 * t / len(caches):.2f} | {read / t / 1e9:.0f} | {100 * read / t / bandwidth:.1f}% |"
              for t, label in sorted(timed)]
    return lines + [""]


def attention_configs(text: str) -> list[tuple]:
    """'SPLITS/BLOCKS/WARPS/STAGES' with comma lists in each field (stages 0: Triton's default), every combination;
    e.g. '1,2/32,64/4,8/0,2'."""
    fields = [[int(v) for v in part.split(",")] for part in text.split("/")]
    return [(s, b, w, st or None) for s in fields[0] for b in fields[1] for w in fields[2] for st in fields[3]]


def kernel_table(prof, per: int, total_s: float, top: int = 14) -> tuple[float, float, list[str]]:
    """The profiler's CUDA kernels per call (of `per` calls): busy seconds, launches, and the top rows by time."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type.name == "CUDA" and event.device_time > 0:
            name = event.name[:70]
            kernels[name][0] += event.device_time / 1e6 / per
            kernels[name][1] += 1 / per
    busy = sum(v[0] for v in kernels.values())
    launches = sum(v[1] for v in kernels.values())
    rows = ["| kernel | launches | ms | share |", "|---|---|---|---|"]
    for name, (t, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        rows.append(f"| `{name}` | {count:.0f} | {t * 1e3:.3f} | {100 * t / total_s:.1f}% |")
    return busy, launches, rows


def prefill_gemm_table(model, bandwidth: float, rows: int = 128) -> list[str]:
    """Each GEMM of a layer (all layers' weights, in a CUDA graph) at `rows` input rows as the prefill runs it:
    weight bytes over time against the copy bandwidth, and TFLOPS."""
    lines = [f"| GEMM at {rows} rows | shape | ms (all layers) | weight GB/s | % of copy | TFLOPS |",
             "|---|---|---|---|---|---|"]
    keys = [k for k in ("qkv", "dense", "fc_gate", "fc", "gate", "proj") if k in model.layers[0]]
    for key in keys:
        linears = [layer[key] for layer in model.layers]
        n, k = linears[0].weight.shape
        total = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        inp = torch.randn(rows, k, device=model.device).to(model.dtype)

        def run():
            for lin in linears:
                lin(inp)

        seconds = graph_time(run, replays=10)
        lines.append(f"| {key} | {n}x{k}{' fp8' if isinstance(linears[0], FP8Linear) else ''} | {seconds * 1e3:.3f} | "
                     f"{total / seconds / 1e9:.0f} | {100 * total / seconds / bandwidth:.1f}% | "
                     f"{2 * rows * n * k * len(linears) / seconds / 1e12:.0f} |")
    return lines


def profile_prefill(decoder, prompt_len: int = 128, repeats: int = 10) -> list[str]:
    """The prefill of one prompt (batch 1) as the bench times it, GPU events around each call, and its kernels."""
    from torch.profiler import ProfilerActivity, profile

    prompts = make_prompts(decoder.batch, prompt_len, decoder.model.vocab_size, seed=1)
    decoder.prefill(prompts)  # a prefill graph is captured at a width's first prefill
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decoder.prefill(prompts)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    prefill_s = statistics.median(times)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.prefill(prompts)
        torch.cuda.synchronize()
    busy, launches, rows = kernel_table(prof, 1, prefill_s, top=16)
    return [f"prefill of {prompt_len} tokens {prefill_s * 1e3:.3f} ms (GPU events, median of {repeats}); kernels busy "
            f"{busy * 1e3:.3f} ms over {launches:.0f} launches", ""] + rows


def profile_variant(model, options: DecodeOptions, steps: int, read_bytes: int, bandwidth: float,
                    batch: int = 1, max_len: int = 256, prefill: bool = False) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    decoder = CudaDecoder(model, batch, max_len, options)
    decoder.warm_up()
    decoder.prefill(make_prompts(batch, 128, model.vocab_size, seed=1))
    decoder.run_steps(3)
    events: list = []
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    decoder.run_steps(steps, events)
    torch.cuda.synchronize()
    step_s = statistics.median(a.elapsed_time(b) / 1e3 for a, b in zip([start] + events[:-1], events))
    decoder.prefill(make_prompts(batch, 128, model.vocab_size, seed=1))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.run_steps(steps)
        torch.cuda.synchronize()
    busy, launches, rows = kernel_table(prof, steps, step_s)
    lines = [f"### {options.label}, batch {batch} ({decoder.path})", "",
             f"step {step_s * 1e3:.3f} ms = {batch / step_s:.1f} tok/s; weights read at "
             f"{100 * read_bytes / step_s / bandwidth:.1f}% of the copy bandwidth; kernels busy {busy * 1e3:.3f} ms/step over {launches:.0f} launches; idle "
             f"{(step_s - busy) * 1e3:.3f} ms ({(step_s - busy) / max(launches, 1) * 1e6:.2f} us per launch)", ""] + rows
    if prefill:
        lines += [""] + profile_prefill(decoder)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none", choices=("none", "fp8"))
    p.add_argument("--variants", default="graph+triton-gemv+fused-mlp+fused-step",
                   help="decode paths to profile (labels; a compile variant adds about a minute of set-up)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=1, help="sequences per step (the fused step runs at batch 1 only)")
    p.add_argument("--no-gemv", action="store_true", help="skip the GEMV table (at --batch rows)")
    p.add_argument("--sweep", default="", help="GEMMs (e.g. qkv,dense,fc_gate,proj) whose every fused-GEMV config "
                   "is timed (batch 1)")
    p.add_argument("--attention", action="append", default=[], metavar="SPLITS/BLOCKS/WARPS/STAGES",
                   help="time decode_attention's configs at --batch (see attention_configs; repeatable)")
    p.add_argument("--max-len", type=int, default=256, help="the profiled decoder's cache slots (the bench: 384)")
    p.add_argument("--attention-slot", type=int, default=192, help="the new token's slot for --attention (of 384)")
    p.add_argument("--prefill", action="store_true", help="also time and profile each variant's prefill of a "
                   "128-token prompt, and each GEMM at 128 rows")
    args = p.parse_args(argv)
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    comm = Comm(Mapping(1, 1, 0), device)
    model, config, _ = device_random_model(args.shape, 1, comm, device, args.dtype)
    if args.quant == "fp8":
        quantize_model_fp8(model, calibrate_on_device(model, config["vocab_size"]))
    accelerate(model, DecodeOptions())
    bandwidth = copy_bandwidth(device)
    read_bytes = weight_bytes(model)
    print(f"## {args.shape} {args.dtype} {args.quant} on {torch.cuda.get_device_name(device)}: copy "
          f"{bandwidth / 1e12:.2f} TB/s, {read_bytes / 1e9:.3f} GB read per step, roofline "
          f"{bandwidth / read_bytes:.0f} tok/s ({read_bytes / bandwidth * 1e3:.3f} ms)\n")
    if not args.no_gemv:
        print("\n".join(gemv_table(model, bandwidth, args.batch)) + "\n", flush=True)
        for key, config in {**gemv.autotuned_configs(), **tuning.chosen_configs()}.items():
            print(f"- config for {key}: {config}")
        print(flush=True)
    for spec in args.attention:
        print("\n".join(attention_table(model, bandwidth, args.batch, 384, args.attention_slot,
                                        attention_configs(spec))), flush=True)
    if args.prefill:
        print("\n".join(prefill_gemm_table(model, bandwidth)) + "\n", flush=True)
    if args.sweep:
        print("\n".join(sweep_table(model, bandwidth, args.sweep.split(","))) + "\n", flush=True)
    for variant in filter(None, args.variants.split(",")):
        options = DecodeOptions.from_label(variant)
        set_triton_gemv(model, options.triton_gemv)
        try:
            lines = profile_variant(model, options, args.steps, read_bytes, bandwidth, args.batch, args.max_len,
                                    args.prefill)
            print("\n".join(lines) + "\n", flush=True)
        except Exception as exc:
            print(f"### {variant}: failed: {type(exc).__name__}: {exc}"[:600] + "\n", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
