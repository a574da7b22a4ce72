"""INT8 SmoothQuant (QuantAlgo W8A8_SQ_*_PLUGIN): int8 weights and int8 activations, with SmoothQuant's
per-input-channel smoothing s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (alpha: precision.quantization.
smoothquant_alpha, default 0.5) folded where TensorRT-LLM folds it. `smoothing: false` writes the same layout with
s = 1 (plain W8A8, the comparison point). The options per_channel / per_token pick the QuantAlgo:

| per_channel | per_token | quant_algo                            |
|-------------|-----------|---------------------------------------|
| true        | true      | W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN  (default) |
| true        | false     | W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN |
| false       | true      | W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN   |
| false       | false     | W8A8_SQ_PER_TENSOR_PLUGIN             |

Layout per layer of a rank (the plugin path: SmoothQuantAttention / SmoothQuantGatedMLP / SmoothQuantMLP /
SmoothQuantRmsNorm / SmoothQuantLayerNorm in tensorrt_llm/quantization/layers.py, swapped in by
quantization/quantize.py smooth_quantize_plugin; values as tensorrt_llm/models/llama/convert.py smooth_llama_model,
generate_int8 and get_tllm_linear_sq_weight write them):

| tensor                                     | dtype       | shape                          |
|--------------------------------------------|-------------|--------------------------------|
| {qkv,dense,fc,gate,proj}.weight            | int8        | [out_r, in_r]                  |
| {qkv,dense,fc,gate,proj}.per_channel_scale | float32     | [1, out_r] (per tensor: [1, 1]) weight scale amax / 127 |
| {dense,proj}.smoother                      | float32     | [1, in_r]  the row-parallel GEMM's input is divided by it |
| {qkv,dense,fc,gate,proj}.act_scale         | float32     | [1, 1] static activation scale amax / 127 (per_token false) |
| input_layernorm.weight / post_layernorm.weight | model dtype | [hidden] divided by the smoothing of qkv / fc+gate |
| input_layernorm.scale_to_int / post_layernorm.scale_to_int | model dtype | [1] 127 / amax of the smoothed input |
| attention.quantization_scaling_factor, mlp.quantization_scaling_factor | float32 | [1] (per_token false) 127 / amax of the smoothed dense / proj input |

qkv's smoothing goes into input_layernorm (and its bias for LayerNorm), fc and gate share one smoothing in
post_layernorm; dense and proj cannot fold theirs into a norm, so TensorRT-LLM carries it as `smoother` and
divides in-graph. config.json: smoothquant_val = alpha.

The static (per_token false) values follow the same formulas; TensorRT-LLM's convert writes scale_y_accum_quant
products in some of those places, which is not verified here against a real build: only the per-token default was
checked tensor by tensor against convert.py.
"""

from __future__ import annotations

import torch

from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import CheckpointError
from pipeline.quantize.formats import INT8_MAX, int8_weight_quantize, smoothquant_scale
from pipeline.quantize.registry import CheckpointTensor, WeightFormat

QUANT_ALGOS = {(True, True): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
               (True, False): "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
               (False, True): "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
               (False, False): "W8A8_SQ_PER_TENSOR_PLUGIN"}
# linear group -> (the norm its smoothing folds into, or None: a smoother tensor; the module holding its static
# quantization_scaling_factor)
GROUPS = {("attention.qkv",): ("input_layernorm", None), ("mlp.fc", "mlp.gate"): ("post_layernorm", None),
          ("attention.dense",): (None, "attention"), ("mlp.proj",): (None, "mlp")}


