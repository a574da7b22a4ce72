"""The engine loop: scheduler -> every rank's model runner -> output processing.

Rank 0 owns the scheduler and the requests. Each step it makes a StepPlan, sends it to the other ranks over MPI,
runs it on its own rank, and turns the sampled tokens into outputs (detokenized text, stop conditions, finished
requests). The other ranks run `worker_loop`: receive a plan, run it, until rank 0 sends shutdown. A plan is a
few hundred bytes, so one point-to-point message per rank and step costs microseconds.

On one rank, steps overlap the host's work with the GPU's (TensorRT-LLM's overlap scheduler): while step N runs,
step N+1 is planned without N's tokens (the scheduler counts them as in flight) and launched behind it (it reads
N's tokens on the device), and only then are N's tokens waited for and turned into outputs. The GPU does not wait
for the host between steps; a request that stops on step N's token has one token computed in vain, dropped. A step
that bans tokens (min_tokens), or one that would preempt a request, runs after N's tokens are read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.engine.runner import Launched, ModelRunner
from pipeline.engine.scheduler import Request, Scheduler, StepPlan
from pipeline.params import SamplingParams

PLAN_TAG = 7
IDLE_POLL_S = 0.001  # how often an idle worker rank looks for the next plan (busy-waiting would burn a core)


@dataclass(slots=True)
class RequestOutput:
    """A request's state after a step: everything so far, and what is new since the previous output."""

    request_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    delta_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length" or "abort"
    ttft_s: float | None = None  # arrival to first token
    e2e_s: float | None = None  # arrival to finish
    preemptions: int = 0
    made_s: float = 0.0  # time.perf_counter() when the step that made this output ended
    token_times: list[float] | None = None  # a request that does not stream: each token's made_s, in its last output


class Detokenizer:
    """A request's text, made incrementally (tokenizers' DecodeStream: constant work per token), with stop
    strings found as they appear."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.text = ""
        self.stream = None
        if tokenizer is not None and hasattr(tokenizer, "_tokenizer"):
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new text, whether a stop string ended the output)."""
        if self.tokenizer is None:
            return "", False
        if self.stream is not None:
            chunk = self.stream.step(self.tokenizer._tokenizer, token) or ""
        else:  # a slow tokenizer: decode everything again (quadratic, but only for tokenizers without Rust)
            self._ids.append(token)
            whole = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            chunk = "" if whole.endswith("\ufffd") else whole[len(self.text):]
        before = len(self.text)
        self.text += chunk
        for stop in self.stop:
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                return self.text[before:] if at > before else "", True
        return chunk, False


