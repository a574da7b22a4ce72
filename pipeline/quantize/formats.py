"""The arithmetic of each quantization format, as TensorRT-LLM 1.2 defines it.

FP8 (QuantAlgo FP8, per-tensor): scale = amax / 448 (E4M3's largest finite value); q = (x / scale) saturated to
[-448, 448] and rounded to float8_e4m3fn (round to nearest even). A GEMM quantizes its input with the static,
calibrated activation scale, multiplies FP8 x FP8 with float32 accumulation, and scales the product by
s_activation * s_weight.

Weight-only (W8A16 / W4A16, per output channel): trtllm-build quantizes at build time with
`symmetric_quantize_last_axis_of_batched_matrix`: scale_j = max_i |W[i, j]| / 128 (int8) or / 8 (int4) computed in
float32 (note 128, not 127), q = round(W / scale_j) with C's round (half away from zero), clipped to [-128, 127] or
[-8, 7]; the scale is stored in the model dtype and the GEMM multiplies by it. Int4 packs two values per byte,
element 2k in the low nibble.

KV cache: FP8 stores k / s and v / s as float8_e4m3fn with s = amax / 448; INT8 stores round(k / s) with
s = amax / 127 (pipeline/quantize/schemes/kv_fp8.py, kv_int8.py).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
INT8_KV_MAX = 127.0
WEIGHT_ONLY_RANGE = {8: (128.0, -128, 127), 4: (8.0, -8, 7)}


def fp8_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor FP8 scale as a float32 tensor of shape [1]; a zero amax gets scale 1/448 (any value fits)."""
    amax = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    return torch.where(amax > 0, amax, torch.ones_like(amax)) / FP8_MAX


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    y = x.float() if x.dtype != torch.float32 else x.clone()  # one float32 temporary, then in place
    return y.div_(scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def _scaled_mm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, act_scale: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = (q(x) @ q(W)^T) * s_a * s_w (+ b): FP8 operands, float32 accumulation, output in out_dtype.

    On Ada/Hopper GPUs this is torch._scaled_mm (cuBLASLt FP8 tensor cores); elsewhere an exact emulation: FP8
    values convert to float32 exactly, so only the order of the float32 additions can differ.
    """
    shape = x.shape
    x2d = quantize_fp8(x.reshape(-1, shape[-1]), act_scale)
    if _scaled_mm_available(x.device):
        y = torch._scaled_mm(x2d, weight_fp8.t(), scale_a=act_scale.float(), scale_b=weight_scale.float(),
                             out_dtype=out_dtype)
    else:
        y = ((x2d.float() @ weight_fp8.float().t()) * (act_scale.float() * weight_scale.float())).to(out_dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight_fp8.shape[0])


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves go away from zero (torch.round goes to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def weight_only_quantize(weight: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a [out, in] weight per output channel. Returns (int8 values in range, scales [out] in scale_dtype)."""
    divisor, low, high = WEIGHT_ONLY_RANGE[bits]
    w = weight.float()
    scale = w.abs().amax(dim=1) / divisor
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[:, None] > 0, round_half_away(w / safe[:, None]), torch.zeros_like(w))
    return q.clamp(low, high).to(torch.int8), scale.to(scale_dtype)


