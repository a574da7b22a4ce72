"""int4_awq (W4A16_AWQ) and w8a8_smoothquant (W8A8_SQ_*_PLUGIN): the arithmetic against float64, the checkpoint per
rank at tp=2 and pp=2, and that TensorRT-LLM 1.2 would load exactly the tensors every quantized format writes."""

import fnmatch
import json

import pytest
import torch
from safetensors import safe_open

from pipeline.build import Builder
from pipeline.errors import GateError
from pipeline.quantize.formats import (
    awq_clip_amax,
    awq_scale,
    awq_weight_mean_rel,
    groupwise_int4_dequantize,
    groupwise_int4_quantize,
    int8_activation_quantize,
    int8_gemm_int32,
    int8_weight_quantize,
    pack_int4_rows,
    smoothquant_linear,
    smoothquant_scale,
    unpack_int4_rows,
)
from pipeline.quantize.schemes.int4_awq import search_group
from pipeline.recipe import recipe_from_dict

CALIBRATION = {"samples": 4, "seq_len": 32}


# --------------------------------------------------------------------------------------------- the arithmetic


def test_groupwise_int4_scales_rounding_and_zero_groups_against_float64():
    w = torch.tensor([[7.0, -3.5, 2.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                      [-14.0, 1.0, 3.0, -5.0, 1.25, -0.75, 0.25, 3.0]], dtype=torch.float64)
    q, scale = groupwise_int4_quantize(w, group_size=4)
    # scale = group amax / 7 (computed in float32); a group of zeros gets scale 0 and values 0
    assert scale.dtype == torch.float32 and scale.tolist() == [[1.0, 0.0], [2.0, torch.tensor(3.0 / 7.0).item()]]
    # half to even (torch.round, as ModelOpt's to_quantized_weight): -3.5 -> -4, 2.5 -> 2, 0.5 -> 0, -1.5 -> -2
    assert q[0].tolist() == [7, -4, 2, 0, 0, 0, 0, 0]
    assert q[1, :4].tolist() == [-7, 0, 2, -2]  # 1/2 = 0.5 -> 0, 3/2 = 1.5 -> 2, -5/2 = -2.5 -> -2
    expected = torch.round(w[1, 4:] / (3.0 / 7.0)).clamp(-8, 7)  # no halves here: float32 and float64 agree
    assert q[1, 4:].tolist() == expected.tolist()
    back = groupwise_int4_dequantize(q, scale, 4).double()
    assert ((back - w).abs() <= scale.double().repeat_interleave(4, dim=1) / 2 + 1e-7).all()


def test_groupwise_int4_random_matches_a_float64_restatement():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 256, generator=g, dtype=torch.float64)
    q, scale = groupwise_int4_quantize(w, 128)
    ref_scale = w.reshape(6, 2, 128).abs().amax(dim=2) / 7
    assert torch.allclose(scale.double(), ref_scale, rtol=1e-6)
    ref_q = torch.round(w.reshape(6, 2, 128) / scale.double()[..., None]).clamp(-8, 7).reshape(6, 256)
    assert torch.equal(q.long(), ref_q.long())
    assert q.min() >= -8 and q.max() <= 7 and (q == 7).any()


def test_int4_row_packing_order():
    q = torch.tensor([[1, -2, 7], [3, -8, -1]], dtype=torch.int8)
    packed = pack_int4_rows(q)
    # ModelOpt: row 2k in the low nibble, row 2k+1 in the high nibble, shape [out / 2, in]
    assert packed.shape == (1, 3) and packed.dtype == torch.int8
    assert packed.view(torch.uint8).tolist() == [[0x31, 0x8E, 0xF7]]
    g = torch.Generator().manual_seed(5)
    r = torch.randint(-8, 8, (10, 12), generator=g, dtype=torch.int8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(r)), r)


def test_awq_scale_against_float64():
    x = torch.tensor([0.1, 2.0, 8.0, 0.5], dtype=torch.float64)
    w = torch.tensor([0.9, 0.3, 0.5, 1.0], dtype=torch.float64)
    for alpha in (0.0, 0.35, 0.9):
        s = (x ** alpha / w ** (1 - alpha)).clamp(1e-4, 1e4)
        s = s / (s.max() * s.min()).sqrt()
        assert torch.allclose(awq_scale(x, w, alpha).double(), s, rtol=1e-6)
    weight = torch.tensor([[1.0, -2.0, 0.5, 4.0], [0.0, 1.0, -1.0, 0.5]])
    rel = awq_weight_mean_rel(weight, 2)
    assert torch.allclose(rel, torch.tensor([(0.5 + 0.0) / 2, (1.0 + 1.0) / 2, (0.125 + 1.0) / 2, (1.0 + 0.5) / 2]))


