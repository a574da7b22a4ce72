"""In-flight batching: which requests run in the next step, and how many of their tokens.

Every step the scheduler (rank 0) gives each running request its next tokens (one for a request that is
decoding, a chunk of its prompt for one that is still prefilling), then admits waiting requests while the step's
token budget (`max_num_tokens`), the batch limit (`max_batch_size`) and the free KV blocks allow. A prompt longer
than what is left of the budget is prefilled in chunks over several steps, mixed with other requests' decoding.
Finished requests leave at the end of the step that finished them, so nobody waits for anybody else.

When a running request needs a block and none is free, the most recently admitted request is preempted: its
blocks are freed and it goes back to the front of the queue, to be recomputed from its prompt and the tokens it
already produced (greedy decoding gives the same tokens again). A request is never admitted unless its prompt
and output fit the whole pool, which `Scheduler.add` checks.

With the engine's overlap of host and GPU, a step is planned while the previous one still runs: a request whose
sampled token is in flight (`inflight`, set by `launched`) counts it as known, its value left to the GPU (AHEAD),
and one whose in-flight token is its last by length gets no more work. Such a schedule preempts nobody: where it
would have to, it returns None and the engine first waits for the step in flight.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from pipeline.engine.blocks import BlockPool, BlockTable, OutOfBlocks
from pipeline.errors import PipelineError
from pipeline.params import SamplingParams


class EngineError(PipelineError):
    """A request the engine cannot serve (for example a KV pool too small for it)."""


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


AHEAD = -1  # a token in flight: sampled by a launched step, its value on the GPU only


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int  # the sampler's seed (params.seed, or drawn at arrival)
    arrival_s: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    computed: int = 0  # tokens whose keys and values are in the cache
    table: BlockTable = field(default_factory=BlockTable)
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length", "abort"
    preemptions: int = 0
    first_token_s: float | None = None
    finished_s: float | None = None
    inflight: int = 0  # sampled tokens of launched steps not read yet (their values are on the GPU)
    token_times: list[float] | None = None  # a request that does not stream: when each token was made

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> tuple[int, ...]:
        """tokens[start:stop] without joining the two lists (a decode step takes one token of a long request);
        a position past the known tokens is the in-flight token, AHEAD."""
        if start >= self.total_len:
            return (AHEAD,) * (stop - start)
        n = len(self.prompt_ids)
        if start >= n:
            return tuple(self.output_ids[start - n:stop - n])
        if stop <= n:
            return tuple(self.prompt_ids[start:stop])
        return tuple(self.prompt_ids[start:]) + tuple(self.output_ids[:stop - n])

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class SeqWork(NamedTuple):
    """One request's share of a step: compute `tokens` at positions start.., attend over its blocks. (A named
    tuple: a step makes one per running request, and a frozen dataclass costs several times more to build.)"""

    request_id: int
    tokens: tuple[int, ...]
    start: int
    blocks: tuple[int, ...]
    sample: bool  # the chunk reaches the request's last known token: sample the next one
    params: SamplingParams
    seed: int
    banned: tuple[int, ...] = ()  # tokens that may not be sampled yet (EOS and stop tokens before min_tokens)


@dataclass(frozen=True)
class StepPlan:
    """What every rank executes in one step (rank 0 makes it and broadcasts it)."""

    work: tuple[SeqWork, ...]
    shutdown: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.work)

    @property
    def kind(self) -> str:
        """"decode" (one token per sequence) or "mixed" (prompt chunks among them)."""
        return "decode" if self.num_tokens == len(self.work) else "mixed"


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_num_tokens: int, eos_id: int | None = None):
        self.pool = pool
        self.eos_id = eos_id
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.preemptions = 0

    # ------------------------------------------------------------------------------------------- requests

    def add(self, prompt_ids: list[int], params: SamplingParams, seed: int) -> Request:
        need = self.pool.blocks_for(len(prompt_ids) + params.max_tokens)
        if need > self.pool.num_blocks:
            raise EngineError(
                f"a request of {len(prompt_ids)} prompt tokens and up to {params.max_tokens} new tokens needs "
                f"{need} KV blocks of {self.pool.block_size} tokens, but the whole pool has {self.pool.num_blocks}; "
                f"ask for fewer tokens, or give the KV cache more memory (kv_cache_free_gpu_memory_fraction / "
                f"kv_cache_max_tokens)")
        request = Request(next(self._ids), list(prompt_ids), params, seed)
        self.requests[request.id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: int) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.status != Status.FINISHED:
            self.finish(request, "abort")

    def finish(self, request: Request, reason: str) -> None:
        if request.status == Status.RUNNING:
            self.running.remove(request)
        elif request.status == Status.WAITING:
            self.waiting.remove(request)
        self.pool.free(request.table)
        request.status = Status.FINISHED
        request.finish_reason = reason
        request.finished_s = time.perf_counter()
        del self.requests[request.id]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------- the step

    def _grow(self, request: Request, tokens: int) -> None:
        """Give the request blocks for `tokens` more tokens after what it computed (raises OutOfBlocks)."""
        need = self.pool.blocks_for(request.computed + tokens) - len(request.table.blocks)
        if need > self.pool.free_count:
            raise OutOfBlocks
        if need > 0:
            request.table.blocks += tuple(self.pool.allocate() for _ in range(need))

    def _preempt(self, request: Request) -> None:
        assert not request.inflight, "a request with a token in flight is never preempted (schedule(can_preempt))"
        self.running.remove(request)
        self.pool.free(request.table)
        request.computed = 0
        request.status = Status.WAITING
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self, can_preempt: bool = True) -> StepPlan | None:
        """The next step's plan; None where it would preempt a request and `can_preempt` is False."""
        budget = self.max_num_tokens
        work: list[tuple[Request, int]] = []
        block_size = self.pool.block_size
        # Running requests first, oldest first; the newest give way when blocks run out.
        queue = deque(self.running)
        while queue and budget > 0:
            request = queue.popleft()
            if request.inflight and len(request.output_ids) + request.inflight >= request.params.max_tokens:
                continue  # its last token is in flight
            count = min(request.total_len + request.inflight - request.computed, budget)
            if request.computed + count <= len(request.table.blocks) * block_size:  # its blocks hold the tokens
                work.append((request, count))
                budget -= count
                continue
            while True:
                try:
                    self._grow(request, count)
                    break
                except OutOfBlocks:
                    if not can_preempt:
                        return None  # blocks given so far stay with their requests, which need them anyway
                    victim = self.running[-1]
                    self._preempt(victim)
                    if victim is request:
                        break
                    if victim in queue:
                        queue.remove(victim)
            if request.status == Status.RUNNING:
                work.append((request, count))
                budget -= count
        # Then waiting requests, first come first served, while budget, batch slots and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            cached = self.pool.match_prefix(request.tokens[:request.total_len - 1])  # one token left to compute
            self.pool.take_prefix(request.table, cached)
            request.computed = len(cached) * self.pool.block_size
            count = min(request.total_len - request.computed, budget)
            try:
                self._grow(request, count)
            except OutOfBlocks:
                self.pool.free(request.table)
                request.computed = 0
                break
            self.waiting.popleft()
            self.pool.reused_tokens += len(cached) * self.pool.block_size
            request.status = Status.RUNNING
            self.running.append(request)
            work.append((request, count))
            budget -= count
        return StepPlan(
            work=tuple(SeqWork(r.id, r.token_slice(r.computed, r.computed + n), r.computed, r.table.blocks,
                               r.computed + n == r.total_len + r.inflight, r.params, r.seed, self._banned(r))
                       for r, n in work))

    def launched(self, plan: StepPlan) -> None:
        """The plan runs on the GPU, its tokens not read yet: the next schedule counts them (see the module)."""
        for w in plan.work:
            request = self.requests[w.request_id]
            request.computed = w.start + len(w.tokens)
            request.inflight += w.sample

    def _banned(self, request: Request) -> tuple[int, ...]:
        if not request.params.min_tokens or len(request.output_ids) + request.inflight >= request.params.min_tokens:
            return ()
        eos = () if self.eos_id is None or request.params.ignore_eos else (self.eos_id,)
        return eos + request.params.stop_token_ids

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[Request]:
        """Advance the requests of `plan` by what was computed, append sampled tokens; returns those that got one."""
        advanced = []
        for w in plan.work:
            request = self.requests.get(w.request_id)
            if request is None or request.status != Status.RUNNING:
                continue  # finished or aborted while the step ran (a token computed in vain)
            request.computed = max(request.computed, w.start + len(w.tokens))  # a later step may be launched
            if w.sample:
                request.inflight = max(0, request.inflight - 1)
                request.output_ids.append(sampled[w.request_id])
                if request.first_token_s is None:
                    request.first_token_s = time.perf_counter()
                advanced.append(request)
            known = min(request.computed, request.total_len)  # blocks of tokens with known values only
            if known // self.pool.block_size > request.table.named:
                self.pool.register_full_blocks(request.table, request.tokens, known)
        return advanced
