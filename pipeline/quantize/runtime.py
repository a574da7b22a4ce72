"""The GEMMs the quantization formats run in the PyTorch backend, faithful to what TensorRT-LLM executes; each
format's registry entry (pipeline/quantize/schemes/) picks its linear through `linear_factory`.

- FP8: the checkpoint holds float8_e4m3fn weights with per-tensor weight and activation scales; each call quantizes
  its input with the static activation scale and multiplies FP8 x FP8 with float32 accumulation.
- W8A16 / W4A16: the checkpoint holds full-precision weights (TensorRT-LLM's builder quantizes them); this backend
  quantizes them the same way when it loads them, keeps int8 (int4: packed two per byte) and per-channel scales,
  and dequantizes for each product.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F

from pipeline.backends.torch_model import Linear
from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import CheckpointError
from pipeline.quantize.formats import (
    fp8_linear,
    pack_int4,
    unpack_int4,
    weight_only_dequantize,
    weight_only_quantize,
)

# The linear layers TensorRT-LLM's weight-only path quantizes (convert_utils.weight_only_quantize_dict).
WEIGHT_ONLY_TARGETS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


class FP8Linear:
    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, act_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype):
        self.weight, self.weight_scale, self.act_scale = weight, weight_scale.float(), act_scale.float()
        self.bias, self.out_dtype = bias, out_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.act_scale, self.weight_scale, self.bias, self.out_dtype)


class WeightOnlyLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int):
        self.dtype, self.bits, self.bias = weight.dtype, bits, bias
        q, self.scale = weight_only_quantize(weight, bits, weight.dtype)
        self.q = pack_int4(q) if bits == 4 else q
        self.out_features = weight.shape[0]

    def dequantized(self) -> torch.Tensor:
        q = unpack_int4(self.q) if self.bits == 4 else self.q
        return weight_only_dequantize(q, self.scale, self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)


def _excluded(prefix: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(prefix, p) for p in patterns or ())


def weight_only_linear_factory(bits: int):
    """The runtime linear of a weight-only format (W8A16 / W4A16): quantized on load, as trtllm-build does."""

    def factory(config: dict, weights: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
        excluded = config["quantization"].get("exclude_modules")

        def make_weight_only(prefix: str, weight: torch.Tensor, bias):
            if not prefix.endswith(WEIGHT_ONLY_TARGETS) or _excluded(prefix, excluded):
                return Linear(weight, bias)
            return WeightOnlyLinear(weight, bias, bits)
        return make_weight_only
    return factory


def linear_factory(config: dict, weights: dict[str, torch.Tensor], device: torch.device):
    """A function (prefix, weight, bias) -> callable GEMM for the checkpoint's quant_algo (its registry entry)."""
    from pipeline.quantize.registry import weight_format_for_algo, weight_formats

    algo = config["quantization"].get("quant_algo")
    dtype = TORCH_DTYPES[config["dtype"]]
    fmt = weight_format_for_algo(algo)
    if fmt is None or fmt.linear_factory is None:
        runs = ", ".join(f.quant_algo for f in weight_formats() if f.quant_algo and f.linear_factory)
        raise CheckpointError(f"quant_algo {algo} is not executed by the PyTorch backend (it runs {runs})")
    return fmt.linear_factory(config, weights, device, dtype)


