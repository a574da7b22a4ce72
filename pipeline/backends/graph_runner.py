"""`python -m pipeline.run` on an exported graph: an `onnx` folder through ONNX Runtime, or a `tensorrt` folder (its
engine) on a GPU, with the PyTorch path's flags and output."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipeline.backends.onnx_runtime import OnnxDecoder
from pipeline.errors import RunError


def run_graph(args, artifact: Path, runtime: dict, stage: str, world: int) -> int:
    """`python -m pipeline.run` on an `onnx` folder (ONNX Runtime) or a `tensorrt` folder (the engine on a GPU):
    the PyTorch path's flags and output (pipeline.run.report_outputs)."""
    import json
    import time

    from pipeline.manifest import read_manifest, verify_folder
    from pipeline.recipe import RuntimeSpec
    from pipeline.run_outputs import StreamPrinter, load_tokenizer, report_outputs, sampling_from

    if world != 1:
        raise RunError(f"{artifact} is one {stage} graph for one process, but {world} ranks were started; run: "
                       f"python -m pipeline.run --engine {artifact}")
    if not args.no_verify:
        problems = verify_folder(artifact)
        if problems:
            raise RunError(f"{artifact} does not match its manifest:\n  " + "\n  ".join(problems)
                           + "\n  rebuild it (make build) or pass --no-verify to run it anyway")
    manifest = read_manifest(artifact) or {}
    start = time.perf_counter()
    if stage == "tensorrt":
        from pipeline.backends.tensorrt_engine import TrtDecoder

        decoder = TrtDecoder(artifact, manifest)
        tokenizer_dir = Path(manifest["tensorrt"]["onnx"])
        graph = (read_manifest(tokenizer_dir) or {}).get("onnx", {})
        label = f"{decoder.library} engine on {decoder.gpu}"
    else:
        graph = manifest["onnx"]
        decoder = OnnxDecoder(artifact, graph, args.device)
        tokenizer_dir = artifact
        label = f"onnxruntime {decoder.provider}"
    tokenizer = load_tokenizer(tokenizer_dir)
    if args.prompt_ids_file:
        prompts = json.loads(args.prompt_ids_file.read_text())
    elif args.prompt_ids:
        prompts = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
    else:
        if tokenizer is None:
            raise RunError(f"{tokenizer_dir} has no tokenizer files; give --prompt-ids 1,2,3 or set model.tokenizer "
                           f"in the recipe and rebuild")
        prompts = [tokenizer(t).input_ids for t in args.prompt or list(runtime.get("prompts", RuntimeSpec().prompts))]
    print(f"[pipeline.run] backend {stage}: {label}, {artifact} (loaded in {time.perf_counter() - start:.1f} s)",
          file=sys.stderr)
    sampling = sampling_from(runtime, args)
    eos_id = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None \
        else graph.get("eos_token_id")
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    if args.logits_out is not None:
        torch.save([decoder.score(p) for p in prompts], args.logits_out)
        if args.score_only:
            return 0
    printer = StreamPrinter(tokenizer, prompts[0]) if tokenizer is not None and len(prompts) == 1 else None

    def on_tokens(tokens: torch.Tensor, finished: torch.Tensor) -> None:
        if printer is not None and int(tokens[0]) != eos_id:
            printer.add(int(tokens[0]))

    start = time.perf_counter()
    outputs = decoder.generate(prompts, sampling, eos_id, pad_id, on_tokens=on_tokens)
    report_outputs(args, artifact, stage, world, prompts, outputs, tokenizer, time.perf_counter() - start,
                   streamed=printer is not None)
    return 0
