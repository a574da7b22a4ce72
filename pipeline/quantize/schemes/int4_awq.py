"""Group-wise int4 weights (QuantAlgo W4A16_AWQ) with AWQ's activation-aware scale search. The recipe option
`precision.quantization.awq_search: false` writes the same checkpoint without the search (no
prequant_scaling_factor, config pre_quant_scale false): plain group-wise int4, the comparison point. An option and
not a second format because both are one TensorRT-LLM QuantAlgo, and a checkpoint's quant_algo names one runtime.

Layout, per quantized linear `<p>` of a rank (what NVIDIA ModelOpt exports and TensorRT-LLM 1.2 loads):

| tensor                       | dtype       | shape            |
|------------------------------|-------------|------------------|
| <p>.weight                   | int8        | [out_p // 2, in_p] two int4 per byte: row 2k low nibble, row 2k+1 high |
| <p>.weights_scaling_factor   | model dtype | [out_p, in_p // group_size] |
| <p>.prequant_scaling_factor  | model dtype | [in_p]  (with the search only; the kernel multiplies the input by it) |

config.json: quant_algo W4A16_AWQ, group_size, has_zero_point false, pre_quant_scale true (search) / false.
out_p / in_p are the rank's widths padded as TensorRT-LLM's layer declares them: WeightOnlyGroupwiseQuantLinear /
RowLinear pad in and out features to a multiple of max(64, group_size) * tp (zeros here; the PyTorch backend slices
them off), and we refuse tp > 1 where that padding would be needed.

Where read (NVIDIA/TensorRT-LLM, 1.2 line; NVIDIA/Model-Optimizer):
- tensorrt_llm/quantization/layers.py, WeightOnlyGroupwiseQuantLinear / RowLinear: parameters weight
  [in, out/4] (the preprocessed form), weights_scaling_factor [in/group, out], prequant_scaling_factor [1, in] only
  when QuantConfig.pre_quant_scale, the padding rule above.
- tensorrt_llm/models/modeling_utils.py, preprocess_perlayer_weights (W4A16_AWQ): an int8 `weight` is transposed
  and run through preprocess_weights_for_mixed_gemm (so the checkpoint holds [out/2, in] packed along out);
  weights_scaling_factor is transposed and cast to the model dtype; prequant_scaling_factor reshaped to [1, -1].
- tensorrt_llm/quantization/quantize.py, weight_only_groupwise_quantize: group_size, pre_quant_scale and
  has_zero_point come from QuantConfig.
- modelopt/torch/export/quant_utils.py, to_quantized_weight: q = round(W / scale).clamp(-8, 7), packed as above;
  scale = amax / 7 per output row and group (pipeline/quantize/formats.py).
- modelopt/torch/quantization/model_calib.py, awq_lite: per input channel, x = mean |x| over the calibration
  tokens, w = mean over rows of |W| / (group max |W|), s = x^a / w^(1-a) normalised by sqrt(max s * min s); the
  weight is multiplied by s and the input by 1/s; `a` minimises the mean squared error of the quantized linear's
  output on the calibration inputs. ModelOpt searches each linear alone, then averages the scales of linears that
  share an input for export; we search one scale per group that shares an input (qkv; fc with gate; dense; proj)
  on the sum of the group's errors, over a = i / awq_grid for i < awq_grid.
- the same file, awq_clip (ModelOpt's "awq_full" runs it after awq_lite): per output row and group, the clipped
  range r * max |W| (r = 1, 0.95, ..., 0.5: ModelOpt's min_clip_ratio and shrink_step) that minimises the group's
  output error on the calibration inputs; weights_scaling_factor = that range / 7. Run on each rank's tensor (the search is local to a row and a group).

ModelOpt itself is not a dependency: it quantizes a whole Hugging Face model in memory, where the converter streams
a rank's tensors, and it would add its own torch and transformers pins. We re-state its arithmetic, test it against
float64 (tests/test_quantize_awq_sq.py), and measure ModelOpt on the CPU as the quality oracle
(bench/awq_modelopt.py; bench/results/eval-smollm2-135m.md: its default INT4_AWQ_CFG, awq_lite, is what
TensorRT-LLM's quantize.py applies for int4_awq).
"""

from __future__ import annotations

import torch

from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import CheckpointError, WeightMapError
from pipeline.progress import progress
from pipeline.quantize.formats import (
    awq_clip_amax,
    awq_scale,
    awq_weight_mean_rel,
    groupwise_int4_dequantize,
    groupwise_int4_quantize,
    pack_int4_rows,
)
from pipeline.quantize.registry import CheckpointTensor, WeightFormat

GROUPS = (("attention.qkv",), ("mlp.fc", "mlp.gate"), ("attention.dense",), ("mlp.proj",))


