"""The architecture registry and the two architectures added through it (Qwen2, Mistral with a sliding window).

Conversion bytes are checked in tests/test_convert.py (qwen2-tiny*, mistral-tiny against the in-memory
reference); here: lookups, the TensorRT-LLM 1.2 config.json fields, the runtime's view of a checkpoint, and
greedy tokens and logits against transformers under mpirun at tp=2 and pp=2.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.architectures import ARCHITECTURES, by_hf_config, by_trtllm_name, describe, for_checkpoint
from pipeline.backends.torch_backend import checkpoint_config_problems
from pipeline.backends.torch_model import RankModel
from pipeline.convert import convert_checkpoint
from pipeline.dist import Comm
from pipeline.errors import CheckpointError, WeightMapError
from pipeline.mapping import Mapping
from pipeline.random_weights import make_random_checkpoint
from pipeline.shapes import SHAPES
from tests.conftest import run_json
from tests.test_run_mpi import build

# The first prompt is longer than mistral-tiny's window of 8, so its last positions lose their first keys.
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38], [27, 18, 28]]
NEW_TOKENS = 6


def test_lookup_by_hugging_face_and_tensorrt_llm_names():
    assert by_hf_config({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    assert by_hf_config({"model_type": "mistral"}).name == "mistral"
    assert by_trtllm_name("GPTForCausalLM").name == "gpt2"
    assert by_trtllm_name("LlamaForCausalLM").name == "llama"
    names = [n for a in ARCHITECTURES for n in a.hf_architectures]
    assert len(names) == len(set(names)) and {"Qwen2ForCausalLM", "MistralForCausalLM"} <= set(names)
    with pytest.raises(WeightMapError, match="'PhiForCausalLM' .*is not supported; supported: GPT2LMHeadModel"):
        describe({"architectures": ["PhiForCausalLM"], "model_type": "phi"})
    with pytest.raises(CheckpointError, match="architecture 'PhiForCausalLM' is not one this pipeline runs"):
        by_trtllm_name("PhiForCausalLM")
    assert "is not one this pipeline runs" in checkpoint_config_problems(
        {"architecture": "X", "dtype": "float32", "hidden_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 1, "vocab_size": 8, "mapping": {}, "quantization": {}})[0]


def test_every_shape_describes_and_the_real_ones_have_their_published_sizes():
    for name, hf in SHAPES.items():
        assert by_hf_config(hf).describe(hf).num_layers == hf.get("num_hidden_layers", hf.get("n_layer")), name
    qwen = describe(SHAPES["qwen2.5-0.5b"])
    assert (qwen.num_heads, qwen.num_kv_heads, qwen.head_size, qwen.attn_bias, qwen.dense_bias) == (14, 2, 64, True,
                                                                                                    False)
    mistral = describe(SHAPES["mistral-7b"])
    assert (mistral.num_kv_heads, mistral.sliding_window, mistral.max_positions) == (8, 4096, 32768)
    # a window as long as the positions is full attention
    assert describe({**SHAPES["mistral-tiny"], "sliding_window": 256}).sliding_window is None
    with pytest.raises(WeightMapError, match="use_sliding_window"):
        describe({**SHAPES["qwen2-tiny"], "use_sliding_window": True, "sliding_window": 16})


def _convert(tmp_path, shape, tp=2, pp=1):
    make_random_checkpoint(shape, 0, tmp_path / "hf")
    out = tmp_path / "out"
    out.mkdir()
    convert_checkpoint(tmp_path / "hf", out, dtype="float16", tp=tp, pp=pp)
    return json.loads((out / "config.json").read_text())


def test_qwen2_config_json_is_qwenconfigs(tmp_path):
    config = _convert(tmp_path, "qwen2-tiny-tied")
    # QWenConfig's own fields first, PretrainedConfig's next, then the keywords it stores implicitly
    assert list(config)[:8] == ["mlp_bias", "attn_bias", "rotary_base", "rotary_scaling",
                                "disable_weight_only_quant_plugin", "num_labels", "use_logn_attn", "moe"]
    assert list(config)[-5:] == ["seq_length", "qwen_type", "moe_intermediate_size",
                                 "moe_shared_expert_intermediate_size", "tie_word_embeddings"]
    expected = {
        "architecture": "Qwen2ForCausalLM", "qwen_type": "qwen2", "attn_bias": True, "mlp_bias": False,
        "dtype": "float16", "vocab_size": 1001, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_size": 16, "hidden_act": "silu", "norm_epsilon": 1e-6,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0, "rotary_scaling": None,
        "tie_word_embeddings": True, "seq_length": 8192, "use_logn_attn": False, "num_labels": 1,
        "moe": {"num_experts": 0, "top_k": 0, "normalization_mode": 0, "sparse_mixer_epsilon": 0.01, "tp_mode": 0},
    }
    assert {k: config[k] for k in expected} == expected


def test_mistral_config_json_is_llamaconfigs_plus_the_window(tmp_path):
    config = _convert(tmp_path, "mistral-tiny")
    assert config["architecture"] == "MistralForCausalLM"
    assert list(config)[:8] == ["mlp_bias", "attn_bias", "rotary_base", "rotary_scaling", "residual_mlp",
                                "disable_weight_only_quant_plugin", "moe", "remove_duplicated_kv_heads"]
    assert list(config)[-1] == "sliding_window" and config["sliding_window"] == 8
    assert for_checkpoint(config).sliding_window == 8
    assert for_checkpoint({**config, "architecture": "LlamaForCausalLM"}).sliding_window == 8
    del config["sliding_window"]
    assert for_checkpoint(config).sliding_window is None


@pytest.mark.parametrize("architecture, kinds", [
    ("GPT2LMHeadModel", ("layernorm", "gelu", "learned", True)),
    ("Qwen2ForCausalLM", ("rmsnorm", "gated_silu", "rope", False)),
    ("MistralForCausalLM", ("rmsnorm", "gated_silu", "rope", False)),
])
def test_rank_model_reads_its_kinds_from_the_registry(architecture, kinds):
    config = {"architecture": architecture, "dtype": "float32", "hidden_size": 8, "head_size": 4,
              "vocab_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2, "norm_epsilon": 1e-5,
              "num_hidden_layers": 0, "sliding_window": 3 if architecture == "MistralForCausalLM" else None}
    model = RankModel(config, {}, Comm(Mapping(1, 1, 0), torch.device("cpu")), torch.device("cpu"))
    assert (model.arch.norm, model.arch.mlp, model.arch.position) == kinds[:3]
    if architecture == "MistralForCausalLM":
        cache = model.new_cache(1, 6)
        cache.valid[:] = True
        mask = model.attention_mask(cache, 0, 6, 6)[0, 0]
        # query 5 sees keys 3, 4, 5 (a window of 3); query 1 sees keys 0, 1
        assert mask[5].tolist() == [False, False, False, True, True, True]
        assert mask[1].tolist() == [True, True, False, False, False, False]


@pytest.mark.parametrize("shape, tp, pp", [
    ("qwen2-tiny", 2, 1),
    ("qwen2-tiny-tied", 1, 2),  # tied embeddings across two stages: lm_head on the last from the embedding
    ("mistral-tiny", 2, 1),
    ("mistral-tiny", 1, 2),
])
def test_greedy_tokens_and_logits_match_transformers(home, tmp_path, shape, tp, pp):
    source, artifact = build(shape, tp, pp)
    result = run_json(home, tp * pp, artifact, PROMPTS, tmp_path / "out.json", NEW_TOKENS, tmp_path / "logits.pt")
    ours = torch.load(tmp_path / "logits.pt")
    # eager attention applies Mistral's sliding window (so does sdpa in transformers 5; eager is the plain one)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    for prompt, logits, generated in zip(PROMPTS, ours, result["results"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference(ids).logits[0]
            greedy = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
        assert (logits - expected).abs().max().item() < 1e-4
        assert generated["new_ids"] == greedy[0, len(prompt):].tolist()
    if shape.startswith("mistral"):  # the window is really exercised: without it the long prompt's logits differ
        reference.config.sliding_window = None
        with torch.no_grad():
            full = reference(torch.tensor([PROMPTS[0]])).logits[0]
        assert (ours[0][:8] - full[:8]).abs().max().item() < 1e-4
        assert (ours[0][8:] - full[8:]).abs().amax(dim=-1).min().item() > 1e-3


@pytest.mark.parametrize("shape, tp, rank_tensors", [
    ("qwen2.5-0.5b", 2, 1 + 24 * 8 + 2),  # embedding, 24 x (qkv weight + bias, dense, 3 MLP, 2 norms), ln_f, lm_head
    ("mistral-7b", 2, 1 + 32 * 7 + 2),  # no biases
])
def test_the_real_shapes_plan_every_tensor(shape, tp, rank_tensors):
    """The published shapes convert (tensor accounting, splits) without writing their gigabytes."""
    from pipeline.convert.memory import VirtualIndex
    from pipeline.convert.streaming import plan_conversion
    from pipeline.random_weights import hf_tensor_shapes

    shapes = hf_tensor_shapes(SHAPES[shape])
    index = VirtualIndex(shapes, torch.bfloat16, lambda name: None)
    plan = plan_conversion(index, describe(SHAPES[shape]), tp, 1, "bfloat16")
    assert [len(targets) for targets in plan.targets] == [rank_tensors] * tp
    head = plan.targets[1]["lm_head.weight"]
    assert list(head.shape) == [-(-SHAPES[shape]["vocab_size"] // tp), SHAPES[shape]["hidden_size"]]
