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
from pathlib import Path

import torch

from pipeline.build import read_build_record, recipe_for
from pipeline.dist import Comm, abort, all_ok, finish, mpi_world, pick_device
from pipeline.errors import PipelineError, RunError
from pipeline.generate import Sampling, generate, score
from pipeline.manifest import read_manifest
from pipeline.mapping import Mapping
from pipeline.recipe import RuntimeSpec
from pipeline.run_outputs import load_tokenizer, report_outputs, sampling_from
from pipeline.verify import verify_problem


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
    p.add_argument("--decode", choices=("engine", "fast"), default="engine",
                   help="engine: in-flight batching over the paged KV cache (the default); fast: one static batch "
                        "through the CUDA fused decode step (greedy, pp=1, GPU)")
    p.add_argument("--compile", action="store_true", help="with the fast path: torch.compile the prefill, and the "
                   "decode step where the fused step does not run it (about a minute to start for 8B)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send --prompt text as it is, even to a chat model (default: the tokenizer's chat template)")
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
    from pipeline.backends.torch_backend import read_checkpoint_config

    artifact, runtime = resolve_artifact(args)
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
    if args.logits_out is not None or args.decode == "fast":
        return _run_static(args, artifact, runtime, config, rank, world, mpi_comm)
    from pipeline.engine.llm import LLM

    sampling = sampling_from(runtime, args)
    llm = LLM(artifact, device=args.device, verify=False)  # verified above; ranks other than 0 serve, then exit
    try:
        return _run_engine(args, llm, runtime, sampling)
    finally:
        llm.shutdown()


def read_prompts(args: argparse.Namespace, runtime: dict, tokenizer, chat: bool) -> tuple[list[str] | None, list]:
    """(texts or None, token ids) of the prompts: --prompt-ids(-file), else --prompt or the recipe's prompts
    (through the chat template when the tokenizer has one, unless --no-chat-template)."""
    if args.prompt_ids_file:
        return None, json.loads(args.prompt_ids_file.read_text())
    if args.prompt_ids:
        return None, [[int(t) for t in s.split(",")] for s in args.prompt_ids]
    texts = args.prompt or list(runtime.get("prompts", RuntimeSpec().prompts))
    if tokenizer is None:
        raise RunError("the artifact has no tokenizer files; give --prompt-ids 1,2,3 or set model.tokenizer in "
                       "the recipe and rebuild")
    if chat:
        return texts, [list(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                          tokenize=True, return_dict=True)["input_ids"])
                       for t in texts]
    return texts, [tokenizer(t).input_ids for t in texts]


def _run_engine(args: argparse.Namespace, llm, runtime: dict, sampling: Sampling) -> int:
    """Rank 0 of an engine run: submit every prompt at once, stream a single prompt's text, report."""
    from pipeline.params import SamplingParams

    tokenizer = llm.tokenizer
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template
    texts, prompts = read_prompts(args, runtime, tokenizer, chat)
    params = SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)
    start = time.perf_counter()
    if len(prompts) == 1 and tokenizer is not None:
        print(texts[0] + "\n" if chat else tokenizer.decode(prompts[0], skip_special_tokens=True), end="", flush=True)
        for output in llm.generate_stream(prompts[0], params):
            print(output.delta_text, end="", flush=True)
        outputs, streamed = [output], True
    else:
        outputs, streamed = llm.generate(prompts, params), False
    seconds = time.perf_counter() - start
    report_outputs(args, llm.artifact, "torch", llm.world, prompts, [o.output_ids for o in outputs], tokenizer,
                   seconds, streamed=streamed, texts=[o.text for o in outputs] if chat else None)
    return 0


def _run_static(args: argparse.Namespace, artifact: Path, runtime: dict, config: dict, rank: int, world: int,
                mpi_comm) -> int:
    """One static batch without the engine: --logits-out (scoring every position) and --decode fast (the CUDA
    fused batch-1 step, until the engine's step runs it)."""
    from pipeline.backends.torch_backend import load_rank_model

    tokenizer = load_tokenizer(artifact)
    _, prompts = read_prompts(args, runtime, tokenizer, chat=False)
    sampling = sampling_from(runtime, args)
    manifest = read_manifest(artifact) or {}
    conversion = manifest.get("conversion", {})
    eos_id = tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None \
        else conversion.get("eos_token_id")
    pad_id = (tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else None)
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
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
    fast = args.decode == "fast"
    if fast and (pp != 1 or sampling.temperature != 0 or device.type != "cuda"):
        raise RunError("--decode fast runs greedy decoding (temperature 0) with pp=1 on a CUDA GPU; leave it out "
                       "to run the engine")
    start = time.perf_counter()
    if fast:
        from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate

        options = DecodeOptions(cuda_graph=True, compile=args.compile)
        decoder = CudaDecoder(accelerate(model, options), len(prompts),
                              max(len(p) for p in prompts) + sampling.max_new_tokens, options,
                              prefill_graphs=0)  # one prefill: capturing it would only add two runs
        decoder.warm_up()
        if rank == 0:
            print(f"[pipeline.run] decode: {options.label}, {decoder.path}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        outputs = decoder.generate(prompts, sampling.max_new_tokens, eos_id, pad_id)
    else:
        outputs = generate(model, prompts, sampling, eos_id, pad_id)
    seconds = time.perf_counter() - start
    if rank == 0:
        report_outputs(args, artifact, "torch", world, prompts, outputs, tokenizer, seconds)
    decoder = None  # its CUDA graphs hold captured NCCL work: release them before the teardown
    return finish(comm, 0)


if __name__ == "__main__":
    sys.exit(main())
