"""`mpirun -n N python -m pipeline.serve --recipe R | --engine DIR`: an OpenAI-compatible HTTP server over the engine.

Every rank constructs the engine (`LLM`); the ranks other than 0 serve rank 0's steps inside it, and rank 0 serves
HTTP (FastAPI on uvicorn) as a thin adapter: a request is parsed, checked by pipeline.params (the one validation
home) and handed to `LLM.generate_async`; its outputs go back as JSON or as server-sent events.

    POST /v1/chat/completions   messages through the tokenizer's chat template
    POST /v1/completions        text or token-id prompts (one, or a list)
    GET  /v1/models             the one model served
    GET  /health                200 while the engine steps; 503 when draining or dead
    GET  /metrics               Prometheus text

Bounds (the server never hangs):
- a full queue: more than --max-waiting requests admitted beyond the engine's batch -> 503 with Retry-After;
- a client that disconnects: its request is aborted and its KV blocks freed at the engine's next step;
- SIGTERM to rank 0 (`python -m pipeline serve` forwards its own SIGTERM there; mpirun itself would end the job at
  once): new requests get 503, in-flight ones finish (at most --drain-timeout-s), then exit 0;
- a dead engine thread: /health fails and the process exits with EXIT_ENGINE_DEAD within WATCHDOG_PERIOD_S + 1 s;
  a rank that hangs stops the engine's heartbeat: the same exit --step-timeout-s later; a rank that dies ends
  the job through mpirun (it kills every rank when one fails) or, first, through rank 0's failed collective;
  mpirun itself killed (rank 0 loses its parent): the same exit within WATCHDOG_PERIOD_S + 1 s.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.engine.scheduler import EngineError
from pipeline.errors import PipelineError
from pipeline.openai_api import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    ApiError,
    ChunkWriter,
    chat_prompt,
    check,
    completion_body,
    completion_prompts,
    param_of,
    sampling_params,
)
from pipeline.params import ParamError, SamplingParams

EXIT_ENGINE_DEAD = 3
WATCHDOG_PERIOD_S = 0.5
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.1  # how often a non-streaming request looks for its client having left


@dataclass
class ServerState:
    """What the HTTP side knows beyond the engine: admission, draining, health."""

    llm: object
    model_name: str
    max_waiting: int
    step_timeout_s: float
    launcher_pid: int | None = None  # under mpirun: the parent (Open MPI's daemon), whose loss ends the job
    pending: int = 0  # requests (choices) admitted and not finished
    draining: bool = False
    stopped: bool = False  # the HTTP side is done; the engine is being shut down on purpose
    dead_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def capacity(self) -> int:
        return self.llm.scheduler.max_batch_size + self.max_waiting

    def health_problem(self) -> str | None:
        if self.dead_reason:
            return self.dead_reason
        llm = self.llm
        if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            return "mpirun is gone (this rank's parent exited): the other ranks are lost"
        if not llm.alive:
            return f"the engine stopped: {llm.error!r}" if llm.error else "the engine thread is not running"
        stalled = time.monotonic() - llm.heartbeat_s
        if stalled > self.step_timeout_s:
            return (f"the engine made no step for {stalled:.0f} s (more than --step-timeout-s {self.step_timeout_s:g}): "
                    f"a rank hangs")
        return None


# ----------------------------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self, state: ServerState):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import GaugeMetricFamily

        self.registry = registry = CollectorRegistry()
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.requests = Counter("pipeline_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=registry)
        self.ttft = Histogram("pipeline_time_to_first_token_seconds", "arrival to first token", buckets=latency,
                              registry=registry)
        self.tpot = Histogram("pipeline_time_per_output_token_seconds", "mean time between a request's tokens after "
                              "the first", buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=registry)
        self.e2e = Histogram("pipeline_e2e_request_latency_seconds", "arrival to last token", buckets=latency,
                             registry=registry)
        self.generated = Counter("pipeline_generation_tokens", "tokens generated", registry=registry)
        self.prompt = Counter("pipeline_prompt_tokens", "prompt tokens of admitted requests", registry=registry)

        class EngineGauges:
            def collect(self):
                stats = state.llm.stats()
                for name, value, doc in (
                        ("pipeline_requests_waiting", stats["waiting"], "requests queued in the engine"),
                        ("pipeline_requests_running", stats["running"], "requests in the engine's batch"),
                        ("pipeline_requests_pending", state.pending, "requests admitted by the server, unfinished"),
                        ("pipeline_kv_blocks_used", stats["kv_blocks_used"], "KV cache blocks in use"),
                        ("pipeline_kv_blocks_total", stats["kv_blocks_total"], "KV cache blocks in the pool"),
                        ("pipeline_preemptions", stats["preemptions"], "requests preempted so far"),
                        ("pipeline_engine_steps", stats["steps"], "engine steps so far")):
                    yield GaugeMetricFamily(name, doc, value=value)

        registry.register(EngineGauges())

    def observe(self, output) -> None:
        """A finished request's latencies and token count."""
        self.generated.inc(len(output.output_ids))
        if output.ttft_s is not None:
            self.ttft.observe(output.ttft_s)
        if output.e2e_s is not None:
            self.e2e.observe(output.e2e_s)
            if output.ttft_s is not None and len(output.output_ids) > 1:
                self.tpot.observe((output.e2e_s - output.ttft_s) / (len(output.output_ids) - 1))


