"""LLaMA family (LlamaForCausalLM: Llama 2/3, SmolLM2, ...) -> TensorRT-LLM LLaMAForCausalLM.

RMSNorm, rotary embeddings (Llama-3 frequency scaling too), gated SiLU MLP, grouped-query attention (KV heads
replicated when there are fewer than tp ranks), tied or untied embeddings; biases only when the config asks.

Naming trap: TensorRT-LLM's GatedMLP computes proj(act(fc(x)) * gate(x)), so HF gate_proj (the activated
branch) is `mlp.fc` and HF up_proj is `mlp.gate`. Rotary embeddings use the rotate-half layout in both, so q and k
need no permutation. `describe_llama_like`, `llama_fields` and `LLAMA_MAP` are shared by the modules whose
TensorRT-LLM converter is LLaMA's or a copy of it (mistral, qwen2).
"""

from __future__ import annotations

from pipeline.architectures.base import ArchInfo, Architecture, first_eos, moe_fields
from pipeline.architectures.weight_map import H, Rule, WeightMap, qkv_rows
from pipeline.errors import WeightMapError


def rope_settings(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either spelling transformers writes (rope_theta/rope_scaling or
    rope_parameters); only llama3 scaling is supported."""
    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling is None and rope.get("rope_type", "default") != "default":
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind not in ("llama3", "default"):
            raise WeightMapError(f"rope_scaling type '{kind}' is not supported (supported: llama3)")
    return float(rope_theta), rope_scaling


def describe_llama_like(hf: dict, **overrides) -> ArchInfo:
    """ArchInfo of a LLaMA-shaped config; `overrides` are the fields a sibling architecture sets its own way."""
    heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = rope_settings(hf)
    attn_bias = bool(hf.get("attention_bias", hf.get("bias", False)))
    fields = dict(
        model_type=hf["model_type"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_size=hf.get("head_dim") or hf["hidden_size"] // heads, intermediate_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], max_positions=hf.get("max_position_embeddings", 2048),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=hf.get("tie_word_embeddings", False), attn_bias=attn_bias, dense_bias=attn_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), rope_theta=rope_theta, rope_scaling=rope_scaling,
        torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32", bos_token_id=hf.get("bos_token_id"),
        eos_token_id=first_eos(hf),
    )
    return ArchInfo(**(fields | overrides))


def llama_fields(arch: ArchInfo) -> tuple[dict, dict]:
    """LLaMAConfig's own fields (section 1.6)."""
    return {
        "mlp_bias": arch.mlp_bias, "attn_bias": arch.attn_bias, "rotary_base": arch.rope_theta,
        "rotary_scaling": arch.rope_scaling, "residual_mlp": False, "disable_weight_only_quant_plugin": False,
        "moe": moe_fields(1), "remove_duplicated_kv_heads": False,
    }, {}


_ATTN = "model.layers.{l}.self_attn."
_MLP = "model.layers.{l}.mlp."

LLAMA_MAP = WeightMap(
    top={
        "transformer.vocab_embedding.weight": Rule("replicate", ("model.embed_tokens.weight",),
                                                   lambda a: (a.vocab_size, a.hidden_size), stage="first"),
        "transformer.ln_f.weight": Rule("replicate", ("model.norm.weight",), H, stage="last"),
        "lm_head.weight": Rule("vocab", ("lm_head.weight",), lambda a: (a.vocab_size, a.hidden_size),
                               tied_sources=("model.embed_tokens.weight",), stage="last"),
    },
    layer={
        "input_layernorm.weight": Rule("replicate", ("model.layers.{l}.input_layernorm.weight",), H),
        "attention.qkv.weight": Rule("qkv", (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"),
                                     lambda a: (qkv_rows(a), a.hidden_size), gemm=True),
        "attention.qkv.bias": Rule("qkv", (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"),
                                   lambda a: (qkv_rows(a),), when=lambda a: a.attn_bias),
        "attention.dense.weight": Rule("row", (_ATTN + "o_proj.weight",),
                                       lambda a: (a.hidden_size, a.num_heads * a.head_size), gemm=True),
        "attention.dense.bias": Rule("replicate", (_ATTN + "o_proj.bias",), H, when=lambda a: a.dense_bias),
        "post_layernorm.weight": Rule("replicate", ("model.layers.{l}.post_attention_layernorm.weight",), H),
        "mlp.fc.weight": Rule("column", (_MLP + "gate_proj.weight",),
                              lambda a: (a.intermediate_size, a.hidden_size), gemm=True),
        "mlp.gate.weight": Rule("column", (_MLP + "up_proj.weight",),
                                lambda a: (a.intermediate_size, a.hidden_size), gemm=True),
        "mlp.proj.weight": Rule("row", (_MLP + "down_proj.weight",),
                                lambda a: (a.hidden_size, a.intermediate_size), gemm=True),
        "mlp.fc.bias": Rule("column", (_MLP + "gate_proj.bias",), lambda a: (a.intermediate_size,),
                            when=lambda a: a.mlp_bias),
        "mlp.gate.bias": Rule("column", (_MLP + "up_proj.bias",), lambda a: (a.intermediate_size,),
                              when=lambda a: a.mlp_bias),
        "mlp.proj.bias": Rule("replicate", (_MLP + "down_proj.bias",), H, when=lambda a: a.mlp_bias),
    },
    # Rotary frequencies that some checkpoints saved as buffers; TensorRT-LLM recomputes them.
    ignored=("model.layers.{l}.self_attn.rotary_emb.inv_freq",),
)

_BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
_LLAMA3_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
SHAPES = {
    # SmolLM2-135M: 9 heads / 3 KV heads, tied embeddings.
    "smollm2-135m": {**_BASE, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    # Llama-3.2-1B: the 1B point of the conversion-memory benchmark.
    "llama-3.2-1b": {**_BASE, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "bos_token_id": 128000, "eos_token_id": 128001, "rope_scaling": dict(_LLAMA3_SCALING)},
    # Llama-3.2-3B: the largest shape whose whole-model conversion baseline fits a 24 GiB machine.
    "llama-3.2-3b": {**_BASE, "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                     "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "bos_token_id": 128000, "eos_token_id": 128001, "rope_scaling": dict(_LLAMA3_SCALING)},
    # Llama-3-8B (16.06 GB in bfloat16).
    "llama-3-8b": {**_BASE, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
                   "bos_token_id": 128000, "eos_token_id": 128001},
    # A tiny LLaMA for tests: 8 heads and 2 KV heads (GQA), so tp=4 replicates KV heads.
    "llama-tiny": {**_BASE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                   "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
                   "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
                   "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32"},
    # A tiny LLaMA whose linears need no padding for TensorRT-LLM's group-wise int4 at tp=2 (every width a multiple
    # of max(64, group_size) * tp = 128 for group_size 64).
    "llama-tiny-g64": {**_BASE, "vocab_size": 1000, "hidden_size": 128, "intermediate_size": 256,
                       "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 16,
                       "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
                       "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32"},
    # The same with tied embeddings and llama3 rope scaling, to cover those paths.
    "llama-tiny-tied": {**_BASE, "vocab_size": 1001, "hidden_size": 64, "intermediate_size": 160,
                        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
                        "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": True,
                        "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32",
                        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64, "rope_type": "llama3"}},
}

ARCH = Architecture(
    name="llama", hf_architectures=("LlamaForCausalLM",), model_types=("llama",),
    trtllm_architecture="LlamaForCausalLM", norm="rmsnorm", mlp="gated_silu", position="rope",
    biases="none, unless the config sets attention_bias (q/k/v/o) or mlp_bias",
    describe=describe_llama_like, checkpoint_fields=llama_fields, weight_map=LLAMA_MAP, shapes=SHAPES,
)
