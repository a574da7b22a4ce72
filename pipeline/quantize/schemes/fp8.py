"""FP8 (QuantAlgo FP8): float8_e4m3fn GEMM weights with per-tensor weight scales and static, calibrated
activation scales (pipeline/quantize/formats.py has the arithmetic). The same scalars on every tp rank; q, k and v
share one weight scale (amax of the unsplit source tensors)."""

from __future__ import annotations

import torch

from pipeline.quantize.formats import FP8_MAX, fp8_scale, quantize_fp8
from pipeline.quantize.registry import CheckpointTensor, WeightFormat

FP8_GPUS = "Ada, Hopper, Blackwell"
FP8_FIX = "Use int8_weight_only / kv_cache: int8, or build on an FP8-capable GPU"


def encode_linear(weight: torch.Tensor, act_amax: float) -> dict:
    w_scale = fp8_scale(weight.abs().amax())
    return {"weight": quantize_fp8(weight, w_scale), "weights_scaling_factor": w_scale,
            "activation_scaling_factor": fp8_scale(act_amax)}


def encode_checkpoint(ctx) -> dict:
    scales: dict[str, dict] = {}
    for target in ctx.quantized_linears():
        w_scale = fp8_scale(ctx.weight_amax(target))
        act_amax = ctx.calibration.act_amax[target.module]
        target.spec.dtype = torch.float8_e4m3fn
        target.spec.encode = lambda block, s=w_scale: quantize_fp8(block, s)
        ctx.plan.add_literal(target.rank, target.prefix + ".weights_scaling_factor", w_scale)
        ctx.plan.add_literal(target.rank, target.prefix + ".activation_scaling_factor", fp8_scale(act_amax))
        scales[target.module] = {"weight_amax": float(w_scale) * FP8_MAX, "activation_amax": act_amax}
    return {"fp8_scales": scales}


def linear_factory(config: dict, weights: dict, device: torch.device, dtype: torch.dtype):
    from pipeline.backends.torch_model import Linear
    from pipeline.errors import CheckpointError
    from pipeline.quantize.runtime import FP8Linear

    def make_fp8(prefix: str, weight: torch.Tensor, bias):
        if weight.dtype != torch.float8_e4m3fn:  # an excluded module, kept in high precision
            return Linear(weight, bias)
        try:
            w_scale = weights[prefix + ".weights_scaling_factor"].to(device)
            a_scale = weights[prefix + ".activation_scaling_factor"].to(device)
        except KeyError as exc:
            raise CheckpointError(f"FP8 checkpoint lacks {exc.args[0]}; rebuild it") from None
        return FP8Linear(weight, w_scale, a_scale, bias, dtype)
    return make_fp8


def device_quantizer(model, act_amax: dict):
    from pipeline.backends.cuda_decode import quantize_model_fp8

    return quantize_model_fp8(model, act_amax)


FP8 = WeightFormat(
    name="fp8", quant_algo="FP8", summary="W8A8 FP8 (E4M3), per-tensor weight and static activation scales",
    calibration=("activation_amax",), min_capability=(8, 9), capability_note=FP8_GPUS, capability_fix=FP8_FIX,
    checkpoint_tensors=(CheckpointTensor("weight", "float8_e4m3fn", "[out, in]"),
                        CheckpointTensor("weights_scaling_factor", "float32", "[1]"),
                        CheckpointTensor("activation_scaling_factor", "float32", "[1]")),
    encode_linear=encode_linear, encode_checkpoint=encode_checkpoint, linear_factory=linear_factory,
    fused_mlp=True, fp8_qdq=True, tolerance=0.06, device_quantizer=device_quantizer,
)