class Engine:
    """Rank 0's side of the engine; `step()` runs one step on every rank and returns the outputs it produced."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, mpi_comm, tokenizer, eos_id: int | None,
                 overlap: bool = True):
        self.runner, self.scheduler, self.mpi_comm = runner, scheduler, mpi_comm
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.world = mpi_comm.Get_size() if mpi_comm is not None else 1
        self.overlap = overlap and self.world == 1  # other ranks would need the tokens the plan leaves to the GPU
        self._pending: tuple[StepPlan, Launched] | None = None  # a step launched, its tokens not read yet
        self._detok: dict[int, Detokenizer] = {}
        self.steps = 0
        self.tokens_computed = 0
        # Where rank 0's time goes, summed over steps (seconds): planning, the forward pass of decoding-only and of
        # mixed steps (to the sampled tokens on the host, so GPU time included; the runner's launch_s is the host's
        # part of both), making the outputs, and the LLM handing them to their requests.
        self.time_s = {"schedule": 0.0, "decode_forward": 0.0, "mixed_forward": 0.0, "outputs": 0.0, "deliver": 0.0}
        self.step_counts = {"decode": 0, "mixed": 0, "planned_ahead": 0}  # planned_ahead: launched behind another
        self.closed = False

    def add_request(self, prompt_ids: list[int], params: SamplingParams, seed: int, stream: bool = True) -> Request:
        """Admit a request; `stream`: an output every step (else its last one only, with every token's time)."""
        request = self.scheduler.add(prompt_ids, params, seed)
        if not stream:
            request.token_times = []
        self._detok[request.id] = Detokenizer(self.tokenizer, params.stop)
        return request

    def abort(self, request_id: int) -> RequestOutput | None:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.abort(request_id)
        return self._output(request, [], "")

    def _send(self, plan: StepPlan) -> None:
        for rank in range(1, self.world):
            self.mpi_comm.send(plan, dest=rank, tag=PLAN_TAG)

    @property
    def has_work(self) -> bool:
        return self._pending is not None or self.scheduler.has_work

    def step(self) -> list[RequestOutput]:
        """Plan and run one step; returns the outputs of the steps whose tokens were read meanwhile (with overlap,
        the step launched before this one)."""
        start = time.perf_counter()
        pending = self._pending
        plan = self.scheduler.schedule(can_preempt=pending is None)
        planned = time.perf_counter()
        self.time_s["schedule"] += planned - start
        if plan is None or not plan.work:
            # nothing new to run, or a preemption that must wait for the step in flight
            return self._read_pending(planned) if pending is not None else []
        after = pending[1] if pending is not None else None
        if self.overlap and self.runner.can_launch(plan):
            self._pending = (plan, self.runner.launch(plan, after))
            self.scheduler.launched(plan)
            self._count(plan, planned)
            if pending is not None:
                self.step_counts["planned_ahead"] += 1
            return self._read(pending, time.perf_counter()) if pending is not None else []
        self._send(plan)
        sampled = self.runner.execute(plan, after)
        self._count(plan, planned)
        outputs = self._read_pending(time.perf_counter()) if pending is not None else []  # its tokens are ready
        return outputs + self._outputs(plan, sampled)

    def _count(self, plan: StepPlan, since: float) -> None:
        self.step_counts[plan.kind] += 1
        self.time_s[f"{plan.kind}_forward"] += time.perf_counter() - since
        self.steps += 1
        self.tokens_computed += plan.num_tokens

    def _read_pending(self, since: float) -> list[RequestOutput]:
        pending, self._pending = self._pending, None
        return self._read(pending, since)

    def _read(self, pending: tuple[StepPlan, Launched], since: float) -> list[RequestOutput]:
        """Wait for a launched step's tokens (the time waited counts as its kind's forward time) and make its
        outputs."""
        plan, launched = pending
        sampled = self.runner.collect(launched)
        self.time_s[f"{plan.kind}_forward"] += time.perf_counter() - since
        return self._outputs(plan, sampled)

    def _outputs(self, plan: StepPlan, sampled: dict[int, int]) -> list[RequestOutput]:
        ran = time.perf_counter()
        outputs = [self._after_token(request, ran) for request in self.scheduler.update(plan, sampled)]
        self.time_s["outputs"] += time.perf_counter() - ran
        return [o for o in outputs if o is not None]

    def _after_token(self, request: Request, made_s: float) -> RequestOutput | None:
        """The stop checks of a request's new token, and its output (None for a request that does not stream,
        until it finishes)."""
        token = request.output_ids[-1]
        params = request.params
        delta_text, stopped = self._detok[request.id].add(token)
        reason = None
        if stopped:
            reason = "stop"
        elif token in params.stop_token_ids or (token == self.eos_id and not params.ignore_eos):
            reason = "stop" if len(request.output_ids) > params.min_tokens else None
        if reason is None and len(request.output_ids) >= params.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(request, reason)
        if request.token_times is not None:
            request.token_times.append(made_s)
            if reason is None:
                return None
            return self._output(request, list(request.output_ids), self._detok[request.id].text, made_s)
        return self._output(request, [token], delta_text, made_s)

    def _output(self, request: Request, delta_ids: list[int], delta_text: str, made_s: float | None = None
                ) -> RequestOutput:
        finished = request.finish_reason is not None
        detok = self._detok.pop(request.id) if finished else self._detok[request.id]
        return RequestOutput(
            request.id, request.prompt_ids, list(request.output_ids), detok.text, delta_ids, delta_text, finished,
            request.finish_reason,
            ttft_s=None if request.first_token_s is None else request.first_token_s - request.arrival_s,
            e2e_s=None if request.finished_s is None else request.finished_s - request.arrival_s,
            preemptions=request.preemptions, made_s=time.perf_counter() if made_s is None else made_s,
            token_times=request.token_times)

    def shutdown(self) -> None:
        if not self.closed:
            self.closed = True
            self._send(StepPlan(work=(), shutdown=True))


def worker_loop(runner: ModelRunner, mpi_comm) -> None:
    """A rank other than 0: run each plan rank 0 sends until it sends shutdown."""
    while True:
        since = time.monotonic()
        while not mpi_comm.Iprobe(source=0, tag=PLAN_TAG):
            if time.monotonic() - since > 0.002:  # spin briefly between busy steps, then sleep while idle
                time.sleep(IDLE_POLL_S)
        plan = mpi_comm.recv(source=0, tag=PLAN_TAG)
        if plan.shutdown:
            return
        runner.execute(plan)