# ----------------------------------------------------------------------------------------------- the app


class Api:
    """The OpenAI endpoints' handlers over a started engine (rank 0): admission, one engine request per choice,
    and the answer as JSON or as server-sent events. A request keeps its place in the queue until its answer is
    delivered, not only generated."""

    def __init__(self, state: ServerState, metrics: Metrics):
        self.state, self.llm, self.metrics = state, state.llm, metrics

    def error_response(self, exc: ApiError, endpoint: str):
        from fastapi.responses import JSONResponse

        self.metrics.requests.labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def read_body(self, request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.state.model_name:
            raise ApiError(400, f"the model {model!r} does not exist; this server serves {self.state.model_name!r} "
                                f"(GET /v1/models)", "model", code="model_not_found")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ApiError(400, f"n must be a whole number of at least 1, got {n!r}", "n")
        return body

    def admit(self, count: int):
        """Admit `count` requests or refuse them; returns the function that gives their places back (once)."""
        state = self.state
        if state.draining:
            raise ApiError(503, "the server is shutting down and admits no new requests", type_="server_error",
                           code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)})
        problem = state.health_problem()
        if problem:
            raise ApiError(503, f"the engine is not serving: {problem}", type_="server_error",
                           code="engine_dead")
        with state.lock:
            if state.pending + count > state.capacity:
                raise ApiError(503, f"the queue is full ({state.pending} requests admitted, at most "
                                    f"{state.capacity} = max_batch_size {self.llm.scheduler.max_batch_size} + "
                                    f"--max-waiting {state.max_waiting}); retry later", type_="server_error",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            state.pending += count
        released = []

        def release() -> None:
            with state.lock:
                if not released:
                    released.append(True)
                    state.pending -= count

        return release

    async def run_choice(self, index: int, prompt_ids: list[int], params: SamplingParams, sink: asyncio.Queue,
                         stream: bool):
        """One choice: its outputs (or the error that ended it) go to `sink` as (index, item); without `stream`, the
        last output only."""
        last = None
        try:
            async for out in self.llm.generate_async(prompt_ids, params, stream=stream):
                last = out
                await sink.put((index, out))
        except (PipelineError, RuntimeError) as exc:
            await sink.put((index, exc))
        finally:
            if last is not None and last.finished and last.finish_reason != "abort":
                self.metrics.observe(last)

    async def start(self, request, chat: bool):
        """Parse, check and admit a request; start its choices. Returns (body, prompt lengths, tasks, sink,
        release)."""
        llm = self.llm
        body = await self.read_body(request)
        n = body.get("n", 1)
        prompts = [chat_prompt(llm, body)] if chat else completion_prompts(llm, body)
        context = llm.limits.context_len
        jobs = []
        for p, prompt_ids in enumerate(prompts):
            default = DEFAULT_COMPLETION_MAX_TOKENS if not chat else (
                max(1, context - len(prompt_ids)) if context else DEFAULT_COMPLETION_MAX_TOKENS)
            for i in range(n):
                params = sampling_params(body, default, i)
                check(params, prompt_ids, llm.limits)
                jobs.append((p * n + i, prompt_ids, params))
        release = self.admit(len(jobs))
        for _, prompt_ids, _ in jobs[::n]:
            self.metrics.prompt.inc(len(prompt_ids))
        sink: asyncio.Queue = asyncio.Queue()
        stream = bool(body.get("stream"))
        tasks = [asyncio.create_task(self.run_choice(i, ids, params, sink, stream)) for i, ids, params in jobs]
        return body, [len(p) for p in prompts], tasks, sink, release

    @staticmethod
    async def cancel(tasks) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def fail_from(exc: Exception) -> ApiError:
        """An error that ended a request in the engine: one it cannot serve (400), or the engine gone (503)."""
        if isinstance(exc, EngineError):
            return ApiError(400, str(exc))
        return ApiError(503, str(exc), type_="server_error", code="engine_dead")

    async def handle(self, request, endpoint: str, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        try:
            body, prompt_lens, tasks, sink, release = await self.start(request, chat)
        except ApiError as exc:
            return self.error_response(exc, endpoint)
        except ParamError as exc:
            return self.error_response(ApiError(400, str(exc), param_of(exc.problems[0])), endpoint)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.get("stream"):
            try:
                first = await sink.get()  # an error before the first token still gets its status code
            except BaseException:
                release()
                await self.cancel(tasks)
                raise
            if isinstance(first[1], BaseException):
                release()
                await self.cancel(tasks)
                return self.error_response(self.fail_from(first[1]), endpoint)
            self.metrics.requests.labels(endpoint, "200").inc()
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            writer = ChunkWriter(rid, created, self.state.model_name, chat, include_usage)
            events = self.stream(writer, first, tasks, sink, prompt_lens, release)
            weakref.finalize(events, release)  # a stream never started (the client left first) still gives back
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            outputs = await self.collect(tasks, sink, request)
        except ApiError as exc:
            return self.error_response(exc, endpoint)
        finally:
            release()
        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(completion_body(rid, created, self.state.model_name, chat, outputs, prompt_lens))

    async def collect(self, tasks, sink: asyncio.Queue, request) -> list:
        """The final output of every choice, in order; ApiError 499 once the client has left (checked every
        DISCONNECT_POLL_S however fast tokens come) or the error that ended a choice."""
        finals: dict[int, object] = {}
        checked = time.monotonic()
        try:
            while len(finals) < len(tasks):
                getter = asyncio.ensure_future(sink.get())
                while not getter.done():
                    await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                    if time.monotonic() - checked >= DISCONNECT_POLL_S:
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            getter.cancel()
                            raise ApiError(499, "the client disconnected")
                index, item = getter.result()
                if isinstance(item, BaseException):
                    raise self.fail_from(item)
                if item.finished:
                    finals[index] = item
        finally:
            await self.cancel(tasks)
        return [finals[i] for i in range(len(tasks))]

    async def stream(self, writer: ChunkWriter, first, tasks, sink: asyncio.Queue, prompt_lens, release):
        finals: dict[int, object] = {}
        item = first
        try:
            while True:
                index, out = item
                if isinstance(out, BaseException):
                    yield writer.event(self.fail_from(out).body())
                    break
                yield writer.chunk(index, out)
                if out.finished:
                    finals[index] = out
                    if len(finals) == len(tasks):
                        break
                item = await sink.get()
            if writer.include_usage and len(finals) == len(tasks):
                yield writer.usage_chunk(prompt_lens, [finals[i] for i in range(len(tasks))])
            yield ChunkWriter.DONE
        finally:  # also when the client went away: the requests still running are aborted
            release()
            await self.cancel(tasks)


def create_app(state: ServerState):
    """The FastAPI application over a started engine (rank 0)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse

    llm = state.llm
    api = Api(state, Metrics(state))
    app = FastAPI(title="trtllm-pipeline", docs_url=None, redoc_url=None)
    app.state.server, app.state.metrics = state, api.metrics

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.handle(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.handle(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "trtllm-pipeline",
                                            "max_model_len": llm.limits.context_len}]}

    @app.get("/health")
    async def health():
        problem = "draining: the server is shutting down" if state.draining else state.health_problem()
        if problem:
            return JSONResponse({"status": "unhealthy", "reason": problem}, status_code=503)
        return {"status": "ok", **llm.stats()}

    @app.get("/metrics")
    async def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# ----------------------------------------------------------------------------------------------- process


def watchdog(state: ServerState) -> None:
    """Exit the process (non-zero) once the engine is dead or stalled: a hung server is worse than none."""
    while True:
        time.sleep(WATCHDOG_PERIOD_S)
        problem = None if state.stopped else state.health_problem()
        if problem and not state.stopped:
            state.dead_reason = problem
            try:
                print(f"[serve] {problem}; exiting with code {EXIT_ENGINE_DEAD}", file=sys.stderr, flush=True)
            except OSError:  # stderr was a pipe to mpirun, which is gone
                pass
            time.sleep(1.0)  # /health answers 503 meanwhile
            os._exit(EXIT_ENGINE_DEAD)  # not MPI_Finalize: mpirun must see rank 0 fail and end the other ranks


def serve_http(state: ServerState, host: str, port: int, drain_timeout_s: float) -> int:
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig != signal.SIGTERM or state.draining:
                return super().handle_exit(sig, frame)
            state.draining = True
            print(f"[serve] SIGTERM: admitting no new requests, draining {state.pending} (at most "
                  f"{drain_timeout_s:g} s)", file=sys.stderr, flush=True)

            def drain() -> None:
                deadline = time.monotonic() + drain_timeout_s
                while state.pending > 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                self.should_exit = True

            threading.Thread(target=drain, name="drain", daemon=True).start()

    app = create_app(state)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    server = Server(config)
    threading.Thread(target=watchdog, args=(state,), name="watchdog", daemon=True).start()
    print(f"[serve] {state.model_name} on http://{host}:{port} (OpenAI API under /v1)", file=sys.stderr, flush=True)
    server.run()
    return 0


def serve_command(artifact: Path, world_size: int, serve_args: list[str], mpirun_args: list[str] = ()) -> list[str]:
    """The command that serves `artifact` on `world_size` ranks: the python module alone for one rank, else under
    mpirun with `mpirun_args` (e.g. --hostfile hosts --map-by ppr:8:node to spread the ranks over nodes)."""
    from pipeline.dist import mpirun_command

    module_args = ["-m", "pipeline.serve", "--engine", str(artifact), *serve_args]
    if world_size == 1:
        return [sys.executable, *module_args]
    cmd = mpirun_command(world_size, module_args)
    cmd[1:1] = list(mpirun_args)
    return cmd


def launch(artifact: Path, world_size: int, serve_args: list[str], mpirun_args: list[str] = ()) -> int:
    """Run `python -m pipeline.serve --engine ARTIFACT` on `world_size` ranks (mpirun when more than one) and
    return its exit code; SIGTERM and SIGINT given to this process go to rank 0, which drains and stops the rest."""
    import subprocess
    import tempfile

    from pipeline.dist import mpirun_env

    pid_file = Path(tempfile.mkdtemp(prefix="pipeline-serve-")) / "rank0.pid"
    cmd = serve_command(artifact, world_size, ["--pid-file", str(pid_file), *serve_args], mpirun_args)
    # mpirun in its own session: a terminal's Ctrl-C reaches it only through this process, which sends it to rank 0
    proc = subprocess.Popen(cmd, env=mpirun_env(), start_new_session=True)

    def forward(sig, frame) -> None:
        try:
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
        except (OSError, ValueError):  # rank 0 not started yet (or gone): end the whole job
            proc.terminate()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = proc.wait()
    pid_file.unlink(missing_ok=True)
    pid_file.parent.rmdir()
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="serve the latest build of this recipe")
    what.add_argument("--engine", type=Path, help="serve this artifact folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: the recipe's name)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests admitted beyond the engine's batch before new ones get 503 + Retry-After")
    p.add_argument("--step-timeout-s", type=float, default=120.0,
                   help="seconds without an engine step (a hung rank) before /health fails and the server exits")
    p.add_argument("--drain-timeout-s", type=float, default=60.0,
                   help="after SIGTERM, how long in-flight requests may take before the server exits anyway")
    p.add_argument("--pid-file", type=Path, help="write rank 0's process id here (send SIGTERM to it, not to mpirun: "
                                                 "mpirun ends the job at once on SIGTERM)")
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-num-tokens", type=int)
    p.add_argument("--tokens-per-block", type=int)
    p.add_argument("--kv-cache-max-tokens", type=int)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-verify", action="store_true", help="serve even if the artifact does not match its manifest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipeline.dist import mpi_world

    args = parse_args(argv)
    rank, _, mpi_comm = mpi_world()
    if rank != 0:  # mpirun forwards SIGTERM to every rank; only rank 0 drains, the others leave when it shuts down
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from pipeline.engine.llm import LLM

        model = args.engine if args.engine is not None else args.recipe
        options = {k: getattr(args, k) for k in ("max_batch_size", "max_num_tokens", "tokens_per_block",
                                                 "kv_cache_max_tokens") if getattr(args, k) is not None}
        llm = LLM(model, device=args.device, verify=not args.no_verify, **options)  # other ranks stay in here
    except PipelineError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        from pipeline.dist import abort

        abort(mpi_comm, exc.exit_code)
        return exc.exit_code
    if args.pid_file is not None:
        args.pid_file.write_text(str(os.getpid()))
    name = args.served_model_name or llm.recipe.get("name") or llm.artifact.name
    state = ServerState(llm, name, args.max_waiting, args.step_timeout_s,
                        launcher_pid=os.getppid() if llm.world > 1 else None)
    code = serve_http(state, args.host, args.port, args.drain_timeout_s)
    state.stopped = True
    if state.dead_reason:
        os._exit(EXIT_ENGINE_DEAD)
    llm.shutdown()  # releases the other ranks
    print("[serve] drained and stopped", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
