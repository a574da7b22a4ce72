"""The quantization-format registry: complete, consistent with TensorRT-LLM 1.2's names, every entry's encoder and
runtime linear right against float64, and a new entry usable by validation and the adapter without other edits."""

import dataclasses
import re

import pytest
import torch

from pipeline.architectures import quantization_block
from pipeline.backends import tensorrt_llm as trt
from pipeline.errors import RecipeError
from pipeline.quantize import registry
from pipeline.quantize.formats import dequantize_kv
from pipeline.recipe import (
    QuantizationSpec,
    check_against_model,
    list_recipes,
    load_recipe,
    recipe_from_dict,
)
from pipeline.shapes import SHAPES
from pipeline.typed_config import choices_of
from tests.test_tensorrt_llm import KV_CACHE_QUANT_ALGO_1_2, QUANT_ALGO_1_2

TINY = {"model": {"random": "llama-tiny"}, "precision": {"dtype": "bfloat16"}}


def _schema_choices(name: str) -> tuple:
    field = next(f for f in dataclasses.fields(QuantizationSpec) if f.name == name)
    return choices_of(field.metadata)


def test_quant_algo_names_are_tensorrt_llm_names():
    assert set(registry.TRTLLM_QUANT_ALGOS) == QUANT_ALGO_1_2
    assert set(registry.TRTLLM_KV_CACHE_QUANT_ALGOS) == KV_CACHE_QUANT_ALGO_1_2
    algos = [f.quant_algo for f in registry.weight_formats()]
    assert algos.count(None) == 1  # only "none" is unquantized
    assert all(a in QUANT_ALGO_1_2 for a in algos if a is not None)
    assert len(set(algos)) == len(algos)  # a checkpoint's quant_algo names one runtime linear
    kv_algos = [f.quant_algo for f in registry.kv_cache_formats()]
    assert kv_algos.count(None) == 1 and all(a in KV_CACHE_QUANT_ALGO_1_2 for a in kv_algos if a is not None)


def test_every_schema_choice_has_an_entry():
    quant = _schema_choices("quant")
    assert set(quant) == {"none", "fp8", "int8_weight_only", "int4_weight_only", "int4_awq", "w8a8_smoothquant"}
    for name in quant:
        if registry.reserved(name):
            continue
        entry = registry.weight_format(name)
        assert entry.name == name and entry.linear_factory is not None and entry.encode_linear is not None
        assert set(entry.calibration) <= set(registry.CALIBRATION_KINDS)
        assert entry.tolerance > 0 and entry.rank_input_multiple >= 1
        assert (entry.min_capability > (7, 0)) == bool(entry.capability_note and entry.capability_fix)
    assert set(_schema_choices("kv_cache")) == {"auto", "fp8", "int8"}
    for name in _schema_choices("kv_cache"):
        entry = registry.kv_cache_format(name)
        assert (entry.quant_algo is None) == (entry.scale is None) == (entry.quantize is None) == \
            (entry.storage_dtype is None) == (not entry.calibration)
    for name in list_recipes():  # every shipped recipe's formats resolve
        q = load_recipe(name).precision.quantization
        assert registry.weight_format(q.quant).name == q.quant and registry.kv_cache_format(q.kv_cache)


