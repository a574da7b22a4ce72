"""Triton kernels for decoding on GPUs, one module per family; no model logic here.

    common        shared Triton helpers (tile loaders, residual prologue, activation, split-K finish), buffers
    gemv          batch-1 GEMVs: the fused one (norm/residual prologue, bias/activation epilogue) and the plain one
    batched_gemm  GEMMs of 2 to 64 rows: split-K, swap-AB
    attention     decode attention: rotary embedding, cache write, (split) attention in one kernel
    sampling      the greedy argmax
    tuning        timing candidate configs in CUDA graphs, and the tuning cache that keeps the choices

Importing the package registers the custom ops (torch.ops.pipeline.*) that model code and torch.compile call.
"""

from pipeline.kernels import attention, batched_gemm, gemv, sampling  # noqa: F401 - registers the custom ops
