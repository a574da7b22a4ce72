"""`mpirun -n N python -m pipeline.run`: generate text with a built artifact, one rank per process.

With no arguments it runs the most recent successful build (checkpoints/latest.json) on its recipe's default
prompts. Every rank loads only its own rank file; rank 0 prints. Before any weights load, all ranks agree that:
the world size is tp * pp of the build, every rank file exists with a sound header, and (unless --no-verify)
every file's sha256 matches the artifact's manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.build import read_build_record, recipe_for
from pipeline.dist import Comm, abort, all_ok, finish, mpi_world, pick_device
from pipeline.errors import PipelineError, RunError
from pipeline.generate import Sampling, generate, score
from pipeline.manifest import read_manifest, sha256_file
from pipeline.mapping import Mapping
from pipeline.recipe import RuntimeSpec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", type=Path, help="artifact folder to run (a converted checkpoint or an engine folder); "
                                                "default: the latest build")
    p.add_argument("--recipe", help="run the latest build of this recipe")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch); default: the recipe's prompts")
    p.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids (repeatable)")
    p.add_argument("--prompt-ids-file", type=Path, help="a JSON list of token-id prompts")
    p.add_argument("--score-only", action="store_true", help="with --logits-out: score the prompts, generate nothing")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--decode", choices=("auto", "plain", "fast"), default="auto",
                   help="fast: the CUDA decode path (static cache, CUDA graph, Triton GEMV; greedy, pp=1); "
                        "auto: fast on a CUDA GPU when the run is greedy with pp=1, plain otherwise")
    p.add_argument("--compile", action="store_true", help="with the fast path: torch.compile the prefill, and the "
                   "decode step where the fused step does not run it (about a minute to start for 8B)")
    p.add_argument("--no-verify", action="store_true", help="run even if the artifact does not match its manifest")
    p.add_argument("--json", type=Path, help="also write prompts, token ids and text as JSON (rank 0)")
    p.add_argument("--logits-out", type=Path,
                   help="save the float32 logits of every prompt position (torch.save list, from the sampling rank)")
    return p.parse_args(argv)


def resolve_artifact(args: argparse.Namespace) -> tuple[Path, dict]:
    """The folder to run and the runtime settings (RuntimeSpec as dict) that go with it."""
    if args.engine is not None:
        if not args.engine.is_dir():
            raise RunError(f"--engine {args.engine}: no such folder")
        return args.engine, recipe_for(args.engine).get("runtime", {})
    record = read_build_record(args.recipe)
    return Path(record["artifact"]), record["resolved"]["runtime"]


def sampling_from(runtime: dict, args: argparse.Namespace) -> Sampling:
    spec = RuntimeSpec(**{k: v for k, v in runtime.items() if k in RuntimeSpec.__dataclass_fields__ and k != "prompts"})
    sampling = Sampling(spec.max_new_tokens, spec.temperature, spec.top_k, spec.top_p, spec.seed)
    overrides = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                 "top_p": args.top_p, "seed": args.seed}
    return replace(sampling, **{k: v for k, v in overrides.items() if v is not None})


def load_tokenizer(folder: Path):
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def verify_problem(artifact: Path, rank: int, verify: bool) -> str | None:
    """This rank's objection to running: a missing/corrupt rank file or one that differs from the manifest."""
    from pipeline.backends.torch_backend import rank_file_problem

    problem = rank_file_problem(artifact, rank)
    if problem or not verify:
        return problem
    manifest = read_manifest(artifact)
    if manifest is None or "outputs" not in manifest:
        return (f"{artifact} has no manifest.json, so it cannot be verified; rebuild it with `make build`, "
                f"or pass --no-verify to run it anyway")
    names = [f"rank{rank}.safetensors"] + (["config.json"] if rank == 0 else [])
    for name in names:
        expected = manifest["outputs"].get(name)
        if expected is None or sha256_file(artifact / name) != expected:
            return (f"{artifact / name} does not match the sha256 in its manifest (modified or corrupted after the "
                    f"build); rebuild it (make build) or pass --no-verify to run it anyway")
    return None


