"""The architecture registry: one module per architecture, looked up by Hugging Face or TensorRT-LLM name.

Adding an architecture is one module here (an `Architecture`: names, config fields, weight map, layer kinds,
random-weight shapes), its line in `ARCHITECTURES`, and a tiny-checkpoint test; nothing else in the pipeline
names architectures.
"""

from __future__ import annotations

from pipeline.architectures import gpt2, llama, mistral, qwen2
from pipeline.architectures.base import ArchInfo, Architecture, quantization_block, resolve_dtype
from pipeline.errors import CheckpointError, WeightMapError
from pipeline.mapping import Mapping

ARCHITECTURES: tuple[Architecture, ...] = (gpt2.ARCH, llama.ARCH, qwen2.ARCH, mistral.ARCH)

_BY_HF = {name: a for a in ARCHITECTURES for name in (*a.hf_architectures, *a.model_types)}
_BY_TRTLLM = {name: a for a in ARCHITECTURES for name in (a.trtllm_architecture, *a.trtllm_aliases)}

__all__ = ["ARCHITECTURES", "ArchInfo", "Architecture", "by_hf_config", "by_trtllm_name", "describe",
           "for_checkpoint", "for_model", "quantization_block", "resolve_dtype", "trtllm_config"]


def by_hf_config(hf: dict) -> Architecture:
    """The entry for a Hugging Face config.json: by its `architectures` name, else its `model_type`."""
    names = [*(hf.get("architectures") or []), hf.get("model_type")]
    for name in names:
        if name in _BY_HF:
            return _BY_HF[name]
    supported = ", ".join(n for a in ARCHITECTURES for n in a.hf_architectures)
    raise WeightMapError(
        f"architecture {names[0]!r} (model_type {hf.get('model_type')!r}) is not supported; supported: {supported}. "
        f"Adding one is a module in pipeline/architectures/ plus a tiny-checkpoint test")


def by_trtllm_name(name: str) -> Architecture:
    """The entry for a TensorRT-LLM checkpoint's `architecture` string."""
    if name not in _BY_TRTLLM:
        raise CheckpointError(f"architecture '{name}' is not one this pipeline runs ({', '.join(_BY_TRTLLM)})")
    return _BY_TRTLLM[name]


def describe(hf: dict) -> ArchInfo:
    """Read a Hugging Face config.json dict; raises WeightMapError for unsupported architectures."""
    return by_hf_config(hf).describe(hf)


def for_model(arch: ArchInfo) -> Architecture:
    """The entry of a described model."""
    return _BY_HF[arch.model_type]


def trtllm_config(arch: ArchInfo, dtype: str, mapping: Mapping, quantization: dict) -> dict:
    """The TensorRT-LLM 1.2 checkpoint config.json of a described model."""
    return for_model(arch).checkpoint_config(arch, dtype, mapping, quantization)


def for_checkpoint(config: dict) -> Architecture:
    """The entry for a TensorRT-LLM checkpoint config.json, carrying that model's sliding window."""
    return by_trtllm_name(config["architecture"]).with_window(config.get("sliding_window"))


def random_shapes() -> dict[str, dict]:
    """Every architecture's random-weight shapes: name -> Hugging Face config.json."""
    return {name: hf for a in ARCHITECTURES for name, hf in a.shapes.items()}
