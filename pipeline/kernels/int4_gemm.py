"""The W4A16_AWQ GEMM: y = (x * prequant) @ dequantize(packed int4, group scales)^T (+ bias), for any rows.

The weight stays packed as the checkpoint holds it (pipeline/quantize/schemes/int4_awq.py): int8 [N_p / 2, K_p],
packed row r holding output row 2r in its low nibble and 2r + 1 in its high nibble; scales [N_p, K_p / group] in the
model dtype; prequant [K_p] in the model dtype. A program takes BLOCK_H packed rows (2 * BLOCK_H outputs) and
BLOCK_M input rows, and per BLOCK_K chunk unpacks both nibbles, scales them by their group's scale and rounds them to
the model dtype (as the CPU emulation, pipeline.quantize.runtime.GroupwiseInt4Linear, dequantizes), then multiplies
with float32 sums. Decode reads every weight once, so 4-bit weights read a quarter of bfloat16's bytes.

Two forms per config (DOT): 0, CUDA-core FMAs for one input row (the batch-1 GEMV); 1, tensor-core dots with the
dequantized tile as the tall operand and BLOCK_M (>= 16) input rows as the narrow one. N and K are the real
(unpadded) widths: padded rows are never stored, padded columns never read.

The FMA form is bound by the instructions per weight, not its loads (quant run 2: 25% of the bandwidth roofline
with ten a weight), so it reads the weight as 32-bit words (4 columns of a packed row: 8 nibbles) and makes each
nibble's float with a shift and one and-or into the bits of 1 + v / 16 (v = the nibble xor 8, the signed value + 8):
three instructions a weight with its FMA. Per word column the sums of the 4 columns come back to sum((v - 8) * x) =
16 * sum(f * x) - 24 * sum(x), times the group's scale. So the scale multiplies sums, not each weight: the output
differs from the emulation's (which rounds each q * scale to the model dtype) by that rounding, and equals the exact
q * scale weights times x to float32 sums.
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import emulated, gdc_launch_dependents, gdc_wait, tl, triton

INTERPRETER_CONFIG = {"BLOCK_H": 4, "BLOCK_K": 32}  # the emulator's one config (BLOCK_M and DOT chosen per call)
# the fused GEMV's in the emulator: fewer, larger programs (the emulator's time goes per program and operation)
FUSED_INTERPRETER_CONFIG = {"BLOCK_H": 16, "BLOCK_K": 64}
DTYPES = (torch.bfloat16, torch.float16)

if triton is not None:
    CONFIGS = [
        triton.Config({"BLOCK_H": bh, "BLOCK_K": bk, "BLOCK_M": 1, "DOT": 0}, num_warps=w, num_stages=s)
        for bh, bk, w, s in ((16, 128, 4, 4), (32, 128, 8, 3), (8, 256, 4, 3), (16, 256, 4, 3), (16, 512, 8, 3),
                             (8, 512, 4, 2), (8, 1024, 4, 2),
                             # narrow and long, as the bfloat16 GEMV's best (pipeline.kernels.gemv): 2-4 packed
                             # rows a program, so 512-1,024 programs on a 4,096-row weight keep more loads in flight
                             (4, 512, 4, 3), (4, 1024, 4, 2), (2, 1024, 4, 2), (2, 2048, 4, 2), (4, 2048, 8, 2))
    ] + [
        triton.Config({"BLOCK_H": bh, "BLOCK_K": bk, "BLOCK_M": bm, "DOT": 1}, num_warps=w, num_stages=s)
        for bm in (16, 64)
        for bh, bk, w, s in ((16, 128, 4, 4), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3))
    ]

    def _prune(configs, named_args, **kwargs):
        """One row: the FMA form and the dots over 16 rows; more: the dots whose BLOCK_M the rows fill; and
        about a program per SM (132 on an H100/H200) or more, where the weight has the rows for it."""
        rows, nh = named_args["M_BUCKET"], -(-named_args["N"] // 2)

        def form(c):
            if rows == 1:
                return c.kwargs["DOT"] == 0 or c.kwargs["BLOCK_M"] == 16
            return c.kwargs["DOT"] == 1 and (c.kwargs["BLOCK_M"] == 16 or rows > 16)

        kept = [c for c in configs if form(c)]
        busy = [c for c in kept if nh // c.kwargs["BLOCK_H"] * max(1, rows // c.kwargs["BLOCK_M"]) >= 128]
        return busy or kept

    @triton.jit
    def _int4_mm(x_ptr, pq_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KP, GROUPS, M_BUCKET,
                 HAS_PQ: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr,
                 F32_DOT: tl.constexpr = False):
        """y [M, N] for BLOCK_H packed rows and BLOCK_M input rows (see the module). x [M, K] row-major; q rows of
        KP bytes; GROUPS scales per output row. M_BUCKET only keys the autotuning. On a GPU K is a runtime
        argument; the emulator's entry passes it as a constant (its loops need one) and F32_DOT (its tl.dot of
        bfloat16 operands is wrong: Triton 3.6)."""
        pid_h = tl.program_id(0)
        pid_m = tl.program_id(1)
        dt = y_ptr.dtype.element_ty
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        rows_h = tl.minimum(offs_h, (N + 1) // 2 - 1).to(tl.int64)  # clamped: the weight loads need no row mask
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        if DOT == 1:
            q_rows = q_ptr + rows_h[:, None] * KP
            s_lo = s_ptr + 2 * rows_h * GROUPS
            x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * K
            arange_k = tl.arange(0, BLOCK_K)
            acc_lo = tl.zeros((BLOCK_H, BLOCK_M), dtype=tl.float32)
            acc_hi = tl.zeros_like(acc_lo)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + arange_k
                k_mask = offs_k < K
                sl, sh = _scales(s_lo, k0, GROUPS, GROUP, BLOCK_K, GROUP)
                if EVEN_K:
                    p = tl.load(q_rows + offs_k[None, :], eviction_policy="evict_first")
                    x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
                else:
                    p = tl.load(q_rows + offs_k[None, :], mask=k_mask[None, :], other=0,
                                eviction_policy="evict_first")
                    x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w_lo, w_hi = _dequantize(p, sl, sh, dt)
                if HAS_PQ:  # x * prequant, rounded to the model dtype as the unfused multiply rounds it
                    pq = tl.load(pq_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                    x = (x.to(tl.float32) * pq[None, :]).to(dt)
                if F32_DOT:
                    xt = tl.trans(x.to(tl.float32))
                    acc_lo += tl.dot(w_lo.to(tl.float32), xt, input_precision="ieee")
                    acc_hi += tl.dot(w_hi.to(tl.float32), xt, input_precision="ieee")
                else:
                    xt = tl.trans(x.to(dt))
                    acc_lo += tl.dot(w_lo, xt)
                    acc_hi += tl.dot(w_hi, xt)
            y_lo = acc_lo
            y_hi = acc_hi
        else:  # one row (BLOCK_M = 1): the word form of the module's note
            x_row = x_ptr + pid_m.to(tl.int64) * K
            BLOCK_W: tl.constexpr = BLOCK_K // 4
            acc_lo = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
            acc_hi = tl.zeros_like(acc_lo)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                if HAS_PQ:  # x * prequant, rounded to the model dtype as the unfused multiply rounds it
                    x = (x * tl.load(pq_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)).to(dt).to(tl.float32)
                x0, x1, x2, x3 = _columns(x, BLOCK_W)
                offs_w = k0 // 4 + tl.arange(0, BLOCK_W)
                acc_lo, acc_hi = _fma_words(acc_lo, acc_hi, x0, x1, x2, x3, q_ptr, s_ptr, rows_h, k0, offs_w, K, KP,
                                            GROUPS, GROUP, BLOCK_K, EVEN_K)
            y_lo = tl.sum(acc_lo, axis=1)[:, None]
            y_hi = tl.sum(acc_hi, axis=1)[:, None]
        out_lo = 2 * offs_h
        out_hi = out_lo + 1
        if HAS_BIAS:
            y_lo += tl.load(b_ptr + out_lo, mask=out_lo < N, other=0.0).to(tl.float32)[:, None]
            y_hi += tl.load(b_ptr + out_hi, mask=out_hi < N, other=0.0).to(tl.float32)[:, None]
        y_rows = y_ptr + offs_m.to(tl.int64)[None, :] * N
        tl.store(y_rows + out_lo[:, None], y_lo.to(dt), mask=(out_lo < N)[:, None] & m_mask[None, :])
        tl.store(y_rows + out_hi[:, None], y_hi.to(dt), mask=(out_hi < N)[:, None] & m_mask[None, :])

    @triton.jit
    def _columns(x, BLOCK_W: tl.constexpr):
        """x [4 * BLOCK_W] -> its columns 16 * x[4i + j] for j = 0..3 ([BLOCK_W] each; times 16 for _fma_words,
        exact): x loads contiguous (vector loads) and splits in registers, where strided loads would be a scalar
        load an element."""
        a, b = tl.split(tl.reshape(16.0 * x, (BLOCK_W, 2, 2)))  # a[i, t] = x[4i + 2t], b[i, t] = x[4i + 2t + 1]
        x0, x2 = tl.split(a)
        x1, x3 = tl.split(b)
        return x0, x1, x2, x3

    @triton.jit
    def _nibble(w, one, N: tl.constexpr):
        """1 + v / 16 in float32 for the nibble v at bits 4N..4N+3 of w: v moved to the top of the mantissa (bits
        19-22) and or-ed into 1.0's bits `one` (a shift and one and-or)."""
        if 4 * N <= 19:
            t = w << (19 - 4 * N)
        else:
            t = w >> (4 * N - 19)
        return ((t & 0x780000) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _fma_words(acc_lo, acc_hi, x0, x1, x2, x3, q_ptr, s_ptr, rows_h, k0, offs_w, K, KP, GROUPS,
                   GROUP: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """One BLOCK_K chunk of the packed rows rows_h ([BLOCK_H]) times the input's columns x0..x3 (column j of
        each word times 16, [BLOCK_K / 4] float32, 0 past K; see _columns), added to the [BLOCK_H, BLOCK_K / 4] accumulators of the low-
        and high-nibble rows (see the module). A packed row's word holds its columns 4i..4i+3: byte j's low nibble
        is row 2r's column 4i + j, its high nibble row 2r + 1's."""
        words = q_ptr.to(tl.pointer_type(tl.int32)) + rows_h[:, None] * (KP // 4) + offs_w[None, :]
        if EVEN_K:
            w = tl.load(words, eviction_policy="evict_first")
        else:
            w = tl.load(words, mask=(4 * offs_w < K)[None, :], other=0, eviction_policy="evict_first")
        w = w ^ -0x77777778  # 0x88888888: each nibble's signed value + 8
        # 1.0's bits as a value the compilers cannot fold (GROUPS > 0 always): with both masks as constants the
        # and-or compiles to two instructions, with one in a register to one (LOP3 takes one immediate)
        one = tl.where(GROUPS > 0, 0x3F800000, 0)
        # x0..x3 come times 16: sum(f * 16x) - 24 * sum(x) = sum((v - 8) * x), the chain started at the offset
        offset = (-1.5 * (x0 + x1 + x2 + x3))[None, :]
        a_lo = offset + _nibble(w, one, 0) * x0[None, :] + _nibble(w, one, 2) * x1[None, :] \
            + _nibble(w, one, 4) * x2[None, :] + _nibble(w, one, 6) * x3[None, :]
        a_hi = offset + _nibble(w, one, 1) * x0[None, :] + _nibble(w, one, 3) * x1[None, :] \
            + _nibble(w, one, 5) * x2[None, :] + _nibble(w, one, 7) * x3[None, :]
        sl, sh = _scales(s_ptr + 2 * rows_h * GROUPS, k0, GROUPS, GROUP, BLOCK_K, GROUP // 4)  # a scale per word
        acc_lo += a_lo * sl.to(tl.float32)
        acc_hi += a_hi * sh.to(tl.float32)
        return acc_lo, acc_hi

    @triton.jit
    def _scales(s_lo, k0, GROUPS, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, REPEAT: tl.constexpr):
        """The scales of a chunk's low-nibble rows (s_lo [BLOCK_H]: their scale rows) and high-nibble rows (the
        next rows): a chunk inside one group takes one scale per row, loaded as a vector and broadcast along K
        ([BLOCK_H, 1]: a load or two per thread; shaped like the weight tile it would be one load per row in every
        thread); a wider chunk its BLOCK_K // GROUP scales per row as one small tile, each repeated REPEAT times
        (GROUP for a tile of columns, GROUP // 4 for one of 4-column words; gathered per element instead, they
        were 32 to 64 scalar loads an iteration)."""
        if BLOCK_K <= GROUP:
            sl = tl.load(s_lo + k0 // GROUP)[:, None]
            sh = tl.load(s_lo + GROUPS + k0 // GROUP)[:, None]
        else:
            G: tl.constexpr = BLOCK_K // GROUP
            g = k0 // GROUP + tl.arange(0, G)
            g_mask = (g < GROUPS)[None, :]
            sl = _repeat(tl.load(s_lo[:, None] + g[None, :], mask=g_mask, other=0.0), REPEAT)
            sh = _repeat(tl.load(s_lo[:, None] + GROUPS + g[None, :], mask=g_mask, other=0.0), REPEAT)
        return sl, sh

    @triton.jit
    def _repeat(s, TIMES: tl.constexpr):
        """[rows, G] -> [rows, G * TIMES]: each value repeated TIMES times along the row."""
        rows: tl.constexpr = s.shape[0]
        G: tl.constexpr = s.shape[1]
        return tl.reshape(tl.broadcast_to(s[:, :, None], (rows, G, TIMES)), (rows, G * TIMES))

    @triton.jit
    def _dequantize(p, sl, sh, dt):
        """Packed bytes -> (low-nibble, high-nibble) weights in the model dtype: q * scale rounded once, as the
        emulation's float32 product cast to the model dtype. A nibble u is the signed value (u ^ 8) - 8; the float
        of that is made without an int-to-float conversion (a quarter-rate instruction on GPUs): the bits
        0x4B000000 | (u ^ 8) are the float 2^23 + (u ^ 8), exactly, and subtracting 2^23 + 8 leaves the value."""
        t = p.to(tl.int32) ^ 0x88
        lo = ((t & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        hi = (((t >> 4) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        return (lo * sl.to(tl.float32)).to(dt), (hi * sh.to(tl.float32)).to(dt)

    @triton.jit
    def _int4_mm_emulated(x_ptr, pq_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, KP, GROUPS, M_BUCKET,
                          HAS_PQ: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr):
        _int4_mm(x_ptr, pq_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KP, GROUPS, M_BUCKET, HAS_PQ, HAS_BIAS, GROUP,
                 BLOCK_H, BLOCK_K, BLOCK_M, DOT, EVEN_K, True)

    _int4_mm_gpu = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_int4_mm)
    # cache_results: the choice is kept in Triton's cache, so a later process times nothing (and chooses the same)
    _int4_mm_tuned = triton.autotune(configs=CONFIGS, key=["N", "K", "M_BUCKET", "GROUP", "HAS_PQ"],
                                     cache_results=True,
                                     prune_configs_by={"early_config_prune": _prune})(_int4_mm_gpu)


def rows_bucket(m: int) -> int:
    """The autotuning key of m input rows: 1, the power of 2 up to 64 that holds them, or 128 (prefill, large
    batches)."""
    return 1 if m == 1 else min(128, max(16, triton.next_power_of_2(m)))


def _check(x, packed, scales, prequant, out_features, group_size):
    K = x.shape[-1]
    if x.dtype not in DTYPES or scales.dtype != x.dtype:
        raise ValueError(f"int4_mm: x in bfloat16 or float16 with scales of the same dtype, got {x.dtype} and "
                         f"{scales.dtype}")
    if packed.dtype != torch.int8 or packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError(f"int4_mm: packed must be a contiguous int8 [N_p / 2, K_p], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    n_p, k_p = 2 * packed.shape[0], packed.shape[1]
    if not (0 < out_features <= n_p and K <= k_p) or k_p % group_size or scales.shape != (n_p, k_p // group_size):
        raise ValueError(f"int4_mm: weight [{n_p}, {k_p}] (packed), scales {tuple(scales.shape)}, group "
                         f"{group_size}: cannot give {out_features} outputs of {K} inputs")
    if group_size & (group_size - 1) or group_size < 16:
        raise ValueError(f"int4_mm: group size {group_size} is not a power of 2 >= 16")
    if prequant is not None and prequant.numel() < K:
        raise ValueError(f"int4_mm: prequant has {prequant.numel()} values for {K} inputs")


@torch.library.custom_op("pipeline::int4_mm", mutates_args=())
def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, prequant: torch.Tensor | None,
            bias: torch.Tensor | None, out_features: int, group_size: int, dot: int = -1) -> torch.Tensor:
    """x [M, K] -> y [M, out_features] in x's dtype (see the module). On a GPU the config is autotuned per (N, K,
    rows bucket); in Triton's CPU emulator INTERPRETER_CONFIG runs, in form `dot` (-1: 0 for one row, else 1).
    An op, so that torch.compile calls it unopened."""
    _check(x, packed, scales, prequant, out_features, group_size)
    x = x.contiguous()
    M, K = x.shape
    N = out_features
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    args = (x, prequant if prequant is not None else y, packed, scales, bias if bias is not None else y, y,
            M, N, K, packed.shape[1], scales.shape[1], rows_bucket(M))
    flags = dict(HAS_PQ=prequant is not None, HAS_BIAS=bias is not None, GROUP=group_size)
    if emulated():
        form = (0 if M == 1 else 1) if dot < 0 else dot
        block_m = 1 if form == 0 else 16
        meta = dict(INTERPRETER_CONFIG, BLOCK_M=block_m, DOT=form, EVEN_K=K % INTERPRETER_CONFIG["BLOCK_K"] == 0)
        grid = (triton.cdiv(triton.cdiv(N, 2), meta["BLOCK_H"]), triton.cdiv(M, block_m))
        _int4_mm_emulated[grid](*args, **flags, **meta)
    else:
        grid = lambda meta: (triton.cdiv(triton.cdiv(N, 2), meta["BLOCK_H"]),  # noqa: E731
                             triton.cdiv(M, meta["BLOCK_M"]))
        _int4_mm_tuned[grid](*args, **flags)
    return y


@int4_mm.register_fake
def _(x, packed, scales, prequant, bias, out_features, group_size, dot=-1):
    return torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)


def autotuned_configs() -> dict[str, str]:
    """The config Triton's autotuner chose per key in this process."""
    if triton is None:
        return {}
    chosen = {f"int4_mm {key}": config for key, config in _int4_mm_tuned.cache.items()}
    chosen.update({f"int4_fused_gemv {key}": config for key, config in _int4_fused_gemv_tuned.cache.items()})
    return {key: str(config) for key, config in chosen.items()}


# ------------------------------------------------------------------------------------ the fused batch-1 GEMV
# The fused decode step's form (pipeline.backends.fused_step): one row, the residual add and RMSNorm as its prologue
# (one pass: the sums scaled by 1 / rms(x) at the end, as pipeline.kernels.gemv does), bias and silu(fc) * gate as
# its epilogue. With silu-gate the weight is the fused [fc; gate] (fc's packed rows first) and the program takes
# both halves of its rows.

if triton is not None:
    from pipeline.kernels.common import activation, load_row

    FUSED_CONFIGS = [c for c in CONFIGS if c.kwargs["DOT"] == 0]

    @triton.jit
    def _int4_fused_gemv(x_ptr, r_ptr, h_out_ptr, nw_ptr, pq_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N, K, KP, GROUPS, eps,
                         ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_PQ: tl.constexpr,
                         HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr = 1,
                         DOT: tl.constexpr = 0, PDL: tl.constexpr = False):
        """y [N] = act(dequantize(q) @ (norm(x + residual) * prequant) + bias) for BLOCK_H packed rows (2 * BLOCK_H
        outputs; with silu-gate also the gate's, N / 2 packed rows further); x + residual stored to h_out by
        program 0. The word form of the module's note. BLOCK_M and DOT: the shared configs' keys (one row, the FMA
        form). PDL (Hopper, launched with programmatic dependent launch): wait for the previous kernel before
        anything, let the next launch after the main loop (as pipeline.kernels.gemv's fused GEMV)."""
        if PDL:
            gdc_wait()
        pid = tl.program_id(0)
        offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
        n_out = N
        if ACT == 1:
            n_out = N // 2
        nh = (n_out + 1) // 2  # packed rows of the output (of fc alone with silu-gate)
        rows_h = tl.minimum(offs_h, nh - 1).to(tl.int64)
        gate_h = rows_h + nh  # the gate half's packed rows (ACT = 1)
        BLOCK_W: tl.constexpr = BLOCK_K // 4
        acc_lo = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        acc_hi = tl.zeros_like(acc_lo)
        gate_lo = tl.zeros_like(acc_lo)
        gate_hi = tl.zeros_like(acc_lo)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        arange_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + arange_k
            k_mask = offs_k < K
            x = load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL)
            if ADD_RESIDUAL:
                tl.store(h_out_ptr + offs_k, x.to(h_out_ptr.dtype.element_ty), mask=k_mask & (pid == 0))
            if NORM == 1:
                ss += x * x
                x = x * tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if HAS_PQ:
                x = x * tl.load(pq_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x0, x1, x2, x3 = _columns(x, BLOCK_W)
            offs_w = k0 // 4 + tl.arange(0, BLOCK_W)
            acc_lo, acc_hi = _fma_words(acc_lo, acc_hi, x0, x1, x2, x3, q_ptr, s_ptr, rows_h, k0, offs_w, K, KP,
                                        GROUPS, GROUP, BLOCK_K, EVEN_K)
            if ACT == 1:
                gate_lo, gate_hi = _fma_words(gate_lo, gate_hi, x0, x1, x2, x3, q_ptr, s_ptr, gate_h, k0, offs_w, K,
                                              KP, GROUPS, GROUP, BLOCK_K, EVEN_K)
        if PDL:
            gdc_launch_dependents()
        y_lo = tl.sum(acc_lo, axis=1)
        y_hi = tl.sum(acc_hi, axis=1)
        g_lo = tl.sum(gate_lo, axis=1)
        g_hi = tl.sum(gate_hi, axis=1)
        if NORM == 1:
            inv_rms = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
            y_lo = y_lo * inv_rms
            y_hi = y_hi * inv_rms
            g_lo = g_lo * inv_rms
            g_hi = g_hi * inv_rms
        out_lo = 2 * offs_h
        out_hi = out_lo + 1
        if HAS_BIAS:
            y_lo += tl.load(b_ptr + out_lo, mask=out_lo < n_out, other=0.0).to(tl.float32)
            y_hi += tl.load(b_ptr + out_hi, mask=out_hi < n_out, other=0.0).to(tl.float32)
            if ACT == 1:
                g_lo += tl.load(b_ptr + n_out + out_lo, mask=out_lo < n_out, other=0.0).to(tl.float32)
                g_hi += tl.load(b_ptr + n_out + out_hi, mask=out_hi < n_out, other=0.0).to(tl.float32)
        dt = x_ptr.dtype.element_ty
        y_lo = activation(y_lo, g_lo, dt, ACT)
        y_hi = activation(y_hi, g_hi, dt, ACT)
        tl.store(y_ptr + out_lo, y_lo.to(y_ptr.dtype.element_ty), mask=out_lo < n_out)
        tl.store(y_ptr + out_hi, y_hi.to(y_ptr.dtype.element_ty), mask=out_hi < n_out)

    @triton.jit
    def _int4_fused_gemv_emulated(x_ptr, r_ptr, h_out_ptr, nw_ptr, pq_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N,
                                  K: tl.constexpr, KP, GROUPS, eps, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr,
                                  HAS_PQ: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                                  GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                                  EVEN_K: tl.constexpr):
        _int4_fused_gemv(x_ptr, r_ptr, h_out_ptr, nw_ptr, pq_ptr, q_ptr, s_ptr, b_ptr, y_ptr, N, K, KP, GROUPS, eps,
                         ADD_RESIDUAL, NORM, HAS_PQ, HAS_BIAS, ACT, GROUP, BLOCK_H, BLOCK_K, EVEN_K, 1, 0, False)

    def _prune_fused(configs, named_args, **kwargs):
        nh = named_args["N"] // (4 if kwargs.get("ACT", 0) else 2)
        return [c for c in configs if nh // c.kwargs["BLOCK_H"] >= 128] or configs[:2]

    _int4_fused_gemv_tuned = triton.autotune(
        configs=FUSED_CONFIGS, key=["N", "K", "NORM", "ACT", "HAS_PQ", "GROUP"], cache_results=True,
        prune_configs_by={"early_config_prune": _prune_fused})(
            triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_int4_fused_gemv))


@torch.library.custom_op("pipeline::int4_fused_gemv", mutates_args=())
def int4_fused_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
                    packed: torch.Tensor, scales: torch.Tensor, prequant: torch.Tensor | None,
                    bias: torch.Tensor | None, out_rows: int, group_size: int, eps: float, norm: int,
                    act: int, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One row x [.., K]: (y [out_rows or out_rows / 2 with silu-gate], x + residual [K] or empty), see above.
    out_rows: the weight's real rows (fc and gate together with silu-gate; no padding rows between them). pdl: launch
    with programmatic dependent launch (Hopper; not in the emulator)."""
    K = x.shape[-1]
    x = x.reshape(K).contiguous()
    _check(x.view(1, K), packed, scales, prequant, out_rows, group_size)
    if act and 2 * packed.shape[0] != out_rows:
        raise ValueError(f"int4_fused_gemv: silu-gate needs [fc; gate] without padding rows, got {out_rows} of "
                         f"{2 * packed.shape[0]}")
    y = torch.empty(out_rows // 2 if act else out_rows, dtype=x.dtype, device=x.device)
    h_out = torch.empty(K if residual is not None else 0, dtype=x.dtype, device=x.device)
    args = (x, residual.reshape(K).contiguous() if residual is not None else x, h_out if residual is not None else y,
            norm_weight if norm_weight is not None else y, prequant if prequant is not None else y, packed, scales,
            bias if bias is not None else y, y, out_rows, K, packed.shape[1], scales.shape[1], eps)
    flags = dict(ADD_RESIDUAL=residual is not None, NORM=norm, HAS_PQ=prequant is not None, HAS_BIAS=bias is not None,
                 ACT=act, GROUP=group_size)
    if emulated():
        meta = dict(FUSED_INTERPRETER_CONFIG, EVEN_K=K % FUSED_INTERPRETER_CONFIG["BLOCK_K"] == 0)
        _int4_fused_gemv_emulated[(triton.cdiv(triton.cdiv(y.numel(), 2), meta["BLOCK_H"]),)](*args, **flags, **meta)
    else:
        if pdl:
            flags.update(PDL=True, launch_pdl=True)
        _int4_fused_gemv_tuned[lambda meta: (triton.cdiv(triton.cdiv(y.numel(), 2), meta["BLOCK_H"]),)](*args, **flags)
    return y, h_out


@int4_fused_gemv.register_fake
def _(x, residual, norm_weight, packed, scales, prequant, bias, out_rows, group_size, eps, norm, act, pdl=False):
    k = x.shape[-1] if residual is not None else 0
    return (torch.empty(out_rows // 2 if act else out_rows, dtype=x.dtype, device=x.device),
            torch.empty(k, dtype=x.dtype, device=x.device))
