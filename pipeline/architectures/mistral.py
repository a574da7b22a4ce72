"""Mistral (MistralForCausalLM) -> TensorRT-LLM LLaMAForCausalLM, architecture "MistralForCausalLM".

LLaMA's layers, weight map and converter, plus sliding-window attention: a query attends to itself and the
`sliding_window - 1` positions before it (transformers' rule). TensorRT-LLM 1.2's LLaMAConfig has no window field:
its runtime takes the window as `max_attention_window_size`. The checkpoint here records it as one extra
config.json key, `sliding_window`, after LLaMAConfig's fields (PretrainedConfig keeps unknown keys as attributes),
so the PyTorch backend masks with it and the TensorRT-LLM backend passes it to the runtime.
"""

from __future__ import annotations

from pipeline.architectures.base import ArchInfo, Architecture
from pipeline.architectures.llama import LLAMA_MAP, describe_llama_like, llama_fields


def describe(hf: dict) -> ArchInfo:
    window = hf.get("sliding_window")
    max_positions = hf.get("max_position_embeddings", 2048)
    # A window as long as the model's positions never masks anything: full attention.
    return describe_llama_like(hf, sliding_window=window if window and window < max_positions else None)


def checkpoint_fields(arch: ArchInfo) -> tuple[dict, dict]:
    own, _ = llama_fields(arch)
    return own, ({"sliding_window": arch.sliding_window} if arch.sliding_window else {})


_BASE = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
SHAPES = {
    # Mistral-7B-v0.1: 32 heads / 8 KV heads, a 4096-token sliding window over 32768 positions.
    "mistral-7b": {**_BASE, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": 4096},
    # A tiny Mistral for tests: a window of 8, so a prompt of a dozen tokens already loses its first keys.
    "mistral-tiny": {**_BASE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                     "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
                     "max_position_embeddings": 256, "rope_theta": 10000.0, "sliding_window": 8,
                     "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32"},
}

ARCH = Architecture(
    name="mistral", hf_architectures=("MistralForCausalLM",), model_types=("mistral",),
    trtllm_architecture="MistralForCausalLM", norm="rmsnorm", mlp="gated_silu", position="rope", biases="none",
    describe=describe, checkpoint_fields=checkpoint_fields, weight_map=LLAMA_MAP, shapes=SHAPES,
)
