"""The activations' FP8 cast before torch._scaled_mm in one pass: q = clamp(x / scale, -448, 448) as float8_e4m3fn
(round to nearest even), the arithmetic of pipeline.quantize.formats.quantize_fp8, which takes four passes and a
float32 copy of x (at prefill sizes that copy costs more than the FP8 GEMM saves)."""

from __future__ import annotations

import torch

from pipeline.kernels.common import tl, triton

BLOCK = 2048

if triton is not None:

    @triton.jit
    def _quantize_fp8_kernel(x_ptr, scale_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        x = tl.load(x_ptr + offs, mask=keep, other=0.0).to(tl.float32)
        q = tl.clamp(x / tl.load(scale_ptr), -448.0, 448.0)
        tl.store(out_ptr + offs, q.to(tl.float8e4nv), mask=keep)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (contiguous) at the per-tensor float32 `scale` [1] as float8_e4m3fn, same shape."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    n = x.numel()
    _quantize_fp8_kernel[(triton.cdiv(n, BLOCK),)](x, scale, out, n, BLOCK=BLOCK)
    return out
