"""GEMMs of a few rows (batched decode: 2 to 64 sequences) that stream the weight at the memory's speed.

A decode step at batch 32 still reads every weight once, so its GEMMs are bound by memory bandwidth like batch 1's
GEMVs; cuBLAS's tiles leave SMs idle on the shapes with few output rows. This kernel is the "swap AB" form of
small-batch GEMMs with split-K:

- each program computes a [BLOCK_N, rows] tile of y^T = W x^T: the weight is the tall operand (BLOCK_N >= 64 rows:
  Hopper's wgmma), the few input rows the narrow one, so no tensor-core lane is spent on padding rows;
- split-K: SPLIT_K programs share a row block's K, each stores its float32 sums, and the last to finish (a counter
  per row block) adds them in order and stores the result: no second kernel, and the same bits on every run.

Which shapes run it and which keep cuBLAS is chosen by timing both (pipeline.kernels.tuning); `candidates` lists
the configs worth timing for a shape.

Layout: x [M, K] (2 <= M <= MAX_ROWS) and weight [N, K] (or [2N, K], [fc; gate], with silu-gate) in bfloat16 or
float16, row-major; bias [N] (or [2N]); y [M, N] in x's dtype.
"""

from __future__ import annotations

import torch

from pipeline.kernels.common import ACT_NONE, ACT_SILU_GATE, emulated, split_buffers, tl, triton

MAX_ROWS = 64  # the widest input this kernel takes (the narrow operand of the dot)
MAX_SPLIT_K = 8
INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}  # what Triton's CPU emulator runs (SPLIT_K chosen per call)
DTYPES = (torch.bfloat16, torch.float16)  # float32 GEMMs stay on cuBLAS (no tf32 rounding)


def padded_rows(rows: int) -> int:
    """The rows of the kernel's narrow operand for `rows` inputs (a power of 2, at least 16)."""
    return max(16, triton.next_power_of_2(rows)) if triton is not None else rows


if triton is not None:
    from pipeline.kernels.common import add_split_tiles, load_tiles, store_tile

    CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=w, num_stages=s)
        for bn, bk, w, s in ((64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (128, 64, 4, 4), (128, 128, 4, 4),
                             (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 2))
        for split in (1, 2, 4, 8)
    ]

    @triton.jit
    def _skinny_gemm(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counter_ptr, M, N, K,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, M_P: tl.constexpr,
                     SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, ACT: tl.constexpr = 0, F32_DOT: tl.constexpr = False):
        """y [M, N] = x [M, K] @ w [N, K]^T (+ bias) for one row block of w and one share of K (see the module).
        ACT = 1 (silu-gate): w holds [fc; gate] (2N rows) and y = silu(x fc^T) * (x gate^T), each program taking
        both halves of its rows, rounded as the unfused ops round (common.activation).
        On a GPU K is a runtime argument; the CPU emulator's entry passes it as a constant (its loops need one),
        and F32_DOT (its tl.dot of bfloat16 operands returns garbage: Triton 3.6). With SPLIT_K > 1 the host keeps
        K a multiple of BLOCK_K * SPLIT_K. No programmatic dependent launch: it made the batched step no faster."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        dt = y_ptr.dtype.element_ty
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped rows: the weight loads need no row mask
        offs_m = tl.arange(0, M_P)
        m_mask = offs_m < M
        arange_k = tl.arange(0, BLOCK_K)
        k_first = 0  # a constant without split-K: the loads' alignment stays provable
        if SPLIT_K > 1:
            k_first = pid_k * (K // SPLIT_K)
        w_rows = w_ptr + rows[:, None] * K
        w2_rows = w_ptr + (rows + N)[:, None] * K  # the gate half (ACT = 1)
        acc = tl.zeros((BLOCK_N, M_P), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, M_P), dtype=tl.float32)
        for k0 in range(0, K if SPLIT_K == 1 else K // SPLIT_K, BLOCK_K):  # the count inline, as the emulator needs
            offs_k = k_first + k0 + arange_k
            k_mask = offs_k < K
            w, w2 = load_tiles(w_rows, w2_rows, offs_k, k_mask, EVEN_K, ACT)
            acc, acc2 = _chunk(acc, acc2, w, w2, x_ptr, offs_m, m_mask, offs_k, k_mask, K, EVEN_K, ACT, F32_DOT)
        if SPLIT_K == 1:
            store_tile(acc, acc2, offs_n, n_mask, offs_m, m_mask, N, b_ptr, y_ptr, dt, HAS_BIAS, ACT)
        else:  # the last share to finish adds the shares' sums and stores the result
            tile = (offs_n[:, None] * M_P + offs_m[None, :]).to(tl.int64)
            last, acc, acc2 = add_split_tiles(acc, acc2, part_ptr, counter_ptr, pid, pid_k, tile, n_mask, N, M_P,
                                               SPLIT_K, ACT)
            if last:
                store_tile(acc, acc2, offs_n, n_mask, offs_m, m_mask, N, b_ptr, y_ptr, dt, HAS_BIAS, ACT)

    @triton.jit
    def _chunk(acc, acc2, w, w2, x_ptr, offs_m, m_mask, offs_k, k_mask, K, EVEN_K: tl.constexpr, ACT: tl.constexpr,
               F32_DOT: tl.constexpr):
        """One BLOCK_K chunk: the rows' chunk times the weight tile w (and the gate tile w2); returns (acc, acc2)."""
        if EVEN_K:
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        else:
            x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
        acc += _dot(w, x, F32_DOT)
        if ACT == 1:
            acc2 += _dot(w2, x, F32_DOT)
        return acc, acc2

    @triton.jit
    def _dot(w, x, F32_DOT: tl.constexpr):
        """A weight tile [BLOCK_N, BLOCK_K] times the rows [M_P, BLOCK_K], transposed: [BLOCK_N, M_P]."""
        if F32_DOT:
            return tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        return tl.dot(w, tl.trans(x))

    @triton.jit
    def _skinny_gemm_emulated(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counter_ptr, M, N, K: tl.constexpr,
                              HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              M_P: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                              ACT: tl.constexpr = 0):
        _skinny_gemm(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, counter_ptr, M, N, K, HAS_BIAS, BLOCK_N, BLOCK_K, M_P,
                     SPLIT_K, EVEN_K, ACT, True)


