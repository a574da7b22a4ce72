"""The converter: TensorRT-LLM names, shapes and config fields, and byte-identity with a plain in-memory conversion.

`reference_convert` below follows TensorRT-LLM's converters step by step (load everything, transpose Conv1D,
split q/k/v with torch.chunk, duplicate KV heads, pad lm_head, save_file). The streaming engine must produce the
very same bytes, for any chunk size and number of workers.
"""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.convert.streaming as streaming
from pipeline.convert import convert_checkpoint
from pipeline.errors import WeightMapError
from pipeline.random_weights import make_random_checkpoint

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    out = {}
    for shape in ("gpt2-tiny", "llama-tiny", "llama-tiny-tied", "qwen2-tiny", "qwen2-tiny-tied", "mistral-tiny"):
        make_random_checkpoint(shape, 0, folder / shape)
        out[shape] = folder / shape
    return out


def reference_convert(src, tp, pp, dtype):
    """Convert the way TensorRT-LLM's convert_checkpoint.py does: whole tensors in memory."""
    hf = json.loads((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    gpt = hf["model_type"] == "gpt2"
    if gpt:
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        nh = nkv = hf["n_head"]
        layers, hidden = hf["n_layer"], hf["n_embd"]
    else:
        nh, nkv = hf["num_attention_heads"], hf["num_key_value_heads"]
        layers, hidden = hf["num_hidden_layers"], hf["hidden_size"]
    hd = hf.get("head_dim") or hidden // nh
    vocab = hf["vocab_size"]
    ranks = []
    for rank in range(tp * pp):
        t, p = rank % tp, rank // tp
        w = {}

        def qkv(q, k, v):
            qr = torch.chunk(q, tp, 0)[t]
            if nkv >= tp:
                kr, vr = torch.chunk(k, tp, 0)[t], torch.chunk(v, tp, 0)[t]
            else:  # duplicate each KV head tp / nkv times, then take this rank's
                rep = tp // nkv
                kr = k.reshape(nkv, hd, -1).repeat_interleave(rep, 0).reshape(nkv * rep * hd, -1)[t * hd:(t + 1) * hd]
                vr = v.reshape(nkv, hd, -1).repeat_interleave(rep, 0).reshape(nkv * rep * hd, -1)[t * hd:(t + 1) * hd]
                kr, vr = kr.reshape(-1, *q.shape[1:]), vr.reshape(-1, *q.shape[1:])
            return torch.cat([qr, kr, vr], 0)

        per = layers // pp
        for local, layer in enumerate(range(p * per, (p + 1) * per)):
            o = f"transformer.layers.{local}."
            if gpt:
                s = f"h.{layer}."
                cw = sd[s + "attn.c_attn.weight"].t().contiguous()
                cb = sd[s + "attn.c_attn.bias"]
                w[o + "attention.qkv.weight"] = qkv(*torch.split(cw, hidden, 0))
                w[o + "attention.qkv.bias"] = qkv(*torch.split(cb, hidden, 0))
                w[o + "attention.dense.weight"] = torch.chunk(sd[s + "attn.c_proj.weight"].t().contiguous(), tp, 1)[t]
                w[o + "attention.dense.bias"] = sd[s + "attn.c_proj.bias"]
                w[o + "mlp.fc.weight"] = torch.chunk(sd[s + "mlp.c_fc.weight"].t().contiguous(), tp, 0)[t]
                w[o + "mlp.fc.bias"] = torch.chunk(sd[s + "mlp.c_fc.bias"], tp, 0)[t]
                w[o + "mlp.proj.weight"] = torch.chunk(sd[s + "mlp.c_proj.weight"].t().contiguous(), tp, 1)[t]
                w[o + "mlp.proj.bias"] = sd[s + "mlp.c_proj.bias"]
                for a, b in (("input_layernorm", "ln_1"), ("post_layernorm", "ln_2")):
                    w[o + a + ".weight"], w[o + a + ".bias"] = sd[s + b + ".weight"], sd[s + b + ".bias"]
            else:
                s = f"model.layers.{layer}."
                w[o + "attention.qkv.weight"] = qkv(sd[s + "self_attn.q_proj.weight"], sd[s + "self_attn.k_proj.weight"],
                                                    sd[s + "self_attn.v_proj.weight"])
                if s + "self_attn.q_proj.bias" in sd:  # Qwen2: q/k/v biases split and replicated like the weights
                    w[o + "attention.qkv.bias"] = qkv(sd[s + "self_attn.q_proj.bias"],
                                                      sd[s + "self_attn.k_proj.bias"], sd[s + "self_attn.v_proj.bias"])
                w[o + "attention.dense.weight"] = torch.chunk(sd[s + "self_attn.o_proj.weight"], tp, 1)[t]
                w[o + "mlp.fc.weight"] = torch.chunk(sd[s + "mlp.gate_proj.weight"], tp, 0)[t]
                w[o + "mlp.gate.weight"] = torch.chunk(sd[s + "mlp.up_proj.weight"], tp, 0)[t]
                w[o + "mlp.proj.weight"] = torch.chunk(sd[s + "mlp.down_proj.weight"], tp, 1)[t]
                w[o + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
                w[o + "post_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
        embed = sd["wte.weight" if gpt else "model.embed_tokens.weight"]
        if p == 0:
            w["transformer.vocab_embedding.weight"] = embed
            if gpt:
                w["transformer.position_embedding.weight"] = sd["wpe.weight"]
        if p == pp - 1:
            head = embed if (gpt or hf.get("tie_word_embeddings")) else sd["lm_head.weight"]
            padded = torch.nn.functional.pad(head, (0, 0, 0, -(-vocab // tp) * tp - vocab), value=0)
            w["lm_head.weight"] = torch.chunk(padded, tp, 0)[t].clone()
            if gpt:
                w["transformer.ln_f.weight"], w["transformer.ln_f.bias"] = sd["ln_f.weight"], sd["ln_f.bias"]
            else:
                w["transformer.ln_f.weight"] = sd["model.norm.weight"]
        ranks.append({k: v.to(DT[dtype]).contiguous() for k, v in w.items()})
    return ranks


@pytest.mark.parametrize("shape, tp, pp, dtype", [
    ("gpt2-tiny", 2, 2, "float16"),
    ("gpt2-tiny", 4, 1, "float32"),
    ("llama-tiny", 4, 1, "bfloat16"),  # 2 KV heads on 4 ranks: replicated
    ("llama-tiny", 2, 2, "float32"),
    ("llama-tiny-tied", 2, 1, "float16"),  # tied embeddings, vocab 1001 padded to 1002
    ("qwen2-tiny", 2, 2, "float32"),  # q/k/v biases, no o bias
    ("qwen2-tiny", 4, 1, "bfloat16"),  # 2 KV heads on 4 ranks: weights and biases replicated
    ("qwen2-tiny-tied", 2, 1, "float16"),
    ("mistral-tiny", 2, 2, "bfloat16"),
])
def test_streaming_conversion_is_byte_identical_to_reference(sources, tmp_path, monkeypatch, shape, tp, pp, dtype):
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 1000)  # force many row chunks per tensor
    convert_checkpoint(sources[shape], tmp_path, dtype=dtype, tp=tp, pp=pp, workers=3)
    for rank, weights in enumerate(reference_convert(sources[shape], tp, pp, dtype)):
        save_file(weights, tmp_path / f"ref{rank}.safetensors")
        assert _sha(tmp_path / f"rank{rank}.safetensors") == _sha(tmp_path / f"ref{rank}.safetensors"), rank


def test_worker_count_does_not_change_bytes(sources, tmp_path):
    digests = []
    for workers in (1, 4):
        out = tmp_path / str(workers)
        out.mkdir()
        convert_checkpoint(sources["llama-tiny"], out, dtype="float16", tp=2, pp=2, workers=workers)
        digests.append([_sha(out / f"rank{r}.safetensors") for r in range(4)])
    assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def gpt2_small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    make_random_checkpoint("gpt2", 0, folder / "hf", dtype="float16")
    out = folder / "trt"
    out.mkdir()
    convert_checkpoint(folder / "hf", out, dtype="float16", tp=2, pp=1)
    return out


def test_gpt2_small_tp2_names_and_shapes_are_trtllms(gpt2_small):
    for rank in range(2):
        weights = load_file(gpt2_small / f"rank{rank}.safetensors")
        assert len(weights) == 149  # 2 embeddings + 12 layers x 12 + ln_f (2) + lm_head
        shapes = {k: list(v.shape) for k, v in weights.items()}
        assert shapes["transformer.layers.0.attention.qkv.weight"] == [1152, 768]
        assert shapes["transformer.layers.0.attention.qkv.bias"] == [1152]
        assert shapes["transformer.layers.11.attention.dense.weight"] == [768, 384]
        assert shapes["transformer.layers.0.attention.dense.bias"] == [768]
        assert shapes["transformer.layers.0.mlp.fc.weight"] == [1536, 768]
        assert shapes["transformer.layers.0.mlp.proj.weight"] == [768, 1536]
        assert shapes["transformer.vocab_embedding.weight"] == [50257, 768]
        assert shapes["transformer.position_embedding.weight"] == [1024, 768]
        assert shapes["lm_head.weight"] == [25129, 768]
        assert all(v.dtype == torch.float16 for v in weights.values())
    last = load_file(gpt2_small / "rank1.safetensors")["lm_head.weight"]
    assert torch.count_nonzero(last[-1]) == 0  # the padding row (50257 -> 50258) is zeros, on the last rank


def test_gpt2_config_json_has_the_documented_fields(gpt2_small):
    config = json.loads((gpt2_small / "config.json").read_text())
    expected = {
        "architecture": "GPT2LMHeadModel", "dtype": "float16", "vocab_size": 50257, "hidden_size": 768,
        "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12, "head_size": 64,
        "intermediate_size": 3072, "hidden_act": "gelu_new", "position_embedding_type": "learned_absolute",
        "max_position_embeddings": 1024, "norm_epsilon": 1e-5, "logits_dtype": "float32", "gpt_variant": "gpt2",
        "bias": True, "use_parallel_embedding": False, "embedding_sharding_dim": 0,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["mapping"] == {"world_size": 2, "gpus_per_node": 8, "cp_size": 1, "tp_size": 2, "pp_size": 1,
                                 "moe_tp_size": 2, "moe_ep_size": 1}
    assert config["quantization"]["quant_algo"] is None and config["quantization"]["group_size"] == 128
    assert list(config)[:2] == ["gpt_variant", "bias"]  # GPTConfig's own keys first, as TensorRT-LLM writes them


def test_unknown_and_missing_tensors_are_errors(sources, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((sources["llama-tiny"] / "config.json").read_text())
    weights = load_file(sources["llama-tiny"] / "model.safetensors")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del weights["model.layers.3.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(WeightMapError) as err:
        convert_checkpoint(src, out, dtype="float32", tp=1, pp=1)
    assert "missing source tensor 'model.layers.3.mlp.up_proj.weight'" in str(err.value)
    assert "neither uses nor ignores: model.layers.0.self_attn.extra.weight" in str(err.value)
    assert not list(out.iterdir())  # planning fails before anything is written


def test_wrong_shape_is_an_error(sources, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((sources["gpt2-tiny"] / "config.json").read_text())
    weights = load_file(sources["gpt2-tiny"] / "model.safetensors")
    weights["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 100)
    save_file(weights, src / "model.safetensors")
    with pytest.raises(WeightMapError, match=r"'transformer.h.1.mlp.c_fc.weight' has shape \[100, 64\] \(after "
                                             r"transposing HF Conv1D \[in, out\]\), the config implies \[256, 64\]"):
        convert_checkpoint(src, tmp_path, dtype="float32", tp=1, pp=1)
