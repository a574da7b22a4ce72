"""The gated MLP's activation after the fused [fc; gate] GEMM in one pass: h = silu(fc) * gate. torch runs it as two
unvectorized elementwise kernels over the strided halves of the GEMM's output (silu, then the product), and an FP8
proj then reads h once more to cast it; here one launch reads [fc | gate] once and writes h, or h already cast to
the proj's FP8 input (kernels/fp8.py's arithmetic), so the proj skips its cast.

The rounding is the unfused ops': silu in float32 (IEEE division and libdevice's expf on a GPU, as torch's CUDA
kernel computes it) rounded to the model dtype, then the product in float32 rounded to the model dtype."""

from __future__ import annotations

import torch

from pipeline.kernels.common import emulated, tl, triton

BLOCK = 1024  # columns of h per program: 8 bfloat16 a thread at 4 warps (16-byte loads and stores)

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _silu_mul_kernel(y_ptr, scale_ptr, out_ptr, y_stride, inter, BLOCK: tl.constexpr, FP8: tl.constexpr,
                         LIBDEVICE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < inter
        dt = y_ptr.dtype.element_ty
        fc = tl.load(y_ptr + row * y_stride + offs, mask=keep, other=0.0).to(tl.float32)
        gate = tl.load(y_ptr + row * y_stride + inter + offs, mask=keep, other=0.0).to(tl.float32)
        if LIBDEVICE:  # torch's expf; tl.exp is ex2.approx, a few float32 ulps off
            e = libdevice.exp(-fc)
        else:  # the emulator has no libdevice; its tl.exp is numpy's float32 exp
            e = tl.exp(-fc)
        silu = tl.math.div_rn(fc, 1.0 + e).to(dt).to(tl.float32)
        h = (silu * gate).to(dt)
        if FP8:
            q = tl.clamp(h.to(tl.float32) / tl.load(scale_ptr), -448.0, 448.0)  # as kernels/fp8.py casts h
            tl.store(out_ptr + row * inter + offs, q.to(tl.float8e4nv), mask=keep)
        else:
            tl.store(out_ptr + row * inter + offs, h, mask=keep)


def silu_mul(y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(fc) * gate of the fused GEMM's output y [..., 2I] (fc first; the last dimension contiguous): h [..., I]
    in y's dtype, or with `scale` (a per-tensor float32 [1]: the FP8 proj's act_scale) h cast to float8_e4m3fn at
    it, clamp(h / scale, -448, 448)."""
    inter = y.shape[-1] // 2
    rows = y.reshape(-1, y.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], inter), dtype=y.dtype if scale is None else torch.float8_e4m3fn,
                      device=y.device)
    if rows.shape[0] and inter:
        grid = (rows.shape[0], triton.cdiv(inter, BLOCK))
        _silu_mul_kernel[grid](rows, scale if scale is not None else rows, out, rows.stride(0), inter, BLOCK=BLOCK,
                               FP8=scale is not None, LIBDEVICE=not emulated(), num_warps=4)
    return out.view(*y.shape[:-1], inter)
