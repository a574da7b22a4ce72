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
from pipeline.dist import Comm, Watchdog, abort, all_ok, finish, mpi_world, pick_device
from pipeline.errors import PipelineError, RunError
from pipeline.generate import generate, score
from pipeline.manifest import read_manifest
from pipeline.mapping import Mapping
from pipeline.params import Limits, ParamError, SamplingParams, request_problems, text_problems
from pipeline.recipe import RuntimeSpec
from pipeline.run_outputs import DecodingTokenizer, load_tokenizer, report_outputs, sampling_from
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
                        "through the CUDA decode path and, at batch 1, its fused step (greedy, pp=1)")
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
    """The folder to run and the resolved recipe (as dict) that goes with it."""
    if args.engine is not None:
        if not args.engine.is_dir():
            what = "a file" if args.engine.exists() else "no such folder"
            raise RunError(f"--engine {args.engine}: {what}; give the artifact folder (the `artifact:` line that "
                           f"`make build` prints), or leave --engine out to run the latest build")
        return args.engine, recipe_for(args.engine)
    record = read_build_record(args.recipe)
    return Path(record["artifact"]), record["resolved"]


RUN_FLAGS = {"max_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
             "top_p": "--top-p", "seed": "--seed"}  # how request_problems names each parameter to a runner user


