"""Decode attention: one step's attention for a batch of sequences, in one kernel.

For each (sequence, KV head) it rotates q and k (rotate-half rotary embedding, when inv_freq is given), writes the
new k and v into the cache slot, and runs an online softmax over the new token and the valid cache slots before it,
for the KV head's group of query heads, with tensor-core dots. Where few (sequence, KV head) pairs would leave SMs
idle, several programs share a pair's slots (flash-decoding) and the last to finish combines them.

Layout: qkv [B, (heads + 2 kv_heads) * head_size] (q heads, then k, then v); k/v caches [B, kv_heads, max_len,
head_size] in qkv's dtype; valid [B, max_len] bool; positions [B] int64; slot a 0-d int64 tensor (the new token's
cache slot, the same for every sequence); inv_freq [head_size / 2] float32; output [B, heads * head_size].
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import emulated, gdc_launch_dependents, gdc_wait, split_buffers, tl, triton

if triton is not None:

    @triton.jit
    def _attention_load(k_ptr, v_ptr, valid_ptr, start, s_end, d, d_mask, BLOCK_S: tl.constexpr, D: tl.constexpr):
        """One block of cache slots [start, start + BLOCK_S), those from s_end on left out: (keys, values, keep).
        The keys, values and valid flags are loaded at once (none waits for another)."""
        offs_s = start + tl.arange(0, BLOCK_S)
        in_share = offs_s < s_end
        kv_mask = in_share[:, None] & d_mask[None, :]
        kb = tl.load(k_ptr + offs_s[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
        vb = tl.load(v_ptr + offs_s[:, None] * D + d[None, :], mask=kv_mask, other=0.0)
        keep = (tl.load(valid_ptr + offs_s, mask=in_share, other=0) != 0) & in_share
        return kb, vb, keep

    @triton.jit
    def _attention_update(q, m, denom, acc, kb, vb, keep, scale, IEEE: tl.constexpr):
        """The online softmax over one loaded block: returns the updated (m, denom, acc). A slot that is not kept
        gets no weight, and its value is zeroed (0 * a non-finite one is not 0)."""
        if IEEE:
            scores = tl.dot(q, tl.trans(kb), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(kb))
        scores = tl.where(keep[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        vb = tl.where(keep[:, None], vb, 0.0)
        if IEEE:
            pv = tl.dot(p.to(q.dtype), vb, input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), vb)
        return m_new, denom, acc * alpha[:, None] + pv

    @triton.jit
    def _rotate(q, k, row, q_off, k_off, d, d_mask, qd_mask, position, inv_freq_ptr, dt, D: tl.constexpr):
        """Rotate-half rotary embedding of q [GROUP_P, D_P] and k [D_P] (float32) at `position`: (q, k)."""
        HALF: tl.constexpr = D // 2
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        angle = position.to(tl.float32) * tl.load(inv_freq_ptr + (d % HALF), mask=d_mask, other=0.0)
        cos = tl.cos(angle).to(dt).to(tl.float32)
        sin = tl.sin(angle).to(dt).to(tl.float32)
        q_p = tl.load(row + q_off + partner[None, :], mask=qd_mask, other=0.0).to(tl.float32)
        k_p = tl.load(row + k_off + partner, mask=d_mask, other=0.0).to(tl.float32)
        return q * cos[None, :] + sign[None, :] * q_p * sin[None, :], k * cos + sign * k_p * sin

    @triton.jit
    def _combine_splits(m, denom, acc, part_ptr, counter_ptr, out_ptr, b, kvh, split, q_off, d, qd_mask, dt,
                        HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr,
                        D_P: tl.constexpr, SPLITS: tl.constexpr):
        """Flash-decoding's end: store this split's (m, denom, acc); the split of its (sequence, KV head) that
        finishes last (counted on counter_ptr) combines every split's and stores the output."""
        g = tl.arange(0, GROUP_P)
        # this split's partial: m [GROUP_P], denom [GROUP_P], acc [GROUP_P, D_P] in float32, padding included
        RECORD: tl.constexpr = GROUP_P * (D_P + 2)
        parts = part_ptr + (b * KV_HEADS + kvh).to(tl.int64) * SPLITS * RECORD
        part = parts + split * RECORD
        tl.store(part + g, m)
        tl.store(part + GROUP_P + g, denom)
        tl.store(part + 2 * GROUP_P + g[:, None] * D_P + d[None, :], acc)
        tl.debug_barrier()  # every thread of this program has stored before the counter counts it
        # release: the partial above is visible to the program that sees the last count; acquire: it sees all
        counter = counter_ptr + b * KV_HEADS + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1:  # the last split to finish combines
            m_max = tl.full((GROUP_P,), -1e30, tl.float32)
            for s in range(0, SPLITS):  # loads at L2 (.cg): other SMs wrote them, this SM's L1 may be stale
                m_max = tl.maximum(m_max, tl.load(parts + s * RECORD + g, cache_modifier=".cg"))
            num = tl.zeros((GROUP_P, D_P), dtype=tl.float32)
            den = tl.zeros((GROUP_P,), dtype=tl.float32)
            for s in range(0, SPLITS):
                part = parts + s * RECORD
                w = tl.exp(tl.load(part + g, cache_modifier=".cg") - m_max)
                den += w * tl.load(part + GROUP_P + g, cache_modifier=".cg")
                num += w[:, None] * tl.load(part + 2 * GROUP_P + g[:, None] * D_P + d[None, :],
                                            cache_modifier=".cg")
            out = num / den[:, None]
            tl.store(out_ptr + b * HEADS * D + q_off + d[None, :], out.to(dt), mask=qd_mask)
            tl.store(counter, 0)  # the next launch (and a CUDA graph's replay) counts from 0 again

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, inv_freq_ptr, out_ptr,
                                 part_ptr, counter_ptr, max_len, scale,
                                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, GROUP_P: tl.constexpr,
                                 D_P: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr, BLOCK_S: tl.constexpr,
                                 SPLITS: tl.constexpr, PDL: tl.constexpr = False, EMULATED: tl.constexpr = False,
                                 PRELOAD: tl.constexpr = False):
        """One (sequence, KV head, split) of decode_attention. The new token sits at `slot`; the cache's other
        slots that count are the valid ones before it (as RankModel.attention_mask has it: a query sees the valid
        slots at or before its own), so only slots [0, slot) are read, whatever max_len is. With SPLITS > 1
        (flash-decoding) each split runs the online softmax over its own BLOCK_S-aligned share of those slots and
        stores (m, denom, acc) to part_ptr; the split that finishes last (counted on counter_ptr) combines them.
        SPLITS == 1 touches neither. One kernel body, long as the algorithm is: the split's loads, online softmax and
        combine share registers that helper functions would only hide.

        The cache loads depend on `slot` alone, not on the valid flags (which only mask the scores and values
        afterwards), so that a block's keys, values and flags are all in flight at once. max_len is a runtime
        argument on a GPU; the CPU emulator (EMULATED, max_len a constant) cannot run a loop whose bound it loads,
        so there each split loops over the most blocks any slot could give it, the surplus masked off.

        PRELOAD: the split's first block is loaded first, before the qkv row (and, with PDL, before waiting for the
        kernel that writes it): none of the cache slots before the new token's is written by the kernels this
        one can overlap (the qkv GEMM), nor are the slot index and valid flags, which the step sets before its
        first layer. (Longer than most functions here: mostly this docstring; the body is one pass whose loads are
        ordered for overlap, its rotary and split-combining parts already helpers.)"""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = 0
        if SPLITS > 1:
            split = tl.program_id(2)
        first = split == 0  # the split that writes the new token to the cache and starts from it
        dt = qkv_ptr.dtype.element_ty
        G: tl.constexpr = HEADS // KV_HEADS
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, D_P)
        g_mask = g < G
        d_mask = d < D
        qd_mask = g_mask[:, None] & d_mask[None, :]
        cache = (b * KV_HEADS + kvh).to(tl.int64) * max_len * D
        flags = valid_ptr + b * max_len
        # this split's share of the blocks before the slot, and where it ends
        slot = tl.load(slot_ptr).to(tl.int32)
        share = (tl.cdiv(slot, BLOCK_S) + SPLITS - 1) // SPLITS
        s_first = split * share * BLOCK_S
        s_end = tl.minimum(s_first + share * BLOCK_S, slot)
        if PRELOAD:
            kb0, vb0, keep0 = _attention_load(k_ptr + cache, v_ptr + cache, flags, s_first, s_end, d, d_mask,
                                              BLOCK_S, D)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        row = qkv_ptr + b * (HEADS + 2 * KV_HEADS) * D
        q_off = (kvh * G + g)[:, None] * D
        k_off = HEADS * D + kvh * D
        v_off = (HEADS + KV_HEADS) * D + kvh * D
        q = tl.load(row + q_off + d[None, :], mask=qd_mask, other=0.0).to(tl.float32)
        k = tl.load(row + k_off + d, mask=d_mask, other=0.0).to(tl.float32)
        v = tl.load(row + v_off + d, mask=d_mask, other=0.0)
        if ROPE:
            q, k = _rotate(q, k, row, q_off, k_off, d, d_mask, qd_mask, tl.load(pos_ptr + b), inv_freq_ptr, dt, D)
        q = q.to(dt)
        k = k.to(dt)
        tl.store(k_ptr + cache + slot * D + d, k, mask=d_mask & first)
        tl.store(v_ptr + cache + slot * D + d, v, mask=d_mask & first)

        # the new token first (always attended), then the valid slots before it, online softmax
        m = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale
        m = tl.where(g_mask, m, 0.0)
        denom = tl.zeros((GROUP_P,), dtype=tl.float32) + 1.0
        acc = tl.zeros((GROUP_P, D_P), dtype=tl.float32) + v.to(tl.float32)[None, :]
        if SPLITS > 1:  # the other splits start empty; a finite m keeps a split with no valid slot free of NaN
            m = tl.where(first, m, -1e30)
            denom = tl.where(first, denom, 0.0)
            acc = tl.where(first, acc, 0.0)
        FIRST: tl.constexpr = 1 if PRELOAD else 0  # the blocks the loop starts after
        if PRELOAD:
            m, denom, acc = _attention_update(q, m, denom, acc, kb0, vb0, keep0, scale, IEEE)
        if EMULATED:  # the bound inline: the emulator makes an assigned value a tensor
            for i in range(FIRST, ((max_len + BLOCK_S - 1) // BLOCK_S + SPLITS - 1) // SPLITS):
                kb, vb, keep = _attention_load(k_ptr + cache, v_ptr + cache, flags, s_first + i * BLOCK_S, s_end,
                                               d, d_mask, BLOCK_S, D)
                m, denom, acc = _attention_update(q, m, denom, acc, kb, vb, keep, scale, IEEE)
        else:
            for i in range(FIRST, share):
                kb, vb, keep = _attention_load(k_ptr + cache, v_ptr + cache, flags, s_first + i * BLOCK_S, s_end,
                                               d, d_mask, BLOCK_S, D)
                m, denom, acc = _attention_update(q, m, denom, acc, kb, vb, keep, scale, IEEE)
        if SPLITS == 1:
            out = acc / denom[:, None]
            tl.store(out_ptr + b * HEADS * D + q_off + d[None, :], out.to(dt), mask=qd_mask)
        else:
            _combine_splits(m, denom, acc, part_ptr, counter_ptr, out_ptr, b, kvh, split, q_off, d, qd_mask, dt,
                            HEADS, KV_HEADS, D, GROUP_P, D_P, SPLITS)

    @triton.jit
    def _decode_attention_kernel_emulated(qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, inv_freq_ptr, out_ptr,
                                          part_ptr, counter_ptr, max_len: tl.constexpr, scale,
                                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                          GROUP_P: tl.constexpr, D_P: tl.constexpr, ROPE: tl.constexpr,
                                          IEEE: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                                          PRELOAD: tl.constexpr = False):
        _decode_attention_kernel(qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, inv_freq_ptr, out_ptr,
                                 part_ptr, counter_ptr, max_len, scale, HEADS, KV_HEADS, D, GROUP_P, D_P, ROPE, IEEE,
                                 BLOCK_S, SPLITS, False, True, PRELOAD)


ATTENTION_BLOCK_S = 64  # cache slots per block of the unsplit attention's loop, and attention_splits' unit
ATTENTION_SPLIT_BLOCK_S = 32  # the same with splits (flash-decoding), attention_block
ATTENTION_WARPS = 4
ATTENTION_PROGRAMS = 264  # two programs per SM of an H100/H200 (132 SMs): what flash-decoding splits aim for


def attention_splits(batch: int, kv_heads: int, max_len: int) -> int:
    """How many programs share each (sequence, KV head)'s slots (flash-decoding): enough for the grid to reach
    ATTENTION_PROGRAMS, but at least one block of slots each. At batch 1 of Llama-3-8B (8 KV heads, 384 slots: 6
    blocks) that is 6 splits, 48 programs instead of 8. From half of ATTENTION_PROGRAMS (sequence, KV head) pairs
    on it is 1 (no split): there the cost of combining splits outweighs the programs gained."""
    pairs = batch * kv_heads
    if 2 * pairs >= ATTENTION_PROGRAMS:
        return 1
    blocks = triton.cdiv(max_len, ATTENTION_BLOCK_S)
    splits = min(blocks, max(1, triton.cdiv(ATTENTION_PROGRAMS, pairs)))
    return triton.cdiv(blocks, triton.cdiv(blocks, splits))  # no split left without blocks (6 blocks: 4 -> 3)


def attention_block(splits: int) -> int:
    """The slots of a block of the attention's loop: ATTENTION_SPLIT_BLOCK_S with splits, else ATTENTION_BLOCK_S.
    A split's share is a whole number of blocks, so the smaller block spreads the slots more evenly over splits."""
    return ATTENTION_BLOCK_S if splits == 1 else ATTENTION_SPLIT_BLOCK_S


def attention_stages(splits: int) -> int | None:
    """The attention loop's pipeline stages: 1 (no software pipelining, more programs resident) where each
    program loops over all of its sequence's slots (splits 1), else Triton's default (None)."""
    return 1 if splits == 1 else None


@torch.library.custom_op("pipeline::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor,
                     positions: torch.Tensor, slot: torch.Tensor, inv_freq: torch.Tensor | None, heads: int,
                     kv_heads: int, head_size: int, pdl: bool = False, splits: int | None = None) -> torch.Tensor:
    """One decode step's attention for qkv [B, (heads + 2 kv_heads) * head_size]: rotary embedding (if inv_freq),
    k and v written to the caches [B, kv_heads, max_len, head_size] at `slot`, and softmax(q k^T / sqrt(d)) v over
    the new token and the valid slots before `slot`. Returns [B, heads * head_size]. splits: programs per
    (sequence, KV head), each over a share of the slots (None: attention_splits chooses; tests force it)."""
    return launch_decode_attention(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads, kv_heads,
                                   head_size, pdl, splits)


def launch_decode_attention(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads, kv_heads, head_size,
                            pdl=False, splits=None, block_s=None, num_warps=ATTENTION_WARPS,
                            num_stages=-1, preload=True) -> torch.Tensor:
    """decode_attention's launch, its tile (block_s slots a loop step; None: attention_block), warps and pipeline
    stages given (bench/profile_step.py --attention times each so; num_stages -1: attention_stages, None: Triton's
    default). preload: each program loads its first block of the cache before the qkv row (before waiting for the
    qkv GEMM, with PDL); bench/profile_step.py --attention times it off."""
    batch = qkv.shape[0]
    max_len = k_cache.shape[2]
    out = torch.empty((batch, heads * head_size), dtype=qkv.dtype, device=qkv.device)
    group = heads // kv_heads
    group_p, d_p = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_size))
    if splits is None:
        splits = attention_splits(batch, kv_heads, max_len)
    elif splits < 1:
        raise ValueError(f"decode_attention: splits={splits}; give 1 or more (or None to choose)")
    # per split: m [GROUP_P], denom [GROUP_P], acc [GROUP_P, D_P]; a counter per (sequence, KV head)
    part, counter = (split_buffers(("attention", batch, kv_heads, splits, group_p, d_p), qkv.device,
                                    batch * kv_heads * splits * group_p * (d_p + 2), batch * kv_heads)
                     if splits > 1 else (out, out))
    on_emulator = emulated()
    kernel = _decode_attention_kernel_emulated if on_emulator else _decode_attention_kernel
    extra = dict(PDL=True, launch_pdl=True) if pdl and not on_emulator else {}
    if num_stages == -1:
        num_stages = attention_stages(splits)
    if block_s is None:
        block_s = attention_block(splits)
    if num_stages is not None and not on_emulator:
        extra["num_stages"] = num_stages
    kernel[(batch, kv_heads, splits)](
        qkv, k_cache, v_cache, valid.view(torch.uint8), positions, slot,
        inv_freq if inv_freq is not None else qkv, out, part, counter, max_len, head_size ** -0.5,
        HEADS=heads, KV_HEADS=kv_heads, D=head_size, GROUP_P=group_p, D_P=d_p, ROPE=inv_freq is not None,
        IEEE=qkv.dtype == torch.float32, BLOCK_S=block_s, SPLITS=splits, PRELOAD=preload, num_warps=num_warps,
        **extra)
    return out


@decode_attention.register_fake
def _(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads, kv_heads, head_size, pdl=False, splits=None):
    return torch.empty((qkv.shape[0], heads * head_size), dtype=qkv.dtype, device=qkv.device)
