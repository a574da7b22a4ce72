"""Triton kernels for the CUDA decode path: a batch-1 GEMV for bfloat16/float16 and FP8 weights.

A decode step at batch 1 is a chain of matrix-vector products that must stream every weight once; its speed is
the bandwidth a GEMV kernel reaches. cuBLAS reaches about 70% of the copy bandwidth on these skinny shapes
(shared/reference/gpu-measurements.md); this kernel gives each program a band of BLOCK_N output rows and walks K in
BLOCK_K steps with wide, coalesced loads, autotuned per (N, K).

The FP8 variant computes exactly what an FP8 GEMM does: the input is quantized with the static activation scale
(x / s_a, saturated, rounded to E4M3), products of E4M3 values are formed and accumulated in float32, and the sum is
scaled by s_a * s_w. Reading one byte per weight instead of two is where its speed comes from.

Used through the custom op `pipeline::gemv` so that torch.compile treats it as one opaque call.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the CUDA path is simply unavailable
    triton = None

if triton is not None:
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in (
            (4, 512, 2, 3), (4, 1024, 4, 3), (8, 256, 2, 4), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 128, 2, 4),
            (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 8, 3), (16, 1024, 8, 2), (32, 128, 4, 4), (32, 256, 4, 3),
            (32, 256, 8, 3), (32, 512, 8, 2), (64, 128, 4, 3), (64, 256, 8, 2),
            (16, 2048, 8, 2), (32, 1024, 8, 3), (64, 512, 8, 3), (128, 256, 8, 3),
        )
    ]

    @triton.autotune(configs=_CONFIGS, key=["N", "K", "FP8"])
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr, N, K,
                     HAS_BIAS: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        if FP8:
            a_scale = tl.load(a_scale_ptr)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0)
            if FP8:
                x = tl.clamp(x / a_scale, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if FP8:
            acc = acc * (a_scale * tl.load(w_scale_ptr))
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs_n, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


@torch.library.custom_op("pipeline::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act_scale: torch.Tensor | None,
         weight_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = x @ weight^T (+ bias) for one row x (shape [..., K] with one row in all); FP8 when scales are given."""
    K = x.shape[-1]
    N = weight.shape[0]
    x = x.reshape(K).contiguous()
    y = torch.empty(N, dtype=out_dtype, device=x.device)
    fp8 = act_scale is not None
    dummy = y  # an unused pointer argument
    _gemv_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
        x, weight, bias if bias is not None else dummy, y, act_scale if fp8 else dummy,
        weight_scale if fp8 else dummy, N, K, HAS_BIAS=bias is not None, FP8=fp8)
    return y


@gemv.register_fake
def _(x, weight, bias, act_scale, weight_scale, out_dtype):
    return torch.empty(weight.shape[0], dtype=out_dtype, device=x.device)


def linear_1row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                act_scale: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out_dtype = out_dtype or x.dtype
    y = torch.ops.pipeline.gemv(x, weight, bias, act_scale, weight_scale, out_dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
