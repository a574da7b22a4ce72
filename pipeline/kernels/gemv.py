"""GEMVs: one input row times a weight, for decode at batch 1.

- `fused_gemv` (op pipeline::fused_gemv) computes act(W @ norm(x + residual) + bias) and returns it with
  x + residual: the residual add and the norm (RMSNorm in one pass, sum(w * g * x) / rms(x); LayerNorm and FP8
  after a statistics pass over the row) are its prologue, bias and the activation (silu(fc) * gate, GELU) its
  epilogue. FP8 weights are multiplied as an FP8 GEMM does: the input quantized with the static scale, E4M3
  products, float32 sums. Three forms per config (USE_DOT): 0, CUDA-core FMAs on a [BLOCK_N, BLOCK_K] tile (ACC_R
  sums neighbours first, for fewer registers); 1, tensor-core dots of the row broadcast to 16 rows; 2, the weight
  as the tall operand (swap-AB, which lets Hopper's wgmma take FP8 bytes unconverted at BLOCK_N >= 64).
- `linear_1row` (op pipeline::gemv): the plain x @ W^T (+ bias), FP8 when scales are given, autotuned per (N, K).

Layout: x and residual one row of K (any leading shape of one row in all); weight [N, K] row-major, or [2N, K]
([fc; gate]) with silu-gate; norm weight/bias [K]; scales one float32 each; y [N] in out_dtype.
"""

from __future__ import annotations

import warnings

import torch

from pipeline.kernels.common import (
    ACT_SILU_GATE,
    emulated,
    gdc_launch_dependents,
    gdc_wait,
    split_buffers,
    tl,
    triton,
)

INTERPRETER_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 64, "USE_DOT": 0}  # the emulator cannot autotune; K=64 leaves ragged K
MAX_SPLIT_K = 4  # the largest SPLIT_K among the configs (sizes the split-K sums)
STATS_K_MAX = 4096  # the statistics pass's block: a row of up to this many values in one load

