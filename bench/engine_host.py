"""The engine's host work per step, without a model: the real Engine, Scheduler and BlockPool (pipeline/engine/)
over a stand-in runner whose steps cost nothing and whose tokens are drawn at once, so what is timed is what rank 0
does in Python each step (schedule, output processing with detokenization, stop checks). On a GPU that work runs
while the previous step computes (the overlap scheduler); where it takes longer than a step's GPU time the engine
is host-bound (bench/results/gpu-h200/engine/README.md). Runs on any machine:

    python bench/engine_host.py [--requests 1000] [--max-batch 512] [--in 128] [--out 128] [--stream] [--profile 25]

Prints the engine's time_s split per step and, with --profile N, cProfile's top N functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.engine.blocks import BlockPool  # noqa: E402
from pipeline.engine.core import Engine  # noqa: E402
from pipeline.engine.runner import Launched  # noqa: E402
from pipeline.engine.scheduler import Scheduler, StepPlan  # noqa: E402
from pipeline.params import SamplingParams  # noqa: E402


class StandInRunner:
    """launch/collect/execute as ModelRunner has them, with tokens drawn from a seeded generator (ids 300-20,000:
    ordinary GPT-2 tokens, no EOS, so every request runs to its length)."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        self.launch_s = 0.0

    def can_launch(self, plan: StepPlan) -> bool:
        return bool(plan.work)

    def launch(self, plan: StepPlan, after: Launched | None = None) -> Launched:
        sampled = tuple(w for w in plan.work if w.sample)
        host = torch.tensor([self.rng.randrange(300, 20000) for _ in sampled], dtype=torch.long)
        return Launched(sampled, host, host, None)

    def collect(self, launched: Launched) -> dict[int, int]:
        return {w.request_id: t for w, t in zip(launched.work, launched.host.tolist())}

    def execute(self, plan: StepPlan, after: Launched | None = None) -> dict[int, int]:
        return self.collect(self.launch(plan, after))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--in", dest="input_len", type=int, default=128)
    p.add_argument("--out", dest="output_len", type=int, default=128)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--tokenizer", type=Path, default=Path("checkpoints/sources/gpt2-tokenizer"),
                   help="a tokenizer folder (python -m pipeline.offline gpt2-tokenizer); 'none' for no text")
    p.add_argument("--stream", action="store_true", help="an output per request and step (else at the end only)")
    p.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions by own time")
    args = p.parse_args()
    tokenizer = None
    if str(args.tokenizer) != "none":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    blocks = args.max_batch * -(-(args.input_len + args.output_len) // 32) + 64
    scheduler = Scheduler(BlockPool(blocks, 32), args.max_batch, args.max_num_tokens, eos_id=None)
    engine = Engine(StandInRunner(), scheduler, None, tokenizer, None, overlap=True)
    rng = random.Random(1)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.requests):
        engine.add_request([rng.randrange(300, 20000) for _ in range(args.input_len)], params, 0, args.stream)
    profiler = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    outputs = 0
    while engine.has_work:
        outputs += len(engine.step())
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - start
    steps = max(engine.steps, 1)
    print(f"{args.requests} requests {args.input_len}/{args.output_len}, max_batch {args.max_batch}: {engine.steps} "
          f"steps ({engine.step_counts}), {outputs} outputs in {seconds:.2f} s: {seconds / steps * 1e3:.2f} ms of "
          f"host work a step")
    print("per step (ms): " + ", ".join(f"{k} {v / steps * 1e3:.2f}" for k, v in engine.time_s.items()))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
