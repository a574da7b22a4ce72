"""FP8 KV cache (kv_cache_quant_algo FP8): k / s and v / s stored as float8_e4m3fn, s = calibrated amax / 448 per
layer."""

from __future__ import annotations

import torch

from pipeline.quantize.formats import FP8_MAX, amax_scale, quantize_fp8
from pipeline.quantize.registry import KVCacheFormat
from pipeline.quantize.schemes.fp8 import FP8_FIX, FP8_GPUS


def plugin_problems(p, weight_format) -> list[str]:
    if p.use_paged_context_fmha and not weight_format.fp8_qdq:
        return ["build.plugins.use_paged_context_fmha: an FP8 KV cache with paged context FMHA needs the FP8 "
                "quantization workflow (\"FP8 Paged Context FMHA only works with fp8 quantization "
                "workflow\"); set precision.quantization.quant: fp8, or use_paged_context_fmha: false"]
    return []


KV_FP8 = KVCacheFormat(
    name="fp8", quant_algo="FP8", summary="FP8 (E4M3) keys and values, one scale per layer",
    calibration=("kv_amax",), min_capability=(8, 9), capability_note=FP8_GPUS, capability_fix=FP8_FIX,
    storage_dtype=torch.float8_e4m3fn, scale=lambda amax: amax_scale(amax, FP8_MAX), quantize=quantize_fp8,
    tolerance=2 ** -6, relative_tolerance=2 ** -4, plugin_problems=plugin_problems,
)
