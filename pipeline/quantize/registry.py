"""The quantization formats: one entry per recipe name, each defined by one module of pipeline/quantize/schemes/.

A weight/activation format (`precision.quantization.quant`) is a WeightFormat; a KV-cache format
(`precision.quantization.kv_cache`) is a KVCacheFormat. Every module of the schemes package is imported on the
first lookup and each WeightFormat / KVCacheFormat it defines at module level is registered, so adding a format
is one new module there (plus its tests and a recipe); the recipe schema, convert, the PyTorch backend and the
TensorRT-LLM adapter read everything they need about a format from its entry.

This module imports no torch and nothing of the pipeline at load time: recipe validation uses it.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# QuantAlgo member names of TensorRT-LLM 1.2 (tensorrt_llm/quantization/mode.py) and its KV_CACHE_QUANT_ALGO_LIST.
TRTLLM_QUANT_ALGOS = (
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
    "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN",
    "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_BLOCK_SCALES", "NVFP4",
    "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "MIXED_PRECISION", "INT8", "W4A8_NVFP4_FP8",
    "W4A8_MXFP4_FP8", "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
)
TRTLLM_KV_CACHE_QUANT_ALGOS = ("FP8", "INT8", "NVFP4")
# Names the schema accepts and refuses with "reserved for a later release" until a schemes module defines them.
RESERVED_WEIGHT_FORMATS: tuple[str, ...] = ()
# What calibration can measure (pipeline/quantize/calibrate.py); a format lists the kinds it reads.
CALIBRATION_KINDS = {
    "activation_amax": "max |input| of every linear layer (global layer names)",
    "kv_amax": "max(|k|, |v|) per layer, of the keys (after rotary embedding) and values the KV cache stores",
    "activation_stats": "per linear: per-input-channel max |x| and mean |x|, a sample of input rows, and the float32 "
                        "weights (AWQ and SmoothQuant scale searches)",
}


@dataclass(frozen=True)
class CheckpointTensor:
    """One tensor a format writes per quantized linear, next to (or instead of) `<prefix>.weight`."""

    suffix: str  # "weight", "weights_scaling_factor", ...
    dtype: str  # "model" (the checkpoint dtype) or a torch dtype name: "float8_e4m3fn", "float32", ...
    # a Python list expression over out, in (the rank's weight shape), out_p, in_p (padded as TensorRT-LLM pads) and
    # group_size: "[out, in]", "[1]", "[out_p // 2, in_p]"
    shape: str


@dataclass(frozen=True)
class WeightFormat:
    """A weight/activation format: everything the pipeline needs to convert, build and run it."""

    name: str  # precision.quantization.quant
    quant_algo: str | None  # TensorRT-LLM 1.2 QuantAlgo (config.json quantization.quant_algo); None: unquantized
    summary: str  # one line for docs and messages
    # Other QuantAlgos the encoder may write instead, picked by recipe options (SmoothQuant's per-channel/per-token).
    quant_algo_variants: tuple[str, ...] = ()
    # Calibration kinds it reads (CALIBRATION_KINDS keys); empty: no calibration.
    calibration: tuple[str, ...] = ()
    min_capability: tuple[int, int] = (7, 0)  # the oldest GPU TensorRT-LLM runs it on
    capability_note: str = ""  # GPU families that have it, for the error message
    capability_fix: str = ""  # what to do on an older GPU
    checkpoint_tensors: tuple[CheckpointTensor, ...] = ()  # per quantized linear; () = weight unchanged
    # Per linear, (weight [out, in] in the model dtype, calibrated input amax) -> {suffix: tensor} as written.
    encode_linear: Callable[[Any, float], dict] | None = None
    # The convert-stage encoder: called with pipeline.quantize.checkpoint.CheckpointContext, sets target dtypes and
    # encoders and adds scale tensors to the plan; returns what the manifest records. None: weights unchanged.
    encode_checkpoint: Callable[[Any], dict] | None = None
    # (config, rank weights, device, model dtype) -> make_linear(prefix, weight, bias) for the PyTorch backend.
    linear_factory: Callable[..., Callable] | None = None
    config_fields: dict = field(default_factory=dict)  # set in config.json's quantization block (TensorRT-LLM names)
    build_flags: tuple[str, ...] = ()  # extra trtllm-build arguments
    fused_mlp: bool = True  # trtllm-build fuses the gate and fc GEMMs of gated MLPs for it
    fp8_qdq: bool = False  # TensorRT-LLM's FP8 workflow: FP8 context FMHA, gemm_plugin fp8, FP8 paged context FMHA
    rank_input_multiple: int = 1  # a rank's input width (hidden_size / tp) must be a multiple of this
    rank_input_reason: str = ""
    tolerance: float = 0.0  # relative error of one linear's output against float64 (tests/test_quantize_registry.py)
    # bench --device-random: quantizes a model loaded on the GPU in place, given activation amax per "layer.key".
    device_quantizer: Callable[[Any, dict], Any] | None = None


@dataclass(frozen=True)
class KVCacheFormat:
    """A KV-cache format: what convert writes per layer and what the PyTorch backend stores."""

    name: str  # precision.quantization.kv_cache
    quant_algo: str | None  # config.json quantization.kv_cache_quant_algo; None: the cache keeps the model dtype
    summary: str
    calibration: tuple[str, ...] = ()
    min_capability: tuple[int, int] = (7, 0)
    capability_note: str = ""
    capability_fix: str = ""
    storage_dtype: Any = None  # torch dtype of the cache; None: the model dtype
    scale_tensor: str = "attention.kv_cache_scaling_factor"  # per layer, float32 [1]
    scale: Callable[[float], Any] | None = None  # calibrated amax -> scale tensor
    quantize: Callable[[Any, Any], Any] | None = None  # (k or v, scale) -> stored values
    tolerance: float = 0.0  # |dequantize(quantize(x)) - x| <= tolerance * scale + |x| * relative_tolerance
    relative_tolerance: float = 0.0
    # (build.plugins, the recipe's WeightFormat) -> the TensorRT-LLM 1.2 refusals this cache format causes.
    plugin_problems: Callable[[Any, WeightFormat], list[str]] | None = None


_WEIGHT: dict[str, WeightFormat] = {}
_KV: dict[str, KVCacheFormat] = {}
_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from pipeline.quantize import schemes

    for info in sorted(pkgutil.iter_modules(schemes.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{schemes.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, (WeightFormat, KVCacheFormat)):
                register(value)


def register(entry: WeightFormat | KVCacheFormat) -> None:
    table = _WEIGHT if isinstance(entry, WeightFormat) else _KV
    existing = table.get(entry.name)
    if existing is not None and existing is not entry:
        raise ValueError(f"quantization format '{entry.name}' is defined twice")
    table[entry.name] = entry


def unregister(entry: WeightFormat | KVCacheFormat) -> None:
    table = _WEIGHT if isinstance(entry, WeightFormat) else _KV
    if table.get(entry.name) is entry:
        del table[entry.name]


@contextlib.contextmanager
def registered(entry: WeightFormat | KVCacheFormat) -> Iterator[WeightFormat | KVCacheFormat]:
    """Register `entry` for the duration of a with-block (tests)."""
    _load()
    register(entry)
    try:
        yield entry
    finally:
        unregister(entry)


def weight_formats() -> tuple[WeightFormat, ...]:
    _load()
    return tuple(_WEIGHT.values())


def kv_cache_formats() -> tuple[KVCacheFormat, ...]:
    _load()
    return tuple(_KV.values())


def weight_format_names(reserved: bool = True) -> tuple[str, ...]:
    """The recipe choices of precision.quantization.quant: "none" first, then the formats, then (with `reserved`)
    the reserved names."""
    names = sorted(_names(weight_formats()), key=lambda n: n != "none")
    return (*names, *(n for n in RESERVED_WEIGHT_FORMATS if reserved and n not in names))


def kv_cache_format_names() -> tuple[str, ...]:
    return tuple(sorted(_names(kv_cache_formats()), key=lambda n: n != "auto"))


def _names(entries) -> list[str]:
    return [e.name for e in entries]


def reserved(name: str) -> bool:
    return name in RESERVED_WEIGHT_FORMATS and name not in _names(weight_formats())


def weight_format(name: str) -> WeightFormat:
    _load()
    try:
        return _WEIGHT[name]
    except KeyError:
        raise KeyError(f"no quantization format '{name}' (known: {', '.join(_WEIGHT)})") from None


def kv_cache_format(name: str) -> KVCacheFormat:
    _load()
    try:
        return _KV[name]
    except KeyError:
        raise KeyError(f"no KV-cache format '{name}' (known: {', '.join(_KV)})") from None


def weight_format_or_none(name: str) -> WeightFormat:
    """The entry of `name`, or the unquantized one for a reserved name (which validation refuses on its own)."""
    return weight_format("none" if reserved(name) else name)


def weight_format_for_algo(quant_algo: str | None) -> WeightFormat | None:
    """The format whose checkpoint says quant_algo (None: unquantized); None if no entry writes it."""
    return next((f for f in weight_formats() if quant_algo == f.quant_algo or quant_algo in f.quant_algo_variants),
                None)


def kv_cache_format_for_algo(quant_algo: str | None) -> KVCacheFormat | None:
    return next((f for f in kv_cache_formats() if f.quant_algo == quant_algo), None)


def fp8_qdq_names() -> tuple[str, ...]:
    return tuple(f.name for f in weight_formats() if f.fp8_qdq)
