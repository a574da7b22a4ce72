"""`LLM`: a built artifact as a long-lived engine that takes requests as they come.

    from pipeline import LLM, SamplingParams
    llm = LLM("smollm2-135m-bf16-pp2")                     # a recipe's latest build, a recipe file, or a folder
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
    llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    for out in llm.generate_stream("Once upon a time"): print(out.delta_text, end="")
    async for out in llm.generate_async("Hi"): ...

Rank 0 runs the engine loop in a background thread (scheduler -> every rank's step -> outputs); requests from any
thread or asyncio loop are queued to it. Under `mpirun -n N`, every rank constructs the LLM; the ranks other than 0
serve rank 0's steps inside the constructor and leave the process (exit 0) when rank 0 shuts the engine down.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.dist import Comm, all_ok, finish, mpi_world, pick_device
from pipeline.engine.blocks import BlockPool
from pipeline.engine.core import Engine, RequestOutput, worker_loop
from pipeline.engine.runner import ModelRunner, kv_bytes_per_token, use_gpu_kernels
from pipeline.engine.scheduler import Scheduler
from pipeline.errors import PipelineError, RunError
from pipeline.mapping import Mapping
from pipeline.params import Limits, SamplingParams, check_request, seed_of

CPU_KV_CACHE_BYTES = 2 << 30  # on a CPU the pool has no free-memory figure to follow: at most this much


@dataclass(frozen=True)
class EngineConfig:
    """How the engine sizes itself; None takes the recipe's build limits (TensorRT-LLM's names)."""

    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    tokens_per_block: int | None = None
    kv_cache_free_gpu_memory_fraction: float = 0.9  # TensorRT-LLM's KvCacheConfig default
    kv_cache_max_tokens: int | None = None
    enable_prefix_reuse: bool = True
    cuda_graphs: bool = True  # decoding steps and lone prompt chunks replay CUDA graphs (one GPU)
    overlap: bool = True  # plan and launch the next step while the GPU runs this one (one rank)


def resolve_model(model: str | Path, build: bool = False) -> tuple[Path, dict]:
    """(artifact folder, resolved recipe dict) for a recipe name, a recipe file or an artifact folder."""
    from pipeline.build import Builder, read_build_record, recipe_for
    from pipeline.recipe import load_recipe

    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RunError(f"{path}: not a built artifact (no config.json); give a recipe name or the folder "
                           f"`python -m pipeline build` printed")
        return path, recipe_for(path)
    if build:
        result = Builder(load_recipe(model), log=lambda m: print(f"[build] {m}", file=sys.stderr)).run()
        return result.artifact, result.recipe.to_dict()
    name = path.stem if path.suffix in (".yaml", ".yml") else str(model)
    try:
        record = read_build_record(name)
    except PipelineError as exc:
        raise RunError(f"{exc}; or pass build=True to build it now") from None
    return Path(record["artifact"]), record["resolved"]


class RequestHandle:
    """A submitted request: iterate it for outputs as they are made (the last one has finished=True). Given an
    asyncio event loop, its outputs go to an asyncio.Queue on that loop instead (LLM.generate_async)."""

    def __init__(self, llm: LLM, loop: asyncio.AbstractEventLoop | None = None):
        self._llm = llm
        self._loop = loop
        self._outputs: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self.id: int | None = None

    def _put(self, item) -> None:
        """Hand one output or error over (engine thread)."""
        if isinstance(item, RequestOutput) and self.id is None:
            self.id = item.request_id
        if self._loop is None:
            self._outputs.put(item)
        else:
            _hand_over(self._loop, [(self._outputs, item)])

    def __iter__(self) -> Iterator[RequestOutput]:
        while True:
            item = self._outputs.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def result(self) -> RequestOutput:
        *_, last = self
        return last

    def abort(self) -> None:
        self._llm._commands.put(("abort", self))


def _hand_over(loop: asyncio.AbstractEventLoop, items: list) -> None:
    """Put (asyncio queue, item) pairs on their loop in one wake-up of it, not one per item."""
    def put_all() -> None:
        for outputs, item in items:
            outputs.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


class LLM:
    def __init__(self, model: str | Path, *, build: bool = False, device: str = "auto", verify: bool = True,
                 engine: EngineConfig | None = None, tokenizer=None, **engine_options):
        from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
        from pipeline.run_outputs import load_tokenizer
        from pipeline.verify import verify_problem

        options = engine or EngineConfig(**engine_options)
        self.rank, self.world, mpi_comm = mpi_world()
        self.artifact, self.recipe = resolve_model(model, build)
        self.config = config = read_checkpoint_config(self.artifact)
        tp, pp = config["mapping"]["tp_size"], config["mapping"]["pp_size"]
        if self.world != tp * pp:
            raise RunError(f"{self.artifact.name} was built for {tp * pp} rank(s) (tp={tp}, pp={pp}) but "
                           f"{self.world} {'was' if self.world == 1 else 'were'} started; run it under "
                           f"mpirun -n {tp * pp}")
        problems = all_ok(mpi_comm, verify_problem(self.artifact, self.rank, verify))
        if problems:
            raise RunError("the artifact cannot run:\n" + "\n".join(f"  rank {r}: {p}" for r, p in problems))
        build_spec = self.recipe.get("build", {})
        self.limits = Limits.from_config(config, build_spec)
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        self.device = pick_device(mpi_comm, device)
        self.comm = Comm.create(Mapping(tp, pp, self.rank), self.device, mpi_comm)
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, self.world)))
        # rank 0's tokenizer: the caller's (pipeline.run needs it first for text prompts), else loaded beside the
        # weights (importing transformers takes seconds; the load is mostly file reads and copies)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer") as pool:
            job = pool.submit(load_tokenizer, self.artifact) if self.rank == 0 and tokenizer is None else None
            model_part = load_rank_model(self.artifact, config, self.comm, self.device)
            self.tokenizer = None if self.rank != 0 else job.result() if job is not None else tokenizer
        self.timings["load_s"] = time.perf_counter() - start
        from pipeline.manifest import read_manifest

        conversion = (read_manifest(self.artifact) or {}).get("conversion", {})
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id if tok is not None and tok.eos_token_id is not None \
            else conversion.get("eos_token_id")
        self._start(model_part, mpi_comm, build_spec, options)

    @classmethod
    def from_rank_model(cls, model_part, mpi_comm, tokenizer=None, build_spec: dict | None = None,
                        **engine_options) -> LLM:
        """An engine over a RankModel made in memory (benchmarks on random weights made on the GPU)."""
        self = cls.__new__(cls)
        self.rank, self.world = model_part.mapping.rank, model_part.mapping.world_size
        self.artifact, self.recipe, self.config = None, {"build": build_spec or {}}, model_part.config
        self.limits = Limits.from_config(model_part.config, build_spec)
        self.tokenizer, self.eos_id = tokenizer, None if tokenizer is None else tokenizer.eos_token_id
        self.device, self.comm, self.timings = model_part.device, model_part.comm, {}
        self._start(model_part, mpi_comm, build_spec or {}, EngineConfig(**engine_options))
        return self

    def _start(self, model_part, mpi_comm, build_spec: dict, options: EngineConfig) -> None:
        """Size the KV pool, then: rank 0 starts the engine thread; other ranks serve until shutdown and exit."""
        self.model_dtype = model_part.dtype
        tp, pp = model_part.mapping.tp, model_part.mapping.pp
        if self.device.type == "cuda":
            use_gpu_kernels(model_part)
        block_size = options.tokens_per_block or build_spec.get("plugins", {}).get("tokens_per_block", 32)
        max_batch = options.max_batch_size or build_spec.get("max_batch_size", 8)
        num_blocks = self._pool_blocks(model_part, block_size, max_batch, options)
        if mpi_comm is not None and self.world > 1:
            from mpi4py import MPI

            num_blocks = mpi_comm.allreduce(num_blocks, op=MPI.MIN)  # every rank holds the same block ids
        max_tokens = options.max_num_tokens or build_spec.get("max_num_tokens", 8192)
        self.runner = ModelRunner(model_part, num_blocks, block_size)
        if self.runner.kernel and self.world == 1 and options.cuda_graphs:
            start = time.perf_counter()
            context = self.limits.context_len or 8192
            self.runner.capture_graphs(max_batch, -(-context // block_size), max_tokens)
            self.timings["graph_capture_s"] = time.perf_counter() - start
            fused = "; batch 1 through the fused step" if self.runner.graphs.fused is not None else ""
            prompts = self.runner.prompt_graphs
            prompts = f"; of lone prompt chunks in buckets of {prompts.sizes} tokens" if prompts is not None else ""
            self._log(f"CUDA graphs of decoding steps for batches {self.runner.graphs.sizes}{fused}{prompts} "
                      f"captured in {self.timings['graph_capture_s']:.1f} s")
            num_blocks -= 1  # the last block is the graphs' scratch
            start = time.perf_counter()
            self.runner.warm_up(self.runner.graphs.scratch)
            self.timings["warm_up_s"] = time.perf_counter() - start
            self._log(f"warm-up steps (prompt and mixed) in {self.timings['warm_up_s']:.1f} s")
        attention = "paged kernel" if self.runner.kernel else "gathered keys, torch sdpa"
        self._log(f"backend torch on {self.device.type}, {self.world} rank(s) tp={tp} pp={pp}, "
                  f"{self.artifact or 'a model in memory'} (loaded in {self.timings.get('load_s', 0):.1f} s); "
                  f"max_batch_size {max_batch}; KV cache: {num_blocks} blocks of {block_size} tokens; "
                  f"attention: {attention}")
        if self.rank != 0:
            worker_loop(self.runner, mpi_comm)
            raise SystemExit(finish(self.comm, 0))
        pool = BlockPool(num_blocks, block_size, prefix_reuse=options.enable_prefix_reuse)
        self.scheduler = Scheduler(pool, max_batch, max_tokens, self.eos_id)
        self.engine = Engine(self.runner, self.scheduler, mpi_comm, self.tokenizer, self.eos_id,
                             overlap=options.overlap)
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, RequestHandle] = {}
        self.error: BaseException | None = None
        self._closed = False
        self.heartbeat_s = time.monotonic()  # the engine thread's last pass through its loop (a server's watchdog)
        gc.collect()
        gc.freeze()  # what start-up made leaves the collector's generations: shorter collections during steps
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        atexit.register(self.shutdown)

    # ------------------------------------------------------------------------------------------- set-up

    def _pool_blocks(self, model, block_size: int, max_batch: int, options: EngineConfig) -> int:
        """KV blocks for this rank: the recipe's kv_cache_max_tokens, else what a fraction of free GPU memory holds
        (on a CPU, at most CPU_KV_CACHE_BYTES); never more than max_batch full contexts need (+1: the graphs'
        scratch block), so a small model does not get tens of millions of blocks."""
        per_block = kv_bytes_per_token(model) * block_size
        if options.kv_cache_max_tokens is not None:
            return max(1, options.kv_cache_max_tokens // block_size)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            fits = int(free * options.kv_cache_free_gpu_memory_fraction) // per_block
        else:
            fits = CPU_KV_CACHE_BYTES // per_block
        useful = max_batch * -(-(self.limits.context_len or 2048) // block_size) + (self.device.type == "cuda")
        return max(1, min(fits, useful))

    def _log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[engine] {message}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------- the loop

    def _loop(self) -> None:
        """The engine thread: take commands, run steps while there is work, hand outputs to their requests."""
        try:
            while True:
                self.heartbeat_s = time.monotonic()
                block = not self.engine.has_work
                try:
                    command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
                except queue.Empty:
                    command = None
                if command is not None:
                    if command[0] == "stop":
                        break
                    self._handle_command(command)
                    continue  # take every queued command before the next step
                outputs = self.engine.step()
                start = time.perf_counter()
                by_loop: dict[asyncio.AbstractEventLoop, list] = {}
                for output in outputs:
                    handle = self._handles.get(output.request_id)
                    if handle is None:
                        continue
                    if handle._loop is None:
                        handle._put(output)
                    else:  # asyncio consumers get a step's outputs in one hand-over per event loop
                        by_loop.setdefault(handle._loop, []).append((handle._outputs, output))
                    if output.finished:
                        del self._handles[output.request_id]
                for loop, items in by_loop.items():
                    _hand_over(loop, items)
                self.engine.time_s["deliver"] += time.perf_counter() - start
        except BaseException as exc:  # the engine is dead: every waiting request learns why
            self.error = exc
            for handle in self._handles.values():
                handle._put(RunError(f"the engine stopped: {exc!r}"))
            self._drain_commands(exc)
        finally:
            self.engine.shutdown()

    def _handle_command(self, command) -> None:
        kind, handle = command[0], command[1]
        if kind == "add":
            _, handle, prompt_ids, params, seed, stream = command
            try:
                request = self.engine.add_request(prompt_ids, params, seed, stream)
            except PipelineError as exc:
                handle._put(exc)
                return
            handle.id = request.id
            self._handles[request.id] = handle
        elif kind == "abort" and handle.id in self._handles:
            output = self.engine.abort(handle.id)
            del self._handles[handle.id]
            if output is not None:
                handle._put(output)

    def _drain_commands(self, exc: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                command[1]._put(RunError(f"the engine stopped: {exc!r}"))

    # ------------------------------------------------------------------------------------------- requests

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RunError(f"{self.artifact} has no tokenizer; give token ids instead of text")
            return self.tokenizer(prompt).input_ids
        return list(prompt)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template with the assistant's turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RunError(f"{self.artifact}'s tokenizer has no chat template; send a plain prompt instead")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               handle: RequestHandle | None = None, stream: bool = True) -> RequestHandle:
        """Queue one request (any thread); checked against the build's limits first (ParamError). `stream`: an
        output per token; else only the last one (with `token_times`), which spares the engine thread an output
        per request and step."""
        if self._closed or self.error is not None:
            raise RunError(f"the engine is not running{f': {self.error!r}' if self.error else ''}")
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        check_request(params, prompt_ids, self.limits)
        seed = seed_of(params)
        handle = handle or RequestHandle(self)
        self._commands.put(("add", handle, prompt_ids, params, seed, stream))
        return handle

    def generate(self, prompts: str | list[int] | list, params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Generate for a list of prompts (text or token ids); all run together, in flight. Finished outputs in
        the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        each = params if isinstance(params, list) else [params] * len(prompts)
        handles = [self.submit(p, s, stream=False) for p, s in zip(prompts, each)]
        return [h.result() for h in handles]

    def generate_stream(self, prompt: str | list[int], params: SamplingParams | None = None
                        ) -> Iterator[RequestOutput]:
        """Outputs of one request as its tokens are made."""
        handle = self.submit(prompt, params)
        try:
            yield from handle
        finally:
            if handle.id is not None:
                handle.abort()  # a consumer that stops early frees the request's blocks

    async def generate_async(self, prompt: str | list[int], params: SamplingParams | None = None,
                             stream: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as its tokens are made (stream=False: its last output only), for asyncio;
        cancelling it aborts the request."""
        handle = self.submit(prompt, params, RequestHandle(self, asyncio.get_running_loop()), stream)
        outputs = handle._outputs
        finished = False
        try:
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                handle.abort()

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None):
        """Reply to a conversation (a list of {"role", "content"}) or to each of a list of conversations."""
        if messages and isinstance(messages[0], dict):
            return self.generate([self.apply_chat_template(messages)], params)[0]
        return self.generate([self.apply_chat_template(m) for m in messages], params)

    # ------------------------------------------------------------------------------------------- state

    def stats(self) -> dict:
        """Counts for metrics: requests running and waiting, KV blocks, steps (read without locking)."""
        pool = self.scheduler.pool
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": pool.num_blocks, "kv_blocks_used": pool.used_count,
                "kv_blocks_free": pool.free_count, "preemptions": self.scheduler.preemptions,
                "prefix_reused_tokens": pool.reused_tokens, "steps": self.engine.steps,
                "tokens_computed": self.engine.tokens_computed,
                "step_counts": dict(self.engine.step_counts),
                "time_s": {**self.engine.time_s, "launch": self.runner.launch_s}}

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the engine thread and release the other ranks (they exit)."""
        if self._closed:
            return
        self._closed = True
        self._commands.put(("stop", None))
        self._thread.join(timeout=60)
        self.runner.cache = None  # the KV pool is most of the device's memory: give it back now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        finish(self.comm, 0)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

