"""int4 weight-only (QuantAlgo W4A16): as int8_weight_only with 4-bit values packed two per byte, so a rank's
input width must be even."""

from __future__ import annotations

from pipeline.quantize.registry import WeightFormat
from pipeline.quantize.runtime import weight_only_linear_factory

INT4_WEIGHT_ONLY = WeightFormat(
    name="int4_weight_only", quant_algo="W4A16", summary="int4 weights (per-channel scales), activations in the "
    "model dtype", encode_linear=lambda weight, act_amax: {"weight": weight},
    linear_factory=weight_only_linear_factory(bits=4), fused_mlp=False, rank_input_multiple=2,
    rank_input_reason="packs two values per byte; the per-rank input width must be even", tolerance=0.18,
)