def real_out_features(config: dict, prefix: str) -> int:
    """The unpadded output width of linear `prefix` on one tp rank (formats that pad to TensorRT-LLM's shapes)."""
    tp = config["mapping"]["tp_size"]
    if prefix.endswith("attention.qkv"):
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        return (heads // tp + 2 * max(kv // tp, 1)) * config["head_size"]
    if prefix.endswith(("mlp.fc", "mlp.gate")):
        return config["intermediate_size"] // tp
    return config["hidden_size"]


def _triton_kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the W4A16_AWQ and W8A8 GEMMs run as Triton kernels (pipeline.kernels.int4_gemm, int8_gemm): CUDA and
    half precision."""
    from pipeline.kernels import int4_gemm, int8_gemm  # noqa: F401 - register torch.ops.pipeline.int4_mm, w8a8_linear
    from pipeline.kernels.common import triton

    return triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


class GroupwiseInt4Linear:
    """W4A16_AWQ: y = (x * prequant_scaling_factor) @ dequantize(q, group scales)^T, in the model dtype, as
    TensorRT-LLM's weight_only_groupwise_quant_matmul plugin computes it; padding (TensorRT-LLM's shapes) sliced off.
    On CUDA the weight stays packed and the Triton kernel (pipeline.kernels.int4_gemm) dequantizes it per tile; the
    CPU emulation below is the reference it is tested against. `q` is what the GEMM reads (the bench's bytes)."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, prequant: torch.Tensor | None,
                 bias: torch.Tensor | None, group_size: int, out_features: int, dtype: torch.dtype):
        from pipeline.quantize.formats import unpack_int4_rows

        self.kernel = _triton_kernels_run(packed.device, dtype)
        self.packed = packed.contiguous()
        self.q = self.packed if self.kernel else unpack_int4_rows(packed)  # CPU: [out_p, in_p] int8
        self.scales, self.group_size, self.dtype = scales.to(dtype).contiguous(), group_size, dtype
        self.prequant = prequant.reshape(-1).to(dtype).contiguous() if prequant is not None else None
        self.bias, self.out_features = bias, out_features

    def dequantized(self, in_features: int) -> torch.Tensor:
        from pipeline.quantize.formats import groupwise_int4_dequantize, unpack_int4_rows

        q = unpack_int4_rows(self.packed) if self.kernel else self.q
        w = groupwise_int4_dequantize(q, self.scales, self.group_size).to(self.dtype)
        return w[:self.out_features, :in_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        if self.kernel and x.device.type == "cuda":
            y = torch.ops.pipeline.int4_mm(x.reshape(-1, n), self.packed, self.scales, self.prequant, self.bias,
                                           self.out_features, self.group_size)
            return y.view(*x.shape[:-1], self.out_features)
        if self.prequant is not None:
            x = x * self.prequant[:n]
        return F.linear(x, self.dequantized(n), self.bias)

    def fused_with(self, other: GroupwiseInt4Linear) -> GroupwiseInt4Linear | None:
        """One GEMM computing [self(x) | other(x)] (the gated MLP's fc and gate), where both read the same input
        (one prequant) and neither pads its rows; else None (two GEMMs)."""
        same_input = (self.prequant is None) == (other.prequant is None) and (
            self.prequant is None or torch.equal(self.prequant, other.prequant))
        unpadded = all(lin.out_features == 2 * lin.packed.shape[0] for lin in (self, other))
        if not (same_input and unpadded and self.group_size == other.group_size and self.kernel == other.kernel
                and (self.bias is None) == (other.bias is None)):
            return None
        bias = None if self.bias is None else torch.cat([self.bias, other.bias])
        return GroupwiseInt4Linear(torch.cat([self.packed, other.packed]), torch.cat([self.scales, other.scales]),
                                   self.prequant, bias, self.group_size, self.out_features + other.out_features,
                                   self.dtype)


class SmoothQuantLinear:
    """W8A8 SmoothQuant: x / smoother (dense, proj), int8 activations (per token or static), int8 weights, int32
    accumulation, scaled to the model dtype (pipeline/quantize/formats.py, smoothquant_linear). On CUDA the Triton
    kernels of pipeline.kernels.int8_gemm run it (quantization, then the GEMM with the scales in its epilogue);
    elsewhere the float64-exact emulation. `weight` is what the GEMM reads."""

    def __init__(self, weight_q: torch.Tensor, per_channel_scale: torch.Tensor, act_scale: torch.Tensor | None,
                 smoother: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight_q, self.dtype, self.bias = weight_q, dtype, bias
        self.weight_scale = per_channel_scale.float().reshape(-1).expand(weight_q.shape[0]).contiguous()
        self.act_scale = act_scale.float().reshape(1) if act_scale is not None else None
        self.smoother = smoother.float().reshape(-1) if smoother is not None else None
        self.kernel = _triton_kernels_run(weight_q.device, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_q

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from pipeline.quantize.formats import smoothquant_linear

        if self.kernel and x.device.type == "cuda":
            return torch.ops.pipeline.w8a8_linear(x, self.weight_q, self.weight_scale, self.act_scale, self.smoother,
                                                  self.bias)
        if self.smoother is not None:
            x = (x.float() / self.smoother).to(x.dtype)
        return smoothquant_linear(x, self.weight_q, self.weight_scale, self.act_scale, self.bias, self.dtype)

    def fused_with(self, other: SmoothQuantLinear) -> SmoothQuantLinear | None:
        """One GEMM computing [self(x) | other(x)] (fc and gate: one input, so one activation quantization), where
        both quantize that input alike; else None. Per-channel weight scales concatenate exactly."""
        def same(a, b):
            return (a is None) == (b is None) and (a is None or torch.equal(a, b))

        if not (same(self.act_scale, other.act_scale) and same(self.smoother, other.smoother)
                and (self.bias is None) == (other.bias is None)):
            return None
        bias = None if self.bias is None else torch.cat([self.bias, other.bias])
        fused = SmoothQuantLinear(torch.cat([self.weight_q, other.weight_q]),
                                  torch.cat([self.weight_scale, other.weight_scale]), self.act_scale, None, bias,
                                  self.dtype)
        fused.smoother = self.smoother
        return fused


def quantize_model_linears(model, make) -> None:
    """Replace every GEMM of a model's layers that is still a plain Linear by make(layer key, Linear) (bench
    --device-random: a model loaded in the model dtype on the GPU, quantized in place, one weight at a time)."""
    for layer in model.layers:
        for key in ("qkv", "dense", "fc", "gate", "proj"):
            linear = layer.get(key)
            if type(linear) is Linear:
                layer[key] = make(key, linear)
                del linear