def smoothing_scales(ctx, alpha: float, smoothing: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Per linear (global name): its smoothing s [in_full], and the amax of its smoothed input."""
    cal = ctx.calibration
    scales: dict[str, torch.Tensor] = {}
    amax: dict[str, float] = {}
    layers = sorted({int(n.split(".")[2]) for n in cal.act_stats if n.startswith("transformer.layers.")})
    for layer in layers:
        for group in GROUPS:
            names = [f"transformer.layers.{layer}.{m}" for m in group]
            names = [n for n in names if n in cal.act_stats]
            if not names:
                continue
            x_amax = cal.act_stats[names[0]].channel_amax
            if smoothing:
                w_amax = torch.cat([cal.weights[n + ".weight"].float() for n in names]).abs().amax(dim=0)
                s = smoothquant_scale(x_amax, w_amax, alpha)
            else:
                s = torch.ones_like(x_amax)
            for n in names:
                scales[n] = s
                amax[n] = float((x_amax / s).max())
    return scales, amax


def _chunk(s: torch.Tensor, ctx, rank: int, name: str) -> torch.Tensor:
    dim, index, parts = ctx.split_of(rank, name)
    return s.chunk(parts)[index] if dim == 1 else s


def encode(ctx) -> dict:
    o = ctx.options
    dtype = TORCH_DTYPES[ctx.plan.dtype]
    scales, amax = smoothing_scales(ctx, o.smoothquant_alpha, o.smoothing)
    quantized = list(ctx.quantized_linears())
    if {t.module for t in quantized} != set(scales):
        missing = sorted(set(scales) ^ {t.module for t in quantized})[:3]
        raise CheckpointError(f"w8a8_smoothquant quantizes every linear of a layer (the plugin layers have no "
                              f"high-precision member); exclude patterns matched {missing}: exclude none of them")
    for t in quantized:
        s = _chunk(scales[t.module], ctx, t.rank, t.name)
        w = ctx.read_target(t.rank, t.name) * s
        q, w_scale = int8_weight_quantize(w, o.per_channel)
        ctx.replace_with_literal(t.rank, t.name, q)
        ctx.plan.add_literal(t.rank, t.prefix + ".per_channel_scale", w_scale.reshape(1, -1))
        if t.prefix.endswith(("attention.dense", "mlp.proj")):
            ctx.plan.add_literal(t.rank, t.prefix + ".smoother", s.reshape(1, -1).float())
        if not o.per_token:
            ctx.plan.add_literal(t.rank, t.prefix + ".act_scale", torch.tensor([[amax[t.module] / INT8_MAX]]))
    layers = {(t.rank, t.prefix.rsplit(".", 2)[0]): t.module.rsplit(".", 2)[0] for t in quantized}
    for (rank, local), global_layer in layers.items():
        for group, (norm, holder) in GROUPS.items():
            first = f"{global_layer}.{group[0]}"
            if first not in scales:
                continue
            if norm is not None:
                for suffix in ("weight", "bias"):
                    name = f"{local}.{norm}.{suffix}"
                    if name in ctx.plan.targets[rank]:
                        folded = ctx.read_target(rank, name) / scales[first]
                        ctx.replace_with_literal(rank, name, folded.to(dtype))
                ctx.plan.add_literal(rank, f"{local}.{norm}.scale_to_int",
                                     torch.tensor([INT8_MAX / amax[first]]).to(dtype))
            elif not o.per_token:
                ctx.plan.add_literal(rank, f"{local}.{holder}.quantization_scaling_factor",
                                     torch.tensor([INT8_MAX / amax[first]]))
    ctx.config.update({"quant_algo": QUANT_ALGOS[(o.per_channel, o.per_token)],
                       "smoothquant_val": o.smoothquant_alpha})
    return {"smoothquant": {"alpha": o.smoothquant_alpha if o.smoothing else None,
                            "input_amax": {k: round(v, 6) for k, v in sorted(amax.items())}}}


def encode_linear(weight: torch.Tensor, act_amax: float) -> dict:
    """One linear, unsmoothed, per channel and per token."""
    q, scale = int8_weight_quantize(weight, per_channel=True)
    return {"weight": q, "per_channel_scale": scale.reshape(1, -1)}


def linear_factory(config: dict, weights: dict, device: torch.device, dtype: torch.dtype):
    from pipeline.backends.torch_model import Linear
    from pipeline.quantize.runtime import SmoothQuantLinear

    def make(prefix: str, weight: torch.Tensor, bias):
        if weight.dtype != torch.int8:
            return Linear(weight, bias)
        try:
            scale = weights[prefix + ".per_channel_scale"].to(device)
        except KeyError as exc:
            raise CheckpointError(f"SmoothQuant checkpoint lacks {exc.args[0]}; rebuild it") from None
        act = weights.get(prefix + ".act_scale")
        if act is None and "PER_TOKEN" not in (config["quantization"]["quant_algo"] or ""):
            raise CheckpointError(f"SmoothQuant checkpoint with static activation scales lacks {prefix}.act_scale; "
                                  f"rebuild it")
        return SmoothQuantLinear(weight.to(device), scale, act, weights.get(prefix + ".smoother"), bias, dtype)
    return make


def device_quantizer(model, act_amax: dict):
    """bench --device-random: every GEMM of a model loaded in the model dtype on the GPU as W8A8 per channel and
    per token (the default quant_algo), smoothing 1 (random weights have no calibration text) and the dense / proj
    smoother of a real checkpoint (ones), which the GEMM divides by all the same."""
    from pipeline.quantize.runtime import SmoothQuantLinear, quantize_model_linears

    def make(key, linear):
        q, scale = int8_weight_quantize(linear.weight, per_channel=True)
        smoother = torch.ones(q.shape[1], device=q.device) if key in ("dense", "proj") else None
        return SmoothQuantLinear(q, scale, None, smoother, linear.bias, model.dtype)

    quantize_model_linears(model, make)
    return model


W8A8_SMOOTHQUANT = WeightFormat(
    name="w8a8_smoothquant", quant_algo="W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    quant_algo_variants=tuple(QUANT_ALGOS.values()),
    summary="int8 weights and activations (per-channel / per-token options) with SmoothQuant smoothing",
    calibration=("activation_stats",), min_capability=(8, 0),
    capability_note="Ampere and newer (TensorRT-LLM: no SmoothQuant on Volta/Turing)",
    capability_fix="use int8_weight_only on older GPUs",
    checkpoint_tensors=(CheckpointTensor("weight", "int8", "[out, in]"),
                        CheckpointTensor("per_channel_scale", "float32", "[1, out]")),
    encode_linear=encode_linear, encode_checkpoint=encode, linear_factory=linear_factory, fused_mlp=False,
    tolerance=0.03, device_quantizer=device_quantizer,
)
