"""No quantization: GEMMs and the KV cache in the model dtype (quant: none, kv_cache: auto)."""

from __future__ import annotations

from pipeline.quantize.registry import KVCacheFormat, WeightFormat


def _encode_linear(weight, act_amax: float) -> dict:
    return {"weight": weight}


def _linear_factory(config: dict, weights: dict, device, dtype):
    from pipeline.backends.torch_model import Linear

    return lambda prefix, weight, bias: Linear(weight, bias)


NONE = WeightFormat(
    name="none", quant_algo=None, summary="the model dtype (float16 / bfloat16 / float32)",
    checkpoint_tensors=(), encode_linear=_encode_linear, linear_factory=_linear_factory, tolerance=0.004,
)

AUTO = KVCacheFormat(name="auto", quant_algo=None, summary="the KV cache in the model dtype")
