"""What the converter and runtime need to know about a Hugging Face architecture.

`describe` reads a Hugging Face config.json into an `ArchInfo` (one vocabulary for GPT-2 and the LLaMA family),
and `trtllm_config` writes the TensorRT-LLM 1.2 checkpoint config.json for it, with the fields and key order of
TensorRT-LLM's own `GPTConfig` / `LLaMAConfig` (shared/reference/trtllm-checkpoint-and-build.md, sections 1.2-1.6).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import WeightMapError
from pipeline.mapping import Mapping

# Hugging Face model_type -> weight-map family, and the architecture string TensorRT-LLM's MODEL_MAP knows.
FAMILIES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama"}
TRTLLM_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    family: str  # the weight map: gpt2 | llama
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
    attn_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    torch_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_id: int | None = None


def _eos(hf: dict) -> int | None:
    eos = hf.get("eos_token_id")
    return eos[0] if isinstance(eos, list) else eos


def describe(hf: dict) -> ArchInfo:
    """Read a Hugging Face config.json dict; raises WeightMapError for architectures without a weight map."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise WeightMapError(
            f"model_type '{model_type}' has no weight map; supported: {', '.join(FAMILIES)}. Adding one is a data "
            f"file in pipeline/convert/maps/ plus a tiny-checkpoint test")
    dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if model_type == "gpt2":
        hidden = hf.get("n_embd", 768)
        heads = hf.get("n_head", 12)
        return ArchInfo(
            model_type=model_type, family="gpt2", hidden_size=hidden, num_layers=hf.get("n_layer", 12),
            num_heads=heads, num_kv_heads=heads, head_size=hidden // heads,
            intermediate_size=hf.get("n_inner") or 4 * hidden, vocab_size=hf.get("vocab_size", 50257),
            max_positions=hf.get("n_positions", 1024), norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            hidden_act=hf.get("activation_function", "gelu_new"), tie_word_embeddings=hf.get("tie_word_embeddings", True),
            attn_bias=True, mlp_bias=True, torch_dtype=dtype, bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf),
        )
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is None and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ("llama3", "default"):
            raise WeightMapError(f"rope_scaling type '{kind}' is not supported (supported: llama3)")
    if hf.get("sliding_window") and model_type == "mistral":
        window = hf["sliding_window"]
        if window < hf.get("max_position_embeddings", 0):
            raise WeightMapError(f"sliding-window attention (window {window}) is not supported; use a Mistral "
                                 f"checkpoint without sliding_window")
    return ArchInfo(
        model_type=model_type, family="llama", hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_size=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_positions=hf.get("max_position_embeddings", 2048),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attn_bias=bool(hf.get("attention_bias", hf.get("bias", False))), mlp_bias=bool(hf.get("mlp_bias", False)),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling, torch_dtype=dtype,
        bos_token_id=hf.get("bos_token_id"), eos_token_id=_eos(hf),
    )


def resolve_dtype(recipe_dtype: str, arch: ArchInfo) -> str:
    """The checkpoint dtype: the recipe's, or for `auto` the model's own with float32 -> float16 (TRT-LLM's rule)."""
    if recipe_dtype != "auto":
        return recipe_dtype
    dtype = arch.torch_dtype if arch.torch_dtype in ("float16", "bfloat16", "float32") else "float16"
    return "float16" if dtype == "float32" else dtype


def trtllm_config(arch: ArchInfo, dtype: str, mapping: Mapping, quantization: dict) -> dict:
    """The config.json of a TensorRT-LLM 1.2 checkpoint, keys in the order TensorRT-LLM writes them."""
    common_head = {
        "architecture": TRTLLM_ARCHITECTURES[arch.model_type],
        "dtype": dtype,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "hidden_act": arch.hidden_act,
        "logits_dtype": "float32",
        "norm_epsilon": arch.norm_epsilon,
        "runtime_defaults": None,
        "position_embedding_type": "learned_absolute" if arch.family == "gpt2" else "rope_gpt_neox",
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
    moe = {"num_experts": 0, "top_k": 0, "normalization_mode": 1, "sparse_mixer_epsilon": 0.01, "tp_mode": 0}
    if arch.family == "gpt2":
        own = {
            "gpt_variant": "gpt2", "bias": True, "q_scaling": 1.0, "embedding_scale": None,
            "apply_query_key_layer_scaling": False, "rotary_pct": 1.0, "rotary_base": 10000.0, "rotary_scaling": None,
            "inner_layernorm": False, "norm_before_bmm1": False, "moe": moe,
        }
    else:
        own = {
            "mlp_bias": arch.mlp_bias, "attn_bias": arch.attn_bias, "rotary_base": arch.rope_theta,
            "rotary_scaling": arch.rope_scaling, "residual_mlp": False, "disable_weight_only_quant_plugin": False,
            "moe": moe, "remove_duplicated_kv_heads": False,
        }
    return {**own, **common_head}


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