def check_run_request(args: argparse.Namespace, runtime: dict, config: dict, build: dict, tokenizer,
                      chat: bool = False) -> tuple[list[str] | None, list[list[int]], SamplingParams]:
    """The prompt texts (None for token ids), the prompts' token ids (text through the chat template when `chat`)
    and sampling of this run, checked by pipeline.params against the model and the
    build's limits before any rank loads weights; raises ParamError naming each bad flag and its fix. Every rank
    computes the same answer, so every rank stops with the same error and no rank waits in a collective."""
    sampling = sampling_from(runtime, args)
    problems = sampling.problems(RUN_FLAGS)
    texts = None
    if args.prompt_ids_file:
        try:
            prompts = json.loads(args.prompt_ids_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ParamError([f"--prompt-ids-file {args.prompt_ids_file}: not a readable JSON file ({exc}); give a "
                              f"JSON list of token-id lists, e.g. [[1, 2, 3]]"]) from None
        if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
            raise ParamError([f"--prompt-ids-file {args.prompt_ids_file}: expected a JSON list of token-id lists, "
                              f"e.g. [[1, 2, 3]]"])
    elif args.prompt_ids:
        prompts = []
        for text in args.prompt_ids:
            try:
                prompts.append([int(t) for t in text.split(",")])
            except ValueError:
                raise ParamError([f"--prompt-ids {text!r}: give comma-separated whole numbers, e.g. 1,2,3"]) from None
    else:
        texts = args.prompt if args.prompt is not None else list(runtime.get("prompts", RuntimeSpec().prompts))
        text_errors = text_problems(texts, "--prompt")
        if text_errors:
            raise ParamError(problems + text_errors)
        if tokenizer is None:
            raise RunError(f"{args.engine or 'the artifact'} has no tokenizer files; give --prompt-ids 1,2,3 or set "
                           f"model.tokenizer in the recipe and rebuild")
        prompts = [encode_prompt(tokenizer, t, chat) for t in texts]
    if not prompts:
        problems.append("--prompt-ids-file holds no prompts; give at least one")
    limits = Limits.from_config(config, build)
    for i, prompt in enumerate(prompts):
        where = "" if len(prompts) == 1 else f"prompt [{i}]: "
        problems += [where + p for p in request_problems(sampling, prompt, limits, RUN_FLAGS)
                     if p not in problems]  # the flags' own problems are the same for every prompt
    if problems:
        raise ParamError(problems)
    return texts, prompts, sampling


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """A prompt's token ids: as a user's turn through the tokenizer's chat template when `chat`, else as it is."""
    if not chat:
        return tokenizer(text).input_ids
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, mpi_comm = mpi_world()
    watchdog = Watchdog.start(mpi_comm)  # from here on, a rank that stops ends the job (pipeline.dist)
    try:
        return _run(args, rank, world, mpi_comm, watchdog)
    except PipelineError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        traceback.print_exc()
        print(f"[rank {rank}] unexpected error; aborting all ranks", file=sys.stderr)
        abort(mpi_comm, 1)
        return 1
    finally:
        if watchdog is not None:  # also on ranks the engine releases with SystemExit
            watchdog.stop()


def _run(args: argparse.Namespace, rank: int, world: int, mpi_comm, watchdog: Watchdog | None = None) -> int:
    from pipeline.backends.torch_backend import read_checkpoint_config

    def phase(name: str) -> None:
        if watchdog is not None:
            watchdog.phase(name)

    artifact, resolved = resolve_artifact(args)
    runtime = resolved.get("runtime", {})
    stage = (read_manifest(artifact) or {}).get("stage")
    if stage in ("onnx", "tensorrt"):  # one exported graph: ONNX Runtime, or its TensorRT engine
        from pipeline.backends.graph_runner import run_graph

        return run_graph(args, artifact, runtime, stage, world)
    if (artifact / "rank0.engine").is_file():  # a TensorRT-LLM engine folder
        from pipeline.backends.tensorrt_llm import run_engine

        return run_engine(args, artifact, runtime, rank, world, mpi_comm)
    config = read_checkpoint_config(artifact)
    tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    if world != tp * pp:
        raise RunError(f"{artifact.name} was built for {tp * pp} rank(s) (tp={tp}, pp={pp}) but {world} "
                       f"{'was' if world == 1 else 'were'} started; run: mpirun -n {tp * pp} python -m pipeline.run")
    phase("checking the artifact")
    started = time.perf_counter()
    problems = all_ok(mpi_comm, verify_problem(artifact, rank, not args.no_verify))
    if problems:
        raise RunError("the artifact cannot run:\n" + "\n".join(f"  rank {r}: {p}" for r, p in problems))
    startup = {"verify": time.perf_counter() - started}
    static = args.logits_out is not None or args.decode == "fast"
    tokenizer = None
    if static or not (args.prompt_ids or args.prompt_ids_file):  # text prompts are checked as token ids
        started = time.perf_counter()
        tokenizer = load_tokenizer(artifact)
        startup["tokenizer"] = time.perf_counter() - started
    # else token-id prompts need it only to print the new text (below)
    chat = not static and not args.no_chat_template and tokenizer is not None \
        and bool(getattr(tokenizer, "chat_template", None))
    texts, prompts, sampling = check_run_request(args, runtime, config, resolved.get("build", {}), tokenizer, chat)
    if static:
        return _run_static(args, artifact, prompts, sampling, tokenizer, config, rank, world, mpi_comm, watchdog)
    from pipeline.engine.llm import LLM

    phase("loading weights")
    # verified above; ranks other than 0 serve, then exit. The engine holds as many sequences as there are prompts
    # (fewer CUDA graphs to capture, a smaller KV pool: a one-shot run starts sooner).
    build_max = resolved.get("build", {}).get("max_batch_size") or len(prompts)
    if tokenizer is None and rank == 0:
        # token-id prompts: printing the new text needs decoding only, without importing transformers (None where
        # the folder needs transformers' tokenizer: the engine loads that beside the weights)
        tokenizer = DecodingTokenizer.for_folder(artifact)
    llm = LLM(artifact, device=args.device, verify=False, tokenizer=tokenizer,
              max_batch_size=min(len(prompts), build_max))
    for stage_name, key in (("load", "load_s"), ("graphs", "graph_capture_s"), ("warm-up", "warm_up_s")):
        if key in llm.timings:  # graphs and warm-up: one GPU only
            startup[stage_name] = llm.timings[key]
    if rank == 0:
        print("[pipeline.run] start-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in startup.items()), file=sys.stderr,
              flush=True)
    phase("generating")
    try:
        return _run_engine(args, llm, texts if chat else None, prompts, sampling)
    finally:
        llm.shutdown()


def _run_engine(args: argparse.Namespace, llm, chat_texts: list[str] | None, prompts: list[list[int]],
                sampling: SamplingParams) -> int:
    """Rank 0 of an engine run: submit every prompt at once, stream a single prompt's text, report.
    `chat_texts`: the user's texts when the prompts went through the chat template (the reply is printed alone)."""
    tokenizer = llm.tokenizer
    chat = chat_texts is not None
    params = sampling
    start = time.perf_counter()
    if len(prompts) == 1 and tokenizer is not None:
        print(chat_texts[0] + "\n" if chat else tokenizer.decode(prompts[0], skip_special_tokens=True), end="",
              flush=True)
        for output in llm.generate_stream(prompts[0], params):
            print(output.delta_text, end="", flush=True)
        outputs, streamed = [output], True
    else:
        outputs, streamed = llm.generate(prompts, params), False
    seconds = time.perf_counter() - start
    report_outputs(args, llm.artifact, "torch", llm.world, prompts, [o.output_ids for o in outputs], tokenizer,
                   seconds, streamed=streamed, texts=[o.text for o in outputs] if chat else None)
    return 0


def _run_static(args: argparse.Namespace, artifact: Path, prompts: list[list[int]], sampling: SamplingParams, tokenizer,
                config: dict, rank: int, world: int, mpi_comm, watchdog: Watchdog | None = None) -> int:
    """One static batch without the engine: --logits-out (scoring every position) and --decode fast (the CUDA
    fused batch-1 step, until the engine's step runs it)."""
    from pipeline.backends.torch_backend import load_rank_model

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

    def done(code: int) -> int:
        if watchdog is not None:
            watchdog.settle(mpi_comm)
        return finish(comm, code)

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
            return done(0)
    fast = args.decode == "fast"
    if fast and (pp != 1 or sampling.temperature != 0):
        raise RunError("--decode fast runs greedy decoding (temperature 0) with pp=1; leave it out to run the engine")
    start = time.perf_counter()
    if fast:
        from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate

        options = DecodeOptions(cuda_graph=device.type == "cuda", compile=args.compile)
        decoder = CudaDecoder(accelerate(model, options), len(prompts),
                              max(len(p) for p in prompts) + sampling.max_tokens, options,
                              prefill_graphs=0)  # one prefill: capturing it would only add two runs
        decoder.warm_up()
        if rank == 0:
            print(f"[pipeline.run] decode: {options.label}, {decoder.path}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        outputs = decoder.generate(prompts, sampling.max_tokens, eos_id, pad_id)
    else:
        outputs = generate(model, prompts, sampling, eos_id, pad_id)
    seconds = time.perf_counter() - start
    if rank == 0:
        report_outputs(args, artifact, "torch", world, prompts, outputs, tokenizer, seconds)
    decoder = None  # its CUDA graphs hold captured NCCL work: release them before the teardown
    return done(0)


if __name__ == "__main__":
    sys.exit(main())
