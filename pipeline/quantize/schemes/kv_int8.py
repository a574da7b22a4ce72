"""INT8 KV cache (kv_cache_quant_algo INT8): round(k / s) stored as int8 (C's rounding, half away from zero),
s = calibrated amax / 127 per layer."""

from __future__ import annotations

import torch

from pipeline.quantize.formats import INT8_KV_MAX, amax_scale, round_half_away
from pipeline.quantize.registry import KVCacheFormat


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return round_half_away(x.float() / scale).clamp(-128, 127).to(torch.int8)


def plugin_problems(p, weight_format) -> list[str]:
    if p.use_paged_context_fmha:
        return ["build.plugins.use_paged_context_fmha: TensorRT-LLM 1.2 refuses paged context FMHA with an "
                "INT8 KV cache (\"Paged Context FMHA doesn't work with int8 kv cache\"); set "
                "use_paged_context_fmha: false or precision.quantization.kv_cache: auto/fp8"]
    return []


KV_INT8 = KVCacheFormat(
    name="int8", quant_algo="INT8", summary="int8 keys and values, one scale per layer", calibration=("kv_amax",),
    storage_dtype=torch.int8, scale=lambda amax: amax_scale(amax, INT8_KV_MAX), quantize=quantize,
    tolerance=0.5 + 1e-6, plugin_problems=plugin_problems,
)
