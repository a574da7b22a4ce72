"""The general ONNX -> TensorRT workflow: the `onnx` and `tensorrt` stages, ONNX Runtime against the PyTorch
backend, TensorRT for RTX's CPU build with the recipe's profile, INT8 QDQ against its emulation, trtexec's flags.

Tolerances (logits, ONNX Runtime vs the PyTorch backend on the same checkpoint): float32 1e-4 absolute (the same
math in another order); float16 0.5% of the largest |logit| (both sides round activations to float16, in
different places: on llama-tiny, |logits| up to ~34, ORT and torch float16 differ by up to 0.06 and each is within
0.06 of float32); INT8 QDQ 0.02 absolute against the fake-quantized PyTorch model (float32).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import onnx
import pytest
import torch

from pipeline.backends import tensorrt_engine as trt
from pipeline.backends.onnx_runtime import OnnxDecoder
from pipeline.build import Builder
from pipeline.errors import RecipeError
from pipeline.generate import generate, score
from pipeline.manifest import read_manifest, sha256_file
from pipeline.onnx_export import GRAPH_FILE, load_model, planned_graph, qdq_linear_factory
from pipeline.params import SamplingParams
from pipeline.recipe import recipe_from_dict
from tests.conftest import REPO, mpirun, run_cli, run_json

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [27, 18, 28]]
NEW_TOKENS = 6
LIMITS = {"max_batch_size": 4, "max_input_len": 32, "max_seq_len": 64}
FLAGS = json.loads((REPO / "tests" / "trtexec_10_flags.json").read_text())


def build(shape: str, dtype: str, backend: str = "onnx", **onnx_spec):
    calibration = {"samples": 4, "seq_len": 64}  # within gpt2-tiny's 128 positions
    recipe = recipe_from_dict({"model": {"random": shape},
                               "precision": {"dtype": dtype, "quantization": {"calibration": calibration}},
                               "build": {"backend": backend, **LIMITS}, "onnx": onnx_spec},
                              name=f"{shape}-{dtype}-{backend}-{onnx_spec.get('qdq', 'none')}")
    return recipe, Builder(recipe, log=lambda _: None, show_progress=False).run(gate=False)


@pytest.fixture(scope="module")
def gpt2_fp32(home):
    return build("gpt2-tiny", "float32")


@pytest.fixture(scope="module")
def llama_fp16(home):
    return build("llama-tiny", "float16")


@pytest.mark.slow
def test_graph_passes_the_checker_and_its_manifest_describes_it(gpt2_fp32):
    _, result = gpt2_fp32
    folder = result.artifact
    onnx.checker.check_model(str(folder / GRAPH_FILE), full_check=True)
    manifest = read_manifest(folder)
    record = manifest["onnx"]
    assert manifest["stage"] == "onnx" and record["opset"] == 18 and record["dtype"] == "float32"
    assert manifest["outputs"][GRAPH_FILE] == sha256_file(folder / GRAPH_FILE)
    inputs = {t["name"]: t for t in record["inputs"]}
    assert list(inputs)[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert inputs["past_key_values.3.value"]["shape"] == ["batch", 4, "past", 16]  # 4 layers, 4 KV heads of 16
    assert inputs["attention_mask"]["shape"][0] == "batch" and isinstance(inputs["attention_mask"]["shape"][1], str)
    assert [t["name"] for t in record["outputs"]][:2] == ["logits", "present.0.key"]
    assert record["outputs"][0]["shape"][:2] == ["batch", "seq"] and record["outputs"][0]["dtype"] == "float32"
    # plan's prediction of the graph (for trtexec before any export) is the graph
    planned = planned_graph(4, 4, 16, "float32", 128)
    assert [(t["name"], t["dtype"]) for t in planned["inputs"]] == [(t["name"], t["dtype"]) for t in record["inputs"]]


@pytest.mark.slow
def test_onnxruntime_matches_the_pytorch_backend_float32(home, tmp_path, gpt2_fp32):
    """pipeline.run on the onnx artifact: logits within 1e-4 of the PyTorch backend, the same greedy tokens."""
    _, result = gpt2_fp32
    checkpoint = result.stages[1].path
    out = run_json(home, 1, result.artifact, PROMPTS, tmp_path / "out.json", NEW_TOKENS, tmp_path / "logits.pt")
    assert out["backend"] == "onnx" and "onnxruntime CPUExecutionProvider" in out["stderr"]
    model = load_model(checkpoint)
    ours = torch.load(tmp_path / "logits.pt")
    expected_tokens = generate(model, PROMPTS, SamplingParams(max_tokens=NEW_TOKENS), None, 0)
    for prompt, logits, generated, expected in zip(PROMPTS, ours, out["results"], expected_tokens):
        reference = score(model, prompt)
        assert logits.shape == reference.shape
        assert (logits - reference).abs().max().item() < 1e-4
        assert generated["new_ids"] == expected


@pytest.mark.slow
def test_onnxruntime_matches_the_pytorch_backend_float16_llama(llama_fp16):
    """The LLaMA shape (rotary, GQA, RMSNorm) in float16, batched with left padding, in-process."""
    _, result = llama_fp16
    decoder = OnnxDecoder(result.artifact, read_manifest(result.artifact)["onnx"], "cpu")
    model = load_model(result.stages[1].path)
    assert model.dtype == torch.float16
    for prompt in PROMPTS:
        reference = score(model, prompt)
        difference = (decoder.score(prompt) - reference).abs().max().item()
        assert difference < 0.005 * reference.abs().max().item(), difference
    sampling = SamplingParams(max_tokens=NEW_TOKENS)
    assert decoder.generate(PROMPTS, sampling, None, 0) == generate(model, PROMPTS, sampling, None, 0)


@pytest.mark.slow
def test_a_cache_hit_does_no_work(gpt2_fp32):
    recipe, first = gpt2_fp32
    mtime = (first.artifact / GRAPH_FILE).stat().st_mtime_ns
    again = Builder(recipe, log=lambda _: None, show_progress=False).run(gate=False)
    assert [s.hit for s in again.stages] == [True, True, True]
    assert again.artifact == first.artifact and (again.artifact / GRAPH_FILE).stat().st_mtime_ns == mtime
    assert sum(s.seconds for s in again.stages) < 1.0


def _documented(command: list[str]) -> dict[str, str]:
    assert command[0] == "trtexec"
    flags = {}
    for arg in command[1:]:
        name, _, value = arg.partition("=")
        assert name in FLAGS["flags"], f"{name} is not in TensorRT 10's documented trtexec flags"
        assert name not in FLAGS["removed_in_10"]
        assert name not in flags, f"{name} given twice"
        flags[name] = value
    return flags


def _shapes(text: str) -> dict[str, list[int]]:
    return {name: [int(d) for d in dims.split("x")]
            for name, dims in (item.rsplit(":", 1) for item in text.split(","))}


@pytest.mark.slow
def test_tensorrt_rtx_builds_the_engine_with_the_recipe_profile(home, tmp_path, llama_fp16):
    recipe, result = build("llama-tiny", "float16", "tensorrt")
    assert [s.name for s in result.stages] == ["fetch", "convert", "onnx", "tensorrt"]
    assert result.stages[2].hit  # the same graph as the onnx recipe's
    engine_dir = result.artifact
    record = read_manifest(engine_dir)["tensorrt"]
    assert record["library"] in ("tensorrt", "tensorrt_rtx") and (engine_dir / trt.ENGINE_FILE).stat().st_size > 1e5
    if record["library"] == "tensorrt_rtx":
        assert "SM80" in record["compute_capabilities"] and "SM75" not in record["compute_capabilities"]
    # the profile as the builder's IOptimizationProfile holds it: the recipe's limits
    batch, max_input, max_seq = LIMITS["max_batch_size"], LIMITS["max_input_len"], LIMITS["max_seq_len"]
    profile = record["profile"]
    assert profile["input_ids"] == [[1, 1], [batch, 1], [batch, max_input]]
    assert profile["attention_mask"][2] == [batch, max_seq]
    assert profile["past_key_values.0.key"] == [[1, 2, 0, 8], [batch, 2, max_seq // 2, 8], [batch, 2, max_seq - 1, 8]]
    # the printed trtexec command: documented flags only, the same shapes, the real paths
    flags = _documented(shlex.split(record["trtexec"]))
    assert flags["--onnx"] == str(result.stages[2].path / GRAPH_FILE)
    assert flags["--saveEngine"] == str(engine_dir / trt.ENGINE_FILE)
    for which, index in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
        assert _shapes(flags[which]) == {name: dims[index] for name, dims in profile.items()}
    assert "--stronglyTyped" in flags
    if record["library"] == "tensorrt":  # TensorRT for RTX has no timing cache (its builder times nothing)
        assert Path(flags["--timingCacheFile"]).is_file() and record["timing_cache"] == flags["--timingCacheFile"]
    # running it here: no GPU, so a RunError naming the reason and the ONNX alternative
    proc = mpirun(home, 1, "--engine", str(engine_dir), "--prompt-ids", "1,2,3")
    assert proc.returncode == 2, proc.stderr
    assert "cannot run this" in proc.stderr and "no CUDA GPU" in proc.stderr
    assert f"--engine {result.stages[2].path}" in proc.stderr


def test_plan_prints_a_documented_trtexec_command_from_the_recipe(home, recipe_file):
    """Before anything is built: the command's shapes come from the recipe's limits and the model's shape."""
    path = recipe_file("gpt2-trt-plan", {"extends": "gpt2-trt", "build": {"max_batch_size": 2, "max_input_len": 16,
                                                                          "max_seq_len": 48}})
    proc = run_cli(home, "plan", str(path))
    assert proc.returncode == 0, proc.stderr
    line = next(s for s in proc.stdout.splitlines() if s.strip().startswith("$ trtexec"))
    flags = _documented(shlex.split(line.strip()[2:]))
    high = _shapes(flags["--maxShapes"])
    assert high["input_ids"] == [2, 16] and high["attention_mask"] == [2, 48]
    assert high["past_key_values.11.value"] == [2, 12, 47, 64]  # GPT-2 small: 12 layers, 12 heads of 64
    assert _shapes(flags["--minShapes"])["past_key_values.0.key"] == [1, 12, 0, 64]


