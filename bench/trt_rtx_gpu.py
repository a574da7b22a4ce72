"""On a GPU: does TensorRT for RTX build and run on this GPU (Hopper: compute capability 9.0, which its
ComputeCapability list does not name), and how fast is the engine's decode against the PyTorch backend?

    PYTHONPATH=$PWD python3 bench/trt_rtx_gpu.py [--shape gpt2] [--new-tokens 64] --out DIR

Steps, each reported whatever the earlier ones gave: (1) build the recipe's `onnx` and `tensorrt` stages (the
engine for TensorRT for RTX's SM80+ targets, built ahead of time); (2) a second build of the same graph for
ComputeCapability.CURRENT (this GPU), to see whether the builder refuses it; (3) load and run each engine,
asserting greedy tokens equal the PyTorch backend's; (4) time greedy decode of both (batch 1, best of 3).
Writes DIR/trt_rtx_gpu.json and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from pipeline.backends import tensorrt_engine as trt
from pipeline.build import Builder
from pipeline.generate import generate
from pipeline.manifest import read_manifest
from pipeline.onnx_export import GRAPH_FILE, load_model
from pipeline.params import SamplingParams
from pipeline.recipe import recipe_from_dict


def attempt(report: dict, key: str, fn):
    try:
        report[key] = {"ok": True, "result": fn()}
    except Exception as exc:  # the experiment records every failure and goes on
        report[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
    print(f"[{key}] {'ok' if report[key]['ok'] else 'FAILED: ' + report[key]['error'][:2000]}", flush=True)
    return report[key].get("result")


def build_current(onnx_dir: Path, recipe, out: Path) -> dict:
    """The same graph built for ComputeCapability.CURRENT (the GPU present)."""
    module = trt._trt()
    logger = trt._Logger(module).logger
    builder = module.Builder(logger)
    network = builder.create_network(1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = module.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_dir / GRAPH_FILE))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in trt.profile_shapes(recipe, read_manifest(onnx_dir)["onnx"]).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    config.num_compute_capabilities = 1
    config.set_compute_capability(module.ComputeCapability.CURRENT, 0)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("the builder refused: " + " | ".join(logger.messages[-6:]))
    out.mkdir(parents=True, exist_ok=True)
    (out / trt.ENGINE_FILE).write_bytes(bytes(plan))
    return {"engine_bytes": len(bytes(plan)), "messages": logger.messages[-6:]}


def timed(run, repeats=3):
    best, out = float("inf"), None
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="gpt2")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    major, minor = torch.cuda.get_device_capability(0)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}",
                    "library": trt.library().__dict__, "torch": torch.__version__}
    print(json.dumps(report), flush=True)
    recipe = recipe_from_dict({"model": {"random": args.shape}, "precision": {"dtype": "float16"},
                               "build": {"backend": "tensorrt", "max_batch_size": 4, "max_input_len": 128,
                                         "max_seq_len": 256}}, name=f"{args.shape}-trt-gpu")
    result = attempt(report, "build_aot_sm80plus", lambda: Builder(recipe, log=print, show_progress=False).run(gate=False))
    if result is None:
        (args.out / "trt_rtx_gpu.json").write_text(json.dumps(report, indent=2, default=str))
        return
    onnx_dir, engine_dir, checkpoint = result.stages[2].path, result.artifact, result.stages[1].path
    current_dir = Path("/tmp/trt-current")
    attempt(report, "build_for_current_gpu", lambda: build_current(onnx_dir, recipe, current_dir))
    model = load_model(checkpoint, device="cuda")
    prompts = [torch.randint(0, model.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()]
    sampling = SamplingParams(max_tokens=args.new_tokens)
    with torch.no_grad():
        torch_s, expected = timed(lambda: generate(model, prompts, sampling, None, 0))
    report["torch"] = {"seconds": torch_s, "tok_s": args.new_tokens / torch_s}
    manifest = read_manifest(engine_dir)

    def run_engine(folder: Path) -> dict:
        decoder = trt.TrtDecoder(folder, manifest, check_target=False)
        profile = {n: [list(decoder.engine.get_tensor_profile_shape(n, 0)[i]) for i in range(3)]
                   for n in manifest["tensorrt"]["profile"]}
        assert profile == manifest["tensorrt"]["profile"], "the engine's profile differs from the recipe's"
        seconds, tokens = timed(lambda: decoder.generate(prompts, sampling, None, 0))
        return {"seconds": seconds, "tok_s": args.new_tokens / seconds, "tokens_match_torch": tokens == expected,
                "profile_matches_recipe": True}

    attempt(report, "run_aot_sm80plus", lambda: run_engine(engine_dir))
    if report["build_for_current_gpu"]["ok"]:
        (current_dir / "graph.json").write_text((engine_dir / "graph.json").read_text())
        attempt(report, "run_current_gpu", lambda: run_engine(current_dir))
    (args.out / "trt_rtx_gpu.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{report['gpu']} (compute capability {report['compute_capability']}), {report['library']}, "
          f"{args.shape} float16, batch 1, 16-token prompt, {args.new_tokens} new tokens, best of 3")
    print("| path | result | tok/s |\n|---|---|---|")
    print(f"| PyTorch backend (eager) | ran | {report['torch']['tok_s']:.1f} |")
    for key in ("build_for_current_gpu", "run_aot_sm80plus", "run_current_gpu"):
        entry = report.get(key)
        if entry is None:
            continue
        rate = entry["result"].get("tok_s") if entry["ok"] and isinstance(entry["result"], dict) else None
        state = "ok" if entry["ok"] else "refused: " + entry["error"][:160].replace("|", "/").replace("\n", " ")
        print(f"| {key} | {state} | {'' if rate is None else f'{rate:.1f}'} |")


if __name__ == "__main__":
    main()
