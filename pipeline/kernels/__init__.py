"""Triton kernels for decoding on GPUs, one module per family; no model logic here.

    common        shared Triton helpers (tile loaders, residual prologue, activation, split-K finish), buffers
    gemv          batch-1 GEMVs: the fused one (norm/residual prologue, bias/activation epilogue) and the plain one
    batched_gemm  GEMMs of 2 to 64 rows: split-K, swap-AB
    int4_gemm     the W4A16_AWQ GEMM of any rows: packed int4 dequantized per tile (GEMV form for one row)
    attention     decode attention: rotary embedding, cache write, (split) attention in one kernel
    paged_attention  the engine's attention over its paged KV cache, and its rotary + cache-write kernel
    norm          RMS norm of each row in one launch (the engine's batched steps)
    fp8           the activations' FP8 cast in one pass, before torch._scaled_mm
    sampling      the greedy argmax
    tuning        timing candidate configs in CUDA graphs, and the tuning cache that keeps the choices

Importing the package registers the custom ops (torch.ops.pipeline.*) that model code and torch.compile call.
"""

from pipeline.kernels import attention, batched_gemm, gemv, int4_gemm, sampling  # noqa: F401 - registers the custom ops