@pytest.mark.slow
def test_int8_qdq_graph_matches_its_emulation_and_builds(home):
    recipe, result = build("gpt2-tiny", "float32", "tensorrt", qdq="int8")
    onnx_dir = result.stages[2].path
    record = read_manifest(onnx_dir)["onnx"]
    # 4 linear layers a block, 4 blocks: a QDQ pair on each input and each weight (lm_head stays float)
    assert record["op_counts"]["QuantizeLinear"] == 32 and record["op_counts"]["DequantizeLinear"] == 32
    emulation = load_model(result.stages[1].path, qdq_linear_factory(record["act_amax"]))
    decoder = OnnxDecoder(onnx_dir, record, "cpu")
    plain = load_model(result.stages[1].path)
    for prompt in PROMPTS:
        expected = score(emulation, prompt)
        difference = (decoder.score(prompt) - expected).abs().max().item()
        assert difference < 0.02, difference
        assert (score(plain, prompt) - expected).abs().max().item() > 10 * difference  # quantization is there
    sampling = SamplingParams(max_tokens=NEW_TOKENS)
    assert decoder.generate(PROMPTS, sampling, None, 0) == generate(emulation, PROMPTS, sampling, None, 0)
    engine = read_manifest(result.artifact)["tensorrt"]
    assert (result.artifact / trt.ENGINE_FILE).is_file() and engine["engine_bytes"] > 0