def test_awq_search_beats_plain_groupwise_on_outlier_channels():
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 40.0  # a few activation outlier channels, as in LLMs
    s, alpha, best, plain = search_group(weight, x, x.abs().mean(dim=0), 64, 20, torch.bfloat16)
    assert alpha > 0 and best < 0.7 * plain
    # s as stored: its reciprocal is exact in bfloat16
    assert torch.allclose((1 / s).to(torch.bfloat16).float(), 1 / s, rtol=1e-6, atol=0)


def test_awq_clip_search_against_the_unclipped_range():
    g = torch.Generator().manual_seed(17)
    w = torch.randn(16, 128, generator=g) * 0.05
    w[:, 5] = 0.6  # one large weight per row stretches its group's range
    x = torch.randn(512, 128, generator=g)
    amax = awq_clip_amax(w, x, 64)
    full = w.abs().reshape(16, 2, 64).amax(dim=2)
    assert amax.shape == (16, 2) and (amax <= full).all() and (amax >= 0.55 * full - 1e-7).all()

    def error(a):
        q, scale = groupwise_int4_quantize(w, 64, a)
        return float((x @ groupwise_int4_dequantize(q, scale, 64).t() - x @ w.t()).pow(2).mean())
    assert error(amax) < error(None)
    q, scale = groupwise_int4_quantize(w, 64, amax)
    assert torch.allclose(scale, amax / 7) and q.min() >= -8 and q.max() <= 7  # clipped values saturate


def test_int8_gemm_is_exact_int32_accumulation():
    g = torch.Generator().manual_seed(7)
    a = torch.randint(-128, 128, (5, 4096), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (3, 4096), generator=g, dtype=torch.int8)
    a[0] = -128
    b[0] = -128  # the extreme: 4096 * 16384 = 2^26
    exact = a.long() @ b.long().t()
    got = int8_gemm_int32(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), exact) and got[0, 0] == 4096 * 128 * 128


def test_smoothquant_linear_against_float64():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(24, 64, generator=g, dtype=torch.float64) * 0.1
    x = torch.randn(5, 64, generator=g, dtype=torch.float64)
    for per_channel in (True, False):
        wq, ws = int8_weight_quantize(w, per_channel)
        ref_ws = (w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)) / 127
        assert torch.allclose(ws.double(), ref_ws, rtol=1e-6)
        assert torch.equal(wq.long(), torch.round(w / ws.double().reshape(-1, 1)).clamp(-127, 127).long())
        for static in (None, torch.tensor([float(x.abs().max()) / 127])):
            xq, xs = int8_activation_quantize(x, static)
            ref = (xq.double() * xs.double()) @ (wq.double() * ws.double().reshape(-1, 1)).t()
            y = smoothquant_linear(x.float(), wq, ws.expand(24) if not per_channel else ws, static, None,
                                   torch.float64)
            assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
            assert float((y - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.03
    # per token: each row's scale is its own amax / 127
    _, xs = int8_activation_quantize(x, None)
    assert torch.allclose(xs.double().reshape(-1), x.abs().amax(dim=1) / 127, rtol=1e-6)


def test_smoothing_is_exact_in_float64_and_moves_outliers():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(32, 16, generator=g, dtype=torch.float64)
    x[:, 3] *= 50
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    s = smoothquant_scale(x.abs().amax(dim=0), w.abs().amax(dim=0), 0.5).double()
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), rtol=1e-12)
    ratio = lambda t: float(t.abs().amax(dim=0).max() / t.abs().amax(dim=0).median())  # noqa: E731
    assert ratio(x / s) < ratio(x) / 4
    assert torch.equal(smoothquant_scale(torch.zeros(2), torch.ones(2), 0.5), torch.ones(2))


# --------------------------------------------------------------------------------------------- checkpoints


def build(home, quant, shape="llama-tiny", parallel=None, extra=None, name="q"):
    quantization = {"quant": quant, "calibration": CALIBRATION, **(extra or {})}
    data = {"model": {"random": shape}, "parallel": parallel or {},
            "precision": {"dtype": "bfloat16", "quantization": quantization}}
    if quantization.get("kv_cache", "auto") != "auto" and quant != "fp8":  # TensorRT-LLM 1.2 refuses paged context FMHA then
        data["build"] = {"plugins": {"use_paged_context_fmha": False}}
    r = recipe_from_dict(data, name=name)
    return Builder(r, log=lambda _: None, show_progress=False).run(gate=False, record=False).artifact