def weight_only_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor in [-8, 7], even last dim) two per byte: element 2k low nibble, 2k+1 high."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {q.shape[-1]}")
    low = q[..., 0::2].to(torch.uint8) & 0x0F
    high = q[..., 1::2].to(torch.uint8) & 0x0F
    return (low | (high << 4)).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: int8 values in [-8, 7], last dim doubled."""
    u = packed.view(torch.uint8)
    low = (u & 0x0F).to(torch.int8)
    high = (u >> 4).to(torch.int8)
    low = torch.where(low > 7, low - 16, low)
    high = torch.where(high > 7, high - 16, high)
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def amax_scale(amax: float, limit: float) -> torch.Tensor:
    """amax / limit as a float32 tensor of shape [1]; a zero amax gets 1 / limit (any value fits)."""
    amax_t = torch.tensor([amax], dtype=torch.float32)
    return torch.where(amax_t > 0, amax_t, torch.ones_like(amax_t)) / limit


def kv_scale(amax: float, kv_format: str) -> torch.Tensor:
    """The scale of KV-cache format `kv_format` (a kv_cache name; pipeline/quantize/schemes/kv_*.py)."""
    from pipeline.quantize.registry import kv_cache_format

    return kv_cache_format(kv_format).scale(amax)


def quantize_kv(x: torch.Tensor, scale: torch.Tensor, kv_format: str) -> torch.Tensor:
    from pipeline.quantize.registry import kv_cache_format

    return kv_cache_format(kv_format).quantize(x, scale)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


# --------------------------------------------------------------------------------------------- group-wise int4
# W4A16_AWQ as NVIDIA ModelOpt exports it for TensorRT-LLM (modelopt/torch/export/quant_utils.py,
# to_quantized_weight; pipeline/quantize/schemes/int4_awq.py has the tensor layout): per output row and group of
# `group_size` input channels, scale = amax / 7 (TensorQuantizer.maxbound = 2^(bits-1) - 1), q = round(W / scale)
# with torch.round (half to even), clamped to [-8, 7]. A group of zeros gets scale 0 and q 0.
INT4_GROUP_MAX = 7.0


def groupwise_int4_quantize(weight: torch.Tensor, group_size: int,
                            amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] (in a multiple of group_size) -> (int8 values in [-8, 7] [out, in], float32 scales [out, in/g]).
    `amax` [out, in/g]: the range per group (AWQ's clipped range); default max |W| of the group."""
    out, inp = weight.shape
    if inp % group_size:
        raise ValueError(f"input width {inp} is not a multiple of the group size {group_size}")
    w = weight.float().reshape(out, inp // group_size, group_size)
    scale = (w.abs().amax(dim=2) if amax is None else amax.float()) / INT4_GROUP_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[..., None] > 0, torch.round(w / safe[..., None]), torch.zeros_like(w)).clamp(-8, 7)
    return q.reshape(out, inp).to(torch.int8), scale


def groupwise_int4_dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in] = q * scale of its group."""
    return (q.float().reshape(q.shape[0], -1, group_size) * scale.float()[..., None]).reshape(q.shape)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """ModelOpt's W4A16_AWQ packing: [out, in] int4 values -> int8 [out/2, in]; row 2k in the low nibble of row k,
    row 2k+1 in the high nibble."""
    if q.shape[0] % 2:
        raise ValueError(f"int4 row packing needs an even number of output rows, got {q.shape[0]}")
    return pack_int4(q.t().contiguous()).t().contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    return unpack_int4(packed.t().contiguous()).t().contiguous()


def awq_scale(act_mean_abs: torch.Tensor, weight_mean_rel: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ-lite's per-input-channel scale (modelopt/torch/quantization/model_calib.py, awq_lite.get_scale):
    s = x^alpha / w^(1 - alpha), clamped to [1e-4, 1e4], divided by sqrt(max(s) * min(s))."""
    tiny = torch.finfo(torch.float32).tiny
    s = (act_mean_abs.float().pow(alpha) / (weight_mean_rel.float().pow(1 - alpha) + tiny)).clamp(1e-4, 1e4)
    return s / (s.max() * s.min()).sqrt()


def awq_clip_amax(weight: torch.Tensor, x: torch.Tensor, group_size: int,
                  ratios: tuple[float, ...] = tuple(1.0 - i / 20 for i in range(11))) -> torch.Tensor:
    """AWQ's clipping search (awq_clip in modelopt/torch/quantization/model_calib.py, auto_clip in llm-awq): per
    output row and group, the range r * max |W| (r in `ratios`) whose quantized group minimises the mean squared
    error of that group's share of the output, x_g . w_g, on the inputs x [rows, in]. Returns amax [out, in/g]."""
    out, inp = weight.shape
    groups = inp // group_size
    w = weight.float().reshape(out, groups, group_size)
    xg = x.float().reshape(-1, groups, group_size)
    group_max = w.abs().amax(dim=2)
    best_err = torch.full((out, groups), float("inf"))
    best = group_max.clone()
    reference = torch.einsum("ngk,ogk->gno", xg, w)
    for r in ratios:
        amax = group_max * r
        scale = amax / INT4_GROUP_MAX
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / safe[..., None]).clamp(-8, 7) * scale[..., None]
        err = (torch.einsum("ngk,ogk->gno", xg, q) - reference).pow(2).mean(dim=1).t()  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, amax, best)
    return best


