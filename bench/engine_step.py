"""Where an engine step's GPU time goes, on one GPU: the ModelRunner's forward pass for step plans of a given
shape, timed with CUDA events, and its kernels from torch's profiler.

    python bench/engine_step.py llama-3-8b [--batch 256] [--context 192] [--chunks 2x128]

Steps timed: a decoding step of `--batch` sequences at `--context` tokens each, replayed from its CUDA graph and
eager; a mixed step (the same decoding sequences but `--chunks` N x L prompt chunks beside them); and the
attention kernel alone for the decoding step (one layer). Device-random weights; prints Markdown.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.dist import Comm  # noqa: E402
from pipeline.engine.runner import ModelRunner, use_gpu_kernels  # noqa: E402
from pipeline.engine.scheduler import SeqWork, StepPlan  # noqa: E402
from pipeline.kernels.paged_attention import attention_tiles, paged_attention  # noqa: E402
from pipeline.mapping import Mapping  # noqa: E402
from pipeline.params import SamplingParams  # noqa: E402
from pipeline.random_weights import random_rank_model  # noqa: E402


def timed_ms(fn, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def top_kernels(fn, count: int = 12) -> list[tuple[str, float, int]]:
    """The kernels of one call of fn, by total GPU time: (name, ms, launches)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.device_time / 1e3
            totals[event.name][1] += 1
    rows = sorted(((n, t, c) for n, (t, c) in totals.items()), key=lambda r: -r[1])
    return rows[:count]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none", help="a weight format with a device quantizer (fp8)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--chunks", default="2x128", help="N x L prompt chunks in the mixed step")
    p.add_argument("--block-size", type=int, default=32)
    args = p.parse_args()
    device = torch.device("cuda", 0)
    model, config, _ = random_rank_model(args.shape, Comm(Mapping(1, 1), device), device, args.dtype, args.quant)
    use_gpu_kernels(model)  # as the engine runs it
    per_seq = -(-(args.context + 1) // args.block_size)
    n_chunks, chunk_len = (int(x) for x in args.chunks.split("x"))
    chunk_blocks = -(-chunk_len // args.block_size)
    num_blocks = args.batch * per_seq + n_chunks * chunk_blocks + 1
    runner = ModelRunner(model, num_blocks, args.block_size)
    runner.capture_graphs(args.batch, per_seq)
    params = SamplingParams()
    decode = [SeqWork(i, (7,), args.context, tuple(range(i * per_seq, (i + 1) * per_seq)), True, params, 0)
              for i in range(args.batch)]
    base = args.batch * per_seq
    chunks = [SeqWork(args.batch + j, tuple(range(3, 3 + chunk_len)), 0,
                      tuple(range(base + j * chunk_blocks, base + (j + 1) * chunk_blocks)), True, params, 0)
              for j in range(n_chunks)]
    decode_plan, mixed_plan = StepPlan(tuple(decode)), StepPlan(tuple(decode + chunks))
    graphs = runner.graphs
    print(f"# Engine step: {args.shape} {args.dtype} {args.quant} on {torch.cuda.get_device_name(device)}\n")
    print(f"decoding batch {args.batch} at context {args.context}; mixed: + {args.chunks} prompt tokens\n")
    print("| step | ms | tokens/s of the step |\n|---|---|---|")
    with torch.inference_mode():
        def eager(plan: StepPlan) -> None:
            runner.graphs = None
            try:
                runner.forward(plan)
            finally:
                runner.graphs = graphs

        rows = [("decoding, CUDA graph", lambda: runner.forward(decode_plan), args.batch),
                ("decoding, eager", lambda: eager(decode_plan), args.batch),
                ("mixed, eager", lambda: eager(mixed_plan), args.batch + n_chunks * chunk_len)]
        for name, fn, tokens in rows:
            ms = timed_ms(fn)
            print(f"| {name} | {ms:.2f} | {tokens / ms * 1e3:,.0f} |")
        # one layer's attention for the decoding step
        heads, kv_heads, hd = model.heads, model.kv_heads, model.head_size
        q = torch.randn(args.batch, heads, hd, device=device, dtype=model.dtype)
        table = torch.tensor([list(w.blocks) for w in decode], dtype=torch.int32, device=device)
        pos = torch.full((args.batch,), args.context, dtype=torch.int32, device=device)
        tiles = attention_tiles([1] * args.batch, 1).to(device)
        k, v = runner.cache.k[0], runner.cache.v[0]
        ms = timed_ms(lambda: paged_attention(q, k, v, table, pos, tiles, 1, args.block_size), 50)
        kv_bytes = 2 * args.batch * (args.context + 1) * kv_heads * hd * k.element_size()
        print(f"\nattention, one layer, decoding: {ms * 1e3:.1f} us, {kv_bytes / ms / 1e6:.0f} GB/s of keys and "
              f"values; x {len(model.layers)} layers = {ms * len(model.layers):.2f} ms")
        for name, fn in (("decoding, eager", lambda: eager(decode_plan)), ("mixed, eager", lambda: eager(mixed_plan))):
            print(f"\n## kernels of one {name} step\n\n| kernel | ms | launches |\n|---|---|---|")
            for kernel, ms, count in top_kernels(fn):
                print(f"| {kernel[:90]} | {ms:.2f} | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