SHARED_LIMIT = 232448  # the shared memory one block may use on an H100/H200 (227 KiB)


def shared_bytes(config, act: int = ACT_NONE, m_p: int = 32, element_size: int = 2) -> int:
    """The shared memory _skinny_gemm takes in a config: each pipeline stage holds the weight tile (two with
    silu-gate) and the rows' chunk. Exact for Triton 3.6 on sm_90 (bench/compile_check.py checks it)."""
    c = config.kwargs
    tiles = 2 if act == ACT_SILU_GATE else 1
    return config.num_stages * (tiles * c["BLOCK_N"] + m_p) * c["BLOCK_K"] * element_size


def candidates(n: int, k: int, act: int = ACT_NONE, m_p: int = 32) -> list[int]:
    """The configs (indices into CONFIGS) worth timing for an [n, k] weight (n: output rows; with silu-gate the
    weight has 2n) at m_p padded rows: those whose shared memory fits, split-K only where K's chunks share out
    equally, and a grid of about one to eight programs per SM (132 on an H100/H200); for weights too small for
    that, the configs with the most programs."""
    fits = [i for i, c in enumerate(CONFIGS) if shared_bytes(c, act, m_p) <= SHARED_LIMIT
            and (c.kwargs["SPLIT_K"] == 1 or not k % (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]))]

    def programs(index):
        return triton.cdiv(n, CONFIGS[index].kwargs["BLOCK_N"]) * CONFIGS[index].kwargs["SPLIT_K"]

    kept = [i for i in fits if 96 <= programs(i) <= 1056]
    most = max(map(programs, fits))
    return kept or [i for i in fits if programs(i) == most]


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or not 2 <= x.shape[0] <= MAX_ROWS or x.shape[1] != weight.shape[1]:
        raise ValueError(f"skinny_mm takes x [rows, K] with 2 to {MAX_ROWS} rows and the weight's K "
                         f"{weight.shape[1]}, not {tuple(x.shape)}")
    if weight.dtype not in DTYPES or x.dtype != weight.dtype:
        raise ValueError(f"skinny_mm runs {DTYPES} weights with inputs of the same dtype, not {weight.dtype} "
                         f"and {x.dtype}")


@torch.library.custom_op("pipeline::skinny_mm", mutates_args=())
def skinny_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: int, act: int = 0,
              split_k: int = 1) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype, for 2 <= M <= MAX_ROWS; act=ACT_SILU_GATE: weight
    holds [fc; gate] and the result is silu(fc) * gate [M, N / 2]. config: an index into CONFIGS (a tuned choice).
    In Triton's CPU emulator INTERPRETER_CONFIG runs instead, with split_k programs per row block
    (tests). An op, so that torch.compile calls it unopened."""
    _check(x, weight)
    if act not in (ACT_NONE, ACT_SILU_GATE):
        raise ValueError(f"skinny_mm: act={act}; give {ACT_NONE} (none) or {ACT_SILU_GATE} (silu-gate)")
    x = x.contiguous()
    M, K = x.shape
    N = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    on_emulator = emulated()
    meta = dict(INTERPRETER_CONFIG, SPLIT_K=split_k) if on_emulator else dict(CONFIGS[config].kwargs)
    split = meta["SPLIT_K"]
    if split > 1 and K % (meta["BLOCK_K"] * split):
        raise ValueError(f"skinny_mm: K = {K} does not share out over {split} splits of {meta['BLOCK_K']}")
    m_p = padded_rows(M)
    part, counter = (split_buffers(("skinny", N, m_p), x.device, MAX_SPLIT_K * 2 * N * m_p,
                                    triton.cdiv(N, 16)) if split > 1 else (y, y))
    args = (x, weight, bias if bias is not None else y, y, part, counter, M, N, K)
    flags = dict(HAS_BIAS=bias is not None, M_P=m_p, EVEN_K=K % meta["BLOCK_K"] == 0, ACT=act)
    grid = (triton.cdiv(N, meta["BLOCK_N"]), split)
    if on_emulator:
        _skinny_gemm_emulated[grid](*args, **flags, **meta)
    else:
        config = CONFIGS[config]
        _skinny_gemm[grid](*args, **flags, **meta, num_warps=config.num_warps,
                           num_stages=config.num_stages)
    return y


@skinny_mm.register_fake
def _(x, weight, bias, config, act=0, split_k=1):
    n = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    return torch.empty((x.shape[0], n), dtype=x.dtype, device=x.device)


def label(index: int) -> str:
    """A choice as the bench records it and the tuning cache stores it: 'cuBLAS' (-1) or the config."""
    return "cuBLAS" if index < 0 else str(CONFIGS[index])
