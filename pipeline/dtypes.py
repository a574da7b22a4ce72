"""Checkpoint dtype names (TensorRT-LLM's and Hugging Face's `torch_dtype` spelling) -> torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
