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

import torch
import torch.nn.functional as F

from pipeline.backends.torch_model import RankModel
from pipeline.engine.scheduler import SeqWork, StepPlan
from pipeline.generate import Sampling, sample_next
from pipeline.quantize.formats import dequantize_kv, quantize_kv


def kv_bytes_per_token(model: RankModel) -> int:
    """Bytes of keys and values one token takes on this rank (all its layers)."""
    element = 1 if model.kv_format is not None else torch.finfo(model.dtype).bits // 8
    return 2 * len(model.layers) * model.kv_heads * model.head_size * element


class PagedKVCache:
    def __init__(self, model: RankModel, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        dtype = {None: model.dtype, "fp8": torch.float8_e4m3fn, "int8": torch.int8}[model.kv_format]
        shape = (num_blocks * block_size, model.kv_heads, model.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=model.device) for _ in model.layers]

    def slots(self, blocks: tuple[int, ...], start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Cache slots of positions [start, stop) of a sequence with these blocks."""
        positions = torch.arange(start, stop)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[positions // self.block_size] * self.block_size + positions % self.block_size).to(device)


class ModelRunner:
    def __init__(self, model: RankModel, num_blocks: int, block_size: int, sliding_window: int | None = None):
        self.model = model
        self.cache = PagedKVCache(model, num_blocks, block_size)
        self.sliding_window = sliding_window
        self.generators: dict[int, torch.Generator] = {}

    # ------------------------------------------------------------------------------------------- the step

    def execute(self, plan: StepPlan) -> dict[int, int]:
        """Run the plan's forward pass; returns {request id: next token} for its sampling sequences (all ranks)."""
        for request_id in plan.released:
            self.generators.pop(request_id, None)
        if not plan.work:
            return {}
        model, device = self.model, self.model.device
        tokens = torch.tensor([t for w in plan.work for t in w.tokens], dtype=torch.long, device=device)[None]
        positions = torch.cat([torch.arange(w.start, w.start + len(w.tokens)) for w in plan.work]).to(device)[None]
        seqs = []  # (offset in the packed tokens, work, slots of all its positions so far)
        offset = 0
        for w in plan.work:
            seqs.append((offset, w, self.cache.slots(w.blocks, 0, w.start + len(w.tokens), device)))
            offset += len(w.tokens)
        sampled = [(w, off + len(w.tokens) - 1) for off, w, _ in seqs if w.sample]
        rows = torch.tensor([row for _, row in sampled], dtype=torch.long, device=device)

        def attention(index: int, qkv: torch.Tensor, rope, kv_scale) -> torch.Tensor:
            return self._attention(index, qkv, rope, kv_scale, seqs)

        logits = model.forward(tokens, positions, None, attention=attention, logit_rows=rows if len(sampled) else None)
        next_tokens = torch.zeros(len(sampled), dtype=torch.long, device=device)
        comm = model.comm
        if len(sampled) and comm.mapping.rank == comm.sampler_rank:
            next_tokens = self._sample(logits[0], [w for w, _ in sampled])
        if len(sampled):
            next_tokens = comm.broadcast_tokens(next_tokens)
        return {w.request_id: int(t) for (w, _), t in zip(sampled, next_tokens.tolist())}

    def _attention(self, index: int, qkv: torch.Tensor, rope, kv_scale, seqs) -> torch.Tensor:
        model = self.model
        hd, heads, kv_heads = model.head_size, model.heads, model.kv_heads
        total = qkv.shape[1]
        q, k, v = qkv[0].split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
        q = q.view(total, heads, hd).transpose(0, 1)[None]  # [1, heads, T, hd]
        k = k.view(total, kv_heads, hd).transpose(0, 1)[None]
        v = v.reshape(total, kv_heads, hd)
        if rope is not None:
            q, k = model._rope(q, k, rope)
        k = k[0].transpose(0, 1)  # [T, kv_heads, hd]
        if model.observe_kv is not None:
            model.observe_kv(index, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        k_store, v_store = self.cache.k[index], self.cache.v[index]
        if model.kv_format is not None:
            k, v = quantize_kv(k, kv_scale, model.kv_format), quantize_kv(v, kv_scale, model.kv_format)
        new_slots = torch.cat([slots[w.start:] for _, w, slots in seqs])
        k_store.index_copy_(0, new_slots, k.to(k_store.dtype))
        v_store.index_copy_(0, new_slots, v.to(v_store.dtype))
        out = torch.empty(total, heads, hd, dtype=q.dtype, device=q.device)
        for offset, w, slots in seqs:
            n = len(w.tokens)
            keys, values = k_store[slots], v_store[slots]  # [L, kv_heads, hd]
            if model.kv_format is not None:
                keys, values = dequantize_kv(keys, kv_scale, q.dtype), dequantize_kv(values, kv_scale, q.dtype)
            keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [kv_heads, L, hd]
            if kv_heads != heads:
                keys = keys.repeat_interleave(heads // kv_heads, dim=0)
                values = values.repeat_interleave(heads // kv_heads, dim=0)
            query_pos = torch.arange(w.start, w.start + n, device=q.device)[:, None]
            key_pos = torch.arange(len(slots), device=q.device)[None, :]
            mask = key_pos <= query_pos
            if self.sliding_window is not None:
                mask &= key_pos > query_pos - self.sliding_window
            seq_q = q[0, :, offset:offset + n]
            out[offset:offset + n] = F.scaled_dot_product_attention(seq_q, keys, values, attn_mask=mask).transpose(0, 1)
        return out.reshape(1, total, heads * hd)

    # ------------------------------------------------------------------------------------------- sampling

    def _sample(self, logits: torch.Tensor, work: list[SeqWork]) -> torch.Tensor:
        """Next token per row of float32 logits [R, V], each row with its own request's parameters."""
        out = logits.argmax(dim=-1)
        for row, w in enumerate(work):
            params = w.params
            if w.banned:  # EOS and stop tokens before min_tokens
                logits[row, list(w.banned)] = float("-inf")
                out[row] = logits[row].argmax()
            if params.greedy:
                continue
            generator = self.generators.get(w.request_id)
            if generator is None:
                generator = self.generators[w.request_id] = torch.Generator().manual_seed(w.seed)
            sampling = Sampling(params.max_tokens, params.temperature, params.top_k, params.top_p, w.seed)
            out[row] = sample_next(logits[row:row + 1], sampling, generator)[0]
        return out
