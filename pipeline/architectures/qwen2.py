"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM) -> TensorRT-LLM QWenForCausalLM (qwen_type "qwen2").

LLaMA's layers with biases on the q, k and v projections but not on o; tied (0.5B-3B) or untied embeddings.
TensorRT-LLM 1.2's qwen converter (models/qwen/convert.py) names and splits tensors as LLaMA's does (q/k/v biases
split and concatenated like their weights, KV heads replicated for tp > KV heads, lm_head padded to a multiple of
tp), so the weight map is LLaMA's; its config (models/qwen/config.py, QWenConfig) has fields of its own.
"""

from __future__ import annotations

from pipeline.architectures.base import ArchInfo, Architecture, moe_fields
from pipeline.architectures.llama import LLAMA_MAP, describe_llama_like
from pipeline.errors import WeightMapError


def describe(hf: dict) -> ArchInfo:
    window, max_positions = hf.get("sliding_window"), hf.get("max_position_embeddings", 32768)
    if hf.get("use_sliding_window") and window and window < max_positions:
        raise WeightMapError(f"Qwen2 with use_sliding_window (window {window}, applied from layer "
                             f"{hf.get('max_window_layers')}) is not supported; use a checkpoint with "
                             f"use_sliding_window: false (every released Qwen2/Qwen2.5 model)")
    theta = {} if ("rope_theta" in hf or "rope_parameters" in hf) else {"rope_theta": 100000.0}  # QWenConfig's
    return describe_llama_like(hf, attn_bias=True, dense_bias=False, mlp_bias=False, **theta)


def checkpoint_fields(arch: ArchInfo) -> tuple[dict, dict]:
    """QWenConfig's own fields first; the keyword arguments that PretrainedConfig stores implicitly last."""
    own = {
        "mlp_bias": False, "attn_bias": True, "rotary_base": arch.rope_theta, "rotary_scaling": arch.rope_scaling,
        "disable_weight_only_quant_plugin": False, "num_labels": 1, "use_logn_attn": False,
        "moe": moe_fields(0),  # ExpertScaleNormalizationMode.NONE
    }
    extra = {"seq_length": 8192, "qwen_type": "qwen2", "moe_intermediate_size": 0,
             "moe_shared_expert_intermediate_size": 0, "tie_word_embeddings": arch.tie_word_embeddings}
    return own, extra


_BASE = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "use_sliding_window": False, "torch_dtype": "bfloat16",
}
SHAPES = {
    # Qwen2.5-0.5B: 14 heads / 2 KV heads, tied embeddings, a 151936-token vocabulary.
    "qwen2.5-0.5b": {**_BASE, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": 32768,
                     "max_window_layers": 24, "tie_word_embeddings": True, "bos_token_id": 151643,
                     "eos_token_id": 151643},
    # Tiny Qwen2s for tests: 4 heads / 2 KV heads, untied and tied (vocab 1001: lm_head padded for tp=2).
    "qwen2-tiny": {**_BASE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
                   "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32"},
    "qwen2-tiny-tied": {**_BASE, "vocab_size": 1001, "hidden_size": 64, "intermediate_size": 160,
                        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": True,
                        "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32"},
}

ARCH = Architecture(
    name="qwen2", hf_architectures=("Qwen2ForCausalLM",), model_types=("qwen2",),
    trtllm_architecture="Qwen2ForCausalLM", norm="rmsnorm", mlp="gated_silu", position="rope",
    biases="q, k and v projections (not o, not the MLP)",
    describe=describe, checkpoint_fields=checkpoint_fields, weight_map=LLAMA_MAP, shapes=SHAPES,
)
