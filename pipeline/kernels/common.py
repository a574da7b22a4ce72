"""What the kernel families share: the Triton import, the emulator switch, the norm/activation codes, the split
buffers, and the Triton helpers that load weight tiles, add the residual, apply the activation and finish split-K.

Layout contract of every kernel here: row-major contiguous tensors; a weight is [N, K] (a fused gated MLP's
[fc; gate] is [2N, K], fc first); activations are [rows, K] in the model dtype; sums are float32.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # CPU-only installs: the kernels are unavailable and the model code keeps torch's ops
    triton = tl = gdc_launch_dependents = gdc_wait = None

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2
ACT_NONE, ACT_SILU_GATE, ACT_GELU = 0, 1, 2


def emulated() -> bool:
    """Whether Triton runs its CPU emulator (TRITON_INTERPRET=1, Triton's own switch): one fixed config per kernel,
    loop bounds as constants, no programmatic dependent launch."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device: torch.device) -> bool:
    """Whether these kernels can run for tensors on `device` (a GPU, or anywhere under the emulator)."""
    return triton is not None and (device.type == "cuda" or emulated())


def hopper(device: torch.device) -> bool:
    """Programmatic dependent launch needs compute capability 9 (Hopper) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


# The float32 partial sums and int32 counters of the kernels whose last program finishes the work (split-K GEMMs,
# flash-decoding, the argmax), per (kind, shape, device). They outlive the call because CUDA graphs capture these
# addresses; the last program of each group sets its counter back to 0. Decode steps run one at a time on one
# stream, so two launches never share them at once.
_split_work: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_buffers(key: tuple, device: torch.device, partials: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (float32 partials, zeroed int32 counters) of `key`, made on first use (not while a graph is captured)."""
    key = (*key, device)
    if key not in _split_work:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"the split buffers for {key} do not exist yet and cannot be made while a CUDA graph "
                               "is captured: run the step once before capturing (warm-up)")
        _split_work[key] = (torch.empty(partials, dtype=torch.float32, device=device),
                            torch.zeros(counters, dtype=torch.int32, device=device))
    return _split_work[key]


if triton is not None:

    @triton.jit
    def group_sums(p, BLOCK_K: tl.constexpr, ACC_R: tl.constexpr):
        """Products [rows, BLOCK_K] summed over groups of ACC_R neighbours: [rows, BLOCK_K // ACC_R] (the GEMVs'
        grouped accumulators)."""
        if ACC_R > 1:
            return tl.sum(tl.reshape(p, (p.shape[0], BLOCK_K // ACC_R, ACC_R)), axis=2)
        else:
            return p

    @triton.jit
    def load_row(x_ptr, r_ptr, offs_k, k_mask, ADD_RESIDUAL: tl.constexpr):
        """The input row chunk in float32; with a residual, their sum rounded to the model dtype (as x + r is)."""
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0)
        if ADD_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)).to(x.dtype)
        return x.to(tl.float32)

    @triton.jit
    def activation(y, y2, dt, ACT: tl.constexpr):
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

    @triton.jit
    def load_tile(w_rows, offs_k, k_mask, EVEN_K: tl.constexpr):
        """One weight tile [BLOCK_N, BLOCK_K], streamed once: evicted first."""
        if EVEN_K:
            return tl.load(w_rows + offs_k[None, :], eviction_policy="evict_first")
        return tl.load(w_rows + offs_k[None, :], mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")

    @triton.jit
    def load_tiles(w_rows, w2_rows, offs_k, k_mask, EVEN_K: tl.constexpr, ACT: tl.constexpr):
        """The weight tile of a chunk and, for the gated MLP (ACT = 1: silu-gate), the gate half's (else the same
        tile again): (w, w2)."""
        w = load_tile(w_rows, offs_k, k_mask, EVEN_K)
        w2 = w
        if ACT == 1:
            w2 = load_tile(w2_rows, offs_k, k_mask, EVEN_K)
        return w, w2

    @triton.jit
    def store_tile(y, y2, offs_n, n_mask, offs_b, b_mask, N, b_ptr, y_ptr, dt, HAS_BIAS: tl.constexpr,
                    ACT: tl.constexpr):
        """Bias and activation on a batched GEMM's float32 tile y^T [BLOCK_N, rows] (y2: the gate half's), stored
        to y [B, N] (the batched GEMM; the GEMV as a tile of one column)."""
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if ACT == 1:
                y2 += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y = activation(y, y2, dt, ACT)
        tl.store(y_ptr + offs_b[None, :] * N + offs_n[:, None], y.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & b_mask[None, :])

    @triton.jit
    def add_split_tiles(acc, acc2, part_ptr, counter_ptr, pid, pid_k, tile, n_mask, N, ROWS: tl.constexpr,
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