def rank_tensors(artifact) -> list[dict[str, tuple[str, tuple[int, ...]]]]:
    out = []
    for path in sorted(artifact.glob("rank*.safetensors")):
        with safe_open(path, "pt") as f:
            out.append({k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()})
    return out


# llama-tiny-g64: hidden 128, 8 heads of 16, 4 KV heads, intermediate 256, 4 layers (pipeline/architectures/llama.py)
@pytest.mark.parametrize("parallel", [{"tp": 2}, {"pp": 2}])
def test_int4_awq_checkpoint_per_rank(home, parallel):
    artifact = build(home, "int4_awq", shape="llama-tiny-g64", parallel=parallel, extra={"group_size": 64},
                     name="awq-ranks")
    config = json.loads((artifact / "config.json").read_text())["quantization"]
    assert (config["quant_algo"], config["group_size"], config["pre_quant_scale"], config["has_zero_point"]) == \
        ("W4A16_AWQ", 64, True, False)
    tp, pp = parallel.get("tp", 1), parallel.get("pp", 1)
    dims = {"attention.qkv": (256 // tp, 128), "attention.dense": (128, 128 // tp), "mlp.fc": (256 // tp, 128),
            "mlp.gate": (256 // tp, 128), "mlp.proj": (128, 256 // tp)}
    ranks = rank_tensors(artifact)
    assert len(ranks) == 2
    for tensors in ranks:
        layers = {k.split(".")[2] for k in tensors if k.startswith("transformer.layers.")}
        assert len(layers) == 4 // pp
        for layer in layers:
            for module, (out, inp) in dims.items():
                p = f"transformer.layers.{layer}.{module}"
                assert tensors[p + ".weight"] == ("I8", (out // 2, inp))
                assert tensors[p + ".weights_scaling_factor"] == ("BF16", (out, inp // 64))
                assert tensors[p + ".prequant_scaling_factor"] == ("BF16", (inp,))
        assert tensors.get("transformer.vocab_embedding.weight", ("BF16",))[0] == "BF16"


def test_int4_awq_pads_to_trtllm_shapes_at_tp1_and_refuses_it_at_tp2(home):
    artifact = build(home, "int4_awq", extra={"group_size": 128}, name="awq-pad")
    t = rank_tensors(artifact)[0]
    # llama-tiny: qkv 96 x 64 -> 128 x 128 (both padded to a multiple of max(64, 128)); proj 64 x 160 -> 128 x 256
    assert t["transformer.layers.0.attention.qkv.weight"] == ("I8", (64, 128))
    assert t["transformer.layers.0.attention.qkv.weights_scaling_factor"] == ("BF16", (128, 1))
    assert t["transformer.layers.0.mlp.proj.weight"] == ("I8", (64, 256))
    assert t["transformer.layers.0.mlp.proj.prequant_scaling_factor"] == ("BF16", (256,))
    from pipeline.errors import WeightMapError

    with pytest.raises(WeightMapError, match="pads this .* to multiples of max\\(64, group_size\\) \\* tp = 256"):
        build(home, "int4_awq", parallel={"tp": 2}, extra={"group_size": 128}, name="awq-pad-tp2")


@pytest.mark.parametrize("parallel", [{"tp": 2}, {"pp": 2}])
@pytest.mark.parametrize("per_channel,per_token", [(True, True), (False, False)])
def test_w8a8_smoothquant_checkpoint_per_rank(home, parallel, per_channel, per_token):
    artifact = build(home, "w8a8_smoothquant", parallel=parallel,
                     extra={"per_channel": per_channel, "per_token": per_token}, name="sq-ranks")
    config = json.loads((artifact / "config.json").read_text())["quantization"]
    assert config["quant_algo"] == {(True, True): "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
                                    (False, False): "W8A8_SQ_PER_TENSOR_PLUGIN"}[(per_channel, per_token)]
    assert config["smoothquant_val"] == 0.5
    tp = parallel.get("tp", 1)
    # llama-tiny: hidden 64, 8 heads of 8, 2 KV heads (qkv 96 rows), intermediate 160
    dims = {"attention.qkv": (96 // tp, 64), "attention.dense": (64, 64 // tp), "mlp.fc": (160 // tp, 64),
            "mlp.gate": (160 // tp, 64), "mlp.proj": (64, 160 // tp)}
    for tensors in rank_tensors(artifact):
        for layer in {k.split(".")[2] for k in tensors if k.startswith("transformer.layers.")}:
            p = f"transformer.layers.{layer}."
            for module, (out, inp) in dims.items():
                assert tensors[p + module + ".weight"] == ("I8", (out, inp))
                assert tensors[p + module + ".per_channel_scale"] == ("F32", (1, out if per_channel else 1))
                assert (p + module + ".act_scale" in tensors) == (not per_token)
            assert tensors[p + "attention.dense.smoother"] == ("F32", (1, 64 // tp))
            assert tensors[p + "mlp.proj.smoother"] == ("F32", (1, 160 // tp))
            for norm in ("input_layernorm", "post_layernorm"):
                assert tensors[p + norm + ".weight"] == ("BF16", (64,))
                assert tensors[p + norm + ".scale_to_int"] == ("BF16", (1,))
            for holder in ("attention", "mlp"):
                assert (p + holder + ".quantization_scaling_factor" in tensors) == (not per_token)


# --------------------------------------------------------------------------------------------- TensorRT-LLM loads it
# What TensorRT-LLM 1.2 requires of a checkpoint, restated from NVIDIA/TensorRT-LLM (1.2 line):
#   quantization/quantize.py   quantize_layers: the default exclude list; which layer classes each algorithm swaps
#                              (weight-only: ColumnLinear, RowLinear, Embedding; groupwise / FP8: the linears; the
#                              SmoothQuant plugin: norms, attention and MLP, ignoring exclude_modules)
#   quantization/layers.py     the parameters of each swapped layer
#   models/modeling_utils.py   preprocess_weights (what trtllm-build adds before load(): W8A16/W4A16's
#                              per_channel_scale, kv_cache_rcp_scaling_factor) and load()'s "Required but not
#                              provided tensors"
TRTLLM_DEFAULT_EXCLUDE = ["*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                          "*shared_expert_gate"]
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def trtllm_1_2_load_problems(quant: dict, tensors: set[str], plain: set[str]) -> list[str]:
    """The tensors TensorRT-LLM 1.2's model for `quant` requires and the checkpoint (after preprocess_weights) lacks,
    and those it provides that no parameter takes. `plain`: the same model's unquantized tensor names."""
    algo, exclude = quant["quant_algo"], quant["exclude_modules"]
    patterns = TRTLLM_DEFAULT_EXCLUDE if exclude is None else exclude
    provided = set(tensors)
    if algo in ("W8A16", "W4A16"):  # weight_only_quantize_dict: tensor names, default exclude only when null
        tensor_excl = ["*shared_expert_gate.weight"] if exclude is None else exclude
        for name in tensors:
            if any(k + ".weight" in name for k in ("qkv", "dense", "fc", "proj", "gate")) and \
                    not any(fnmatch.fnmatchcase(name, p) for p in tensor_excl):
                provided.add(name.replace(".weight", ".per_channel_scale"))
    for name in tensors:
        if name.endswith(".kv_cache_scaling_factor"):
            provided.add(name.replace("kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor"))
    required = set(plain)
    modules = {n.rsplit(".", 1)[0] for n in plain}
    for m in modules:
        linear = m.endswith(LINEARS) or m == "lm_head"
        embedding = m.endswith(("vocab_embedding", "position_embedding"))
        excluded = any(fnmatch.fnmatchcase(m, p) for p in patterns)
        if algo in ("W8A16", "W4A16") and not excluded:
            if linear:
                required.add(m + ".per_channel_scale")
            elif embedding:
                required.add(m + ".per_token_scale")
        elif algo == "W4A16_AWQ" and linear and not excluded:
            required |= {m + ".weights_scaling_factor"} | ({m + ".prequant_scaling_factor"}
                                                          if quant["pre_quant_scale"] else set())
        elif algo == "FP8" and linear and not excluded:
            required |= {m + ".weights_scaling_factor", m + ".activation_scaling_factor"}
        elif algo and algo.startswith("W8A8_SQ") and m.endswith(LINEARS):
            required.add(m + ".per_channel_scale")
            if "PER_TOKEN" not in algo:
                required.add(m + ".act_scale")
            if m.endswith(("attention.dense", "mlp.proj")):
                required.add(m + ".smoother")
        if algo and algo.startswith("W8A8_SQ") and m.endswith(("input_layernorm", "post_layernorm")):
            required.add(m + ".scale_to_int")
        if algo and algo.startswith("W8A8_SQ") and "PER_TOKEN" not in algo and m.endswith(".attention.qkv"):
            layer = m.rsplit(".", 2)[0]
            required |= {layer + ".attention.quantization_scaling_factor", layer + ".mlp.quantization_scaling_factor"}
    if quant.get("kv_cache_quant_algo"):
        for m in modules:
            if m.endswith(".attention.qkv"):
                layer = m.rsplit(".", 2)[0]
                required |= {layer + ".attention.kv_cache_scaling_factor",
                             layer + ".attention.kv_cache_rcp_scaling_factor"}
    return ([f"Required but not provided tensors: {sorted(required - provided)}"] if required - provided else []) + \
        ([f"not used: {sorted(provided - required)}"] if provided - required else [])


FORMATS = [("fp8", {}), ("int8_weight_only", {}), ("int4_weight_only", {}), ("int4_awq", {"group_size": 64}),
           ("int4_awq", {"group_size": 64, "awq_search": False}), ("w8a8_smoothquant", {}),
           ("w8a8_smoothquant", {"per_token": False, "per_channel": False}), ("none", {"kv_cache": "int8"}),
           ("none", {"kv_cache": "fp8"})]


@pytest.mark.parametrize("shape,parallel", [("llama-tiny-g64", {"tp": 2}), ("gpt2-tiny", {"pp": 2})])
@pytest.mark.parametrize("quant,extra", FORMATS)
def test_trtllm_1_2_loads_exactly_the_tensors_written(home, shape, parallel, quant, extra):
    artifact = build(home, quant, shape=shape, parallel=parallel, extra=extra, name="load")
    plain = build(home, "none", shape=shape, parallel=parallel, name="load-plain")
    config = json.loads((artifact / "config.json").read_text())["quantization"]
    for tensors, plain_tensors in zip(rank_tensors(artifact), rank_tensors(plain)):
        assert trtllm_1_2_load_problems(config, set(tensors), set(plain_tensors)) == []


def test_the_load_rule_catches_the_lm_head_only_exclude_list(home):
    artifact = build(home, "int8_weight_only", name="wo-old")
    config = json.loads((artifact / "config.json").read_text())["quantization"]
    assert config["exclude_modules"][:6] == TRTLLM_DEFAULT_EXCLUDE
    tensors = set(rank_tensors(artifact)[0])
    assert trtllm_1_2_load_problems({**config, "exclude_modules": ["lm_head"]}, tensors, tensors) == [
        "Required but not provided tensors: ['transformer.vocab_embedding.per_token_scale']"]


def test_user_exclude_patterns_reach_both_trtllm_matchers(home):
    artifact = build(home, "int8_weight_only", extra={"exclude": ["lm_head", "transformer.layers.0.mlp.*"]},
                     name="wo-excl")
    config = json.loads((artifact / "config.json").read_text())["quantization"]
    assert config["exclude_modules"] == [*TRTLLM_DEFAULT_EXCLUDE, "transformer.layers.0.mlp.*",
                                         "transformer.layers.0.mlp.*.*"]
    tensors = set(rank_tensors(artifact)[0])
    assert trtllm_1_2_load_problems(config, tensors, tensors) == []


# --------------------------------------------------------------------------------------------- the gate (real weights)
SMALL = ["precision.quantization.calibration.samples=8", "precision.quantization.calibration.seq_len=128"]


def junk_statistics(result):
    """Calibration statistics of the wrong channels: each linear's per-channel maxima, means and sampled inputs
    with their channels shuffled, as if measured on another model."""
    g = torch.Generator().manual_seed(0)
    for stats in result.act_stats.values():
        perm = torch.randperm(stats.channel_amax.numel(), generator=g)
        stats.channel_amax = stats.channel_amax[perm]
        stats.channel_abs_sum = stats.channel_abs_sum[perm]
        stats.samples = [x[:, perm] for x in stats.samples]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-int4awq", "smollm2-135m-w8a8sq"])
def test_a_calibration_made_worse_fails_the_recipe_gate(home, smollm2_dir, monkeypatch, name):
    from pipeline.quantize import calibrate as calibrate_module
    from pipeline.recipe import load_recipe

    real = calibrate_module.calibrate
    monkeypatch.setattr(calibrate_module, "calibrate", lambda *a, **k: junk_statistics(real(*a, **k)))
    r = load_recipe(name, [f"model.local={smollm2_dir}", *SMALL])
    with pytest.raises(GateError, match="eval.gate.max_ppl_increase allows"):
        Builder(r, log=lambda _: None, show_progress=False).run()
