"""LLaMA family (LlamaForCausalLM, MistralForCausalLM) -> TensorRT-LLM LLaMAForCausalLM.

Naming trap: TensorRT-LLM's GatedMLP computes proj(act(fc(x)) * gate(x)), so HF gate_proj (the activated
branch) is `mlp.fc` and HF up_proj is `mlp.gate`. Rotary embeddings use the rotate-half layout in both, so q and k
need no permutation.
"""

from pipeline.convert.rules import H, Rule, WeightMap, qkv_rows


def _attn_bias(a):
    return a.attn_bias


def _mlp_bias(a):
    return a.mlp_bias


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
                                   lambda a: (qkv_rows(a),), when=_attn_bias),
        "attention.dense.weight": Rule("row", (_ATTN + "o_proj.weight",),
                                       lambda a: (a.hidden_size, a.num_heads * a.head_size), gemm=True),
        "attention.dense.bias": Rule("replicate", (_ATTN + "o_proj.bias",), H, when=_attn_bias),
        "post_layernorm.weight": Rule("replicate", ("model.layers.{l}.post_attention_layernorm.weight",), H),
        "mlp.fc.weight": Rule("column", (_MLP + "gate_proj.weight",),
                              lambda a: (a.intermediate_size, a.hidden_size), gemm=True),
        "mlp.gate.weight": Rule("column", (_MLP + "up_proj.weight",),
                                lambda a: (a.intermediate_size, a.hidden_size), gemm=True),
        "mlp.proj.weight": Rule("row", (_MLP + "down_proj.weight",),
                                lambda a: (a.hidden_size, a.intermediate_size), gemm=True),
        "mlp.fc.bias": Rule("column", (_MLP + "gate_proj.bias",), lambda a: (a.intermediate_size,), when=_mlp_bias),
        "mlp.gate.bias": Rule("column", (_MLP + "up_proj.bias",), lambda a: (a.intermediate_size,), when=_mlp_bias),
        "mlp.proj.bias": Rule("replicate", (_MLP + "down_proj.bias",), H, when=_mlp_bias),
    },
    # Rotary frequencies that some checkpoints saved as buffers; TensorRT-LLM recomputes them.
    ignored=("model.layers.{l}.self_attn.rotary_emb.inv_freq",),
)