def padded(n: int, group_size: int, tp: int) -> int:
    """TensorRT-LLM's padded width of a groupwise linear dimension (layers.py: max(64, group) * tp)."""
    multiple = max(64, group_size) * tp
    return -(-n // multiple) * multiple


def _pad_in(w: torch.Tensor, group_size: int) -> torch.Tensor:
    extra = -w.shape[1] % group_size
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def quantize_dequantize(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in] after int4 group quantization (the last group zero-padded when in is not a multiple)."""
    q, s = groupwise_int4_quantize(_pad_in(w, group_size), group_size)
    return groupwise_int4_dequantize(q, s, group_size)[:, :w.shape[1]]


def search_group(weight: torch.Tensor, x: torch.Tensor, x_mean_abs: torch.Tensor, group_size: int, grid: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, float, float, float]:
    """AWQ-lite for a [out, in] weight (a group's weights stacked) and its inputs [rows, in]: returns
    (s as the weight multiplier, the best alpha, its loss, the loss without AWQ)."""
    reference = x @ weight.t()
    w_rel = awq_weight_mean_rel(_pad_in(weight, group_size), group_size)[:weight.shape[1]]

    def loss(s: torch.Tensor) -> float:
        wq = quantize_dequantize(weight * s, group_size)
        return float(((x / s) @ wq.t() - reference).pow(2).mean())

    plain = loss(torch.ones(weight.shape[1]))
    best = (None, 0.0, float("inf"))
    for i in range(grid):
        alpha = i / grid
        s = stored_scale(awq_scale(x_mean_abs, w_rel, alpha), dtype)
        value = loss(s)
        if value < best[2]:
            best = (s, alpha, value)
    return best[0], best[1], best[2], plain


def stored_scale(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight multiplier whose reciprocal the checkpoint stores exactly in the model dtype."""
    return 1.0 / (1.0 / s).to(dtype).float()


def awq_search(ctx, group_size: int, grid: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    cal = ctx.calibration
    quantized = {t.module for t in ctx.quantized_linears()}
    layers = sorted({int(name.split(".")[2]) for name in cal.act_stats if name.startswith("transformer.layers.")})
    scales: dict[str, torch.Tensor] = {}
    record: dict[str, dict] = {}
    for layer in progress(layers, desc="AWQ scale search", unit="layer"):
        for group in GROUPS:
            names = [f"transformer.layers.{layer}.{m}" for m in group]
            names = [n for n in names if n in quantized and n in cal.act_stats]
            if not names:
                continue
            weight = torch.cat([cal.weights[n + ".weight"].float() for n in names])
            stats = cal.act_stats[names[0]]
            s, alpha, best, plain = search_group(weight, stats.sample, stats.channel_mean_abs, group_size, grid,
                                                 dtype)
            for n in names:
                scales[n] = s
            record[names[0]] = {"alpha": alpha, "loss": best, "loss_without_awq": plain}
    return scales, record


def encode(ctx, awq: bool) -> dict:
    o = ctx.options
    g, tp = o.group_size, ctx.plan.tp
    dtype = TORCH_DTYPES[ctx.plan.dtype]
    scales, record = awq_search(ctx, g, o.awq_grid, dtype) if awq else ({}, {})
    for t in list(ctx.quantized_linears()):
        w = ctx.read_target(t.rank, t.name)
        out_r, in_r = w.shape
        dim, index, parts = ctx.split_of(t.rank, t.name)
        out_full, in_full = out_r * (parts if dim == 0 else 1), in_r * (parts if dim == 1 else 1)
        out_p, in_p = padded(out_full, g, tp) // (tp if dim == 0 else 1), padded(in_full, g, tp) // (tp if dim == 1
                                                                                                      else 1)
        if tp > 1 and (out_p, in_p) != (out_r, in_r):
            raise WeightMapError(f"{t.name}: TensorRT-LLM pads this {out_full}x{in_full} linear to multiples of "
                               f"max(64, group_size) * tp = {max(64, g) * tp}, and its split of padded tensors across "
                               f"ranks is not supported here; use tp=1 or a group_size/tp whose multiple divides "
                               f"{out_full} and {in_full}")
        s = scales.get(t.module)
        if s is not None and dim == 1:
            s = s.chunk(parts)[index]
        if s is not None:
            w = w * s
        w = torch.nn.functional.pad(w, (0, in_p - in_r, 0, out_p - out_r))
        amax = None
        if awq:  # the clipping search on this rank's inputs (the column chunk of a row-parallel linear)
            x = ctx.calibration.act_stats[t.module].sample
            x = x.chunk(parts, dim=1)[index] if dim == 1 else x
            x = torch.nn.functional.pad(x / s if s is not None else x, (0, in_p - in_r))
            amax = awq_clip_amax(w, x, g)
        q, w_scale = groupwise_int4_quantize(w, g, amax)
        ctx.replace_with_literal(t.rank, t.name, pack_int4_rows(q))
        ctx.plan.add_literal(t.rank, t.prefix + ".weights_scaling_factor", w_scale.to(dtype))
        if awq:
            inv = torch.ones(in_p)
            if s is not None:
                inv[:in_r] = 1.0 / s
            ctx.plan.add_literal(t.rank, t.prefix + ".prequant_scaling_factor", inv.to(dtype))
    ctx.config.update({"group_size": g, "has_zero_point": False, "pre_quant_scale": awq})
    return {"awq": record} if awq else {}


def linear_factory(config: dict, weights: dict, device: torch.device, dtype: torch.dtype):
    from pipeline.backends.torch_model import Linear
    from pipeline.quantize.runtime import GroupwiseInt4Linear, real_out_features

    q = config["quantization"]

    def make(prefix: str, weight: torch.Tensor, bias):
        if weight.dtype != torch.int8:  # an excluded module, kept in the model dtype
            return Linear(weight, bias)
        try:
            scales = weights[prefix + ".weights_scaling_factor"].to(device)
        except KeyError as exc:
            raise CheckpointError(f"W4A16_AWQ checkpoint lacks {exc.args[0]}; rebuild it") from None
        prequant = weights.get(prefix + ".prequant_scaling_factor")
        if q.get("pre_quant_scale") and prequant is None:
            raise CheckpointError(f"W4A16_AWQ checkpoint with pre_quant_scale lacks {prefix}.prequant_scaling_factor; "
                                  f"rebuild it")
        return GroupwiseInt4Linear(weight.to(device), scales, prequant, bias, q["group_size"],
                                   real_out_features(config, prefix), dtype)
    return make


def encode_linear(weight: torch.Tensor, act_amax: float, group_size: int = 128) -> dict:
    """One linear without AWQ (a scalar amax cannot drive the search), padded as TensorRT-LLM pads it at tp=1."""
    out, inp = weight.shape
    out_p, in_p = padded(out, group_size, 1), padded(inp, group_size, 1)
    w = torch.nn.functional.pad(weight.float(), (0, in_p - inp, 0, out_p - out))
    q, scale = groupwise_int4_quantize(w, group_size)
    return {"weight": pack_int4_rows(q), "weights_scaling_factor": scale.to(weight.dtype),
            "prequant_scaling_factor": torch.ones(in_p, dtype=weight.dtype)}


def device_quantizer(model, act_amax: dict, group_size: int = 128):
    """bench --device-random: every GEMM of a model loaded in the model dtype on the GPU as group-wise int4 in the
    checkpoint's layout (tp=1 padding), with prequant scales of 1: random weights have no calibration text for
    AWQ's search, and the GEMM multiplies by them all the same."""
    from pipeline.quantize.runtime import GroupwiseInt4Linear, quantize_model_linears

    def make(key, linear):
        w = linear.weight
        out, inp = w.shape
        w = torch.nn.functional.pad(w.float(), (0, padded(inp, group_size, 1) - inp,
                                                0, padded(out, group_size, 1) - out))
        q, scale = groupwise_int4_quantize(w, group_size)
        prequant = torch.ones(w.shape[1], dtype=model.dtype, device=w.device)
        return GroupwiseInt4Linear(pack_int4_rows(q), scale.to(model.dtype), prequant, linear.bias, group_size, out,
                                   model.dtype)

    quantize_model_linears(model, make)
    return model


INT4_AWQ = WeightFormat(
    name="int4_awq", quant_algo="W4A16_AWQ", summary="int4 weights, one scale per group of input channels, "
    "AWQ's activation-aware pre-quant scales; activations in the model dtype", calibration=("activation_stats",),
    min_capability=(8, 0), capability_note="Ampere and newer (TensorRT-LLM's groupwise kernels)",
    capability_fix="use int8_weight_only on older GPUs",
    checkpoint_tensors=(CheckpointTensor("weight", "int8", "[out_p // 2, in_p]"),
                        CheckpointTensor("weights_scaling_factor", "model", "[out_p, in_p // group_size]"),
                        CheckpointTensor("prequant_scaling_factor", "model", "[in_p]")),
    encode_linear=encode_linear, encode_checkpoint=lambda ctx: encode(ctx, awq=ctx.options.awq_search),
    linear_factory=linear_factory, fused_mlp=False, rank_input_multiple=2,
    rank_input_reason="packs two values per byte; the per-rank input width must be even", tolerance=0.12,
    device_quantizer=device_quantizer,
)
