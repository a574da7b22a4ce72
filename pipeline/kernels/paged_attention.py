"""Paged attention: the query tokens of a packed step against their own sequences' keys in the paged KV cache.

The step's tokens are cut into tiles: up to `tile_tokens` consecutive tokens of one sequence (a prompt chunk gives
several tiles, a decoding sequence one tile of one token). One program per (tile, KV head) attends the tile's
tokens times the KV head's group of query heads, as the rows of one matrix, to the sequence's cache slots: it walks
the block table BLOCK_N positions at a time, multiplies on tensor cores (tl.dot: queries x keys, then
probabilities x values) and keeps an online softmax in float32. Rows are masked causally by their own token's
position (and, with a sliding window, to the last `window` positions). So prompt chunks and decoding share one
launch per layer, and a decoding step reads each sequence's keys once for all the heads of a group.

Layout: q [T, heads, head_size]; k/v cache [num_blocks * block_size, kv_heads, head_size] (slot = block *
block_size + offset), float16/bfloat16/float32, or int8/float8 with a per-tensor `kv_scale` (read dequantized);
block_tables [S, max_blocks] int32; token_pos [T] int32 (each token's position in its sequence); tiles [N, 3]
int32 (first token, tokens, sequence row of block_tables), from `attention_tiles`; output [T, heads, head_size].
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import emulated, gdc_launch_dependents, gdc_wait, tl, triton

# Rows of a tile's query matrix (tokens x group heads) when the step holds prompt chunks; a decoding-only step
# has tiles of one token (the group's heads, padded to tl.dot's 16 rows).
CHUNK_ROWS = 64

if triton is not None:

    @triton.jit
    def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, tiles_ptr, out_ptr, kv_scale_ptr,
                                scale, window, table_stride, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                                HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KV_QUANT: tl.constexpr,
                                PRECISION: tl.constexpr, EMULATED: tl.constexpr, MAX_LEN: tl.constexpr,
                                PDL: tl.constexpr = False):
        if PDL:  # launched early behind the kernel that wrote q and the cache (programmatic dependent launch)
            gdc_wait()
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        first_token = tl.load(tiles_ptr + tile * 3)
        count = tl.load(tiles_ptr + tile * 3 + 1)
        seq = tl.load(tiles_ptr + tile * 3 + 2)
        r = tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        row_token = r // GROUP
        row_ok = row_token < count
        token = first_token + row_token
        d_mask = d < HEAD_SIZE
        q_rows = token * (KV_HEADS * GROUP) + kv_head * GROUP + r % GROUP
        io_mask = row_ok[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + q_rows[:, None] * HEAD_SIZE + d[None, :], mask=io_mask, other=0.0)
        pos = tl.load(pos_ptr + token, mask=row_ok, other=-1)  # a padding row keeps no position
        last = tl.load(pos_ptr + first_token + count - 1)  # positions rise along a tile
        first = pos * 0
        if window > 0:
            first = tl.maximum(pos - window + 1, 0)
        start = tl.load(pos_ptr + first_token)
        if window > 0:
            start = tl.maximum(start - window + 1, 0)
        if KV_QUANT:
            kv_scale = tl.load(kv_scale_ptr)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        denom = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        if EMULATED:  # the emulator's loops need host-side bounds: every tile of the step's longest sequence
            lo, hi = 0, MAX_LEN
        else:
            lo, hi = (start // BLOCK_N) * BLOCK_N, last + 1
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            in_seq = n <= last
            block = tl.load(table_ptr + seq * table_stride + n // BLOCK_SIZE, mask=in_seq, other=0)
            slot = block.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE
            kv_off = (slot[:, None] * KV_HEADS + kv_head) * HEAD_SIZE + d[None, :]
            kv_mask = in_seq[:, None] & d_mask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            if KV_QUANT:
                k = (k.to(tl.float32) * kv_scale).to(q_ptr.dtype.element_ty)
                v = (v.to(tl.float32) * kv_scale).to(q_ptr.dtype.element_ty)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * (scale * 1.4426950408889634)  # log2 units
            keep = (n[None, :] <= pos[:, None]) & (n[None, :] >= first[:, None])
            scores = tl.where(keep, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet adds nothing
            alpha = tl.exp2(m - m_safe)
            p = tl.exp2(scores - m_safe[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        if PDL:
            gdc_launch_dependents()
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        tl.store(out_ptr + q_rows[:, None] * HEAD_SIZE + d[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


    @triton.jit
    def _kv_code(y, scale, KV_QUANT: tl.constexpr):
        """What a cache of this format stores for y: FP8 x / s clamped to E4M3's range (the cast rounds to nearest
        even); INT8 round(x / s) half away from zero (C's round), clamped; else y."""
        if KV_QUANT == 1:
            y = tl.clamp(y / scale, -448.0, 448.0)
        elif KV_QUANT == 2:
            y = y / scale
            y = tl.clamp(tl.where(y >= 0, tl.floor(y + 0.5), -tl.floor(0.5 - y)), -128.0, 127.0)
        return y

    @triton.jit
    def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, k_ptr, v_ptr, q_out_ptr, kv_scale_ptr, qkv_stride,
                           HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                           HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                           ROPE: tl.constexpr, KV_QUANT: tl.constexpr, PDL: tl.constexpr = False):
        """One token: rotate its query and key heads (rotate-half form), write q to q_out, and its keys and values
        (coded for an int8/FP8 cache) to its cache slot."""
        if PDL:  # launched early behind the GEMV that made qkv; the attention after it may launch early too
            gdc_wait()
            gdc_launch_dependents()
        t = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_HALF)
        j_ok = j < HALF
        base = qkv_ptr + t.to(tl.int64) * qkv_stride
        off = h[:, None] * HEAD_SIZE + j[None, :]
        c = tl.load(cos_ptr + t * HEAD_SIZE + j, mask=j_ok & ROPE, other=1.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + t * HEAD_SIZE + j, mask=j_ok & ROPE, other=0.0).to(tl.float32)[None, :]
        # queries: cos/sin rows are [c, c] and [s, s] (the halves share frequencies); without rope c = 1, s = 0
        q_ok = (h < HEADS)[:, None] & j_ok[None, :]
        x1 = tl.load(base + off, mask=q_ok, other=0.0).to(tl.float32)
        x2 = tl.load(base + off + HALF, mask=q_ok, other=0.0).to(tl.float32)
        q_out = q_out_ptr + t.to(tl.int64) * (HEADS * HEAD_SIZE) + off
        tl.store(q_out, (x1 * c - x2 * s).to(q_out_ptr.dtype.element_ty), mask=q_ok)
        tl.store(q_out + HALF, (x2 * c + x1 * s).to(q_out_ptr.dtype.element_ty), mask=q_ok)
        # keys (rotated) and values, to the token's slot
        kv_ok = (h < KV_HEADS)[:, None] & j_ok[None, :]
        dest = tl.load(slots_ptr + t).to(tl.int64) * (KV_HEADS * HEAD_SIZE) + off
        scale = 1.0
        if KV_QUANT != 0:
            scale = tl.load(kv_scale_ptr)
        k_src = base + HEADS * HEAD_SIZE + off
        y1 = tl.load(k_src, mask=kv_ok, other=0.0).to(tl.float32)
        y2 = tl.load(k_src + HALF, mask=kv_ok, other=0.0).to(tl.float32)
        tl.store(k_ptr + dest, _kv_code(y1 * c - y2 * s, scale, KV_QUANT).to(k_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(k_ptr + dest + HALF, _kv_code(y2 * c + y1 * s, scale, KV_QUANT).to(k_ptr.dtype.element_ty),
                 mask=kv_ok)
        v_src = base + (HEADS + KV_HEADS) * HEAD_SIZE + off
        y1 = tl.load(v_src, mask=kv_ok, other=0.0).to(tl.float32)
        y2 = tl.load(v_src + HALF, mask=kv_ok, other=0.0).to(tl.float32)
        tl.store(v_ptr + dest, _kv_code(y1, scale, KV_QUANT).to(v_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(v_ptr + dest + HALF, _kv_code(y2, scale, KV_QUANT).to(v_ptr.dtype.element_ty), mask=kv_ok)

def tile_tokens(group: int, lens) -> int:
    """Tokens per tile: one when every sequence has one token (decoding), else enough for CHUNK_ROWS rows."""
    return 1 if max(lens) == 1 else max(1, CHUNK_ROWS // group)


def attention_tiles(lens: list[int], per_tile: int) -> torch.Tensor:
    """The tiles [N, 3] (first token, tokens, sequence) of a packed step whose sequences have `lens` tokens."""
    rows, offset = [], 0
    for seq, n in enumerate(lens):
        rows.extend((offset + j, min(per_tile, n - j), seq) for j in range(0, n, per_tile))
        offset += n
    return torch.tensor(rows, dtype=torch.int32).view(-1, 3)


def _pdl(pdl: bool) -> dict:
    """The launch flags of programmatic dependent launch (Hopper; the batch-1 fused step's chain of kernels)."""
    return {"PDL": True, "launch_pdl": True} if pdl and not emulated() else {}


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    token_pos: torch.Tensor, tiles: torch.Tensor, per_tile: int, block_size: int,
                    window: int | None = None, kv_scale: torch.Tensor | None = None, pdl: bool = False
                    ) -> torch.Tensor:
    """Attention of q [T, heads, head_size] over the paged cache (see the module docstring): [T, heads, head_size].
    `tiles` and `per_tile` come from attention_tiles / tile_tokens; `kv_scale` is given for an int8/FP8 cache;
    `pdl`: launched with programmatic dependent launch (between kernels that are too)."""
    tokens, heads, head_size = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    block_m = max(16, triton.next_power_of_2(per_tile * group))
    block_d = max(16, triton.next_power_of_2(head_size))
    block_n = 16 if emulated() else 64
    quant = kv_scale is not None
    _paged_attention_kernel[(tiles.shape[0], kv_heads)](
        q.contiguous(), k_cache, v_cache, block_tables, token_pos, tiles, out, kv_scale if quant else q,
        head_size ** -0.5, window or 0, block_tables.stride(0), KV_HEADS=kv_heads, GROUP=group,
        HEAD_SIZE=head_size, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_N=block_n,
        KV_QUANT=quant, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", EMULATED=emulated(),
        MAX_LEN=block_tables.shape[1] * block_size if emulated() else 0,  # a constant on the GPU: one compile
        num_warps=4, num_stages=2, **_pdl(pdl))
    return out


def write_rope_kv(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slots: torch.Tensor, heads: int, kv_scale: torch.Tensor | None = None,
                  pdl: bool = False) -> torch.Tensor:
    """One launch for the step's tokens: the rotary embedding (rotate-half; `rope` = (cos, sin) rows of [T, head
    size], or None) of q and k from qkv [T, (heads + 2 kv_heads) * head_size], k and v written to their cache
    `slots` (divided by kv_scale and rounded for an int8/FP8 cache). Returns q [T, heads, head_size]."""
    tokens = qkv.shape[0]
    kv_heads, head_size = k_cache.shape[1], k_cache.shape[2]
    q = torch.empty(tokens, heads, head_size, dtype=qkv.dtype, device=qkv.device)
    quant = {torch.float8_e4m3fn: 1, torch.int8: 2}.get(k_cache.dtype, 0)
    cos, sin = (rope[0].reshape(tokens, head_size), rope[1].reshape(tokens, head_size)) if rope else (qkv, qkv)
    _rope_write_kernel[(tokens,)](
        qkv, cos, sin, slots, k_cache, v_cache, q, kv_scale if quant else qkv, qkv.stride(0), HEADS=heads,
        KV_HEADS=kv_heads, HEAD_SIZE=head_size, HALF=head_size // 2,
        BLOCK_H=triton.next_power_of_2(max(heads, kv_heads)), BLOCK_HALF=triton.next_power_of_2(head_size // 2),
        ROPE=rope is not None, KV_QUANT=quant, **_pdl(pdl))
    return q
