"""What every architecture module declares (`Architecture`), and the model facts they all read (`ArchInfo`).

An architecture module (gpt2.py, llama.py, ...) gives its Hugging Face names, how a Hugging Face config.json
becomes an `ArchInfo`, the TensorRT-LLM 1.2 checkpoint config.json fields of its converter (key order included:
TensorRT-LLM writes `__dict__` order, its own class's fields first; shared/reference/trtllm-checkpoint-and-build.md
sections 1.2-1.6), its weight map, the kinds of its layers, and its random-weight shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.mapping import Mapping


@dataclass(frozen=True)
class ArchInfo:
    """One model's sizes and options, in one vocabulary for every architecture."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    norm_epsilon: float
    hidden_act: str
    tie_word_embeddings: bool
    attn_bias: bool = False  # q/k/v projections carry biases
    dense_bias: bool = False  # the attention output projection carries a bias
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # keys older than this many positions are masked; None: full attention
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None


@dataclass(frozen=True)
class Architecture:
    """One registry entry. `sliding_window` is None in the registry; `for_checkpoint` gives a model's copy."""

    name: str
    hf_architectures: tuple[str, ...]  # config.json "architectures" names
    model_types: tuple[str, ...]  # config.json "model_type" values
    trtllm_architecture: str  # the checkpoint's "architecture", a key of TensorRT-LLM 1.2's MODEL_MAP
    norm: str  # layernorm | rmsnorm
    mlp: str  # gelu (fc -> gelu -> proj) | gated_silu (proj(silu(fc(x)) * gate(x)))
    position: str  # learned | rope
    biases: str  # which linear layers carry biases, for `python -m pipeline shapes` and readers
    describe: Callable[[dict], ArchInfo]  # Hugging Face config.json -> ArchInfo; WeightMapError if unsupported
    checkpoint_fields: Callable[[ArchInfo], tuple[dict, dict]]  # (own fields first, extra fields last)
    weight_map: object  # pipeline.architectures.weight_map.WeightMap
    shapes: dict[str, dict]  # random-weight shapes: name -> Hugging Face config.json
    random_fan_in_dim: int = 1  # the input dim of a linear weight in the HF file (GPT-2's Conv1D: 0)
    trtllm_aliases: tuple[str, ...] = ()  # other checkpoint "architecture" strings that mean this one
    sliding_window: int | None = None

    def checkpoint_config(self, arch: ArchInfo, dtype: str, mapping: Mapping, quantization: dict) -> dict:
        """The TensorRT-LLM 1.2 checkpoint config.json, keys in the order TensorRT-LLM writes them."""
        own, extra = self.checkpoint_fields(arch)
        return {**own, **_common_fields(self, arch, dtype, mapping, quantization), **extra}

    def with_window(self, window: int | None) -> Architecture:
        return dataclasses.replace(self, sliding_window=window)


def _common_fields(entry: Architecture, arch: ArchInfo, dtype: str, mapping: Mapping, quantization: dict) -> dict:
    """PretrainedConfig's fields, in the order its __init__ sets them."""
    return {
        "architecture": entry.trtllm_architecture,
        "dtype": dtype,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "hidden_act": arch.hidden_act,
        "logits_dtype": "float32",
        "norm_epsilon": arch.norm_epsilon,
        "runtime_defaults": None,
        "position_embedding_type": {"learned": "learned_absolute", "rope": "rope_gpt_neox"}[entry.position],
        "num_key_value_heads": arch.num_kv_heads,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_positions,
        "mapping": mapping.to_trtllm(),
        "quantization": quantization,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "head_size": arch.head_size,
        "qk_layernorm": False,
        "rotary_embedding_dim": arch.head_size,
    }


def moe_fields(normalization_mode: int) -> dict:
    """MoeConfig.to_dict() of a dense model (no experts)."""
    return {"num_experts": 0, "top_k": 0, "normalization_mode": normalization_mode, "sparse_mixer_epsilon": 0.01,
            "tp_mode": 0}


def first_eos(hf: dict) -> int | None:
    eos = hf.get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def resolve_dtype(recipe_dtype: str, arch: ArchInfo) -> str:
    """The checkpoint dtype: the recipe's, or for `auto` the model's own with float32 -> float16 (TRT-LLM's rule)."""
    if recipe_dtype != "auto":
        return recipe_dtype
    dtype = arch.torch_dtype if arch.torch_dtype in ("float16", "bfloat16", "float32") else "float16"
    return "float16" if dtype == "float32" else dtype


def quantization_block(quant_algo: str | None = None, kv_cache_quant_algo: str | None = None,
                       exclude_modules: list[str] | None = None) -> dict:
    """TensorRT-LLM 1.2's QuantConfig as a dict (dataclasses.asdict order)."""
    return {
        "quant_algo": quant_algo,
        "kv_cache_quant_algo": kv_cache_quant_algo,
        "group_size": 128,
        "smoothquant_val": 0.5,
        "clamp_val": None,
        "use_meta_recipe": False,
        "has_zero_point": False,
        "pre_quant_scale": False,
        "exclude_modules": exclude_modules,
    }
