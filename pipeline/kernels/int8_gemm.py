"""W8A8 on the GPU in two launches: the input's per-token int8 quantization (SmoothQuant's smoother divided out
first), then an int8 x int8 GEMM with int32 accumulation whose epilogue applies the per-token and per-channel
scales (and the bias) and stores the model dtype. cuBLAS's int8 GEMM (torch._int_mm) ran at 0.7-1.4x bfloat16's
speed on an H200 and returns int32 [M, N] for separate kernels to rescale; this GEMM ran at 1.4-1.7x at 32,768 rows
(bench/results/gpu-h200/quant-run4/).

The arithmetic is pipeline/quantize/formats.py's (int8_activation_quantize, smoothquant_linear): x / smoother rounded
to the model dtype; scale = amax / 127 per row (1 / 127 for a zero row) or the static per-tensor scale; q =
round-half-even(x / scale) clamped to [-128, 127]; y = float32(acc) * s_x * s_w rounded to the model dtype, then
the bias added and rounded again (as the reference adds it).

Layout: x [M, K] in the model dtype; weight int8 [N, K]; per-channel scales float32 [N]; bias [N] in the model dtype.
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import emulated, tl, triton

INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}

if triton is not None:

    @triton.jit
    def _round_half_even(y):
        f = tl.floor(y)
        d = y - f
        odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 where f is odd
        return f + tl.where(d > 0.5, 1.0, tl.where(d < 0.5, 0.0, odd))

    @triton.jit
    def _quantize_rows_kernel(x_ptr, smoother_ptr, static_ptr, q_ptr, s_ptr, x_stride, K: tl.constexpr,
                              BLOCK: tl.constexpr, SMOOTH: tl.constexpr, STATIC: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        keep = offs < K
        x = tl.load(x_ptr + row * x_stride + offs, mask=keep, other=0.0)
        if SMOOTH:  # x / smoother in float32, rounded to the model dtype (SmoothQuantLinear.__call__)
            smoother = tl.load(smoother_ptr + offs, mask=keep, other=1.0)
            x = tl.math.div_rn(x.to(tl.float32), smoother).to(x_ptr.dtype.element_ty)
        xf = x.to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr)
        else:
            amax = tl.max(tl.abs(xf), axis=0)
            scale = tl.math.div_rn(tl.where(amax > 0, amax, 1.0), 127.0)
        q = tl.clamp(_round_half_even(tl.math.div_rn(xf, scale)), -128.0, 127.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=keep)
        tl.store(s_ptr + row, scale)

    # the configs timed on an H200 (bench/gemm_shapes.py --w8a8; bench/results/gpu-h200/quant-run4/)
    CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in ((128, 256, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 128, 8, 4),
                                 (64, 256, 128, 4, 4), (64, 128, 256, 4, 3), (128, 256, 64, 8, 4),
                                 (256, 128, 128, 8, 3), (64, 64, 256, 4, 4))
    ]
    # At 32,768 rows 256 x 128 x 128 was the fastest or within 3% of it on every Llama-3-8B GEMM (1.41-1.68x
    # cuBLAS's bfloat16); fewer rows take 64-row tiles, so that 256 rows still make 2 x N / 128 programs.
    LARGE, SMALL = CONFIGS[6], CONFIGS[4]

    @triton.jit
    def _int8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          EVEN_K: tl.constexpr):
        # K a constant: the emulator's loops need host-side bounds (a model has two or three values of K)
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_n  # programs of GROUP_M row blocks share each weight tile through L2
        first_m = (pid // in_group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % size_m
        pid_n = (pid % in_group) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        am = rm % M  # rows and columns past the edge read a valid one and are not stored
        wn = rn % N
        a = a_ptr + am[:, None].to(tl.int64) * K + rk[None, :]
        w = w_ptr + wn[None, :].to(tl.int64) * K + rk[:, None]  # [BLOCK_K, BLOCK_N] of W^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x = tl.load(a)
                y = tl.load(w)
            else:
                left = K - k * BLOCK_K
                x = tl.load(a, mask=rk[None, :] < left, other=0)
                y = tl.load(w, mask=rk[:, None] < left, other=0)
            acc = tl.dot(x, y, acc, out_dtype=tl.int32)
            a += BLOCK_K
            w += BLOCK_K
        s_x = tl.load(as_ptr + am)
        s_w = tl.load(ws_ptr + wn)
        out = acc.to(tl.float32) * s_x[:, None] * s_w[None, :]
        out = out.to(y_ptr.dtype.element_ty)
        if HAS_BIAS:
            out = (out.to(tl.float32) + tl.load(b_ptr + wn)[None, :].to(tl.float32)).to(y_ptr.dtype.element_ty)
        keep = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], out, mask=keep)


def quantize_rows(x: torch.Tensor, smoother: torch.Tensor | None = None,
                  static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (rows contiguous in K) -> (int8 [M, K], float32 scales [M]): per token unless static_scale (float32
    [1]); smoother (float32 [K]) divided out first."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(m,)](x, smoother if smoother is not None else s, static_scale if static_scale is not
                                    None else s, q, s, x.stride(0), K=k, BLOCK=block, SMOOTH=smoother is not None,
                                    STATIC=static_scale is not None, num_warps=min(16, max(1, block // 1024)))
    return q, s


def config_for(m: int) -> dict:
    """The GEMM's tile config for m rows: a fixed choice, not autotuned (a timing run must not start inside a CUDA
    graph's capture)."""
    if emulated():
        return dict(INTERPRETER_CONFIG)
    c = LARGE if m > 512 else SMALL
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


def int8_mm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """float32(xq @ weight^T, int32 sums) * xs[:, None] * weight_scale[None, :] (+ bias) in out_dtype; `config` (one
    of CONFIGS' kwargs plus num_warps/num_stages) instead of config_for's."""
    m, k = xq.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return y
    c = dict(config or config_for(m))
    warps, stages = c.pop("num_warps", 4), c.pop("num_stages", 2)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
    _int8_gemm_kernel[grid](xq, xs, weight, weight_scale, bias if bias is not None else weight_scale, y, m, n, k,
                            HAS_BIAS=bias is not None, EVEN_K=k % c["BLOCK_K"] == 0, num_warps=warps,
                            num_stages=stages, **c)
    return y


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, static_scale: torch.Tensor | None,
                smoother: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """SmoothQuantLinear's product on the GPU: x [..., K] -> [..., N] in x's dtype."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) != shape[-1]):
        rows = rows.contiguous()
    xq, xs = quantize_rows(rows, smoother, static_scale)
    return int8_mm(xq, xs, weight, weight_scale, bias, x.dtype).reshape(*shape[:-1], weight.shape[0])


@torch.library.custom_op("pipeline::w8a8_linear", mutates_args=())
def w8a8_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   static_scale: torch.Tensor | None, smoother: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """w8a8_linear as an op: torch.compile calls it unopened (the Triton launches stay outside its graph)."""
    return w8a8_linear(x, weight, weight_scale, static_scale, smoother, bias)


@w8a8_linear_op.register_fake
def _(x, weight, weight_scale, static_scale, smoother, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
