"""ONNX Runtime (CPU) against the PyTorch backend on the same converted checkpoint: greedy decode speed.

    PYTHONPATH=$PWD python bench/onnx_cpu.py [--shape gpt2] [--new-tokens 32] [--batch 1] [--threads 2]

Builds (or reuses) the `onnx` stage of a random-weight checkpoint in float32, checks that both produce the same
greedy tokens, and prints a Markdown row per runtime: the best of --repeats runs, new tokens per second (the
prefill included, as `python -m pipeline.run` reports it) and the decode steps alone.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from pipeline.backends.onnx_runtime import OnnxDecoder
from pipeline.build import Builder
from pipeline.generate import generate
from pipeline.manifest import read_manifest
from pipeline.onnx_export import load_model
from pipeline.params import SamplingParams
from pipeline.recipe import recipe_from_dict


def timed(run, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = recipe_from_dict({"model": {"random": args.shape}, "precision": {"dtype": "float32"},
                               "build": {"backend": "onnx"}}, name=f"bench-{args.shape}-onnx")
    result = Builder(recipe, log=print, show_progress=False).run(gate=False)
    model = load_model(result.stages[1].path)
    decoder = OnnxDecoder(result.artifact, read_manifest(result.artifact)["onnx"], "cpu", threads=args.threads)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.vocab_size, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.batch)]
    long = SamplingParams(max_tokens=args.new_tokens)
    one = SamplingParams(max_tokens=1)
    rows = []
    with torch.no_grad():
        for name, run in (("PyTorch backend (eager, float32)", lambda s: generate(model, prompts, s, None, 0)),
                          (f"ONNX Runtime {decoder.provider} (float32)", lambda s: decoder.generate(prompts, s, None, 0))):
            run(one)  # warm-up
            prefill_s, _ = timed(lambda: run(one), args.repeats)
            total_s, tokens = timed(lambda: run(long), args.repeats)
            decode_tok_s = args.batch * (args.new_tokens - 1) / max(total_s - prefill_s, 1e-9)
            rows.append((name, total_s, args.batch * args.new_tokens / total_s, decode_tok_s, tokens))
    assert rows[0][4] == rows[1][4], "ONNX Runtime and the PyTorch backend disagree on the greedy tokens"
    print(f"\nshape {args.shape}, batch {args.batch}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"best of {args.repeats}; greedy tokens identical")
    print("| runtime | total s | new tok/s | decode tok/s |\n|---|---|---|---|")
    for name, total_s, tok_s, decode_tok_s, _ in rows:
        print(f"| {name} | {total_s:.2f} | {tok_s:.1f} | {decode_tok_s:.1f} |")


if __name__ == "__main__":
    main()
