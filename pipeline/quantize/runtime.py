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
