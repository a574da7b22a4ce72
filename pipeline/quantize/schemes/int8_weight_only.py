"""int8 weight-only (QuantAlgo W8A16): the checkpoint keeps the weights in the model dtype and config.json names
the algorithm; trtllm-build quantizes them per output channel for the GPU it builds on, and the PyTorch backend
quantizes them the same way when it loads them (pipeline/quantize/formats.py, weight_only_quantize)."""

from __future__ import annotations

from pipeline.quantize.registry import WeightFormat
from pipeline.quantize.runtime import weight_only_linear_factory

INT8_WEIGHT_ONLY = WeightFormat(
    name="int8_weight_only", quant_algo="W8A16", summary="int8 weights (per-channel scales), activations in the "
    "model dtype", encode_linear=lambda weight, act_amax: {"weight": weight},
    linear_factory=weight_only_linear_factory(bits=8), fused_mlp=False, tolerance=0.012,
)
