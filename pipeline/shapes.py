"""Named model shapes: Hugging Face config.json contents for random-weight checkpoints.

GPU machines here have no network and little room to carry weights, so speed and memory are measured on
random weights of real shapes; tests use the tiny ones. A shape is only a config: `hub.make_random_checkpoint`
turns it into a Hugging Face folder.
"""

from __future__ import annotations

_GPT2_BASE = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
_LLAMA_BASE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}

SHAPES: dict[str, dict] = {
    # GPT-2 small (124M), the shape of openai-community/gpt2.
    "gpt2": {**_GPT2_BASE, "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
    # A tiny GPT-2 for tests: 4 heads so tp 1, 2 and 4 all split it.
    "gpt2-tiny": {**_GPT2_BASE, "vocab_size": 1000, "n_positions": 128, "n_embd": 64, "n_layer": 4, "n_head": 4,
                  "bos_token_id": 0, "eos_token_id": 999},
    # SmolLM2-135M: 9 heads / 3 KV heads, tied embeddings.
    "smollm2-135m": {**_LLAMA_BASE, "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    # Llama-3.2-1B: the 1B point of the conversion-memory benchmark.
    "llama-3.2-1b": {**_LLAMA_BASE, "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "bos_token_id": 128000, "eos_token_id": 128001,
                     "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # Llama-3.2-3B: the largest shape whose whole-model conversion baseline fits a 24 GiB machine.
    "llama-3.2-3b": {**_LLAMA_BASE, "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
                     "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0, "tie_word_embeddings": True,
                     "bos_token_id": 128000, "eos_token_id": 128001,
                     "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}},
    # Llama-3-8B (16.06 GB in bfloat16).
    "llama-3-8b": {**_LLAMA_BASE, "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False,
                   "bos_token_id": 128000, "eos_token_id": 128001},
    # A tiny LLaMA for tests: 8 heads and 2 KV heads (GQA), so tp=4 replicates KV heads.
    "llama-tiny": {**_LLAMA_BASE, "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 160,
                   "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
                   "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
                   "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32"},
    # The same with tied embeddings and llama3 rope scaling, to cover those paths.
    "llama-tiny-tied": {**_LLAMA_BASE, "vocab_size": 1001, "hidden_size": 64, "intermediate_size": 160,
                        "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
                        "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": True,
                        "bos_token_id": 0, "eos_token_id": 999, "torch_dtype": "float32",
                        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64, "rope_type": "llama3"}},
}

# Tokenizer asset (pipeline.offline) that suits each shape's vocabulary, for random weights that print text.
SHAPE_TOKENIZERS = {"gpt2": "gpt2-tokenizer", "smollm2-135m": "smollm2-135m-instruct"}
