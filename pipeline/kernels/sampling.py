"""Greedy sampling: the argmax of each row of logits in one kernel of many programs.

torch.argmax reads a row of a large vocabulary (Llama-3's 128256) with few thread blocks; here each program takes a
block of ARGMAX_BLOCK logits of one row, and the last of a row's programs to finish picks among their maxima.

Layout: logits [B, V] with each row's logits consecutive (any row stride), V < 2**24; the result int64 [B], the
first index of each row's largest value (torch.argmax's), a NaN counting as +inf.
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import split_buffers, tl, triton

ARGMAX_BLOCK = 2048  # logits per program (128256 of Llama-3's vocabulary: 63 programs a row)

if triton is not None:

    @triton.jit
    def _greedy_argmax_kernel(x_ptr, part_ptr, counter_ptr, out_ptr, V, row_stride, BLOCK: tl.constexpr,
                              BLOCKS_P: tl.constexpr):
        """One BLOCK of one row of logits: its largest value and the first index holding it go to part_ptr (value,
        index as a float32: exact below 2**24); the program that finishes its row last (counted on counter_ptr)
        picks, over the row's blocks in order, the first holding the largest, so the result is torch.argmax's
        first maximum. A NaN counts as +inf. No loop: the emulator runs it as the GPU does."""
        b = tl.program_id(0)
        blk = tl.program_id(1)
        blocks = tl.num_programs(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + b.to(tl.int64) * row_stride + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.where(x != x, float("inf"), x)
        value, index = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        parts = part_ptr + b * 2 * BLOCKS_P
        tl.store(parts + blk, value)
        tl.store(parts + BLOCKS_P + blk, (blk * BLOCK + index).to(tl.float32))
        tl.debug_barrier()  # every thread of this program has stored before the counter counts it
        counter = counter_ptr + b
        if tl.atomic_add(counter, 1, sem="acq_rel") == blocks - 1:  # the last block of the row to finish
            p = tl.arange(0, BLOCKS_P)
            values = tl.load(parts + p, mask=p < blocks, other=float("-inf"), cache_modifier=".cg")
            best, which = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
            chosen = tl.load(parts + BLOCKS_P + which, cache_modifier=".cg")
            tl.store(out_ptr + b, chosen.to(tl.int64))
            tl.store(counter, 0)  # the next launch (and a CUDA graph's replay) counts from 0 again


@torch.library.custom_op("pipeline::greedy_argmax", mutates_args=())
def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for logits [B, V] (rows contiguous, any row stride): int64 [B], the first index
    of each row's largest value. One kernel of B x ceil(V / ARGMAX_BLOCK) programs, each a block of a row, the last
    of a row to finish choosing among their maxima: torch's argmax reads a row of this size with few blocks."""
    batch, vocab = logits.shape
    if logits.stride(-1) != 1 or vocab >= 2 ** 24:
        raise ValueError(f"greedy_argmax takes rows of consecutive logits and fewer than 2**24 of them, not "
                         f"shape {tuple(logits.shape)} with strides {logits.stride()}")
    blocks = triton.cdiv(vocab, ARGMAX_BLOCK)
    blocks_p = triton.next_power_of_2(blocks)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    part, counter = split_buffers(("argmax", batch, blocks_p), logits.device, batch * 2 * blocks_p, batch)
    _greedy_argmax_kernel[(batch, blocks)](logits, part, counter, out, vocab, logits.stride(0), BLOCK=ARGMAX_BLOCK,
                                           BLOCKS_P=blocks_p, num_warps=4)
    return out


@greedy_argmax.register_fake
def _(logits):
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)