def awq_weight_mean_rel(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean over output rows of |W| / (its group's max |W|), per input channel (awq_lite.get_weight_scale)."""
    out, inp = weight.shape
    w = weight.float().abs().reshape(out, inp // group_size, group_size)
    rel = w / (w.amax(dim=2, keepdim=True) + torch.finfo(torch.float32).tiny)
    return rel.reshape(out, inp).mean(dim=0)


# --------------------------------------------------------------------------------------------- int8 SmoothQuant
# TensorRT-LLM 1.2's SmoothQuant plugin path (tensorrt_llm/models/llama/convert.py: smooth_gemm, generate_int8,
# get_tllm_linear_sq_weight; pipeline/quantize/schemes/w8a8_smoothquant.py has the layout). Weights: per output
# channel (or per tensor) scale = amax / 127, q = round(W * 127 / amax) clipped to [-127, 127] (numpy's round: half
# to even). Activations: per token (dynamic, the quantize_per_token plugin: scale = max |x_row| / 127) or per
# tensor (static, calibrated amax / 127), q = round(x / scale) clipped to [-128, 127]. The GEMM multiplies int8 x int8
# with int32 accumulation and scales the int32 result by s_x * s_w.
INT8_MAX = 127.0


def smoothquant_scale(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel smoothing s = max|X_j|^alpha / max|W_j|^(1-alpha) (smooth_gemm); the input
    is divided by s and the weight columns multiplied by it. A channel with a zero amax gets 1."""
    s = act_amax.float().clamp(min=1e-5).pow(alpha) / weight_amax.float().clamp(min=1e-5).pow(1 - alpha)
    return torch.where((act_amax > 0) & (weight_amax > 0), s, torch.ones_like(s))


def int8_weight_quantize(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (int8 [out, in], float32 scales [out] or [1]): scale = amax / 127, q = round(W / scale)."""
    w = weight.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / INT8_MAX
    s = scale[:, None] if per_channel else scale
    return torch.round(w / s).clamp(-127, 127).to(torch.int8), scale


def int8_activation_quantize(x: torch.Tensor, static_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, in] -> (int8 [tokens, in], float32 scales [tokens, 1]); per token when static_scale is None."""
    xf = x.float()
    if static_scale is None:
        amax = xf.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax)) / INT8_MAX
    else:
        scale = static_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    return torch.round(xf / scale).clamp(-128, 127).to(torch.int8), scale


def int8_gemm_int32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 [m, k] x int8 [n, k]^T with int32 accumulation. The CPU has no int8 GEMM; float64 carries every
    product (< 2^14) and every partial sum (< k * 2^14 < 2^53) exactly, so the result equals int32 accumulation
    whenever that does not overflow (k < 131072)."""
    return (a.double() @ b.double().t()).to(torch.int32)


def smoothquant_linear(x: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor,
                       static_act_scale: torch.Tensor | None, bias: torch.Tensor | None,
                       out_dtype: torch.dtype) -> torch.Tensor:
    """y = (q(x) @ q(W)^T) * s_x * s_w (+ b), the int8 x int8 -> int32 GEMM of the SmoothQuant plugin."""
    shape = x.shape
    xq, xs = int8_activation_quantize(x.reshape(-1, shape[-1]), static_act_scale)
    acc = int8_gemm_int32(xq, weight_q)
    y = (acc.double() * xs.double() * weight_scale.double().reshape(1, -1)).to(out_dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], weight_q.shape[0])
