"""The batched decode GEMM (pipeline.kernels.batched_gemm: split-K, swap-AB) in Triton's CPU emulator, its tuning
with a stand-in timer, and the decode step that uses it; tests/test_gpu.py runs it compiled at the 8B shapes."""

import json
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET before triton loads"

from pipeline.backends.cuda_decode import (  # noqa: E402
    CudaDecoder,
    DecodeOptions,
    accelerate,
    forget_batched_gemms,
    tune_batched_gemms,
)
from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config  # noqa: E402
from pipeline.build import Builder  # noqa: E402
from pipeline.dist import Comm  # noqa: E402
from pipeline.kernels import batched_gemm, tuning  # noqa: E402
from pipeline.kernels.common import ACT_NONE, ACT_SILU_GATE  # noqa: E402
from pipeline.mapping import Mapping  # noqa: E402
from pipeline.recipe import recipe_from_dict  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("rows, n, k, split, bias, dtype", [
    (2, 48, 64, 1, False, torch.bfloat16), (5, 64, 128, 2, True, torch.float16), (17, 40, 96, 1, True, torch.bfloat16),
    (32, 32, 256, 4, False, torch.bfloat16), (64, 16, 100, 1, False, torch.float16)])
def test_batched_gemm_against_float64(rows, n, k, split, bias, dtype):
    """Rows padded to the dot's width, ragged K, row blocks past N, bias, and split-K (each share's float32 sums
    added by the last share to finish): float64's result within the output dtype's rounding. Twice, so a split-K
    counter left unreset would show (the second call's last share would never see the last count)."""
    torch.manual_seed(rows)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    w = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    first = batched_gemm.skinny_mm(x, w, b, 0, 0, split)
    assert first.shape == (rows, n) and first.dtype == dtype
    # two units in the last place: the emulator rounds float32 to bfloat16 toward zero (the GPU test: to nearest)
    assert ((first.double() - ref).abs() <= 2 * ulp * ref.abs() + 1e-3).all()
    assert torch.equal(batched_gemm.skinny_mm(x, w, b, 0, 0, split), first)


@pytest.mark.parametrize("split", [1, 2])
def test_batched_gemm_silu_gate_epilogue(split):
    """act=silu-gate: the [fc; gate] weight's two halves per program and silu(fc) * gate in the epilogue, rounded
    as the unfused ops round (each to float16; the emulator rounds bfloat16 toward zero, four times here), with
    bias and split-K."""
    torch.manual_seed(split)
    rows, n, k = 6, 40, 128
    half = torch.float16
    x = torch.randn(rows, k, device=DEVICE).to(half)
    w = (torch.randn(2 * n, k, device=DEVICE) / k**0.5).to(half)
    b = torch.randn(2 * n, device=DEVICE).to(half)
    fc, gate = (x.double() @ w.double().T + b.double()).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(fc.to(half).float()).to(half).float() * gate.to(half).float()).double()
    got = batched_gemm.skinny_mm(x, w, b, 0, ACT_SILU_GATE, split)
    assert got.shape == (rows, n) and got.dtype == half
    assert ((got.double() - want).abs() <= 3 * 2.0**-11 * want.abs() + 1e-3).all()


def test_batched_gemm_rejects_what_it_cannot_run():
    w = torch.zeros(32, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="2 to 64 rows"):
        batched_gemm.skinny_mm(torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE), w, None, 0)
    with pytest.raises(ValueError, match="2 to 64 rows"):
        batched_gemm.skinny_mm(torch.zeros(65, 64, dtype=torch.bfloat16, device=DEVICE), w, None, 0)
    with pytest.raises(ValueError, match="same dtype"):
        batched_gemm.skinny_mm(torch.zeros(4, 64, device=DEVICE), w.float(), None, 0)
    if DEVICE.type == "cpu":  # split_k is the emulator's (on a GPU the config's SPLIT_K, which tuning checks)
        with pytest.raises(ValueError, match="does not share out"):
            batched_gemm.skinny_mm(torch.zeros(4, 64, dtype=torch.bfloat16, device=DEVICE), w, None, 0, 0, 3)
    with pytest.raises(ValueError, match="silu-gate"):
        batched_gemm.skinny_mm(torch.zeros(4, 64, dtype=torch.bfloat16, device=DEVICE), w, None, 0, 2)


def test_candidates_split_k_evenly_and_fill_the_gpu():
    """Llama-3-8B's dense (4096 x 4096): split-K configs whose shares are whole chunks, grids of 96 to 1056
    programs; a tiny weight keeps the configs with the most programs; with silu-gate's two weight tiles, only
    configs whose shared memory fits (bench/compile_check.py checks the count against the compiler's)."""
    configs = batched_gemm.CONFIGS
    dense = batched_gemm.candidates(4096, 4096)
    assert dense and any(configs[i].kwargs["SPLIT_K"] > 1 for i in dense)
    for i in dense:
        c = configs[i].kwargs
        assert 4096 % (c["BLOCK_K"] * c["SPLIT_K"]) == 0
        assert 96 <= 4096 // c["BLOCK_N"] * c["SPLIT_K"] <= 1056
    assert not any(configs[i].kwargs["SPLIT_K"] == 1 for i in dense)  # 32-64 programs: too few without a split
    # K = 100 shares out over no split, and every tile gives one program
    assert batched_gemm.candidates(64, 100) == [i for i, c in enumerate(configs) if c.kwargs["SPLIT_K"] == 1]
    gated = batched_gemm.candidates(14336, 4096, ACT_SILU_GATE)
    assert gated and all(batched_gemm.shared_bytes(configs[i], ACT_SILU_GATE) <= 232448 for i in gated)
    big = [i for i in batched_gemm.candidates(14336, 4096) if i not in gated]  # fit with one tile, not with two
    assert big and all(batched_gemm.shared_bytes(configs[i], ACT_SILU_GATE) > 232448 for i in big)


