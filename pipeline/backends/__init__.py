"""Backends: TensorRT-LLM engines (tensorrt_llm.py, the only module that imports tensorrt_llm) and the PyTorch
backend (torch_backend.py + torch_model.py), which runs the converted checkpoint directly."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from pipeline.errors import BuildError

TRTLLM_EXTRA = ("pip install -e '.[tensorrt-llm]' --extra-index-url https://pypi.nvidia.com "
                "(TensorRT-LLM 1.2.1, the last release with trtllm-build; or NVIDIA's TensorRT-LLM 1.2 container)")


@dataclass(frozen=True)
class BackendChoice:
    name: str  # torch | tensorrt-llm | onnx | tensorrt
    reason: str


def tensorrt_llm_importable() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def cuda_capability() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(0)


def select_backend(requested: str, needs_capability: tuple[int, int] = (7, 0)) -> BackendChoice:
    """Resolve build.backend. `auto` prefers TensorRT-LLM when it is installed and a suitable GPU is present."""
    has_trtllm = tensorrt_llm_importable()
    capability = cuda_capability()
    if requested in ("torch", "onnx", "tensorrt"):
        return BackendChoice(requested, f"the recipe asks for build.backend: {requested}")
    if requested == "tensorrt-llm":
        if not has_trtllm:
            raise BuildError(f"build.backend is tensorrt-llm, but the tensorrt_llm package is not installed.\n"
                             f"  Fix: {TRTLLM_EXTRA}; or set build.backend: torch (ARGS=\"build.backend=torch\")")
        if capability is None:
            raise BuildError("build.backend is tensorrt-llm, but no CUDA GPU is visible; TensorRT engines are built "
                             "on the GPU model they run on. Set build.backend: torch to run on CPU")
        if capability < needs_capability:
            raise BuildError(f"build.backend is tensorrt-llm, but this GPU has compute capability "
                             f"{capability[0]}.{capability[1]} and the recipe needs "
                             f"{needs_capability[0]}.{needs_capability[1]}")
        return BackendChoice("tensorrt-llm", "the recipe asks for build.backend: tensorrt-llm")
    if not has_trtllm:
        return BackendChoice("torch", "auto: tensorrt_llm is not installed")
    if capability is None:
        return BackendChoice("torch", "auto: tensorrt_llm is installed but no CUDA GPU is visible")
    if capability < needs_capability:
        return BackendChoice("torch", f"auto: GPU compute capability {capability} is below the {needs_capability} "
                                      f"this recipe needs for TensorRT-LLM")
    return BackendChoice("tensorrt-llm", f"auto: tensorrt_llm is installed and a GPU of compute capability "
                                         f"{capability[0]}.{capability[1]} is present")
