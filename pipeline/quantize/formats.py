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