def _model(shape: str, dtype: str):
    recipe = recipe_from_dict({"model": {"random": shape}, "precision": {"dtype": dtype}}, name=f"batched-{shape}")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    config = read_checkpoint_config(artifact)
    return load_rank_model(artifact, config, Comm(Mapping(1, 1, 0), DEVICE), DEVICE)


@pytest.mark.slow
def test_tuning_keeps_the_fastest_per_shape_and_the_step_its_tokens(home, monkeypatch):
    """tune_batched_gemms with a stand-in timer: each GEMM shape keeps its fastest candidate, cuBLAS included
    (-1), for the process; the decode step with the kernel (the gated MLP's activation in its epilogue) gives the
    cuBLAS step's logits within float16 rounding and its tokens; forget_batched_gemms goes back to cuBLAS."""
    monkeypatch.setattr(tuning, "_chosen", {})
    options = DecodeOptions(cuda_graph=False, compile=False, fused_step=False)
    model = accelerate(_model("llama-tiny-tied", "float16"), options)
    timed = []

    ran: dict[str, list[int]] = {}

    def timer(run):  # the kernel wins every shape but dense, where cuBLAS does; later configs time faster
        index = run.config
        timed.append(index)
        run()  # a config this GPU cannot fit in shared memory raises, and tuning skips it
        ran.setdefault(run.gemm, []).append(index)
        if run.gemm == "dense":
            return 0.5 if index < 0 else 1.0
        return 1.0 if index < 0 else 1.0 / (2 + index)

    chosen = tune_batched_gemms(model, 3, timer=timer)
    assert set(chosen) == {"qkv", "dense", "fc_gate", "proj"}
    assert chosen["dense"].startswith("cuBLAS")
    assert "; runner-up " in chosen["dense"]  # where cuBLAS won, how close the kernel came
    assert "; cuBLAS " in chosen["qkv"]  # where the kernel won, cuBLAS's figure
    layer = model.layers[0]
    assert layer["dense"].skinny == {16: -1}
    for name in ("qkv", "fc_gate", "proj"):
        n, k = layer[name].weight.shape
        act = ACT_SILU_GATE if name == "fc_gate" else ACT_NONE  # half the rows out
        wanted = batched_gemm.candidates(n // 2 if act else n, k, act, 16)
        assert sorted(ran[name]) == [-1] + wanted, name
        assert layer[name].skinny == {16: max(ran[name])}, name
    calls = len(timed)
    assert tune_batched_gemms(model, 3, timer=timer) == {} and len(timed) == calls  # kept: nothing timed again

    prompts = [[3, 14, 15, 92, 65, 7, 1], [2, 71, 82], [5, 9, 26, 53, 58]]
    reference = CudaDecoder(accelerate(_model("llama-tiny-tied", "float16"), options), 3, 24, options)
    decoder = CudaDecoder(model, 3, 24, options)
    for d in (reference, decoder):
        d.prefill(prompts)
    for _ in range(3):
        want, got = reference._step(), decoder._step()
        assert ((got - want).norm() / want.norm()).item() < 5e-3
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    forget_batched_gemms(model)
    assert all(not linear.skinny for lyr in model.layers for key, linear in lyr.items() if key in chosen)


def test_the_batched_gemm_choices_persist_in_the_tuning_cache(home, monkeypatch, tmp_path):
    """tune_batched_gemms writes each GEMM shape's choice (cuBLAS or a config) to the tuning cache; a later process takes it
    without timing, though its own timings would choose otherwise."""
    cache_file = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(cache_file))
    model = accelerate(_model("llama-tiny-tied", "float16"), DecodeOptions(cuda_graph=False, compile=False,
                                                                          fused_step=False))
    timed = []

    def timer_for(kernel_wins: bool):
        def timer(run):
            timed.append(run)
            index = run.config
            return 1.0 / (2 + index) if kernel_wins else (0.5 if index < 0 else 1.0)
        return timer

    for fresh in ("_chosen", "_notes", "_loaded"):
        monkeypatch.setattr(tuning, fresh, {})
    first = tune_batched_gemms(model, 3, timer=timer_for(kernel_wins=True), persist=True)
    stored = json.loads(cache_file.read_text())
    assert len(stored) == 4 and all(k.startswith("skinny-gemm ") for k in stored)
    assert "cuBLAS" not in stored.values()
    skinny = {name: model.layers[0][name].skinny[16] for name in first}
    monkeypatch.setattr(tuning, "_chosen", {})  # a new process
    monkeypatch.setattr(tuning, "_loaded", {})
    calls = len(timed)
    second = tune_batched_gemms(model, 3, timer=timer_for(kernel_wins=False), persist=True)
    assert len(timed) == calls and all(text.endswith("(tuning cache)") for text in second.values())
    assert {name: model.layers[0][name].skinny[16] for name in second} == skinny
