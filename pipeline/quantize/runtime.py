"""The GEMM each quantization format runs in the PyTorch backend."""

from __future__ import annotations

import torch

from pipeline.backends.torch_model import Linear
from pipeline.errors import CheckpointError


def linear_factory(config: dict, weights: dict[str, torch.Tensor], device: torch.device):
    """A function (prefix, weight, bias) -> callable GEMM for the checkpoint's quant_algo."""
    algo = config["quantization"].get("quant_algo")
    if algo is None:
        return lambda prefix, weight, bias: Linear(weight, bias)
    raise CheckpointError(f"quant_algo {algo} is not executed by the PyTorch backend")
