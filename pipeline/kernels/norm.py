"""RMS norm of each row in one launch (torch's form of it is five or six elementwise and reduction kernels, which
a batched decoding step pays twice a layer): y = weight * (x * rsqrt(mean(x^2) + eps)), the normalized row rounded
to x's dtype before the weight multiplies it, as RankModel._norm computes it.

`add_rms_norm` also takes the residual add before the norm (h += delta, then the norm of the new h) in the same
pass: one launch and two fewer passes over the rows than an add kernel and then the norm, with the same bits (the
sum is rounded to h's dtype, as torch's add rounds it, before the norm reads it)."""

from __future__ import annotations

import torch

from pipeline.kernels.common import tl, triton

if triton is not None:

    @triton.jit
    def _store_norm(x, w_ptr, out_ptr, row, offs, keep, eps, N: tl.constexpr):
        """The norm of row x (float32, its values in the model dtype) into out's row."""
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + offs, (y * w).to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, eps, x_stride, N: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        keep = offs < N
        x = tl.load(x_ptr + row * x_stride + offs, mask=keep, other=0.0).to(tl.float32)
        _store_norm(x, w_ptr, out_ptr, row, offs, keep, eps, N)

    @triton.jit
    def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, out_ptr, eps, h_stride, d_stride, N: tl.constexpr,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        keep = offs < N
        h = tl.load(h_ptr + row * h_stride + offs, mask=keep, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + row * d_stride + offs, mask=keep, other=0.0).to(tl.float32)
        s = (h + d).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * h_stride + offs, s, mask=keep)
        _store_norm(s.to(tl.float32), w_ptr, out_ptr, row, offs, keep, eps, N)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm over the last dimension of x (rows contiguous in it); weight in x's dtype."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, eps, rows.stride(0), N=n, BLOCK=block,
                                       num_warps=min(16, max(1, block // 512)))
    return out.view(x.shape)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta in place (both [..., N] with rows contiguous in N, in one dtype), then the RMS norm of the new h:
    returns the norm; weight in h's dtype."""
    n = h.shape[-1]
    rows, deltas = h.view(-1, n), delta.reshape(-1, n)
    out = torch.empty(rows.shape, dtype=h.dtype, device=h.device)
    block = triton.next_power_of_2(n)
    _add_rms_norm_kernel[(rows.shape[0],)](rows, deltas, weight, out, eps, rows.stride(0), deltas.stride(0), N=n,
                                           BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return out.view(h.shape)
