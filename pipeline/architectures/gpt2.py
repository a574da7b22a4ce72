"""GPT-2 (GPT2LMHeadModel) -> TensorRT-LLM GPTForCausalLM (gpt_variant gpt2).

LayerNorm with biases, learned absolute positions, fc -> gelu -> proj, biases on every linear layer. HF GPT-2
stores its linear layers as Conv1D, [in, out]: every linear weight is transposed. lm_head is a copy of the token
embedding (GPT-2 is tied). Files exist with and without the `transformer.` prefix.
"""

from __future__ import annotations

from pipeline.architectures.base import ArchInfo, Architecture, first_eos, moe_fields
from pipeline.architectures.weight_map import H, HxH, Rule, WeightMap, qkv_rows


def describe(hf: dict) -> ArchInfo:
    hidden = hf.get("n_embd", 768)
    heads = hf.get("n_head", 12)
    return ArchInfo(
        model_type="gpt2", hidden_size=hidden, num_layers=hf.get("n_layer", 12), num_heads=heads,
        num_kv_heads=heads, head_size=hidden // heads, intermediate_size=hf.get("n_inner") or 4 * hidden,
        vocab_size=hf.get("vocab_size", 50257), max_positions=hf.get("n_positions", 1024),
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), hidden_act=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=hf.get("tie_word_embeddings", True), attn_bias=True, dense_bias=True, mlp_bias=True,
        torch_dtype=hf.get("torch_dtype") or hf.get("dtype") or "float32", bos_token_id=hf.get("bos_token_id"),
        eos_token_id=first_eos(hf),
    )


def checkpoint_fields(arch: ArchInfo) -> tuple[dict, dict]:
    """GPTConfig's own fields (section 1.5)."""
    return {
        "gpt_variant": "gpt2", "bias": True, "q_scaling": 1.0, "embedding_scale": None,
        "apply_query_key_layer_scaling": False, "rotary_pct": 1.0, "rotary_base": 10000.0, "rotary_scaling": None,
        "inner_layernorm": False, "norm_before_bmm1": False, "moe": moe_fields(1),
    }, {}


WEIGHT_MAP = WeightMap(
    top={
        "transformer.vocab_embedding.weight": Rule("replicate", ("{p}wte.weight",),
                                                   lambda a: (a.vocab_size, a.hidden_size), stage="first"),
        "transformer.position_embedding.weight": Rule("replicate", ("{p}wpe.weight",),
                                                      lambda a: (a.max_positions, a.hidden_size), stage="first"),
        "transformer.ln_f.weight": Rule("replicate", ("{p}ln_f.weight",), H, stage="last"),
        "transformer.ln_f.bias": Rule("replicate", ("{p}ln_f.bias",), H, stage="last"),
        "lm_head.weight": Rule("vocab", ("lm_head.weight",), lambda a: (a.vocab_size, a.hidden_size),
                               tied_sources=("{p}wte.weight",), stage="last"),
    },
    layer={
        "input_layernorm.weight": Rule("replicate", ("{p}h.{l}.ln_1.weight",), H),
        "input_layernorm.bias": Rule("replicate", ("{p}h.{l}.ln_1.bias",), H),
        "attention.qkv.weight": Rule("qkv", ("{p}h.{l}.attn.c_attn.weight",),
                                     lambda a: (qkv_rows(a), a.hidden_size), transpose=True, gemm=True),
        "attention.qkv.bias": Rule("qkv", ("{p}h.{l}.attn.c_attn.bias",), lambda a: (qkv_rows(a),)),
        "attention.dense.weight": Rule("row", ("{p}h.{l}.attn.c_proj.weight",), HxH, transpose=True, gemm=True),
        "attention.dense.bias": Rule("replicate", ("{p}h.{l}.attn.c_proj.bias",), H),
        "post_layernorm.weight": Rule("replicate", ("{p}h.{l}.ln_2.weight",), H),
        "post_layernorm.bias": Rule("replicate", ("{p}h.{l}.ln_2.bias",), H),
        "mlp.fc.weight": Rule("column", ("{p}h.{l}.mlp.c_fc.weight",),
                              lambda a: (a.intermediate_size, a.hidden_size), transpose=True, gemm=True),
        "mlp.fc.bias": Rule("column", ("{p}h.{l}.mlp.c_fc.bias",), lambda a: (a.intermediate_size,)),
        "mlp.proj.weight": Rule("row", ("{p}h.{l}.mlp.c_proj.weight",),
                                lambda a: (a.hidden_size, a.intermediate_size), transpose=True, gemm=True),
        "mlp.proj.bias": Rule("replicate", ("{p}h.{l}.mlp.c_proj.bias",), H),
    },
    # Causal-mask buffers that old GPT-2 checkpoints saved; TensorRT-LLM builds its own masks.
    ignored=("{p}h.{l}.attn.bias", "{p}h.{l}.attn.masked_bias"),
    prefixes=("transformer.", ""),
    probe="{p}wte.weight",
)

_BASE = {
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
SHAPES = {
    # GPT-2 small (124M), the shape of openai-community/gpt2.
    "gpt2": {**_BASE, "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
    # A tiny GPT-2 for tests: 4 heads so tp 1, 2 and 4 all split it.
    "gpt2-tiny": {**_BASE, "vocab_size": 1000, "n_positions": 128, "n_embd": 64, "n_layer": 4, "n_head": 4,
                  "bos_token_id": 0, "eos_token_id": 999},
}

ARCH = Architecture(
    name="gpt2", hf_architectures=("GPT2LMHeadModel",), model_types=("gpt2",),
    trtllm_architecture="GPT2LMHeadModel", trtllm_aliases=("GPTForCausalLM",),
    norm="layernorm", mlp="gelu", position="learned", biases="all linear layers",
    describe=describe, checkpoint_fields=checkpoint_fields, weight_map=WEIGHT_MAP, shapes=SHAPES,
    random_fan_in_dim=0,
)