class StreamPrinter:
    """Prints one sequence's text as its tokens arrive (decoding the whole so far, printing what is new)."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.prompt_ids, self.new_ids, self.printed = tokenizer, prompt_ids, [], ""
        text = tokenizer.decode(prompt_ids, skip_special_tokens=True)
        print(text, end="", flush=True)
        self.prefix = text

    def add(self, token: int) -> None:
        self.new_ids.append(token)
        text = self.tokenizer.decode(self.prompt_ids + self.new_ids, skip_special_tokens=True)[len(self.prefix):]
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text


def report_outputs(args: argparse.Namespace, artifact: Path, backend: str, world: int, prompts: list[list[int]],
                   outputs: list[list[int]], tokenizer, seconds: float, streamed: bool = False) -> None:
    """Rank 0's output, the same for every backend: the texts (unless already streamed), a timing line on stderr,
    and with --json the prompts, token ids and texts."""
    if streamed:
        print(flush=True)
    else:
        for i, (prompt, new) in enumerate(zip(prompts, outputs)):
            text = tokenizer.decode(prompt + new, skip_special_tokens=True) if tokenizer else str(prompt + new)
            print(text if len(prompts) == 1 else f"--- [{i}] ---\n{text}", flush=True)
    count = sum(len(o) for o in outputs)
    print(f"[pipeline.run] {count} new tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tok/s)",
          file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "artifact": str(artifact), "backend": backend, "world_size": world,
            "results": [{"prompt_ids": p, "new_ids": o,
                         "text": tokenizer.decode(o, skip_special_tokens=True) if tokenizer else None}
                        for p, o in zip(prompts, outputs)],
        }, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, mpi_comm = mpi_world()
    try:
        return _run(args, rank, world, mpi_comm)
    except PipelineError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        print(f"[rank {rank}] unexpected error; aborting all ranks", file=sys.stderr)
        abort(mpi_comm, 1)
        return 1


def _run(args: argparse.Namespace, rank: int, world: int, mpi_comm) -> int:
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config

    artifact, runtime = resolve_artifact(args)
    stage = (read_manifest(artifact) or {}).get("stage")
    if stage in ("onnx", "tensorrt"):  # one exported graph: ONNX Runtime, or its TensorRT engine
        from pipeline.backends.onnx_runtime import run_graph

        return run_graph(args, artifact, runtime, stage, world)
    if (artifact / "rank0.engine").is_file():  # a TensorRT-LLM engine folder
        from pipeline.backends.tensorrt_llm import run_engine

        return run_engine(args, artifact, runtime, rank, world, mpi_comm)
    config = read_checkpoint_config(artifact)
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    if world != tp * pp:
        raise RunError(f"{artifact.name} was built for {tp * pp} rank(s) (tp={tp}, pp={pp}) but {world} "
                       f"{'was' if world == 1 else 'were'} started; run: mpirun -n {tp * pp} python -m pipeline.run")
    problems = all_ok(mpi_comm, verify_problem(artifact, rank, not args.no_verify))
    if problems:
        raise RunError("the artifact cannot run:\n" + "\n".join(f"  rank {r}: {p}" for r, p in problems))
    tokenizer = load_tokenizer(artifact)
    if args.prompt_ids_file:
        prompts = json.loads(args.prompt_ids_file.read_text())
    elif args.prompt_ids:
        prompts = [[int(t) for t in s.split(",")] for s in args.prompt_ids]
    else:
        texts = args.prompt or list(runtime.get("prompts", RuntimeSpec().prompts))
        if tokenizer is None:
            raise RunError(f"{artifact} has no tokenizer files; give --prompt-ids 1,2,3 or set model.tokenizer in "
                           f"the recipe and rebuild")
        prompts = [tokenizer(t).input_ids for t in texts]
    sampling = sampling_from(runtime, args)
    manifest = read_manifest(artifact) or {}
    conversion = manifest.get("conversion", {})
    eos_id = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None \
        else conversion.get("eos_token_id")
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None)
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    mapping = Mapping(tp, pp, rank)
    device = pick_device(mpi_comm, args.device)
    comm = Comm.create(mapping, device, mpi_comm)
    torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world)))
    start = time.perf_counter()
    model = load_rank_model(artifact, config, comm, device)
    load_s = time.perf_counter() - start
    if rank == 0:
        print(f"[pipeline.run] backend torch on {device.type} ({'nccl' if device.type == 'cuda' else 'gloo'}), "
              f"{world} rank(s) tp={tp} pp={pp}, {artifact} (loaded in {load_s:.1f} s)", file=sys.stderr)

    if args.logits_out is not None:
        all_logits = [score(model, p) for p in prompts]
        if rank == comm.sampler_rank:
            torch.save([t.cpu() for t in all_logits], args.logits_out)
        if args.score_only:
            return finish(comm, 0)

    stream = rank == 0 and tokenizer is not None and len(prompts) == 1
    printer = StreamPrinter(tokenizer, prompts[0]) if stream else None

    def on_first_tokens(first: int) -> None:
        if printer is not None and first != eos_id:
            printer.add(first)

    fast = args.decode == "fast" or (args.decode == "auto" and device.type == "cuda" and pp == 1
                                     and sampling.temperature == 0)
    if fast and (pp != 1 or sampling.temperature != 0):
        raise RunError("--decode fast runs greedy decoding (temperature 0) with pp=1; use --decode plain")
    start = time.perf_counter()
    if fast:
        from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate

        options = DecodeOptions(cuda_graph=device.type == "cuda", compile=args.compile)
        decoder = CudaDecoder(accelerate(model, options), len(prompts),
                              max(len(p) for p in prompts) + sampling.max_new_tokens, options,
                              prefill_graphs=0)  # one prefill: capturing it would only add two runs
        decoder.warm_up()
        if rank == 0:
            print(f"[pipeline.run] decode: {options.label}, {decoder.path}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        outputs = decoder.generate(prompts, sampling.max_new_tokens, eos_id, pad_id,
                                   on_tokens=lambda values: on_first_tokens(values[0]))
    else:
        outputs = generate(model, prompts, sampling, eos_id, pad_id,
                           on_tokens=lambda tokens, finished: on_first_tokens(int(tokens[0])))
    seconds = time.perf_counter() - start
    if rank == 0:
        report_outputs(args, artifact, "torch", world, prompts, outputs, tokenizer, seconds, streamed=printer is not None)
    decoder = None  # its CUDA graphs hold captured NCCL work: release them before the teardown
    return finish(comm, 0)


if __name__ == "__main__":
    sys.exit(main())