if triton is not None:
    from pipeline.kernels.common import activation, add_split_tiles, group_sums, load_row, load_tiles

    CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": dot}, num_warps=w, num_stages=s)
        for bn, bk, w, s, dot in (
            (2, 256, 4, 3, 0), (4, 256, 4, 3, 0),  # small K (GPT-2's 768) without masked lanes
            (2, 1024, 4, 3, 0), (4, 1024, 4, 2, 0), (8, 512, 4, 3, 0), (8, 1024, 8, 2, 0),
            (16, 512, 8, 3, 0), (32, 256, 8, 2, 0),
            (16, 256, 4, 4, 1), (32, 512, 8, 3, 1), (64, 256, 8, 3, 1),
            (32, 256, 4, 3, 2), (32, 512, 4, 3, 2), (64, 128, 4, 4, 2), (64, 256, 4, 3, 2), (128, 128, 4, 3, 2),
        )
    ] + [  # the CUDA-core form with a grouped accumulator (ACC_R): fewer registers, so more weight bytes in flight
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": 0, "ACC_R": r}, num_warps=4, num_stages=2)
        for bn, bk, r in ((4, 1024, 4), (4, 2048, 4), (4, 2048, 8), (8, 1024, 4))
    ] + [  # split-K (FP8 only, see _prune): the wgmma tiles of the 4096-row GEMVs on every SM
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": 2, "SPLIT_K": split}, num_warps=w, num_stages=s)
        for bn, bk, w, s, split in ((64, 256, 4, 3, 2), (64, 256, 4, 3, 4), (64, 128, 4, 4, 4), (128, 128, 4, 3, 4))
    ]

    def _prune(configs, named_args, **kwargs):
        """Keep the configs that give every SM a few row blocks (a GEMV with fewer programs than ~2 per SM leaves
        bandwidth unused); compiling and timing fewer configs also keeps the first step's set-up short."""
        n, k = named_args["N"], named_args["K"]

        def small_k_only(c):
            return c.kwargs["BLOCK_N"] <= 4 and c.kwargs["BLOCK_K"] == 256

        def split_k_fits(c):  # FP8 only (timed there); K's chunks shared equally (the kernel assumes it)
            split = c.kwargs.get("SPLIT_K", 1)
            chunks, ragged = divmod(k, c.kwargs["BLOCK_K"])
            return split == 1 or (kwargs.get("FP8", False) and not ragged and chunks % split == 0)

        def enough_blocks(c):  # the swapped dot's tall tiles do with about one row block per SM
            if c.kwargs.get("SPLIT_K", 1) > 1:
                return n // c.kwargs["BLOCK_N"] * c.kwargs["SPLIT_K"] >= 128
            if c.kwargs["USE_DOT"] != 2:
                return n // c.kwargs["BLOCK_N"] >= 256
            # FP8's wgmma tiles are timed even at half a row block per SM: the conversions they skip may pay
            fp8_wgmma = kwargs.get("FP8", False) and c.kwargs["BLOCK_N"] >= 64
            return n // c.kwargs["BLOCK_N"] >= (64 if fp8_wgmma else 128)

        def fp8_form(c):
            # large FP8 GEMVs: the wgmma form, whose FP8 bytes need no conversion, or the grouped FMA form
            wgmma = c.kwargs["USE_DOT"] == 2 and c.kwargs["BLOCK_N"] >= 64
            grouped = c.kwargs.get("ACC_R", 1) > 1
            return not kwargs.get("FP8", False) or n // 64 < 128 or wgmma or grouped

        def fits_k(c):  # blocks of K no wider than K rounded up to a power of 2, or 1024 (GPT-2's 768: not 2048)
            return c.kwargs["BLOCK_K"] <= max(1024, triton.next_power_of_2(k))

        kept = [c for c in configs if split_k_fits(c) and enough_blocks(c) and fp8_form(c) and fits_k(c)
                and (k < 2048 or not small_k_only(c))]
        return kept or sorted([c for c in configs if c.kwargs.get("SPLIT_K", 1) == 1],
                              key=lambda c: c.kwargs["BLOCK_N"])[:2]

    @triton.jit
    def _tile_product(w, x, xq, FP8: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr, ACC_R: tl.constexpr):
        """A weight tile times the input chunk, in the shape of the accumulator the form keeps (x: float32 input;
        xq: the same in the weight's dtype or E4M3). The FMA form's products [BLOCK_N, BLOCK_K] are summed in
        groups of ACC_R neighbours first (a thread's own elements), which shrinks its accumulator as many times."""
        if DOT == 1:
            return tl.dot(tl.broadcast_to(xq[None, :], (16, BLOCK_K)), tl.trans(w))
        elif DOT == 2:
            return tl.dot(w, tl.trans(tl.broadcast_to(xq[None, :], (16, BLOCK_K))))
        elif FP8:
            return group_sums(w.to(tl.float32) * xq.to(tl.float32)[None, :], BLOCK_K, ACC_R)
        else:
            return group_sums(w.to(tl.float32) * x[None, :], BLOCK_K, ACC_R)

    @triton.jit
    def _gemv_chunk(acc, acc2, ss, w, w2, offs_k, k_mask, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, a_scale, mean,
                    rstd, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr, ACT: tl.constexpr,
                    DOT: tl.constexpr, BLOCK_K: tl.constexpr, ACC_R: tl.constexpr):
        """One BLOCK_K chunk of the GEMV: the input chunk (residual added, normalized, quantized for FP8) times the
        weight tile w (and the gate tile w2), added to the accumulators; returns (acc, acc2, ss)."""
        dt = x_ptr.dtype.element_ty
        x = load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL)
        if ADD_RESIDUAL:
            tl.store(h_out_ptr + offs_k, x.to(dt), mask=k_mask & (pid == 0))
        if NORM == 1:
            g = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if FP8:  # weight * (x * rstd).to(dtype), in the model dtype
                x = (g * (x * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            else:  # one pass: scale the sum by 1/rms(x) at the end
                ss += x * x
                x = x * g
        elif NORM == 2:
            g = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            b = tl.load(nb_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = ((x - mean) * rstd * g + b).to(dt).to(tl.float32)
        if FP8:
            xq = tl.clamp(x / a_scale, -448.0, 448.0).to(tl.float8e4nv)
        else:
            xq = x.to(w.dtype)
        acc += _tile_product(w, x, xq, FP8, DOT, BLOCK_K, ACC_R)
        if ACT == 1:
            acc2 += _tile_product(w2, x, xq, FP8, DOT, BLOCK_K, ACC_R)
        return acc, acc2, ss

    @triton.jit
    def _row_statistics(x_ptr, r_ptr, K, eps, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                        STATS_K: tl.constexpr):
        """(mean, rstd) of x + residual where the normalized value is needed inside the main loop (LayerNorm; FP8
        quantizes it), in blocks of STATS_K (K rounded up to a power of 2) so the row is read in one round trip
        rather than a chain of dependent loads; else (0, 1), RMSNorm's one-pass form scaling the sums at the end."""
        mean = 0.0
        rstd = 1.0
        if NORM == 2 or (NORM == 1 and FP8):
            arange_s = tl.arange(0, STATS_K)
            if NORM == 2:
                s1 = tl.zeros((STATS_K,), dtype=tl.float32)
                for k0 in range(0, K, STATS_K):
                    offs_k = k0 + arange_s
                    s1 += load_row(x_ptr, r_ptr, offs_k, offs_k < K, ADD_RESIDUAL)
                mean = tl.sum(s1, axis=0) / K
            s2 = tl.zeros((STATS_K,), dtype=tl.float32)
            for k0 in range(0, K, STATS_K):
                offs_k = k0 + arange_s
                k_mask = offs_k < K
                x = load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL)
                d = tl.where(k_mask, x - mean, 0.0)
                s2 += d * d
            rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K + eps)
        return mean, rstd

    @triton.jit
    def _gemv_sums(acc, acc2, DOT: tl.constexpr):
        """The row block's sums [BLOCK_N] from the accumulators of its form (a dot's 16 columns are equal)."""
        if DOT == 1:
            return tl.max(acc, axis=0), tl.max(acc2, axis=0)
        elif DOT == 2:
            return tl.max(acc, axis=1), tl.max(acc2, axis=1)
        else:
            return tl.sum(acc, axis=1), tl.sum(acc2, axis=1)

    @triton.jit
    def _fused_gemv(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr,
                    part_ptr, counter_ptr, N, K, eps,
                    ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FP8: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    W_F32: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
                    SPLIT_K: tl.constexpr = 1, STATS_K: tl.constexpr = 256, ACC_R: tl.constexpr = 1):
        """The fused GEMV of one row block (see fused_gemv). On a GPU K is a runtime argument; in Triton's CPU
        emulator, which cannot loop to a runtime bound, _fused_gemv_emulated calls this with K a constant.

        SPLIT_K > 1 (split-K, for the small FP8 GEMVs whose tall wgmma tiles leave SMs idle): program (pid, s) sums
        its row block over the s-th of SPLIT_K equal shares of K (the host keeps K's chunks a multiple of SPLIT_K)
        and the share that finishes last adds them up (add_split_tiles) and runs the epilogue. Not with the one-pass
        RMSNorm (its 1 / rms needs all of K); FP8 and LayerNorm take their statistics over the whole row anyway."""
        tl.static_assert(SPLIT_K == 1 or NORM != 1 or FP8, "split-K needs the norm's statistics pass")
        DOT: tl.constexpr = 0 if W_F32 else USE_DOT  # float32 weights stay on the CUDA cores (no tf32 rounding)
        pid = tl.program_id(0)
        pid_k = 0
        if SPLIT_K > 1:
            pid_k = tl.program_id(1)
        dt = x_ptr.dtype.element_ty
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped rows: loads need no row mask
        w_rows = w_ptr + rows[:, None] * K
        w2_rows = w_ptr + (rows + N)[:, None] * K  # the gate half of a fused gated GEMM
        arange_k = tl.arange(0, BLOCK_K)
        # this program's share of K: all of it, or (split-K) its share's chunks, a count inline as the emulator needs
        k_first = 0  # a constant without split-K: the loads' alignment stays provable
        if SPLIT_K > 1:
            k_first = pid_k * ((K // BLOCK_K) // SPLIT_K) * BLOCK_K
        offs_k0 = k_first + arange_k
        k_mask0 = offs_k0 < K
        # the first weight tile before anything else: with PDL it loads while the previous kernel ends, as the
        # weights depend on no kernel
        w0, w20 = load_tiles(w_rows, w2_rows, offs_k0, k_mask0, EVEN_K, ACT)
        if PDL:
            gdc_wait()  # the previous kernel's writes are visible from here (nothing above reads them)
        mean, rstd = _row_statistics(x_ptr, r_ptr, K, eps, ADD_RESIDUAL, NORM, FP8, STATS_K)
        a_scale = 1.0
        if FP8:
            a_scale = tl.load(a_scale_ptr)
        if DOT == 1:
            acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        elif DOT == 2:
            acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K // ACC_R), dtype=tl.float32)
        acc2 = tl.zeros_like(acc)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc, acc2, ss = _gemv_chunk(acc, acc2, ss, w0, w20, offs_k0, k_mask0, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr,
                                    nb_ptr, a_scale, mean, rstd, ADD_RESIDUAL, NORM, FP8, ACT, DOT, BLOCK_K, ACC_R)
        for k0 in range(BLOCK_K, K if SPLIT_K == 1 else (K // BLOCK_K) // SPLIT_K * BLOCK_K, BLOCK_K):
            offs_k = k_first + k0 + arange_k
            k_mask = offs_k < K
            w, w2 = load_tiles(w_rows, w2_rows, offs_k, k_mask, EVEN_K, ACT)
            acc, acc2, ss = _gemv_chunk(acc, acc2, ss, w, w2, offs_k, k_mask, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr,
                                        nb_ptr, a_scale, mean, rstd, ADD_RESIDUAL, NORM, FP8, ACT, DOT, BLOCK_K, ACC_R)
        if PDL:
            # the next kernel launches once every program got here, not at the start: its waiting programs then
            # take no SM slot that this kernel's later waves need
            gdc_launch_dependents()
        y, y2 = _gemv_sums(acc, acc2, DOT)
        if SPLIT_K == 1:
            if NORM == 1 and not FP8:
                inv_rms = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
                y = y * inv_rms
                y2 = y2 * inv_rms
            _gemv_epilogue(y, y2, offs_n, n_mask, N, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr, dt, HAS_BIAS, FP8, ACT)
        else:  # the shares' sums [SPLIT_K, 2, N] as a one-column tile, added up by the last share to finish
            last, y, y2 = add_split_tiles(y[:, None], y2[:, None], part_ptr, counter_ptr, pid, pid_k,
                                          offs_n[:, None].to(tl.int64), n_mask, N, 1, SPLIT_K, ACT)
            if last:
                _gemv_epilogue(tl.sum(y, axis=1), tl.sum(y2, axis=1), offs_n, n_mask, N, b_ptr, y_ptr, a_scale_ptr,
                               w_scale_ptr, dt, HAS_BIAS, FP8, ACT)

    @triton.jit
    def _gemv_epilogue(y, y2, offs_n, n_mask, N, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr, dt, HAS_BIAS: tl.constexpr,
                       FP8: tl.constexpr, ACT: tl.constexpr):
        """FP8 scales, bias and activation on a row block's float32 sums, stored in the output dtype."""
        if FP8:
            scale = tl.load(a_scale_ptr) * tl.load(w_scale_ptr)
            y = y * scale
            y2 = y2 * scale
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            if ACT == 1:
                y2 += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = activation(y, y2, dt, ACT)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    # K is a runtime argument on a GPU: faster for the 8B step than K a constant (bench/results/gpu-h200)
    _GEMV_HEURISTICS = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                        "STATS_K": lambda args: min(triton.next_power_of_2(args["K"]), STATS_K_MAX)}

    @triton.heuristics(_GEMV_HEURISTICS)
    @triton.jit
    def _fused_gemv_emulated(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr,
                             part_ptr, counter_ptr, N, K: tl.constexpr, eps,
                             ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                             FP8: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             W_F32: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                             STATS_K: tl.constexpr, SPLIT_K: tl.constexpr = 1, ACC_R: tl.constexpr = 1):
        _fused_gemv(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr,
                    part_ptr, counter_ptr, N, K, eps, ADD_RESIDUAL, NORM, HAS_BIAS, FP8, ACT, BLOCK_N, BLOCK_K, W_F32,
                    USE_DOT, EVEN_K, False, SPLIT_K, STATS_K, ACC_R)

    # the GPU entry: _fused_gemv with EVEN_K and STATS_K worked out per launch (the emulated entry the same way)
    _fused_gemv_gpu = triton.heuristics(_GEMV_HEURISTICS)(_fused_gemv)

    def _autotuned(configs):
        # cache_results: the choice is kept in Triton's cache, so a later process times nothing (and chooses the same)
        return triton.autotune(configs=configs, key=["N", "K", "NORM", "FP8", "ACT"], cache_results=True,
                               prune_configs_by={"early_config_prune": _prune})(_fused_gemv_gpu)

    _fused_gemv_kernel = _autotuned(CONFIGS)
    # where autotuning over every form fails (a config this GPU's Triton cannot compile): the forms without swap-AB
    _fused_gemv_kernel_known = _autotuned([c for c in CONFIGS if c.kwargs["USE_DOT"] != 2])


def candidates(n: int, k: int, fp8: bool) -> list:
    """The configs worth timing for an [n, k] weight (n: output rows): those autotuning would time."""
    return _prune(CONFIGS, {"N": n, "K": k}, FP8=fp8)


def gemv_split_buffers(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's sums [MAX_SPLIT_K, 2, N] and a counter per row block (GEMVs of one N share them)."""
    return split_buffers(("gemv", n), device, MAX_SPLIT_K * 2 * n, triton.cdiv(n, 2))


def autotuned_configs() -> dict[str, str]:
    """The config Triton's autotuner chose per (N, K, NORM, FP8, ACT, ...) key in this process, where it chose."""
    if triton is None:
        return {}
    chosen = {**_fused_gemv_kernel_known.cache, **_fused_gemv_kernel.cache}
    return {str(key): str(config) for key, config in chosen.items()}


def _launch_arguments(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, y, h_out,
                      norm: int, act: int, pdl: bool) -> tuple[tuple, dict]:
    """The pointer arguments (an unused one points at y) and the constant flags of the GEMV kernel."""
    fp8 = act_scale is not None
    pointers = tuple(t if t is not None else y for t in (
        x.contiguous(), residual.reshape(x.shape).contiguous() if residual is not None else None,
        h_out if residual is not None else None, norm_weight, norm_bias, weight, bias, y,
        act_scale if fp8 else None, weight_scale if fp8 else None))
    flags = dict(ADD_RESIDUAL=residual is not None, NORM=norm, HAS_BIAS=bias is not None, FP8=fp8, ACT=act,
                 W_F32=weight.dtype == torch.float32)
    if pdl and not emulated():
        flags.update(PDL=True, launch_pdl=True)
    return pointers, flags


@torch.library.custom_op("pipeline::fused_gemv", mutates_args=())
def fused_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
               norm_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
               act_scale: torch.Tensor | None, weight_scale: torch.Tensor | None, eps: float, norm: int, act: int,
               out_dtype: torch.dtype, pdl: bool = False, config: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """act(W @ norm(x + residual) + bias) for one row; returns (y, x + residual) (the second is empty without a
    residual). With act=silu-gate, weight holds [fc; gate] and y has half its rows. pdl: launch with programmatic
    dependent launch (Hopper+), so that the next kernel's launch overlaps this one's end. config: an index into
    CONFIGS (a tuned choice), or -1 to autotune. An op, so that torch.compile calls it unopened."""
    return launch_fused_gemv(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm,
                             act, out_dtype, pdl, CONFIGS[config] if config >= 0 else None)


def launch_fused_gemv(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm, act,
                      out_dtype, pdl=False, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_gemv's launch; with `config` (a triton.Config of CONFIGS) that config instead of the autotuned one
    (bench/profile_step.py --sweep times each so); Triton's CPU emulator runs INTERPRETER_CONFIG whatever it is."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    y = torch.empty(N, dtype=out_dtype, device=x.device)
    h_out = torch.empty(K if residual is not None else 0, dtype=x.dtype, device=x.device)
    pointers, flags = _launch_arguments(x.reshape(K), residual, norm_weight, norm_bias, weight, bias, act_scale,
                                        weight_scale, y, h_out, norm, act, pdl)
    part, counter = gemv_split_buffers(x.device, N) if act_scale is not None else (y, y)  # split-K: FP8 only
    args = (*pointers, part, counter, N, K, eps)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))  # noqa: E731
    if emulated():  # the CPU emulator cannot autotune (nor run K at runtime): one config
        _fused_gemv_emulated[grid(INTERPRETER_CONFIG)](*args, **flags, **INTERPRETER_CONFIG)
    elif config is not None:
        _fused_gemv_gpu[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                              num_stages=config.num_stages)
    elif _autotune_failed:
        _fused_gemv_kernel_known[grid](*args, **flags)
    else:
        try:
            _fused_gemv_kernel[grid](*args, **flags)
        except Exception as exc:  # noqa: BLE001 - retried below with the known forms, which re-raise a real bug
            _autotune_failed.append(f"{type(exc).__name__}: {exc}"[:300])
            warnings.warn(f"fused GEMV autotuning failed ({_autotune_failed[0]}); autotuning without the swap-AB "
                          "forms from now on", stacklevel=2)
            _fused_gemv_kernel_known[grid](*args, **flags)
    return y, h_out


# Why autotuning over every form failed in this process, if it did (fused_gemv then leaves the swap-AB forms out)
_autotune_failed: list[str] = []


@fused_gemv.register_fake
def _(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm, act, out_dtype,
      pdl=False, config=-1):
    n = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    k = x.shape[-1] if residual is not None else 0
    return torch.empty(n, dtype=out_dtype, device=x.device), torch.empty(k, dtype=x.dtype, device=x.device)


# ------------------------------------------------------------------------------------ the plain GEMV

if triton is not None:
    _PLAIN_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in (
            (4, 512, 2, 3), (4, 1024, 4, 3), (8, 256, 2, 4), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 128, 2, 4),
            (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 8, 3), (16, 1024, 8, 2), (32, 128, 4, 4), (32, 256, 4, 3),
            (32, 256, 8, 3), (32, 512, 8, 2), (64, 128, 4, 3), (64, 256, 8, 2),
            (16, 2048, 8, 2), (32, 1024, 8, 3), (64, 512, 8, 3), (128, 256, 8, 3),
        )
    ]

    @triton.autotune(configs=_PLAIN_CONFIGS, key=["N", "K", "FP8"], cache_results=True)
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
            x = load_row(x_ptr, x_ptr, offs_k, k_mask, False)
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
    """Whether the plain GEMV can run here (Triton and a GPU)."""
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
    """x [..., K] (one row in all) @ weight^T (+ bias) through pipeline::gemv, shaped [..., N]."""
    out_dtype = out_dtype or x.dtype
    y = torch.ops.pipeline.gemv(x, weight, bias, act_scale, weight_scale, out_dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