@pytest.mark.parametrize("name", [n for n in registry.weight_format_names() if not registry.reserved(n)])
def test_encoder_and_runtime_linear_round_trip_against_float64(name):
    fmt = registry.weight_format(name)
    g = torch.Generator().manual_seed(19)
    weight = (torch.randn(48, 64, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    prefix = "transformer.layers.0.mlp.fc"
    tensors = fmt.encode_linear(weight, float(x.abs().amax()))
    # the shapes an entry declares, for this [48, 64] weight (padded formats: TensorRT-LLM's padding at tp=1,
    # group 128: out_p = in_p = 128)
    dims = {"out": 48, "in_": 64, "out_p": 128, "in_p": 128, "group_size": 128}
    for t in fmt.checkpoint_tensors:  # what the entry says it writes, it writes
        value = tensors[t.suffix]
        assert str(value.dtype) == "torch." + (t.dtype if t.dtype != "model" else "bfloat16")
        assert list(value.shape) == eval(re.sub(r"\bin\b", "in_", t.shape), {}, dims)  # noqa: S307 (the entry's own shape formula)
    assert set(tensors) == {t.suffix for t in fmt.checkpoint_tensors} | {"weight"}
    weights = {f"{prefix}.{suffix}": t for suffix, t in tensors.items()}
    config = {"dtype": "bfloat16", "mapping": {"tp_size": 1}, "hidden_size": 64, "intermediate_size": 48,
              "quantization": quantization_block(fmt.quant_algo, None, ["lm_head"] if fmt.quant_algo else None)}
    linear = fmt.linear_factory(config, weights, torch.device("cpu"), torch.bfloat16)(prefix, weights[prefix + ".weight"],
                                                                                      None)
    y = linear(x).double()
    reference = x.double() @ weight.double().t()
    error = float((y - reference).norm() / reference.norm())
    assert y.shape == (3, 48) and error <= fmt.tolerance, (name, error)
    if fmt.quant_algo is not None:  # the quantization really happened: worse than the unquantized bfloat16 product
        plain = (x @ weight.t()).double()
        assert error > float((plain - reference).norm() / reference.norm())


@pytest.mark.parametrize("name", [n for n in registry.kv_cache_format_names() if n != "auto"])
def test_kv_cache_formats_round_trip(name):
    fmt = registry.kv_cache_format(name)
    g = torch.Generator().manual_seed(24)
    k = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
    scale = fmt.scale(float(k.abs().max()))
    assert scale.dtype == torch.float32 and scale.shape == (1,)
    stored = fmt.quantize(k.float(), scale)
    assert stored.dtype == fmt.storage_dtype
    back = dequantize_kv(stored, scale, torch.float64)
    assert ((back - k).abs() <= fmt.tolerance * scale.double() + fmt.relative_tolerance * k.abs()).all()
    assert (back - k).abs().max() > 0  # quantized, not passed through


def test_a_new_entry_is_usable_without_editing_other_files(tmp_path):
    toy = registry.WeightFormat(
        name="toy_int8_gptq", quant_algo="W8A16_GPTQ", summary="a test format", min_capability=(9, 0),
        capability_note="Hopper", capability_fix="Build on a Hopper GPU", build_flags=("--toy_flag", "enable"),
        fused_mlp=False, rank_input_multiple=3, rank_input_reason="needs a per-rank input width divisible by 3",
    )
    recipe_data = {**TINY, "precision": {"dtype": "bfloat16", "quantization": {"quant": "toy_int8_gptq"}}}
    with pytest.raises(RecipeError, match="'toy_int8_gptq' is not one of"):
        recipe_from_dict(recipe_data)
    with registry.registered(toy):
        r = recipe_from_dict(recipe_data)
        assert r.precision.quantization.quant == "toy_int8_gptq"
        assert check_against_model(r, SHAPES["llama-tiny"]) == [
            "precision.quantization.quant: toy_int8_gptq needs a per-rank input width divisible by 3"]
        argv = trt.trtllm_build_command(r, "/c", "/o", tmp_path / "cache")
        assert argv[argv.index("--use_fused_mlp") + 1] == "disable"
        assert argv[argv.index("--toy_flag") + 1] == "enable"
        assert "toy_int8_gptq needs compute capability >= 9.0 (Hopper); this GPU has 8.9. Build on a Hopper GPU" in \
            " ".join(trt.plugin_problems(r, (8, 9)))
        fp8_only = {**recipe_data, "build": {"plugins": {"gemm_plugin": "fp8"}}}
        with pytest.raises(RecipeError, match="gemm_plugin: fp8 needs precision.quantization.quant: fp8"):
            recipe_from_dict(fp8_only)
    with pytest.raises(RecipeError, match="'toy_int8_gptq' is not one of"):
        recipe_from_dict(recipe_data)


def test_reserved_names_stay_refused_until_defined(monkeypatch):
    monkeypatch.setattr(registry, "RESERVED_WEIGHT_FORMATS", ("int3_future",))
    data = {**TINY, "precision": {"dtype": "bfloat16", "quantization": {"quant": "int3_future"}}}
    with pytest.raises(RecipeError, match="'int3_future' is reserved for a later release; use one of none, fp8"):
        recipe_from_dict(data)
    future = registry.WeightFormat(name="int3_future", quant_algo="W4A8_AWQ", summary="a stand-in")
    with registry.registered(future):
        assert not registry.reserved("int3_future")
        assert recipe_from_dict(data).precision.quantization.quant == "int3_future"
    assert registry.reserved("int3_future")
