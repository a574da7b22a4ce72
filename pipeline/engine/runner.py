"""The step every rank runs: a StepPlan's sequences packed into one forward pass over the paged KV cache.

All tokens of a step (prompt chunks and single decode tokens of many requests) run as one packed batch, without
padding, through this rank's RankModel (tensor parallel inside, pipeline stages passing the packed hidden states);
only attention looks at sequences one by one, through each request's block table. The sampling rank (the last
stage's first tp rank, which holds the whole vocabulary) picks the next tokens and broadcasts them, so every rank
knows them.

Storage per local layer: keys and values of shape [num_blocks * block_size, kv_heads, head_size] (slot =
block * block_size + offset), in the model dtype or the checkpoint's FP8 / INT8 KV-cache format.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pipeline.backends.torch_model import RankModel
from pipeline.dist import to_device
from pipeline.engine.scheduler import AHEAD, SeqWork, StepPlan
from pipeline.generate import sample_rows
from pipeline.kernels.common import runs_on
from pipeline.kernels.paged_attention import attention_tiles, paged_attention, tile_tokens, write_rope_kv
from pipeline.params import SamplingParams
from pipeline.progress import progress
from pipeline.quantize.formats import dequantize_kv


def kv_bytes_per_token(model: RankModel) -> int:
    """Bytes of keys and values one token takes on this rank (all its layers)."""
    element = 1 if model.kv_format is not None else torch.finfo(model.dtype).bits // 8
    return 2 * len(model.layers) * model.kv_heads * model.head_size * element


def use_gpu_kernels(model: RankModel) -> RankModel:
    """The engine's GPU model: Triton GEMV for one-row steps, fc and gate as one GEMM (accelerate), the RMS
    norm kernel and the gated activation kernel (FP8 out for an FP8 proj). In place; returns the model."""
    from pipeline.backends.cuda_decode import DecodeOptions, accelerate

    accelerate(model, DecodeOptions())
    model.fused_norm = True
    model.fused_activation = True
    return model


class PagedKVCache:
    def __init__(self, model: RankModel, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        fmt = model.kv_cache_format
        dtype = fmt.storage_dtype if fmt is not None and fmt.storage_dtype is not None else model.dtype
        shape = (num_blocks * block_size, model.kv_heads, model.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in model.layers]


def feed_tokens(tokens: torch.Tensor, work: tuple[SeqWork, ...], after: Launched | None) -> None:
    """Put the tokens still in flight (AHEAD in `work`) into the step's packed tokens [T] (on the device): the
    values `after`, the step launched before, sampled for those requests."""
    if after is None:
        return
    rows = {w.request_id: i for i, w in enumerate(after.work)}
    offsets, sources, offset = [], [], 0
    for w in work:
        if w.tokens[0] == AHEAD:
            offsets.append(offset)
            sources.append(rows[w.request_id])
        offset += len(w.tokens)
    if not offsets:
        return
    if offsets == sources == list(range(len(offsets))):  # the same requests first, in the same order
        tokens[:len(offsets)].copy_(after.tokens[:len(offsets)])
        return
    device = tokens.device
    tokens.index_copy_(0, to_device(torch.tensor(offsets), device),
                       after.tokens.index_select(0, to_device(torch.tensor(sources), device)))


class _Batch:
    """A step's sequences as tensors: packed tokens and positions, the cache slots of the new tokens, and what
    attention reads: with the kernel, the block table, each token's position and the attention tiles; else the
    gathered slots (one-token sequences together, padded; prompt chunks one by one)."""

    def __init__(self, work: tuple[SeqWork, ...], block_size: int, window: int | None, device: torch.device,
                 kernel: bool = False, group: int = 1, after: Launched | None = None):
        lens = [len(w.tokens) for w in work]
        width = max(len(w.blocks) for w in work)
        table = torch.tensor([list(w.blocks) + [0] * (width - len(w.blocks)) for w in work], dtype=torch.long)
        starts = torch.tensor([w.start for w in work], dtype=torch.long)
        seq_of_token = torch.repeat_interleave(torch.arange(len(work)), torch.tensor(lens))
        offsets = torch.tensor([0] + lens[:-1], dtype=torch.long).cumsum(0)
        positions = starts[seq_of_token] + torch.arange(sum(lens)) - offsets[seq_of_token]

        def slots_of(rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return table[rows, pos // block_size] * block_size + pos % block_size

        self.tokens = to_device(torch.tensor([t for w in work for t in w.tokens], dtype=torch.long), device)[None]
        feed_tokens(self.tokens[0], work, after)
        self.positions = to_device(positions, device)[None]
        self.new_slots = to_device(slots_of(seq_of_token, positions), device)
        self.sample_rows = to_device(torch.tensor([int(offsets[i]) + lens[i] - 1 for i, w in enumerate(work)
                                                   if w.sample], dtype=torch.long), device)
        self.chunks = []
        self.decode_rows = self.decode_slots = self.decode_mask = None
        if kernel:  # pipeline.kernels.paged_attention reads every sequence through the block table
            self.block_table = to_device(table.to(torch.int32), device)
            self.token_pos = to_device(positions.to(torch.int32), device)
            self.per_tile = tile_tokens(group, lens)
            self.tiles = to_device(attention_tiles(lens, self.per_tile), device)
            return
        decode = [i for i, n in enumerate(lens) if n == 1]
        if decode:
            rows = torch.tensor(decode, dtype=torch.long)
            context = starts[rows] + 1
            key_pos = torch.arange(int(context.max()))
            self.decode_rows = offsets[rows].to(device)
            self.decode_slots = slots_of(rows[:, None], key_pos[None, :].clamp(max=width * block_size - 1)).to(device)
            mask = key_pos[None, :] < context[:, None]
            if window is not None:
                mask &= key_pos[None, :] > (context[:, None] - 1) - window
            self.decode_mask = mask[:, None, None].to(device)  # [D, 1, 1, L]
        for i, n in enumerate(lens):
            if n == 1:
                continue
            key_pos = torch.arange(work[i].start + n)
            query_pos = torch.arange(work[i].start, work[i].start + n)[:, None]
            mask = key_pos[None, :] <= query_pos
            if window is not None:
                mask &= key_pos[None, :] > query_pos - window
            self.chunks.append((int(offsets[i]), n, slots_of(torch.full_like(key_pos, i), key_pos).to(device),
                                mask.to(device)))


GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024)
PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512)  # longer chunks are GPU-bound: their launches hide behind them


class _DecodeGraphs:
    """CUDA graphs of decoding steps (one new token per sequence), one per batch size in GRAPH_BATCHES up to the
    engine's max_batch_size, captured at start-up. A step of B sequences replays the smallest graph of at least B;
    the rows past B point at the pool's last block, kept aside as scratch, so they touch no sequence's cache.
    Batch 1 runs the fused step (pipeline.backends.fused_step: norms and residual adds inside the GEMVs) around
    the paged attention, where the model allows it."""

    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks_per_seq: int, pool):
        device = runner.model.device
        self.runner = runner
        self.sizes = [b for b in GRAPH_BATCHES if b < max_batch] + [max_batch]
        top = self.sizes[-1]
        self.scratch = runner.cache.num_blocks - 1
        self.scratch_slot = self.scratch * runner.cache.block_size
        # tokens, positions and the new tokens' slots in one buffer (one copy from the host a step), staged in
        # pinned memory (a copy from pageable memory may wait for the GPU), two stages used in turn (a step's copy
        # may still be queued while the next step is planned)
        self.inputs = torch.zeros((3, top), dtype=torch.long, device=device)
        self.tokens, self.positions, self.new_slots = self.inputs[0:1], self.inputs[1:2], self.inputs[2]
        self.new_slots.fill_(self.scratch_slot)  # rows beyond a step's sequences write to the scratch block
        self.block_table = torch.full((top, max_blocks_per_seq), self.scratch, dtype=torch.int32, device=device)
        self.stages = [(torch.zeros((3, top), dtype=torch.long).pin_memory(),
                        torch.zeros((top, max_blocks_per_seq), dtype=torch.int32).pin_memory()) for _ in range(2)]
        self.turn = 0
        self.tiles = attention_tiles([1] * top, 1).to(device)  # one tile per decoding sequence
        self.token_pos = torch.zeros(top, dtype=torch.int32, device=device)
        self.rows = torch.arange(top, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.fused = _fused_step(runner.model)
        if self.fused is not None and 1 in self.sizes:
            # each GEMV's config as the bench chooses it (timed once, then read from the tuning cache), not
            # Triton's autotuning in every process
            self.fused.tune()
        for size in progress(list(reversed(self.sizes)), desc="capturing CUDA graphs", unit="graph"):
            # the largest first: the smaller ones fit in its memory
            try:
                self._forward(size)  # compiles the Triton kernels and warms cuBLAS outside the capture
            except Exception as exc:  # noqa: BLE001 - a fused step that fails to compile must not stop the engine
                if size != 1 or self.fused is None:
                    raise
                print(f"[engine] the fused batch-1 step failed ({exc!r}); batch 1 runs the layer-by-layer step",
                      file=sys.stderr, flush=True)
                self.fused = None
                self._forward(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            self.graphs[size] = (graph, logits)

    def _forward(self, size: int) -> torch.Tensor:
        view = _GraphBatch(self.block_table[:size], self.token_pos[:size], self.tiles[:size], 1,
                           self.new_slots[:size])
        model = self.runner.model
        if size == 1 and self.fused is not None:
            rope = model._rope_tables(self.positions[:, :1], model.dtype) if model.arch.position == "rope" else None

            def attention_1(index: int, qkv: torch.Tensor) -> torch.Tensor:
                kv_scale = model.layers[index].get("kv_scale")
                return self.runner._attention(index, qkv.view(1, 1, -1), rope, kv_scale, view,
                                              self.fused.pdl).view(1, -1)

            return self.fused.forward(self.tokens[:, :1], self.positions[:, :1], None, None, attention=attention_1)

        def attention(index: int, qkv: torch.Tensor, rope, kv_scale) -> torch.Tensor:
            return self.runner._attention(index, qkv, rope, kv_scale, view)

        return self.runner.model.forward(self.tokens[:, :size], self.positions[:, :size], None, attention=attention,
                                         logit_rows=self.rows[:size])

    def fits(self, plan: StepPlan) -> bool:
        return len(plan.work) <= self.sizes[-1] and all(len(w.tokens) == 1 and w.sample for w in plan.work)

    def run(self, plan: StepPlan, after: Launched | None = None) -> torch.Tensor:
        """Replay the graph for the plan (its tokens in flight taken from `after`, see feed_tokens)."""
        work, block_size = plan.work, self.runner.cache.block_size
        count = len(work)
        size = next(s for s in self.sizes if s >= count)
        width = max(len(w.blocks) for w in work)
        inputs, table = self.stages[self.turn]
        self.turn ^= 1
        pos = torch.tensor([w.start for w in work], dtype=torch.long)
        table[:count, :width] = torch.tensor([w.blocks + (self.scratch,) * (width - len(w.blocks)) for w in work],
                                             dtype=torch.int32)
        inputs[0, :count] = torch.tensor([w.tokens[0] for w in work], dtype=torch.long)
        inputs[1, :count] = pos
        inputs[2, :count] = table[torch.arange(count), pos // block_size].long() * block_size + pos % block_size
        # rows past the step's sequences: token 0 at position 0 into the scratch block (the stage may hold an
        # earlier, larger step's rows, tokens in flight among them: AHEAD, not a token id)
        inputs[0:2, count:size] = 0
        inputs[2, count:size] = self.scratch_slot
        # whole rows (contiguous: a strided copy would go through an unpinned temporary)
        self.inputs.copy_(inputs, non_blocking=True)
        self.block_table[:count].copy_(table[:count], non_blocking=True)
        feed_tokens(self.tokens[0], work, after)
        self.token_pos[:count].copy_(self.positions[0, :count])
        self.block_table[count:size].fill_(self.scratch)  # rows a larger earlier step left behind
        self.token_pos[count:size].zero_()
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[:, :count]


class _PromptGraphs:
    """CUDA graphs of a step that is one sequence's prompt chunk alone -- what a request meets first when nothing
    else runs (`pipeline.run`, a server's lone request) -- one per token bucket in PROMPT_BUCKETS up to the engine's
    max_num_tokens. Eager, such a step is bound by the host's launches (about a thousand for an 8B model). A chunk
    of n tokens replays the smallest bucket of at least n: the rows past n repeat the chunk's last position (so they
    attend over its keys only) and write to the scratch block, and only row n - 1's logits are computed."""

    def __init__(self, runner: ModelRunner, max_tokens: int, max_blocks_per_seq: int, scratch: int, pool):
        device, block_size = runner.model.device, runner.cache.block_size
        self.runner = runner
        self.sizes = [b for b in PROMPT_BUCKETS if b <= max_tokens]
        self.scratch, self.scratch_slot = scratch, scratch * block_size
        self.replays = 0
        top = self.sizes[-1]
        # tokens, positions, the new tokens' slots and (row 3, first column) the row whose logits are read, in one
        # buffer copied from a pinned stage (two stages used in turn, as the decoding graphs do)
        self.inputs = torch.zeros((4, top), dtype=torch.long, device=device)
        self.tokens, self.positions, self.new_slots = self.inputs[0:1], self.inputs[1:2], self.inputs[2]
        self.logit_row = self.inputs[3, :1]
        self.block_table = torch.full((1, max_blocks_per_seq), scratch, dtype=torch.int32, device=device)
        self.stages = [(torch.zeros((4, top), dtype=torch.long).pin_memory(),
                        torch.zeros((1, max_blocks_per_seq), dtype=torch.int32).pin_memory()) for _ in range(2)]
        self.turn = 0
        self.token_pos = torch.zeros(top, dtype=torch.int32, device=device)
        self.per_tile = tile_tokens(runner.model.heads // runner.model.kv_heads, [top])  # the same for any n > 1
        self.tiles = {size: attention_tiles([size], self.per_tile).to(device) for size in self.sizes}
        self.new_slots.fill_(self.scratch_slot)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        for size in progress(list(reversed(self.sizes)), desc="capturing prompt graphs", unit="graph"):
            self._forward(size)  # warms cuBLAS at this shape outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(size)
            self.graphs[size] = (graph, logits)

    def _forward(self, size: int) -> torch.Tensor:
        view = _GraphBatch(self.block_table, self.token_pos[:size], self.tiles[size], self.per_tile,
                           self.new_slots[:size])

        def attention(index: int, qkv: torch.Tensor, rope, kv_scale) -> torch.Tensor:
            return self.runner._attention(index, qkv, rope, kv_scale, view)

        return self.runner.model.forward(self.tokens[:, :size], self.positions[:, :size], None, attention=attention,
                                         logit_rows=self.logit_row)

    def fits(self, plan: StepPlan) -> bool:
        return (len(plan.work) == 1 and 1 < len(plan.work[0].tokens) <= self.sizes[-1]
                and plan.work[0].tokens[-1] != AHEAD)  # a token in flight is fed on the eager path

    def run(self, plan: StepPlan) -> torch.Tensor:
        (work,) = plan.work
        n, block_size = len(work.tokens), self.runner.cache.block_size
        size = next(s for s in self.sizes if s >= n)
        inputs, table = self.stages[self.turn]
        self.turn ^= 1
        width = len(work.blocks)
        table[0, :width] = torch.tensor(work.blocks, dtype=torch.int32)
        pos = torch.arange(work.start, work.start + size).clamp_(max=work.start + n - 1)
        inputs[0, :n] = torch.tensor(work.tokens, dtype=torch.long)
        inputs[0, n:size] = 0
        inputs[1, :size] = pos
        inputs[2, :n] = table[0, pos[:n] // block_size].long() * block_size + pos[:n] % block_size
        inputs[2, n:size] = self.scratch_slot
        inputs[3, 0] = n - 1
        self.inputs.copy_(inputs, non_blocking=True)  # whole rows: a strided copy would go through pageable memory
        self.block_table[:, :width].copy_(table[:, :width], non_blocking=True)
        self.token_pos[:size].copy_(self.positions[0, :size])
        graph, logits = self.graphs[size]
        graph.replay()
        self.replays += 1
        return logits


def _fused_step(model: RankModel):
    """The fused batch-1 step for this model around the paged attention, or None where it cannot run."""
    from pipeline.backends.cuda_decode import _layernorm_gelu
    from pipeline.backends.fused_step import FusedStep, unsupported_reason
    from pipeline.kernels.common import hopper

    try:
        layernorm_gelu = _layernorm_gelu(model)
    except ValueError:  # an architecture outside the decode path's two kinds
        return None
    if unsupported_reason(model, layernorm_gelu, paged=True) is not None:
        return None
    return FusedStep(model, layernorm_gelu, pdl=hopper(model.device), paged=True)


class Launched(NamedTuple):
    """A step queued by ModelRunner.launch: its sampling sequences, their sampled tokens on the device and where
    they are being copied on the host (ready when `event` has passed; None: already there)."""

    work: tuple[SeqWork, ...]
    tokens: torch.Tensor
    host: torch.Tensor
    event: torch.cuda.Event | None


@dataclass
class _GraphBatch:
    block_table: torch.Tensor
    token_pos: torch.Tensor
    tiles: torch.Tensor
    per_tile: int
    new_slots: torch.Tensor


class ModelRunner:
    def __init__(self, model: RankModel, num_blocks: int, block_size: int):
        self.model = model
        self.cache = PagedKVCache(model, num_blocks, block_size)
        self.sliding_window = model.arch.sliding_window  # Mistral: keys older than the window are masked
        # On a GPU one Triton kernel reads the paged cache; elsewhere torch's attention over gathered keys.
        self.kernel = model.device.type == "cuda" and runs_on(model.device)
        self.graphs: _DecodeGraphs | None = None
        self.prompt_graphs: _PromptGraphs | None = None
        self.launch_s = 0.0
        # where launched steps' tokens land on the host (pinned): two, used in turn (one step may be in flight
        # while the previous one is read)
        self._pinned: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long)] * 2
        self._pinned_turn = 0

    def capture_graphs(self, max_batch: int, max_blocks_per_seq: int, max_tokens: int = 0) -> None:
        """Capture the CUDA graphs of decoding steps and, up to `max_tokens`, of lone prompt chunks (one GPU, paged
        kernel). The pool's last block becomes scratch: the scheduler must be given num_blocks - 1 blocks. The
        graphs share one memory pool: every graph's logits are read (in stream order) before the next replays."""
        pool = torch.cuda.graph_pool_handle()
        self.graphs = _DecodeGraphs(self, max_batch, max_blocks_per_seq, pool)
        if max_tokens >= PROMPT_BUCKETS[0]:
            self.prompt_graphs = _PromptGraphs(self, max_tokens, max_blocks_per_seq, self.graphs.scratch, pool)

    def warm_up(self, block: int) -> None:
        """Run the steps a first request runs that the graphs do not hold (a prompt alone; a prompt chunk beside a
        decoding token), greedy and sampled, on `block` alone (the graphs' scratch), so their kernels load and
        cuBLAS starts before any request is timed. Every rank calls it (each runs the same plans)."""
        size = self.cache.block_size
        greedy, sampled = SamplingParams(), SamplingParams(temperature=1.0, top_k=8, top_p=0.9)
        # prompts of 7 and 16 tokens: Triton compiles a kernel apart for row counts that are multiples of 16
        plans = [StepPlan((SeqWork(-1, (0,) * min(7, size), 0, (block,), True, greedy, 0),)),
                 StepPlan((SeqWork(-1, (0,) * min(16, size), 0, (block,), True, greedy, 0),)),
                 StepPlan((SeqWork(-1, (0,) * size, 0, (block,), True, sampled, 0),
                           SeqWork(-2, (0,), size - 1, (block,), True, greedy, 0)))]
        for plan in plans:
            if self.can_launch(plan):
                self.collect(self.launch(plan))
            else:
                self.execute(plan)
        self.launch_s = 0.0

    # ------------------------------------------------------------------------------------------- the step

    def can_launch(self, plan: StepPlan) -> bool:
        """Whether `launch` takes the plan: one rank, no banned tokens (the sampled tokens stay on the device until
        `collect`; the next step may read them there)."""
        return (self.model.comm.mapping.world_size == 1 and bool(plan.work)
                and not any(w.banned for w in plan.work if w.sample))

    def launch(self, plan: StepPlan, after: Launched | None = None) -> Launched:
        """Queue the plan's forward pass and sampling without waiting for them (see can_launch); tokens of the plan
        still in flight come from `after`, the step launched before it."""
        start = time.perf_counter()
        logits = self.forward(plan, after)
        sampled = tuple(w for w in plan.work if w.sample)
        tokens = self._sample(logits[0], sampled) if sampled else torch.zeros(0, dtype=torch.long)
        event = None
        if tokens.is_cuda:
            turn = self._pinned_turn
            self._pinned_turn ^= 1
            if len(self._pinned[turn]) < len(sampled):
                self._pinned[turn] = torch.zeros(max(len(sampled), 1024), dtype=torch.long).pin_memory()
            host = self._pinned[turn][:len(sampled)]
            host.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = tokens
        self.launch_s += time.perf_counter() - start
        return Launched(sampled, tokens, host, event)

    def collect(self, launched: Launched) -> dict[int, int]:
        """Wait for a launched step; {request id: next token}."""
        if launched.event is not None:
            launched.event.synchronize()
        return {w.request_id: t for w, t in zip(launched.work, launched.host.tolist())}

    def execute(self, plan: StepPlan, after: Launched | None = None) -> dict[int, int]:
        """Run the plan's forward pass (tokens in flight from `after`) and sample; returns {request id: next token}
        for its sampling sequences (all ranks)."""
        if not plan.work:
            return {}
        model, device = self.model, self.model.device
        sampled = [w for w in plan.work if w.sample]
        start = time.perf_counter()
        logits = self.forward(plan, after)
        self.launch_s += time.perf_counter() - start  # the host's part: inputs, launches (a GPU runs on after it)
        next_tokens = torch.zeros(len(sampled), dtype=torch.long, device=device)
        comm = model.comm
        if sampled and comm.mapping.rank == comm.sampler_rank:
            next_tokens = self._sample(logits[0], sampled)
        if sampled:
            next_tokens = comm.broadcast_tokens(next_tokens)
        return {w.request_id: int(t) for w, t in zip(sampled, next_tokens.tolist())}

    def forward(self, plan: StepPlan, after: Launched | None = None) -> torch.Tensor | None:
        """The step's forward pass: float32 logits [1, sampling sequences, vocab] on last-stage ranks."""
        if self.graphs is not None and self.graphs.fits(plan):
            return self.graphs.run(plan, after)
        if self.prompt_graphs is not None and self.prompt_graphs.fits(plan):
            return self.prompt_graphs.run(plan)
        batch = _Batch(plan.work, self.cache.block_size, self.sliding_window, self.model.device, self.kernel,
                       self.model.heads // self.model.kv_heads, after)

        def attention(index: int, qkv: torch.Tensor, rope, kv_scale) -> torch.Tensor:
            return self._attention(index, qkv, rope, kv_scale, batch)

        rows = batch.sample_rows if len(batch.sample_rows) else None
        return self.model.forward(batch.tokens, batch.positions, None, attention=attention, logit_rows=rows)

    def _attention(self, index: int, qkv: torch.Tensor, rope, kv_scale, batch: _Batch, pdl: bool = False
                   ) -> torch.Tensor:
        """Rotary embedding, the cache write of the step's tokens, and attention of each over its sequence (`pdl`:
        the two kernels with programmatic dependent launch, inside the fused batch-1 step's chain)."""
        model = self.model
        hd, heads, kv_heads = model.head_size, model.heads, model.kv_heads
        total = qkv.shape[1]
        k_store, v_store = self.cache.k[index], self.cache.v[index]
        if self.kernel and model.observe_kv is None:  # two launches: rotate and write the cache, then attend
            q = write_rope_kv(qkv[0], rope, k_store, v_store, batch.new_slots, heads,
                              kv_scale if model.kv_format is not None else None, pdl)
            out = paged_attention(q, k_store, v_store, batch.block_table, batch.token_pos, batch.tiles,
                                  batch.per_tile, self.cache.block_size, self.sliding_window,
                                  kv_scale if model.kv_format is not None else None, pdl)
            return out.reshape(1, total, heads * hd)
        q, k, v = qkv[0].split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = q.view(total, heads, hd).transpose(0, 1)[None]  # [1, heads, T, hd]
        k = k.view(total, kv_heads, hd).transpose(0, 1)[None]
        v = v.reshape(total, kv_heads, hd)
        if rope is not None:
            q, k = model._rope(q, k, rope)
        k = k[0].transpose(0, 1)  # [T, kv_heads, hd]
        if model.observe_kv is not None:
            model.observe_kv(index, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        if model.kv_format is not None:
            k, v = model.kv_cache_format.quantize(k, kv_scale), model.kv_cache_format.quantize(v, kv_scale)
        for store, new in ((k_store, k), (v_store, v)):
            new = new.to(store.dtype)
            if store.element_size() == 1:  # CUDA's index_copy_ has no float8: copy the bytes
                store, new = store.view(torch.uint8), new.view(torch.uint8)
            store.index_copy_(0, batch.new_slots, new)

        def read(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if k_store.element_size() == 1:  # gathered as bytes (no float8 indexing kernels on every device)
                keys = k_store.view(torch.uint8)[slots].view(k_store.dtype)
                values = v_store.view(torch.uint8)[slots].view(v_store.dtype)
            else:
                keys, values = k_store[slots], v_store[slots]  # [..., L, kv_heads, hd]
            if model.kv_format is not None:
                keys, values = dequantize_kv(keys, kv_scale, q.dtype), dequantize_kv(values, kv_scale, q.dtype)
            return keys.transpose(-3, -2), values.transpose(-3, -2)  # [..., kv_heads, L, hd]

        if self.kernel:
            out = paged_attention(q[0].transpose(0, 1), k_store, v_store, batch.block_table, batch.token_pos,
                                  batch.tiles, batch.per_tile, self.cache.block_size, self.sliding_window,
                                  kv_scale if model.kv_format is not None else None)
            return out.reshape(1, total, heads * hd)
        out = torch.empty(total, heads, hd, dtype=q.dtype, device=q.device)
        if batch.decode_rows is not None:  # every one-token sequence at once, padded to the longest
            keys, values = read(batch.decode_slots)
            q_rows = q[0, :, batch.decode_rows].transpose(0, 1)[:, :, None]  # [D, heads, 1, hd]
            o = F.scaled_dot_product_attention(q_rows, keys, values, attn_mask=batch.decode_mask,
                                               enable_gqa=kv_heads != heads)
            out[batch.decode_rows] = o[:, :, 0]
        for offset, n, slots, mask in batch.chunks:  # prompt chunks, one sequence at a time
            keys, values = read(slots)
            o = F.scaled_dot_product_attention(q[0, :, offset:offset + n], keys, values, attn_mask=mask,
                                               enable_gqa=kv_heads != heads)
            out[offset:offset + n] = o.transpose(0, 1)
        return out.reshape(1, total, heads * hd)

    # ------------------------------------------------------------------------------------------- sampling

    def _sample(self, logits: torch.Tensor, work: tuple[SeqWork, ...]) -> torch.Tensor:
        """Next token per row of float32 logits [R, V], each row with its own request's parameters, drawn at the
        request's seed and the position of the token it makes (the same draw in any batch, after a preemption
        too)."""
        banned = [(row, token) for row, w in enumerate(work) for token in w.banned]
        if banned:  # EOS and stop tokens before min_tokens
            rows, tokens = zip(*banned)
            logits[list(rows), list(tokens)] = float("-inf")
        return sample_rows(logits, [w.params for w in work], [w.seed for w in work],
                           [w.start + len(w.tokens) for w in work])
