"""GPT-2 (GPT2LMHeadModel) -> TensorRT-LLM GPTForCausalLM (gpt_variant gpt2).

HF GPT-2 stores its linear layers as Conv1D, [in, out]: every linear weight is transposed. lm_head is a copy of
the token embedding (GPT-2 is tied). Files exist with and without the `transformer.` prefix.
"""

from pipeline.convert.rules import H, HxH, Rule, WeightMap, qkv_rows

GPT2_MAP = WeightMap(
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
