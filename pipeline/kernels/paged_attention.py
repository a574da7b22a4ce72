"""Paged attention: each query token of a packed step against its own sequence's keys in the paged KV cache.

One program per (query token, KV head) computes the attention of the KV head's group of query heads: it walks
the sequence's cache slots up to the token's own position (causal; with a sliding window, only the last `window`
positions) through the block table, BLOCK_N positions at a time, with an online softmax in float32. The same
kernel serves prompt chunks (many tokens of one sequence) and decoding (one token of each of many sequences), so
a step with both is one launch per layer.

Layout: q [T, heads, head_size]; k/v cache [num_blocks * block_size, kv_heads, head_size] (slot = block *
block_size + offset), float16/bfloat16/float32; block_tables [S, max_blocks] int32; token_seq [T] int32 (each
token's row of block_tables); token_pos [T] int32 (its position in its sequence); output [T, heads, head_size].
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import emulated, tl, triton

if triton is not None:

    @triton.jit
    def _attend_tile(q, m, denom, acc, n0, pos, first, seq, kv_head, table_ptr, k_ptr, v_ptr, table_stride, scale,
                     KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        """The online softmax over positions [n0, n0 + BLOCK_N) of the sequence: the updated (m, denom, acc)."""
        d = tl.arange(0, BLOCK_D)
        n = n0 + tl.arange(0, BLOCK_N)
        keep = (n <= pos) & (n >= first)
        block = tl.load(table_ptr + seq * table_stride + n // BLOCK_SIZE, mask=keep, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
        kv_off = (slot[:, None] * KV_HEADS + kv_head) * HEAD_SIZE + d[None, :]
        kv_mask = keep[:, None] & (d < HEAD_SIZE)[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(keep[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no kept position adds nothing
        alpha = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        return m_new, denom, acc

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, seq_ptr, pos_ptr, out_ptr, scale, window,
                                table_stride, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                                HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EMULATED: tl.constexpr,
                                MAX_LEN: tl.constexpr):
        token = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(seq_ptr + token)
        pos = tl.load(pos_ptr + token)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_mask = g < GROUP
        d_mask = d < HEAD_SIZE
        heads = KV_HEADS * GROUP
        q_rows = token * heads + kv_head * GROUP + g
        q = tl.load(q_ptr + q_rows[:, None] * HEAD_SIZE + d[None, :], mask=g_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        denom = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        first = pos * 0
        if window > 0:
            first = tl.maximum(pos - window + 1, 0)
        if EMULATED:  # the emulator's loops need host-side bounds: every tile of the step's longest sequence
            for n0 in range(0, MAX_LEN, BLOCK_N):
                m, denom, acc = _attend_tile(q, m, denom, acc, n0, pos, first, seq, kv_head, table_ptr, k_ptr,
                                             v_ptr, table_stride, scale, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, BLOCK_D,
                                             BLOCK_N)
        else:
            for n0 in range((first // BLOCK_N) * BLOCK_N, pos + 1, BLOCK_N):
                m, denom, acc = _attend_tile(q, m, denom, acc, n0, pos, first, seq, kv_head, table_ptr, k_ptr,
                                             v_ptr, table_stride, scale, KV_HEADS, HEAD_SIZE, BLOCK_SIZE, BLOCK_D,
                                             BLOCK_N)
        out = acc / denom[:, None]
        tl.store(out_ptr + q_rows[:, None] * HEAD_SIZE + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=g_mask[:, None] & d_mask[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    token_seq: torch.Tensor, token_pos: torch.Tensor, block_size: int,
                    window: int | None = None) -> torch.Tensor:
    """Attention of q [T, heads, head_size] over the paged cache (see the module docstring): [T, heads, head_size]."""
    tokens, heads, head_size = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    block_g = triton.next_power_of_2(heads // kv_heads)
    block_d = triton.next_power_of_2(head_size)
    # Registers hold [BLOCK_G, BLOCK_N, BLOCK_D] products: keep that near 8K elements.
    block_n = 16 if emulated() else max(16, min(128, 8192 // (block_g * block_d)))
    _paged_attention_kernel[(tokens, kv_heads)](
        q.contiguous(), k_cache, v_cache, block_tables, token_seq, token_pos, out, head_size ** -0.5,
        window or 0, block_tables.stride(0), KV_HEADS=kv_heads, GROUP=heads // kv_heads, HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n, EMULATED=emulated(),
        MAX_LEN=block_tables.shape[1] * block_size if emulated() else 0)  # a constant on the GPU: one compile
    return out
