"""The batch-1 decode step as five kernels per layer, the way TensorRT-LLM's fused plugins run it.

A decode step at batch 1 must stream every weight once, so its floor is (weight bytes) / (memory bandwidth). What
a layer of separate PyTorch operations adds on top is the kernels between the GEMVs: norms, residual adds, rotary
embedding, cache writes, the attention's several kernels, activations. Each costs a launch gap and a ramp-up and
tail in which the memory system idles. This step folds them into the GEMVs and one attention kernel:

    [residual add + norm + qkv GEMV]  [rotary + cache write + attention]  [dense GEMV (+bias)]
    [residual add + norm + fc/gate GEMV + activation]  [proj GEMV (+bias)]

- The GEMV's prologue adds the residual (the previous block's output, after its tp all-reduce) to the hidden
  state and normalizes it on the fly. RMSNorm needs no extra pass: sum(w * g * x) / rms(x) lets the sum of squares
  accumulate in the same loop. LayerNorm and FP8 inputs (quantized after the norm) first take the statistics
  from the input row, which is read from L2. Program 0 writes the new hidden state for the next residual add.
- The epilogue adds the bias and applies silu(fc) * gate (both halves of the fused gated GEMM in one program) or
  GELU. FP8 weights are multiplied as an FP8 GEMM does (input quantized with the static scale, E4M3 products,
  float32 sums).
- The attention kernel rotates q and k, writes k and v into the cache slot, and runs an online softmax over the
  cache for one KV head and its group of query heads, with tensor-core dots.
- Each GEMV's form and tile are chosen per GEMM as TensorRT's builder chooses tactics, by timing: every candidate
  over all layers' weights, launched back to back in a CUDA graph (FusedStep.tune). On Hopper the kernels launch
  with programmatic dependent launch: each loads its first weight tile while the previous kernel finishes.

Rounding follows the unfused model where it is cheap (the residual sum, the norm output, the activation inputs
are rounded to the model dtype as it rounds them), so its greedy tokens stay those of the plain path on the test
models (tests/test_fused_decode.py, tests/test_gpu.py).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from pipeline.backends import tuning_cache
from pipeline.backends.torch_model import Linear, RankModel
from pipeline.quantize.runtime import FP8Linear

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: the fused step is simply unavailable
    triton = None

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2
ACT_NONE, ACT_SILU_GATE, ACT_GELU = 0, 1, 2
# The GEMV configuration Triton's CPU emulator runs (it cannot autotune); K = 64 leaves some shapes ragged
INTERPRETER_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 64, "USE_DOT": 0}

FORMS_ENV = "PIPELINE_FUSED_GEMV_FORMS"  # e.g. "0,1": autotune over these USE_DOT forms only (A/B timing)
SPLIT_K_ENV = "PIPELINE_FUSED_GEMV_SPLIT_K"  # "0": no split-K configs (A/B timing)
TUNE_ENV = "PIPELINE_FUSED_GEMV_TUNE"  # "0": Triton's autotuner picks the fused step's GEMV configs (A/B timing)


def _forms_from_env() -> set[int]:
    text = os.environ.get(FORMS_ENV, "0,1,2")
    try:
        forms = {int(f) for f in text.split(",") if f.strip()}
    except ValueError:
        forms = set()
    if not forms or not forms <= {0, 1, 2}:
        raise ValueError(f"{FORMS_ENV}={text!r}: give a comma-separated subset of 0 (FMA), 1 (dot), 2 (swap-AB dot)")
    return forms


def chosen_configs() -> dict[str, str]:
    """The GEMV configuration autotuning chose for each (N, K, NORM, FP8, ACT, ...) key in this process, and those
    FusedStep.tune chose (keyed by the GEMM's name and shape)."""
    if triton is None:
        return {}
    chosen = {**_fused_gemv_kernel_known.cache, **_fused_gemv_kernel.cache}
    return {**{str(key): str(config) for key, config in chosen.items()}, **_tuned}


_tuned: dict[str, str] = {}  # FusedStep.tune's choices in this process, for the bench's record
_tune_cache: dict[tuple, object] = {}  # (GEMM, shape, dtypes, norm, activation, PDL, device) -> its triton.Config


if triton is not None:
    # Three ways to run the products, chosen per shape (USE_DOT; by FusedStep.tune, else by autotuning): 0,
    # CUDA-core FMAs on a [BLOCK_N, BLOCK_K] tile; 1, tensor-core dots of the input row (broadcast to the 16 rows a
    # dot needs) with the weight tile; 2, the same dot with the weights as the tall operand ([BLOCK_N, K] x [K, 16],
    # the "swap AB" form of small-batch GEMMs, which lets Hopper's wgmma take BLOCK_N >= 64 rows). For FP8 weights
    # on sm_90, the compiled PTX shows (bench/compile_check.py): the FMA form converts each weight byte twice
    # (e4m3x2 -> f16x2, f16 -> f32) before its FMA; form 1 and form 2 with BLOCK_N = 32 also convert to f16
    # (mma.sync); only form 2 with BLOCK_N >= 64 feeds the FP8 bytes to wgmma unconverted. The conversions are not
    # what bounds the FMA form: converting with integer operations instead (sign and exponent bits shifted into a
    # float32, exact) was slower, 2.87 against 2.79 ms for the 8B FP8 step (H200, run 18).
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": dot}, num_warps=w, num_stages=s)
        for bn, bk, w, s, dot in (
            (2, 256, 4, 3, 0), (4, 256, 4, 3, 0),  # small K (GPT-2's 768) without masked lanes
            (2, 1024, 4, 3, 0), (4, 1024, 4, 2, 0), (8, 512, 4, 3, 0), (8, 1024, 8, 2, 0),
            (16, 512, 8, 3, 0), (32, 256, 8, 2, 0),
            (16, 256, 4, 4, 1), (32, 512, 8, 3, 1), (64, 256, 8, 3, 1),
            (32, 256, 4, 3, 2), (32, 512, 4, 3, 2), (64, 128, 4, 4, 2), (64, 256, 4, 3, 2), (128, 128, 4, 3, 2),
        )
        if dot in _forms_from_env()
    ] + [  # the CUDA-core form with a grouped accumulator (ACC_R): fewer registers, so more programs per SM and more
        # weight bytes in flight. At 4 warps an FP8 tile of 4 x 1024 gives each thread half the bytes a bfloat16 one
        # does; FP8's 4096-row GEMVs streamed at 2.1-2.2 TB/s (H100, run 46), bfloat16's at 2.5-2.7. Run 48: 4 x 2048
        # with ACC_R 8 the fastest for FP8's dense, gated MLP and proj (2.20, 2.76, 2.68 TB/s), the step 3.27 -> 3.14 ms
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": 0, "ACC_R": r}, num_warps=4, num_stages=2)
        for bn, bk, r in ((4, 1024, 4), (4, 2048, 4), (4, 2048, 8), (8, 1024, 4))
        if 0 in _forms_from_env()
    ] + [  # split-K (FP8 only, see _prune): the wgmma tiles of the 4096-row GEMVs on every SM
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "USE_DOT": 2, "SPLIT_K": split}, num_warps=w, num_stages=s)
        for bn, bk, w, s, split in ((64, 256, 4, 3, 2), (64, 256, 4, 3, 4), (64, 128, 4, 4, 4), (128, 128, 4, 3, 4))
        if 2 in _forms_from_env() and os.environ.get(SPLIT_K_ENV, "1") != "0"
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
            # FP8's wgmma tiles (BLOCK_N >= 64) are timed even at half a row block per SM (4096 rows): the
            # conversions they skip may outweigh the idle SMs (autotuning has preferred the FMA form there so far)
            fp8_wgmma = kwargs.get("FP8", False) and c.kwargs["BLOCK_N"] >= 64
            return n // c.kwargs["BLOCK_N"] >= (64 if fp8_wgmma else 128)

        def fp8_form(c):
            # FP8 GEMVs with rows for a wgmma tile per SM and more take the wgmma form only: the FMA form converts
            # each byte twice (about 2.4 TB/s against 3.7 at the 8B shape's fc_gate, H200 run 11), and autotuning,
            # timing each config alone, once picked it there anyway (run 14: a 3.13 ms step against 2.72). The FMA
            # form with a grouped accumulator is timed too: on an H100 the plain one came within 1% of wgmma at
            # fc_gate (run 32), and the grouped one keeps more bytes in flight
            wgmma = c.kwargs["USE_DOT"] == 2 and c.kwargs["BLOCK_N"] >= 64
            grouped = c.kwargs.get("ACC_R", 1) > 1
            return not kwargs.get("FP8", False) or n // 64 < 128 or wgmma or grouped or 2 not in _forms_from_env()

        def fits_k(c):  # blocks of K no wider than K rounded up to a power of 2, or 1024 (GPT-2's 768: not 2048)
            return c.kwargs["BLOCK_K"] <= max(1024, triton.next_power_of_2(k))

        kept = [c for c in configs if split_k_fits(c) and enough_blocks(c) and fp8_form(c) and fits_k(c)
                and (k < 2048 or not small_k_only(c))]
        return kept or sorted([c for c in configs if c.kwargs.get("SPLIT_K", 1) == 1],
                              key=lambda c: c.kwargs["BLOCK_N"])[:2]

    @triton.jit
    def _load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL: tl.constexpr):
        """The input row chunk in float32; with a residual, their sum rounded to the model dtype (as x + r is)."""
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
        if ADD_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def _activation(y, y2, dt, ACT: tl.constexpr):
        """The epilogue's activation on float32 sums: silu(fc) * gate (ACT 1; y2 the gate), each rounded to the
        model dtype as the unfused ops round them, or GELU with the tanh approximation (ACT 2, gelu_new)."""
        if ACT == 1:
            f = y.to(dt).to(tl.float32)
            y = (f / (1.0 + tl.exp(-f))).to(dt).to(tl.float32) * y2.to(dt).to(tl.float32)
        elif ACT == 2:
            f = y.to(dt).to(tl.float32)
            inner = 0.7978845608028654 * (f + 0.044715 * f * f * f)
            y = 0.5 * f * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
        return y

    # Hopper's FP8 wgmma sums its products with less than float32 precision, and Triton's sm_90 default lets it
    # chain them: the 64-row FP8 tiles differ from exact float32 sums by 5e-4 (relative; bfloat16 output rounding
    # is 4e-3). Adding each 32-product step to a float32 accumulator (max_num_imprecise_acc=32) left 3.7e-4 and
    # slowed the 8B FP8 step from 2.72 to 2.90 ms (H200, run 16): not done.

    @triton.jit
    def _load_tile(w_rows, offs_k, k_mask, EVEN_K: tl.constexpr):
        """One weight tile [BLOCK_N, BLOCK_K], streamed once: evicted first."""
        if EVEN_K:
            return tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
        return tl.load(w_rows + offs_k[None, :], mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def _load_tiles(w_rows, w2_rows, offs_k, k_mask, EVEN_K: tl.constexpr, ACT: tl.constexpr):
        """The weight tile of a chunk and, for the gated MLP (ACT = 1: silu-gate), the gate half's (else the same
        tile again): (w, w2)."""
        w = _load_tile(w_rows, offs_k, k_mask, EVEN_K)
        w2 = w
        if ACT == 1:
            w2 = _load_tile(w2_rows, offs_k, k_mask, EVEN_K)
        return w, w2

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
            return _group_sums(w.to(tl.float32) * xq.to(tl.float32)[None, :], BLOCK_K, ACC_R)
        else:
            return _group_sums(w.to(tl.float32) * x[None, :], BLOCK_K, ACC_R)

    @triton.jit
    def _group_sums(p, BLOCK_K: tl.constexpr, ACC_R: tl.constexpr):
        """Products [BLOCK_N, BLOCK_K] summed over groups of ACC_R neighbours: [BLOCK_N, BLOCK_K // ACC_R]."""
        if ACC_R > 1:
            return tl.sum(tl.reshape(p, (p.shape[0], BLOCK_K // ACC_R, ACC_R)), axis=2)
        else:
            return p

    @triton.jit
    def _gemv_chunk(acc, acc2, ss, w, w2, offs_k, k_mask, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, a_scale, mean,
                    rstd, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr, ACT: tl.constexpr,
                    DOT: tl.constexpr, BLOCK_K: tl.constexpr, ACC_R: tl.constexpr):
        """One BLOCK_K chunk of the GEMV: the input chunk (residual added, normalized, quantized for FP8) times the
        weight tile w (and the gate tile w2), added to the accumulators; returns (acc, acc2, ss)."""
        dt = x_ptr.dtype.element_ty
        x = _load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL)
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
    def _fused_gemv(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr,
                    part_ptr, counter_ptr, N, K, eps,
                    ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    FP8: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    W_F32: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
                    SPLIT_K: tl.constexpr = 1, STATS_K: tl.constexpr = 256, ACC_R: tl.constexpr = 1):
        """The fused GEMV of one row block (see fused_gemv). On a GPU K is a runtime argument; in Triton's CPU
        emulator, which cannot loop to a runtime bound, _fused_gemv_emulated calls this with K a constant.

        SPLIT_K > 1 (split-K): program (pid, s) sums its row block over the s-th of SPLIT_K equal shares of K (the
        host keeps K's chunks a multiple of SPLIT_K), stores the float32 sums to part_ptr, and the share that
        finishes last (counted on counter_ptr[pid]) adds them up and runs the epilogue. For the small FP8 GEMVs,
        whose tall wgmma tiles leave SMs idle otherwise. Not with the one-pass RMSNorm (its 1 / rms needs all of
        K): FP8 and LayerNorm take their statistics in a first pass over the whole row anyway.

        STATS_K: the block of that statistics pass (K rounded up to a power of 2, at most STATS_K_MAX), so that it
        reads the row in one round trip instead of one per BLOCK_K chunk (a loop of dependent loads, which Triton
        does not pipeline; the 8B FP8 bench, without PDL, went from 285.6 to 290.1 tok/s with it: H100, run 27)."""
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
        # the first chunk's weight tile into registers before anything else; the loop below starts at the second.
        # With PDL (programmatic dependent launch: this kernel was launched before the previous one ended) this
        # load overlaps the previous kernel's end, as the weights depend on no kernel. An L2 prefetch of the first
        # two tiles instead (prefetch.global.L2) slowed the 8B step from 4.18 to 4.95 ms; no load at all, 4.07
        # (H200, run 18).
        w0, w20 = _load_tiles(w_rows, w2_rows, offs_k0, k_mask0, EVEN_K, ACT)
        if PDL:
            gdc_wait()  # the previous kernel's writes are visible from here (nothing above reads them)

        # statistics first where the normalized value is needed inside the loop (LayerNorm; FP8 quantizes it)
        mean = 0.0
        rstd = 1.0
        if NORM == 2 or (NORM == 1 and FP8):
            arange_s = tl.arange(0, STATS_K)
            if NORM == 2:
                s1 = tl.zeros((STATS_K,), dtype=tl.float32)
                for k0 in range(0, K, STATS_K):
                    offs_k = k0 + arange_s
                    s1 += _load_row(x_ptr, r_ptr, offs_k, offs_k < K, ADD_RESIDUAL)
                mean = tl.sum(s1, axis=0) / K
            s2 = tl.zeros((STATS_K,), dtype=tl.float32)
            for k0 in range(0, K, STATS_K):
                offs_k = k0 + arange_s
                k_mask = offs_k < K
                x = _load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL)
                d = tl.where(k_mask, x - mean, 0.0)
                s2 += d * d
            rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K + eps)
        a_scale = 1.0
        if FP8:
            a_scale = tl.load(a_scale_ptr)

        if DOT == 1:
            acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            acc2 = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        elif DOT == 2:
            acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K // ACC_R), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_N, BLOCK_K // ACC_R), dtype=tl.float32)
        ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
        acc, acc2, ss = _gemv_chunk(acc, acc2, ss, w0, w20, offs_k0, k_mask0, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr,
                                    nb_ptr, a_scale, mean, rstd, ADD_RESIDUAL, NORM, FP8, ACT, DOT, BLOCK_K, ACC_R)
        for k0 in range(BLOCK_K, K if SPLIT_K == 1 else (K // BLOCK_K) // SPLIT_K * BLOCK_K, BLOCK_K):
            offs_k = k_first + k0 + arange_k
            k_mask = offs_k < K
            w, w2 = _load_tiles(w_rows, w2_rows, offs_k, k_mask, EVEN_K, ACT)
            acc, acc2, ss = _gemv_chunk(acc, acc2, ss, w, w2, offs_k, k_mask, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr,
                                        nb_ptr, a_scale, mean, rstd, ADD_RESIDUAL, NORM, FP8, ACT, DOT, BLOCK_K, ACC_R)
        if PDL:
            # the next kernel may launch once every program got here: only the epilogues and the last wave's tail
            # remain, so its programs (waiting in gdc_wait) take no SM slot that this kernel's later waves need.
            # Triggered at the start instead, the 8B step took 5.38 ms against 4.26 without PDL (H200, run 11).
            gdc_launch_dependents()

        if DOT == 1:  # the 16 rows (columns) of a dot's result are equal: any one is the result
            y = tl.max(acc, axis=0)
            y2 = tl.max(acc2, axis=0)
        elif DOT == 2:
            y = tl.max(acc, axis=1)
            y2 = tl.max(acc2, axis=1)
        else:
            y = tl.sum(acc, axis=1)
            y2 = tl.sum(acc2, axis=1)
        if SPLIT_K == 1:
            if NORM == 1 and not FP8:
                inv_rms = 1.0 / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
                y = y * inv_rms
                y2 = y2 * inv_rms
            _gemv_epilogue(y, y2, offs_n, n_mask, N, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr, dt, HAS_BIAS, FP8, ACT)
        else:  # this share's sums [SPLIT_K, 2, N] (fc, gate), then the last share to finish adds them up
            tl.store(part_ptr + (pid_k * 2) * N + offs_n, y, mask=n_mask)
            if ACT == 1:
                tl.store(part_ptr + (pid_k * 2 + 1) * N + offs_n, y2, mask=n_mask)
            tl.debug_barrier()  # every thread of this program has stored before the counter counts it
            # acq_rel: the sums above are visible to the program that sees the last count, and it sees them all
            if tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
                y = tl.zeros((BLOCK_N,), dtype=tl.float32)
                y2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for s in range(0, SPLIT_K):  # at L2 (.cg): other SMs wrote them, this SM's L1 may be stale
                    y += tl.load(part_ptr + (s * 2) * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
                    if ACT == 1:
                        y2 += tl.load(part_ptr + (s * 2 + 1) * N + offs_n, mask=n_mask, other=0.0,
                                      cache_modifier=".cg")
                _gemv_epilogue(y, y2, offs_n, n_mask, N, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr, dt, HAS_BIAS, FP8,
                               ACT)
                tl.store(counter_ptr + pid, 0)  # the next launch (and a CUDA graph's replay) counts from 0 again

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
        y = _activation(y, y2, dt, ACT)
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)

    # K as a runtime argument: the Llama-3-8B step took 4.31 ms so, against 4.37-4.42 ms with K a constant (H200,
    # bench/results/gpu-h200 runs 7-8). GPT-2 ran faster with K a constant (0.308 against 0.376 ms per step, with
    # the attention's cache length a constant too): not adopted, as the two changes were not timed apart.
    STATS_K_MAX = 4096  # the statistics pass's block: a row of up to this many values in one load
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
        return triton.autotune(configs=configs, key=["N", "K", "NORM", "FP8", "ACT"],
                               prune_configs_by={"early_config_prune": _prune})(_fused_gemv_gpu)

    _fused_gemv_kernel = _autotuned(_CONFIGS)
    # the forms timed on an H200 before the swap-AB dots were added: where autotuning over every form fails (a
    # config this GPU's Triton cannot compile), the process goes on with these
    _fused_gemv_kernel_known = _autotuned([c for c in _CONFIGS if c.kwargs["USE_DOT"] != 2])

    # Batches above 1 (fused-rows): the same fusion as a small GEMM in the swap-AB form of batched_gemm. Each
    # program computes a [BLOCK_N, B_P] tile of y^T: the weight is the tall operand (wgmma), the batch's rows the
    # narrow one; SPLIT_K programs share K, and the last of them to finish adds the shares (with RMSNorm's sums of
    # squares) and runs the epilogue. The first version, a [B_P, BLOCK_N] tile per program without split-K, ran
    # batch 32 of the 8B shape at half cuBLAS's speed (H200, run 11).
    _ROWS_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=w, num_stages=s)
        for bn, bk, w, s in ((64, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3))
        for split in (1, 2, 4)
    ] + [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 1}, num_warps=4, num_stages=2)]  # float32 only
    MAX_ROWS_SPLIT_K = 4
    ROWS_INTERPRETER_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}  # tests set SPLIT_K to exercise it

    def rows_candidates(n: int, k: int, configs=None, w_f32: bool = False) -> list:
        """The configs worth timing for an [n, k] weight: split-K only where K's chunks share out equally, a grid
        of about one to eight programs per SM (132 on an H100/H200); for weights too small for that, the configs
        with the most programs. Float32 weights (tests, references) take the one small tile whose float32 operands
        fit shared memory."""
        configs = _ROWS_CONFIGS if configs is None else configs
        small = [c for c in configs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 32 * 32]
        if w_f32:
            return small
        configs = [c for c in configs if c not in small]
        fits = [c for c in configs if not k % (c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]) or c.kwargs["SPLIT_K"] == 1]

        def programs(c):
            return triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"]

        most = max(map(programs, fits))
        return [c for c in fits if 96 <= programs(c) <= 1056] or [c for c in fits if programs(c) == most]

    def _prune_rows(configs, named_args, **kwargs):
        return rows_candidates(named_args["N"], named_args["K"], configs, kwargs.get("W_F32", False))

    @triton.jit
    def _load_rows(x_ptr, r_ptr, offs_b, offs_k, mask, K, ADD_RESIDUAL: tl.constexpr):
        """Rows [B_P, BLOCK_K] of the input in float32 (with a residual, the sum rounded to the model dtype)."""
        offs = offs_b[:, None] * K + offs_k[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def _rows_dot(w, xq, W_F32: tl.constexpr, F32_DOT: tl.constexpr):
        """The weight tile [BLOCK_N, BLOCK_K] times the rows [B_P, BLOCK_K], transposed: [BLOCK_N, B_P]."""
        if W_F32:  # float32 weights: no tf32 rounding
            return tl.dot(w, tl.trans(xq), input_precision="ieee")
        elif F32_DOT:  # the CPU emulator's dot of bfloat16 or FP8 operands is wrong (Triton 3.6): exact in float32
            return tl.dot(w.to(tl.float32), tl.trans(xq.to(tl.float32)), input_precision="ieee")
        else:
            return tl.dot(w, tl.trans(xq))

    @triton.jit
    def _rows_chunk(acc, acc2, ss, w, w2, offs_k, k_mask, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, a_scale,
                    mean, rstd, offs_b, b_mask, K, ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr,
                    ACT: tl.constexpr, W_F32: tl.constexpr, F32_DOT: tl.constexpr):
        """One BLOCK_K chunk of the batched GEMM, as _gemv_chunk for a GEMV; returns (acc, acc2, ss)."""
        dt = x_ptr.dtype.element_ty
        mask = b_mask[:, None] & k_mask[None, :]
        x = _load_rows(x_ptr, r_ptr, offs_b, offs_k, mask, K, ADD_RESIDUAL)
        if ADD_RESIDUAL:
            tl.store(h_out_ptr + offs_b[:, None] * K + offs_k[None, :], x.to(dt), mask=mask & (pid == 0))
        if NORM == 1:
            g = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if FP8:  # weight * (x * rstd).to(dtype), in the model dtype
                x = (g[None, :] * (x * rstd[:, None]).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            else:  # one pass: each row's sum scaled by its 1 / rms(x) at the end
                ss += tl.sum(x * x, axis=1)
                x = x * g[None, :]
        elif NORM == 2:
            g = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            b = tl.load(nb_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = ((x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]).to(dt).to(tl.float32)
        if FP8:
            xq = tl.clamp(x / a_scale, -448.0, 448.0).to(tl.float8e4nv)
        else:
            xq = x.to(w.dtype)
        acc += _rows_dot(w, xq, W_F32, F32_DOT)
        if ACT == 1:
            acc2 += _rows_dot(w2, xq, W_F32, F32_DOT)
        return acc, acc2, ss

    @triton.jit
    def _rows_epilogue(y, y2, ss, offs_n, n_mask, offs_b, b_mask, N, K, eps, b_ptr, y_ptr, a_scale, w_scale_ptr,
                       dt, NORM: tl.constexpr, FP8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
        """1 / rms, FP8 scales, bias and activation on a tile's float32 sums [BLOCK_N, B_P], stored to y [B, N]."""
        if NORM == 1 and not FP8:
            inv_rms = 1.0 / tl.sqrt(ss / K + eps)
            y = y * inv_rms[None, :]
            y2 = y2 * inv_rms[None, :]
        if FP8:
            scale = a_scale * tl.load(w_scale_ptr)
            y = y * scale
            y2 = y2 * scale
        _store_tile(y, y2, offs_n, n_mask, offs_b, b_mask, N, b_ptr, y_ptr, dt, HAS_BIAS, ACT)

    @triton.jit
    def _store_tile(y, y2, offs_n, n_mask, offs_b, b_mask, N, b_ptr, y_ptr, dt, HAS_BIAS: tl.constexpr,
                    ACT: tl.constexpr):
        """Bias and activation on a batched GEMM's float32 tile y^T [BLOCK_N, rows] (y2: the gate half's), stored
        to y [B, N] (fused-rows here, batched_gemm's split-K GEMM)."""
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if ACT == 1:
                y2 += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y = _activation(y, y2, dt, ACT)
        tl.store(y_ptr + offs_b[None, :] * N + offs_n[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & b_mask[None, :])

    @triton.jit
    def _add_split_tiles(acc, acc2, part_ptr, counter_ptr, pid, pid_k, tile, n_mask, N, ROWS: tl.constexpr,
                         SPLIT_K: tl.constexpr, ACT: tl.constexpr):
        """Split-K of a batched GEMM's tile: store this share's float32 sums [BLOCK_N, ROWS] (acc, and acc2 with
        silu-gate) to part_ptr [SPLIT_K, 2, N, ROWS] at `tile`, and count the share on counter_ptr[pid]. The share
        that counts last loads every share's sums, adds them in order (the same bits on every run) and sets the
        counter back to 0 for the next launch (and a CUDA graph's replay). Returns (last, acc, acc2). Whatever else
        a share stores before calling this is visible to the last one too."""
        tl.store(part_ptr + (pid_k * 2) * N * ROWS + tile, acc, mask=n_mask[:, None])
        if ACT == 1:
            tl.store(part_ptr + (pid_k * 2 + 1) * N * ROWS + tile, acc2, mask=n_mask[:, None])
        tl.debug_barrier()  # every thread of this program has stored before the counter counts it
        # acq_rel: the sums above are visible to the program that sees the last count, and it sees them all
        last = tl.atomic_add(counter_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1
        if last:
            acc = tl.zeros_like(acc)
            acc2 = tl.zeros_like(acc2)
            for s in range(0, SPLIT_K):  # at L2 (.cg): other SMs wrote them, this SM's L1 may be stale
                acc += tl.load(part_ptr + (s * 2) * N * ROWS + tile, mask=n_mask[:, None], other=0.0,
                               cache_modifier=".cg")
                if ACT == 1:
                    acc2 += tl.load(part_ptr + (s * 2 + 1) * N * ROWS + tile, mask=n_mask[:, None], other=0.0,
                                    cache_modifier=".cg")
            tl.store(counter_ptr + pid, 0)
        return last, acc, acc2

    @triton.jit
    def _fused_gemm_rows(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr,
                         part_ptr, counter_ptr, B, N, K, eps,
                         ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                         FP8: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         B_P: tl.constexpr, W_F32: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
                         SPLIT_K: tl.constexpr = 1, F32_DOT: tl.constexpr = False):
        """fused_gemv for B rows (B <= B_P): act(norm(x + r) @ W^T + bias), each row's norm as _fused_gemv applies
        it, one [BLOCK_N, B_P] tile of the transposed result per program (see above). K is a runtime argument on a
        GPU and a constant in the CPU emulator (_fused_gemm_rows_emulated). With SPLIT_K > 1 the host keeps K a
        multiple of BLOCK_K * SPLIT_K; part_ptr holds the shares' sums [SPLIT_K, 2, N, B_P] and then their sums of
        squares [SPLIT_K, row blocks, B_P], counter_ptr a count per row block."""
        pid = tl.program_id(0)
        pid_k = 0
        if SPLIT_K > 1:
            pid_k = tl.program_id(1)
        dt = x_ptr.dtype.element_ty
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = tl.minimum(offs_n, N - 1).to(tl.int64)
        w_rows = w_ptr + rows[:, None] * K
        w2_rows = w_ptr + (rows + N)[:, None] * K
        offs_b = tl.arange(0, B_P)
        b_mask = offs_b < B
        arange_k = tl.arange(0, BLOCK_K)
        k_first = 0
        if SPLIT_K > 1:
            k_first = pid_k * (K // SPLIT_K)
        offs_k0 = k_first + arange_k
        k_mask0 = offs_k0 < K
        # as in _fused_gemv: the first weight tile before anything else (with PDL, while the previous kernel ends)
        w0, w20 = _load_tiles(w_rows, w2_rows, offs_k0, k_mask0, EVEN_K, ACT)
        if PDL:
            gdc_wait()

        # statistics first where the normalized rows are needed inside the loop (LayerNorm; FP8 quantizes them),
        # over all of K whatever the split
        mean = tl.zeros((B_P,), dtype=tl.float32)
        rstd = tl.zeros((B_P,), dtype=tl.float32) + 1.0
        if NORM == 2:
            s1 = tl.zeros((B_P,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + arange_k
                s1 += tl.sum(_load_rows(x_ptr, r_ptr, offs_b, offs_k, b_mask[:, None] & (offs_k < K)[None, :], K,
                                        ADD_RESIDUAL), axis=1)
            mean = s1 / K
        if NORM == 2 or (NORM == 1 and FP8):
            s2 = tl.zeros((B_P,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + arange_k
                mask = b_mask[:, None] & (offs_k < K)[None, :]
                d = tl.where(mask, _load_rows(x_ptr, r_ptr, offs_b, offs_k, mask, K, ADD_RESIDUAL) - mean[:, None],
                             0.0)
                s2 += tl.sum(d * d, axis=1)
            rstd = 1.0 / tl.sqrt(s2 / K + eps)
        a_scale = 1.0
        if FP8:
            a_scale = tl.load(a_scale_ptr)

        acc = tl.zeros((BLOCK_N, B_P), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, B_P), dtype=tl.float32)
        ss = tl.zeros((B_P,), dtype=tl.float32)
        acc, acc2, ss = _rows_chunk(acc, acc2, ss, w0, w20, offs_k0, k_mask0, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr,
                                    nb_ptr, a_scale, mean, rstd, offs_b, b_mask, K, ADD_RESIDUAL, NORM, FP8, ACT,
                                    W_F32, F32_DOT)
        for k0 in range(BLOCK_K, K if SPLIT_K == 1 else K // SPLIT_K, BLOCK_K):
            offs_k = k_first + k0 + arange_k
            k_mask = offs_k < K
            w, w2 = _load_tiles(w_rows, w2_rows, offs_k, k_mask, EVEN_K, ACT)
            acc, acc2, ss = _rows_chunk(acc, acc2, ss, w, w2, offs_k, k_mask, pid, x_ptr, r_ptr, h_out_ptr, nw_ptr,
                                        nb_ptr, a_scale, mean, rstd, offs_b, b_mask, K, ADD_RESIDUAL, NORM, FP8, ACT,
                                        W_F32, F32_DOT)
        if PDL:  # as in _fused_gemv: after the main loop
            gdc_launch_dependents()

        if SPLIT_K == 1:
            _rows_epilogue(acc, acc2, ss, offs_n, n_mask, offs_b, b_mask, N, K, eps, b_ptr, y_ptr, a_scale,
                           w_scale_ptr, dt, NORM, FP8, HAS_BIAS, ACT)
        else:  # the shares' sums of squares [SPLIT_K, row blocks, B_P] after their sums, stored before the count
            squares = part_ptr + SPLIT_K * 2 * N * B_P + pid * B_P + offs_b
            blocks = tl.num_programs(0) * B_P
            tl.store(squares + pid_k * blocks, ss)
            tile = (offs_n[:, None] * B_P + offs_b[None, :]).to(tl.int64)
            last, acc, acc2 = _add_split_tiles(acc, acc2, part_ptr, counter_ptr, pid, pid_k, tile, n_mask, N, B_P,
                                               SPLIT_K, ACT)
            if last:
                ss = tl.zeros((B_P,), dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    ss += tl.load(squares + s * blocks, cache_modifier=".cg")
                _rows_epilogue(acc, acc2, ss, offs_n, n_mask, offs_b, b_mask, N, K, eps, b_ptr, y_ptr, a_scale,
                               w_scale_ptr, dt, NORM, FP8, HAS_BIAS, ACT)

    _ROWS_HEURISTICS = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}

    @triton.heuristics(_ROWS_HEURISTICS)
    @triton.jit
    def _fused_gemm_rows_emulated(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr,
                                  w_scale_ptr, part_ptr, counter_ptr, B, N, K: tl.constexpr, eps,
                                  ADD_RESIDUAL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  FP8: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  B_P: tl.constexpr, W_F32: tl.constexpr, EVEN_K: tl.constexpr,
                                  SPLIT_K: tl.constexpr = 1):
        _fused_gemm_rows(x_ptr, r_ptr, h_out_ptr, nw_ptr, nb_ptr, w_ptr, b_ptr, y_ptr, a_scale_ptr, w_scale_ptr,
                         part_ptr, counter_ptr, B, N, K, eps, ADD_RESIDUAL, NORM, HAS_BIAS, FP8, ACT, BLOCK_N,
                         BLOCK_K, B_P, W_F32, EVEN_K, False, SPLIT_K, True)

    _fused_gemm_rows_gpu = triton.heuristics(_ROWS_HEURISTICS)(_fused_gemm_rows)
    _fused_gemm_rows_kernel = triton.autotune(configs=_ROWS_CONFIGS, key=["N", "K", "B_P", "NORM", "FP8", "ACT"],
                                              prune_configs_by={"early_config_prune": _prune_rows})(
                                                  _fused_gemm_rows_gpu)

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
        SPLITS == 1 touches neither.

        The cache loads depend on `slot` alone, not on the valid flags (which only mask the scores and values
        afterwards), so that a block's keys, values and flags are all in flight at once. max_len is a runtime
        argument on a GPU; the CPU emulator (EMULATED, max_len a constant) cannot run a loop whose bound it loads,
        so there each split loops over the most blocks any slot could give it, the surplus masked off.

        PRELOAD: the split's first block is loaded first, before the qkv row (and, with PDL, before waiting for the
        kernel that writes it): none of the cache slots before the new token's is written by the kernels this
        one can overlap (the qkv GEMM), nor are the slot index and valid flags, which the step sets before its
        first layer."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = 0
        if SPLITS > 1:
            split = tl.program_id(2)
        first = split == 0  # the split that writes the new token to the cache and starts from it
        dt = qkv_ptr.dtype.element_ty
        G: tl.constexpr = HEADS // KV_HEADS
        HALF: tl.constexpr = D // 2
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
        if ROPE:  # rotate-half rotary embedding at this sequence's position
            partner = tl.where(d < HALF, d + HALF, d - HALF)
            sign = tl.where(d < HALF, -1.0, 1.0)
            angle = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + (d % HALF), mask=d_mask, other=0.0)
            cos = tl.cos(angle).to(dt).to(tl.float32)
            sin = tl.sin(angle).to(dt).to(tl.float32)
            q_p = tl.load(row + q_off + partner[None, :], mask=qd_mask, other=0.0).to(tl.float32)
            k_p = tl.load(row + k_off + partner, mask=d_mask, other=0.0).to(tl.float32)
            q = q * cos[None, :] + sign[None, :] * q_p * sin[None, :]
            k = k * cos + sign * k_p * sin
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
    def _decode_attention_kernel_emulated(qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, inv_freq_ptr, out_ptr,
                                          part_ptr, counter_ptr, max_len: tl.constexpr, scale,
                                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                          GROUP_P: tl.constexpr, D_P: tl.constexpr, ROPE: tl.constexpr,
                                          IEEE: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                                          PRELOAD: tl.constexpr = False):
        _decode_attention_kernel(qkv_ptr, k_ptr, v_ptr, valid_ptr, pos_ptr, slot_ptr, inv_freq_ptr, out_ptr,
                                 part_ptr, counter_ptr, max_len, scale, HEADS, KV_HEADS, D, GROUP_P, D_P, ROPE, IEEE,
                                 BLOCK_S, SPLITS, False, True, PRELOAD)


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


# ------------------------------------------------------------------------------------------------- the ops


def _launch_arguments(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, y, h_out,
                      norm: int, act: int, pdl: bool) -> tuple[tuple, dict]:
    """The pointer arguments (an unused one points at y) and the constant flags shared by both GEMV kernels."""
    fp8 = act_scale is not None
    pointers = tuple(t if t is not None else y for t in (
        x.contiguous(), residual.reshape(x.shape).contiguous() if residual is not None else None,
        h_out if residual is not None else None, norm_weight, norm_bias, weight, bias, y,
        act_scale if fp8 else None, weight_scale if fp8 else None))
    flags = dict(ADD_RESIDUAL=residual is not None, NORM=norm, HAS_BIAS=bias is not None, FP8=fp8, ACT=act,
                 W_F32=weight.dtype == torch.float32)
    if pdl and os.environ.get("TRITON_INTERPRET") != "1":
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
    _CONFIGS (FusedStep.tune's choice), or -1 to autotune. An op, so that torch.compile calls it unopened."""
    return launch_fused_gemv(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm,
                             act, out_dtype, pdl, _CONFIGS[config] if config >= 0 else None)


def launch_fused_gemv(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm, act,
                      out_dtype, pdl=False, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_gemv's launch; with `config` (a triton.Config of _CONFIGS) that config instead of the autotuned one
    (bench/profile_step.py --sweep times each so); Triton's CPU emulator runs INTERPRETER_CONFIG whatever it is."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    y = torch.empty(N, dtype=out_dtype, device=x.device)
    h_out = torch.empty(K if residual is not None else 0, dtype=x.dtype, device=x.device)
    pointers, flags = _launch_arguments(x.reshape(K), residual, norm_weight, norm_bias, weight, bias, act_scale,
                                        weight_scale, y, h_out, norm, act, pdl)
    part, counter = _gemv_split_buffers(x.device, N) if act_scale is not None else (y, y)  # split-K: FP8 only
    args = (*pointers, part, counter, N, K, eps)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))  # noqa: E731
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU emulator cannot autotune (nor run K at runtime): one config
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


MAX_SPLIT_K = 4  # the largest SPLIT_K among the autotuning configs (sizes the split-K sums)

# The float32 partial sums and int32 counters of the kernels that split their work and let the last program finish
# (split-K GEMVs, flash-decoding attention), per (kind, device, shape). They outlive the call because CUDA graphs
# capture the kernels with these addresses and replay them; the counters start at 0 and the last program of each
# group sets its counter back to 0. Two launches of one shape running at once (on two streams) would share them
# and corrupt each other: the decode steps run one at a time, on one stream.
_split_work: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_buffers(key: tuple, device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (float32 partials, zeroed int32 counters) of `key`, made on first use (not while a graph is captured)."""
    key = (*key, device)
    if key not in _split_work:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the split buffers for {key} do not exist yet and cannot be made while a CUDA graph "
                               "is captured: run the step once before capturing (warm-up)")
        _split_work[key] = (torch.empty(partials, dtype=torch.float32, device=device),
                            torch.zeros(counters, dtype=torch.int32, device=device))
    return _split_work[key]


def _gemv_split_buffers(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K's sums [MAX_SPLIT_K, 2, N] and a counter per row block (GEMVs of one N share them)."""
    return _split_buffers(("gemv", n), device, MAX_SPLIT_K * 2 * n, triton.cdiv(n, 2))


# Why autotuning over every form failed in this process, if it did (fused_gemv then leaves the swap-AB forms out)
_autotune_failed: list[str] = []


@fused_gemv.register_fake
def _(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm, act, out_dtype,
      pdl=False, config=-1):
    n = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    k = x.shape[-1] if residual is not None else 0
    return torch.empty(n, dtype=out_dtype, device=x.device), torch.empty(k, dtype=x.dtype, device=x.device)


@torch.library.custom_op("pipeline::fused_gemm_rows", mutates_args=())
def fused_gemm_rows(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
                    norm_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                    act_scale: torch.Tensor | None, weight_scale: torch.Tensor | None, eps: float, norm: int, act: int,
                    out_dtype: torch.dtype, pdl: bool = False, config: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_gemv for a batch of rows x [B, K] (B <= MAX_ROWS): returns (y [B, N], x + residual [B, K]; empty
    without a residual). config: an index into _ROWS_CONFIGS (FusedStep.tune's choice), or -1 to autotune."""
    return launch_fused_gemm_rows(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps,
                                  norm, act, out_dtype, pdl, _ROWS_CONFIGS[config] if config >= 0 else None)


def launch_fused_gemm_rows(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm,
                           act, out_dtype, pdl=False, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_gemm_rows's launch; with `config` (a triton.Config of _ROWS_CONFIGS) that config instead of the
    autotuned one; Triton's CPU emulator runs ROWS_INTERPRETER_CONFIG whatever it is."""
    B, K = x.shape
    if B > MAX_ROWS:
        raise ValueError(f"fused_gemm_rows takes at most {MAX_ROWS} rows, not {B}")
    N = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    y = torch.empty((B, N), dtype=out_dtype, device=x.device)
    h_out = torch.empty((B, K) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    pointers, flags = _launch_arguments(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale,
                                        y, h_out, norm, act, pdl)
    b_p = max(16, triton.next_power_of_2(B))
    flags["B_P"] = b_p
    # the split-K shares' sums [MAX_ROWS_SPLIT_K, 2, N, B_P] and sums of squares per row block, a count per block
    blocks = triton.cdiv(N, 16)
    part, counter = _split_buffers(("rows", N, b_p), x.device, MAX_ROWS_SPLIT_K * (2 * N + blocks) * b_p, blocks)
    args = (*pointers, part, counter, B, N, K, eps)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta.get("SPLIT_K", 1))  # noqa: E731
    if os.environ.get("TRITON_INTERPRET") == "1":
        meta = dict(ROWS_INTERPRETER_CONFIG)
        if K % (meta["BLOCK_K"] * meta["SPLIT_K"]):
            meta["SPLIT_K"] = 1  # K's chunks do not share out: no split
        _fused_gemm_rows_emulated[grid(meta)](*args, **flags, **meta)
    elif config is not None:
        _fused_gemm_rows_gpu[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                                   num_stages=config.num_stages)
    else:
        _fused_gemm_rows_kernel[grid](*args, **flags)
    return y, h_out


MAX_ROWS = 64  # the batched fused step's limit (the rows of one tensor-core tile's operand)


@fused_gemm_rows.register_fake
def _(x, residual, norm_weight, norm_bias, weight, bias, act_scale, weight_scale, eps, norm, act, out_dtype,
      pdl=False, config=-1):
    n = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
    h = x.shape if residual is not None else (0,)
    return (torch.empty((x.shape[0], n), dtype=out_dtype, device=x.device),
            torch.empty(h, dtype=x.dtype, device=x.device))


ATTENTION_BLOCK_S = 64  # cache slots per block of the unsplit attention's loop, and attention_splits' unit
ATTENTION_SPLIT_BLOCK_S = 32  # the same with splits (flash-decoding), attention_block
ATTENTION_WARPS = 4
ATTENTION_PROGRAMS = 264  # two programs per SM of an H100/H200 (132 SMs): what flash-decoding splits aim for


def attention_splits(batch: int, kv_heads: int, max_len: int) -> int:
    """How many programs share each (sequence, KV head)'s slots (flash-decoding): enough for the grid to reach
    ATTENTION_PROGRAMS, but at least one block of slots each. At batch 1 of Llama-3-8B (8 KV heads, 384 slots: 6
    blocks) that is 6 splits, 48 programs instead of 8. From half of ATTENTION_PROGRAMS (sequence, KV head) pairs
    on it is 1 (no split): at batch 32 of the 8B shape (256 pairs) 2 splits took 19.8-23.5 us a layer, 1 split
    14.8-16.7 (H100, run 40: the cost of combining outweighs the programs gained)."""
    pairs = batch * kv_heads
    if 2 * pairs >= ATTENTION_PROGRAMS:
        return 1
    blocks = triton.cdiv(max_len, ATTENTION_BLOCK_S)
    splits = min(blocks, max(1, triton.cdiv(ATTENTION_PROGRAMS, pairs)))
    return triton.cdiv(blocks, triton.cdiv(blocks, splits))  # no split left without blocks (6 blocks: 4 -> 3)


def attention_block(splits: int) -> int:
    """The slots of a block of the attention's loop: ATTENTION_SPLIT_BLOCK_S with splits, else ATTENTION_BLOCK_S;
    PIPELINE_ATTENTION_BLOCK_S=N sets every launch's (A/B timing). A split's share is a whole number of blocks, so
    the smaller block spreads the slots more evenly: at batch 1 of the 8B shape (6 splits) with the new token at
    slot 192, 64-slot blocks leave three splits without any, and the layer took 7.04 us against 6.12 with 32-slot
    blocks (H100, run 40). Unsplit, 64 slots took 14.80 us at batch 32 against 17.99 with 32 (same run)."""
    forced = os.environ.get("PIPELINE_ATTENTION_BLOCK_S")
    if forced:
        if not forced.isdigit() or int(forced) < 16 or int(forced) & (int(forced) - 1):
            raise ValueError(f"PIPELINE_ATTENTION_BLOCK_S={forced!r}: give a power of 2 of at least 16 (cache "
                             "slots a block of the attention's loop), or unset it")
        return int(forced)
    return ATTENTION_BLOCK_S if splits == 1 else ATTENTION_SPLIT_BLOCK_S


def attention_stages(splits: int) -> int | None:
    """The attention loop's pipeline stages: 1 (no software pipelining, more programs resident) where each
    program loops over all of its sequence's slots (splits 1: 14.8 us a layer at batch 32 of the 8B shape against
    16.7 with Triton's default, H100 run 40), else Triton's default (None)."""
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
                            num_stages=-1, preload=None) -> torch.Tensor:
    """decode_attention's launch, its tile (block_s slots a loop step; None: attention_block), warps and pipeline
    stages given (bench/profile_step.py --attention times each so; num_stages -1: attention_stages, None: Triton's
    default). preload: each program loads its first block of the cache before the qkv row (before waiting for the
    qkv GEMM, with PDL); None: unless PIPELINE_ATTENTION_PRELOAD=0 (A/B timing). With it the 8B step took 5.346
    against 5.355 ms in bfloat16 and 3.343 against 3.366 in FP8 at batch 1 (fused step, PDL), 6.198 against 6.223
    ms at batch 32 (layer by layer, PDL) (H100, run 44)."""
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
    part, counter = (_split_buffers(("attention", batch, kv_heads, splits, group_p, d_p), qkv.device,
                                    batch * kv_heads * splits * group_p * (d_p + 2), batch * kv_heads)
                     if splits > 1 else (out, out))
    emulated = os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _decode_attention_kernel_emulated if emulated else _decode_attention_kernel
    extra = dict(PDL=True, launch_pdl=True) if pdl and not emulated else {}
    if num_stages == -1:
        num_stages = attention_stages(splits)
    if block_s is None:
        block_s = attention_block(splits)
    if preload is None:
        preload = os.environ.get("PIPELINE_ATTENTION_PRELOAD", "1") != "0"
    if num_stages is not None and not emulated:
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


ARGMAX_BLOCK = 2048  # logits per program of greedy_argmax (128256 of Llama-3's vocabulary: 63 programs a row)


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
    part, counter = _split_buffers(("argmax", batch, blocks_p), logits.device, batch * 2 * blocks_p, batch)
    _greedy_argmax_kernel[(batch, blocks)](logits, part, counter, out, vocab, logits.stride(0), BLOCK=ARGMAX_BLOCK,
                                           BLOCKS_P=blocks_p, num_warps=4)
    return out


@greedy_argmax.register_fake
def _(logits):
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


# ------------------------------------------------------------------------------------------------- the step


def graph_seconds(fn, replays: int) -> float:
    """Median seconds of fn() replayed from a CUDA graph, after two runs outside it (which compile the kernels and
    make the split-K buffers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()  # the first replay uploads the graph
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return sorted(times)[len(times) // 2]


class _Gemm:
    """The tensors one GEMV reads: weight, bias, and FP8 scales when the weight is FP8."""

    def __init__(self, linear, bias: torch.Tensor | None = None):
        self.weight = linear.weight
        self.bias = linear.bias if bias is None else bias
        fp8 = isinstance(linear, FP8Linear)
        self.act_scale = linear.act_scale if fp8 else None
        self.weight_scale = linear.weight_scale if fp8 else None


def attention_unsupported_reason(model: RankModel) -> str | None:
    """Why decode_attention cannot serve this model's decode steps (None when it can)."""
    if triton is None:
        return "Triton is not installed"
    if model.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"the {model.device.type} device (Triton kernels run on CUDA; TRITON_INTERPRET=1 emulates them)"
    if model.kv_format is not None:
        return f"the {model.kv_format} KV cache (the fused attention reads a cache in the model dtype)"
    if not model.is_gpt:
        rotary = model.config.get("rotary_embedding_dim") or model.head_size
        if rotary != model.head_size:
            return "partial rotary embedding"
    if model.head_size % 2:
        return "an odd head size"
    return None


def unsupported_reason(model: RankModel) -> str | None:
    """Why the fused step cannot run this model (None when it can)."""
    reason = attention_unsupported_reason(model)
    if reason is not None:
        return reason
    if model.mapping.pp != 1:
        return "pipeline parallelism (the fused step runs pp = 1)"
    if model.head is None:
        return "no lm_head on this rank"
    for layer in model.layers:
        if not model.is_gpt and "fc_gate" not in layer:
            return "a gated MLP whose gate and fc are not fused (weight-only or mixed formats)"
        for key in ("qkv", "dense", "fc_gate" if "fc_gate" in layer else "fc", "proj"):
            if not isinstance(layer[key], (Linear, FP8Linear)):
                return f"{type(layer[key]).__name__} GEMMs (weight-only formats)"
    return None


class FusedStep:
    """A decode step (pp = 1, tp any, batch up to MAX_ROWS) as 5 kernels per layer; `forward` matches
    RankModel.forward's decode call and returns float32 logits [B, 1, vocab]."""

    def __init__(self, model: RankModel, pdl: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fused decode step does not support {reason}")
        self.model = model
        first_tp_rank = model.mapping.tp_rank == 0  # RowLinear biases are added once, before the all-reduce
        self.norm = NORM_LAYER if model.is_gpt else NORM_RMS
        self.layers = []
        for layer in model.layers:
            mlp = layer["fc_gate"] if "fc_gate" in layer else layer["fc"]
            self.layers.append({
                "ln1": layer["ln1"], "ln2": layer["ln2"], "qkv": _Gemm(layer["qkv"]),
                "dense": _Gemm(layer["dense"], layer["dense_bias"] if first_tp_rank else None),
                "mlp": _Gemm(mlp), "proj": _Gemm(layer["proj"], layer["proj_bias"] if first_tp_rank else None),
            })
        self.act = ACT_GELU if model.is_gpt else ACT_SILU_GATE
        self.head = _Gemm(model.head)
        self.inv_freq = None if model.is_gpt else model.inv_freq.float().contiguous()
        # programmatic dependent launch needs Hopper or newer; elsewhere the flag is dropped
        self.pdl = pdl and model.device.type == "cuda" and torch.cuda.get_device_capability(model.device)[0] >= 9
        self.configs: dict[str, object] = {}  # GEMM name -> the triton.Config tune() chose for it (batch 1)
        self.row_configs: dict[str, object] = {}  # the same for the batched GEMM (fused-rows)

    def _gemv(self, x, residual, norm, gemm: _Gemm, act=ACT_NONE, out_dtype=None, name: str | None = None):
        """The fused GEMM of rows x [B, K]: (y [B, N], x + residual [B, K]); batch 1 runs the GEMV kernel, in the
        config tune() chose for the GEMM `name` if it did."""
        args = self._args(x, residual, norm, gemm, act, out_dtype)
        if x.shape[0] > 1:
            config = _ROWS_CONFIGS.index(self.row_configs[name]) if name in self.row_configs else -1
            return torch.ops.pipeline.fused_gemm_rows(*args, config)
        # through the op (torch.compile traces this step with the compile option), the tuned config by its index
        config = _CONFIGS.index(self.configs[name]) if name in self.configs else -1
        y, h_out = torch.ops.pipeline.fused_gemv(*args, config)
        return y.view(1, -1), h_out.view(1, -1)

    def _args(self, x, residual, norm, gemm: _Gemm, act, out_dtype) -> tuple:
        """The arguments of the GEMV ops (fused_gemv, fused_gemm_rows, launch_fused_gemv) for one GEMM."""
        weight, bias = norm if norm is not None else (None, None)
        kind = NORM_NONE if norm is None else self.norm
        return (x, residual, weight, bias if kind == NORM_LAYER else None, gemm.weight, gemm.bias, gemm.act_scale,
                gemm.weight_scale, float(self.model.eps), kind, act, out_dtype or self.model.dtype, self.pdl)

    def _gemv_calls(self) -> dict[str, tuple[list[_Gemm], tuple | None, int, torch.dtype | None]]:
        """Each GEMM of the step: (its GEMMs over the layers, the norm of its prologue per layer or None, its
        activation, its output dtype (None: the model's))."""
        layers = self.layers
        return {"qkv": ([ly["qkv"] for ly in layers], [ly["ln1"] for ly in layers], ACT_NONE, None),
                "dense": ([ly["dense"] for ly in layers], None, ACT_NONE, None),
                "mlp": ([ly["mlp"] for ly in layers], [ly["ln2"] for ly in layers], self.act, None),
                "proj": ([ly["proj"] for ly in layers], None, ACT_NONE, None),
                "head": ([self.head], [self.model.ln_f], ACT_NONE, torch.float32)}

    def tune(self, replays: int = 10, timer=None, rows: int = 1, persist: bool | None = None) -> dict[str, str]:
        """Choose each batch-1 GEMV's config as the step runs it: every config autotuning would time (_CONFIGS,
        pruned by _prune), timed over all layers' weights of that GEMM launched back to back in a CUDA graph, the
        fastest kept. Triton's autotuner times each kernel alone on one weight, a few microseconds for the
        4096-row GEMVs, and chose differently from process to process (H200 runs 13-16: FP8 steps of 2.72 to 3.13
        ms). A choice is kept for the process, per GEMM shape and launch kind: another decoder of the same model
        (another batch size, the bench's next variant) does not time again.

        rows > 1: the batched GEMM's configs (fused-rows, _ROWS_CONFIGS pruned by rows_candidates) for that many
        rows, kept in row_configs.

        Choices timed on the GPU are also kept across processes (pipeline.backends.tuning_cache, a file per GPU
        model): a later process takes them instead of timing, so it runs the same kernels and gives the same
        tokens. persist: use that file (default: only when timing for real, not with a stand-in timer).

        Returns {GEMM: "config (GB/s)" or "config (tuning cache)"}. GPU only: elsewhere, and with
        PIPELINE_FUSED_GEMV_TUNE=0, nothing is tuned and autotuning chooses. timer(run) -> seconds replaces the graph
        timing (tests)."""
        model = self.model
        persist = timer is None if persist is None else persist
        if timer is None:
            if model.device.type != "cuda" or os.environ.get(TUNE_ENV, "1") == "0":
                return {}
            timer = functools.partial(graph_seconds, replays=replays)
        chosen = {}
        generator = torch.Generator(device=model.device).manual_seed(0)
        padded = 1 if rows == 1 else max(16, triton.next_power_of_2(rows))
        configs = self.configs if rows == 1 else self.row_configs
        launch = launch_fused_gemv if rows == 1 else launch_fused_gemm_rows
        for name, (gemms, norms, act, out_dtype) in self._gemv_calls().items():
            weight = gemms[0].weight
            k = weight.shape[1]
            n = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
            fp8 = gemms[0].act_scale is not None
            key = (name, n, k, len(gemms), weight.dtype, model.dtype, self.norm, act, self.pdl, padded,
                   str(model.device))
            if key in _tune_cache:
                configs[name] = _tune_cache[key]
                continue
            candidates = (_prune(_CONFIGS, {"N": n, "K": k}, FP8=fp8) if rows == 1
                          else rows_candidates(n, k, w_f32=weight.dtype == torch.float32))
            shape = (f"{name} (N={n}, K={k}, {weight.dtype}{f', {rows} rows' if rows > 1 else ''})")
            entry = tuning_cache.key("fused-gemv", f"{shape} layers={len(gemms)} activations={model.dtype} "
                                     f"norm={self.norm} act={act} pdl={self.pdl} padded={padded}",
                                     [str(c) for c in candidates])
            config = tuning_cache.cached(model.device, entry, candidates) if persist else None
            if config is not None:
                configs[name] = _tune_cache[key] = config
                _tuned[shape] = chosen[name] = f"{config} (tuning cache)"
                continue
            x = torch.randn(rows, k, device=model.device, generator=generator).to(model.dtype)
            residual = torch.randn(rows, k, device=model.device, generator=generator).to(model.dtype)
            timed = []
            for config in candidates:

                def run(config=config):
                    for i, gemm in enumerate(gemms):
                        norm = norms[i] if norms is not None else None
                        launch(*self._args(x, residual if norm is not None else None, norm, gemm, act, out_dtype),
                               config=config)
                try:
                    timed.append((timer(run), config))
                except Exception as exc:  # noqa: BLE001 - a config this GPU cannot run (shared memory) is skipped
                    warnings.warn(f"fused GEMV config {config} skipped for {name}: {type(exc).__name__}: "
                                  f"{str(exc)[:200]}", stacklevel=2)
            if not timed:
                continue  # autotuning chooses for this GEMM
            seconds, best = min(timed, key=lambda t: t[0])
            configs[name] = _tune_cache[key] = best
            if persist:
                tuning_cache.store(model.device, entry, str(best))
            read = sum(g.weight.numel() * g.weight.element_size() for g in gemms)
            _tuned[shape] = chosen[name] = f"{best} ({read / seconds / 1e9:.0f} GB/s over {len(gemms)} weights)"
        return chosen

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache, slot: torch.Tensor) -> torch.Tensor:
        model = self.model
        comm = model.comm
        batch = tokens.shape[0]
        if batch > MAX_ROWS:
            raise ValueError(f"the fused step runs batches of up to {MAX_ROWS}, not {batch}")
        h = F.embedding(tokens.view(batch), model.embed)
        if model.pos_embed is not None:
            h = h + F.embedding(positions.view(batch), model.pos_embed)
        residual = None
        for index, layer in enumerate(self.layers):
            qkv, h_new = self._gemv(h, residual, layer["ln1"], layer["qkv"], name="qkv")
            h = h_new if residual is not None else h
            attn = torch.ops.pipeline.decode_attention(
                qkv, cache.k[index], cache.v[index], cache.valid, positions.view(batch), slot,
                self.inv_freq, model.heads, model.kv_heads, model.head_size, self.pdl)
            residual, _ = self._gemv(attn, None, None, layer["dense"], name="dense")
            residual = comm.all_reduce_tp(residual)
            hidden, h = self._gemv(h, residual, layer["ln2"], layer["mlp"], self.act, name="mlp")
            residual, _ = self._gemv(hidden, None, None, layer["proj"], name="proj")
            residual = comm.all_reduce_tp(residual)
        logits, _ = self._gemv(h, residual, model.ln_f, self.head, out_dtype=torch.float32, name="head")
        logits = comm.all_gather_tp(logits.view(batch, 1, -1))
        return logits[..., : model.vocab_size]