def test_recipe_rules_of_the_onnx_backends():
    with pytest.raises(RecipeError) as err:
        recipe_from_dict({"model": {"random": "gpt2-tiny"}, "precision": {"dtype": "bfloat16"},
                          "parallel": {"tp": 2}, "build": {"backend": "onnx"}})
    text = str(err.value)
    assert "tp=1, pp=1" in text and "float32 or float16" in text
    with pytest.raises(RecipeError, match="onnx.qdq: int8 needs build.backend onnx or tensorrt"):
        recipe_from_dict({"model": {"random": "gpt2-tiny"}, "build": {"backend": "torch"}, "onnx": {"qdq": "int8"}})



@pytest.mark.slow
def test_smollm2_float16_graph_gives_the_pytorch_backend_tokens_and_builds(home, smollm2_dir):
    """The real SmolLM2-135M-Instruct weights: ONNX Runtime's greedy text equals the PyTorch backend's on the same
    float16 checkpoint, and TensorRT for RTX builds the graph with the recipe's profile."""
    recipe = recipe_from_dict({"model": {"local": str(smollm2_dir)}, "precision": {"dtype": "float16"},
                               "build": {"backend": "tensorrt", **LIMITS}}, name="smollm2-onnx-fp16-test")
    result = Builder(recipe, log=lambda _: None, show_progress=False).run(gate=False)
    onnx_dir = result.stages[2].path
    record = read_manifest(onnx_dir)["onnx"]
    assert sum(t["name"].startswith("present.") for t in record["outputs"]) == 60  # 30 layers, keys and values
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    sampling = SamplingParams(max_tokens=12)
    tokens = OnnxDecoder(onnx_dir, record, "cpu").generate([prompt], sampling, None, 0)
    assert tokens == generate(load_model(result.stages[1].path), [prompt], sampling, None, 0)
    engine = read_manifest(result.artifact)["tensorrt"]
    assert engine["profile"]["past_key_values.29.value"][2] == [LIMITS["max_batch_size"], 3, LIMITS["max_seq_len"] - 1, 64]
    assert (result.artifact / trt.ENGINE_FILE).stat().st_size > 100e6  # 135M parameters in float16
