"""Quantized checkpoints as TensorRT-LLM 1.2 loads them, quantized runs across ranks, and the accuracy gate."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import pipeline.quantize.calibrate as calibrate_module
from pipeline.build import Builder
from pipeline.errors import GateError, RecipeError
from pipeline.quantize.checkpoint import TRTLLM_DEFAULT_EXCLUDE
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import load_recipe, recipe_from_dict
from tests.conftest import REPO, run_cli, run_json

CALIBRATION = {"samples": 2, "seq_len": 16, "seed": 7}


def build(shape, tp, pp, quant="fp8", kv="fp8", dtype="float16", name=None):
    recipe = recipe_from_dict({
        "model": {"random": shape}, "precision": {"dtype": dtype, "quantization": {
            "quant": quant, "kv_cache": kv, "calibration": CALIBRATION}},
        "parallel": {"tp": tp, "pp": pp}, "build": {"plugins": {"use_paged_context_fmha": False}},
    }, name=name or f"{shape}-{quant}-tp{tp}-pp{pp}")
    return Builder(recipe, log=lambda _: None, show_progress=False).run().artifact


GEMMS = {"gpt2-tiny": ("attention.qkv", "attention.dense", "mlp.fc", "mlp.proj"),
         "llama-tiny": ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")}


@pytest.mark.parametrize("shape", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_fp8_checkpoint_names_dtypes_shapes(home, shape, tp, pp):
    artifact = build(shape, tp, pp)
    reference = build(shape, 1, 1)
    config = json.loads((artifact / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    assert config["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert config["quantization"]["exclude_modules"] == list(TRTLLM_DEFAULT_EXCLUDE)
    single = load_file(reference / "rank0.safetensors")
    layers = 4 // pp
    for rank in range(tp * pp):
        w = load_file(artifact / f"rank{rank}.safetensors")
        stage = rank // tp
        for local in range(layers):
            p = f"transformer.layers.{local}."
            global_p = f"transformer.layers.{stage * layers + local}."
            for gemm in GEMMS[shape]:
                weight = w[p + gemm + ".weight"]
                assert weight.dtype == torch.float8_e4m3fn
                full = single[global_p + gemm + ".weight"].shape
                split_dim = 1 if gemm in ("attention.dense", "mlp.proj") else 0
                expected = list(full)
                if gemm != "attention.qkv":
                    expected[split_dim] //= tp
                else:
                    expected[0] = full[0] // tp  # 8 heads and 2 KV heads (or 4 and 4) split evenly here
                assert list(weight.shape) == expected
                for scale in ("weights_scaling_factor", "activation_scaling_factor"):
                    t = w[p + gemm + "." + scale]
                    assert t.dtype == torch.float32 and list(t.shape) == [1]
                    # scales come from the unsplit tensor of the right global layer: equal to the tp=1 ones
                    assert torch.equal(t, single[global_p + gemm + "." + scale])
            kv = w[p + "attention.kv_cache_scaling_factor"]
            assert kv.dtype == torch.float32 and torch.equal(kv, single[global_p + "attention.kv_cache_scaling_factor"])
            assert w[p + "input_layernorm.weight"].dtype == torch.float16
        if stage == pp - 1:
            assert w["lm_head.weight"].dtype == torch.float16  # never FP8
            assert "lm_head.weights_scaling_factor" not in w


@pytest.mark.slow
def test_fp8_sharded_run_agrees_with_one_rank_within_fp8_noise(home, tmp_path):
    """tp=2 x pp=2 and one rank quantize with the same scales; they differ only where float16 partial sums
    (all-reduced per rank) tip an FP8 rounding, so they must agree far more closely than FP8 agrees with float16."""
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    one = run_json(home, 1, build("llama-tiny", 1, 1, kv="auto"), prompts, tmp_path / "a.json", 2, tmp_path / "a.pt")
    four = run_json(home, 4, build("llama-tiny", 2, 2, kv="auto"), prompts, tmp_path / "b.json", 2, tmp_path / "b.pt")
    run_json(home, 1, build("llama-tiny", 1, 1, quant="none", kv="auto"), prompts, tmp_path / "c.json", 2,
                     tmp_path / "c.pt")
    assert [r["new_ids"] for r in one["results"]] == [r["new_ids"] for r in four["results"]]
    for a, b, c in zip(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"), torch.load(tmp_path / "c.pt")):
        assert (a - b).abs().max() < 0.1 * a.abs().max()
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
        assert (a - c).abs().max() > 0  # FP8 really ran


@pytest.mark.parametrize("quant, algo", [("int8_weight_only", "W8A16"), ("int4_weight_only", "W4A16")])
def test_weight_only_checkpoints_keep_model_dtype_for_the_builder(home, tmp_path, quant, algo):
    artifact = build("llama-tiny", 2, 1, quant=quant, kv="auto", dtype="bfloat16")
    config = json.loads((artifact / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == algo and config["quantization"]["kv_cache_quant_algo"] is None
    w = load_file(artifact / "rank0.safetensors")
    assert w["transformer.layers.0.attention.qkv.weight"].dtype == torch.bfloat16
    assert not any(k.endswith("scaling_factor") for k in w)
    result = run_json(home, 2, artifact, [[1, 2, 3]], tmp_path / "o.json", 4)
    assert len(result["results"][0]["new_ids"]) == 4


def test_quantization_validation_explains_refusals():
    with pytest.raises(RecipeError, match="TensorRT-LLM 1.2 refuses paged context FMHA with an INT8 KV cache"):
        recipe_from_dict({"model": {"random": "gpt2"}, "precision": {"dtype": "float16",
                                                                     "quantization": {"kv_cache": "int8"}}})
    with pytest.raises(RecipeError, match="float32 with quant fp8 is not a TensorRT-LLM combination"):
        recipe_from_dict({"model": {"random": "gpt2"}, "precision": {"dtype": "float32",
                                                                     "quantization": {"quant": "fp8"}}})
    with pytest.raises(RecipeError, match="smoothquant_alpha: 1.5 is outside \\[0, 1\\]"):
        recipe_from_dict({"model": {"random": "gpt2"}, "precision": {"quantization": {
            "quant": "w8a8_smoothquant", "smoothquant_alpha": 1.5}}})


SMALL_EVAL = ["eval.tokens=512", "eval.seq_len=256", "precision.quantization.calibration.samples=8",
              "precision.quantization.calibration.seq_len=128", "model.local={src}"]


@pytest.mark.slow
def test_gate_passes_and_a_broken_calibration_fails_it(home, smollm2_dir, monkeypatch):
    overrides = [o.format(src=smollm2_dir) for o in SMALL_EVAL]
    recipe = load_recipe("smollm2-135m-fp8-pp2", overrides)
    Builder(recipe, log=lambda _: None, show_progress=False).run()  # the recipe's own gate holds

    real = calibrate_module.calibrate

    def broken(*args, **kwargs):
        result = real(*args, **kwargs)
        result.act_amax = {k: v * 100 for k, v in result.act_amax.items()}
        return result

    monkeypatch.setattr(calibrate_module, "calibrate", broken)
    broken_recipe = load_recipe("smollm2-135m-fp8-pp2", overrides + ["precision.quantization.calibration.seed=8"])
    with pytest.raises(GateError) as err:
        Builder(broken_recipe, log=lambda _: None, show_progress=False).run()
    text = str(err.value)
    assert "perplexity" in text and "eval.gate.max_ppl_increase allows +9.00%" in text
    assert "top-1 agreement" in text and "mean KL" in text


@pytest.mark.slow
def test_gpt2_fp8_builds_offline_from_a_local_folder(home, tmp_path):
    from pipeline.offline import prepare_gpt2_tokenizer

    saved = __import__("os").environ.pop("PIPELINE_HOME")
    try:
        tokenizer = prepare_gpt2_tokenizer()
    finally:
        __import__("os").environ["PIPELINE_HOME"] = saved
    local = tmp_path / "gpt2"
    make_random_checkpoint("gpt2", 0, local)
    for f in tokenizer.iterdir():
        if f.name != "provenance.json":
            shutil.copyfile(f, local / f.name)
    proc = run_cli(home, "build", "gpt2-fp8", "model.hub=null", "model.revision=null", f"model.local={local}",
                   "precision.quantization.calibration.samples=4", "precision.quantization.calibration.seq_len=64",
                   "eval.gate.max_ppl_increase=null", "eval.gate.min_top1_agreement=null", "eval.gate.max_kl=null")
    assert proc.returncode == 0, proc.stderr
    artifact = proc.stdout.split("artifact: ")[1].split()[0]
    w = load_file(f"{artifact}/rank0.safetensors")
    assert w["transformer.layers.0.attention.qkv.weight"].dtype == torch.float8_e4m3fn
    assert list(w["transformer.layers.0.attention.qkv.weight"].shape) == [2304, 768]
    assert (REPO / "recipes" / "gpt2-fp8.yaml").read_text().startswith("# make build RECIPE=gpt2-fp8")
