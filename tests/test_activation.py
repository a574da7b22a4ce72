"""pipeline.kernels.activation.silu_mul (emulated here; the gpu tests on a lent GPU: pytest -m gpu) against the
unfused torch code it replaces, silu(fc) * gate over the [fc | gate] GEMM output, and its FP8 form against the
FP8 cast kernel; and the engine's model path with and without it. The emulator rounds float32 to bfloat16 toward
zero, so float16 is compared exactly here and bfloat16 exactly on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.kernels import fp8
from pipeline.kernels.activation import BLOCK, silu_mul
from pipeline.params import SamplingParams
from tests.test_engine import build


def reference(y: torch.Tensor) -> torch.Tensor:
    """The unfused code: RankModel._mlp's torch ops on the fused GEMM's output."""
    fc, gate = y.chunk(2, dim=-1)
    return F.silu(fc) * gate


def formula(y: torch.Tensor) -> torch.Tensor:
    """The unfused code's arithmetic with the emulator's float32 exp (numpy's; torch's CPU silu takes another
    vectorized exp, a float32 ulp apart at times): silu in float32 rounded to y's dtype, then the product in
    float32 rounded to y's dtype."""
    fc, gate = y.float().chunk(2, dim=-1)
    silu = (fc / (1.0 + torch.from_numpy(np.exp(-fc.numpy())))).to(y.dtype).float()
    return (silu * gate).to(y.dtype)


def gemm_output(rows: int, inter: int, dtype: torch.dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(rows, 2 * inter, generator=gen, device=device) * 4).to(dtype)


@pytest.mark.parametrize("rows", range(1, 8))
@pytest.mark.parametrize("inter", [37, BLOCK + 29])  # I below one block, and a partial second block
def test_silu_mul_gives_the_unfused_float16_bits(rows, inter):
    y = gemm_output(rows, inter, torch.float16, seed=rows)
    h = silu_mul(y)
    assert h.dtype == torch.float16 and h.shape == (rows, inter)
    assert torch.equal(h, formula(y))
    expected = reference(y)  # torch's ops: the same bits but where the two exps tip a rounding (one last-bit step)
    assert ((h.float() - expected.float()).abs() <= 2**-10 * expected.float().abs()).all()


@pytest.mark.parametrize("dtype, ulps", [(torch.float32, 2**-21), (torch.bfloat16, 2**-6)])
def test_silu_mul_in_float32_and_bfloat16(dtype, ulps):
    """float32: torch's CPU silu takes its own vectorized exp (a few float32 ulps); bfloat16: the emulator's two
    truncations instead of round-to-nearest (two last-bit steps)."""
    y = gemm_output(5, 300, dtype)
    h, expected = silu_mul(y).float(), reference(y).float()
    assert ((h - expected).abs() <= ulps * expected.abs() + 1e-6).all()


def test_silu_mul_keeps_leading_dimensions_and_reads_strided_rows():
    """The engine's packed tokens [1, T, 2I], and rows of a wider buffer (a row stride other than 2I)."""
    wide = gemm_output(6, 80, torch.float16)  # [6, 160]
    y = wide[:, :150]  # I = 75, rows 160 apart
    assert torch.equal(silu_mul(y), formula(y))
    packed = wide[None]
    out = silu_mul(packed)
    assert out.shape == (1, 6, 80) and torch.equal(out, formula(packed))


@pytest.mark.parametrize("rows, inter", [(3, 1100), (7, 48)])
def test_silu_mul_in_fp8_gives_the_bytes_of_the_cast_kernel(rows, inter):
    """With the proj's act_scale: the bytes kernels/fp8.py gives for the unfused h (values beyond 448 * scale
    saturate)."""
    y = gemm_output(rows, inter, torch.float16, seed=inter)
    scale = torch.tensor([0.02])
    q = silu_mul(y, scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (rows, inter)
    expected = fp8.quantize_fp8(formula(y), scale)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert (q.float().abs() == 448).any()  # some saturated


def test_the_model_with_the_fused_activation_gives_the_same_logits(home, monkeypatch):
    """RankModel with fc and gate fused (the engine's GPU model, emulated): with fused_activation, steps of more
    than one row run silu_mul (one row keeps torch's ops), and the logits are the unfused ones."""
    from pipeline.backends import torch_model
    from pipeline.backends.cuda_decode import DecodeOptions, accelerate
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.engine.runner import ModelRunner
    from pipeline.engine.scheduler import SeqWork, StepPlan
    from pipeline.mapping import Mapping

    _, artifact = build("llama-tiny", dtype="float16")
    device = torch.device("cpu")
    model = load_rank_model(artifact, read_checkpoint_config(artifact), Comm(Mapping(1, 1), device), device)
    accelerate(model, DecodeOptions())
    rows_seen = []

    def spy(y, scale=None):
        rows_seen.append(y.numel() // y.shape[-1])
        return silu_mul(y, scale)

    monkeypatch.setattr(torch_model, "silu_mul", spy)
    params = SamplingParams()
    prompt = StepPlan((SeqWork(0, (5, 17, 3, 99, 42, 7), 0, (4, 1), True, params, 0),
                       SeqWork(1, (8, 12, 30), 0, (2, 3), True, params, 0)))
    one_row = StepPlan((SeqWork(0, (11,), 6, (4, 1), True, params, 0),))
    logits = {}
    for fused in (True, False):
        model.fused_activation = fused
        runner = ModelRunner(model, 6, 4)
        logits[fused] = [runner.forward(prompt), runner.forward(one_row)]
    assert rows_seen == [9] * len(model.layers)  # the 9 prompt tokens; the one-row step kept torch's ops
    for ours, expected in zip(logits[True], logits[False]):
        assert ours.shape == expected.shape
        # equal bits here; the margin is for a CPU whose exp tips one float16 rounding of h (formula's docstring)
        assert (ours - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()
        assert torch.equal(ours.argmax(-1), expected.argmax(-1))


# ------------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("rows, inter", [(512, 14336), (5, 3000), (3, 37)])
def test_silu_mul_on_the_gpu_gives_the_unfused_bfloat16_bits(rows, inter):
    """bfloat16 on CUDA (round-to-nearest there): the bits of torch's two kernels, and the FP8 bytes of the cast
    kernel on them, at the Llama-3-8B decoding shape too."""
    y = gemm_output(rows, inter, torch.bfloat16, device="cuda")
    expected = reference(y)
    assert torch.equal(silu_mul(y), expected)
    scale = torch.tensor([0.05], device="cuda")
    q = silu_mul(y, scale)
    assert torch.equal(q.view(torch.uint8), fp8.quantize_fp8(expected, scale).view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_the_engine_model_gives_the_same_logits_with_the_fused_activation(home, monkeypatch, quant):
    """The engine's GPU model (use_gpu_kernels) over prompt chunks and decoding: the same logits with the fused
    activation as without; with FP8 weights the proj takes silu_mul's FP8 h and casts nothing itself."""
    from pipeline.engine.runner import ModelRunner, use_gpu_kernels
    from tests.test_engine_gpu import plans, rank_model
    from tests.test_gpu import _artifact

    _, artifact = _artifact("llama-tiny", "bfloat16", quant)
    model = use_gpu_kernels(rank_model(artifact))
    assert "fc_gate" in model.layers[0]
    casts = []
    cast = fp8.quantize_fp8
    monkeypatch.setattr(fp8, "quantize_fp8", lambda x, scale: casts.append(x.shape) or cast(x, scale))
    logits, cast_counts = {}, {}
    for fused in (True, False):
        model.fused_activation = fused
        runner = ModelRunner(model, 9, 16)
        casts.clear()
        logits[fused] = [runner.forward(plan) for plan in plans(16)]
        cast_counts[fused] = len(casts)
    for ours, expected in zip(logits[True], logits[False]):
        assert torch.equal(ours, expected)
    if quant == "fp8":  # qkv, dense, fc_gate and proj cast their input; fused, the proj's cast is silu_mul's
        assert cast_counts[False] == 4 * len(model.layers) * len(plans(16))
        assert cast_counts[True] == 3 * len(model.layers) * len(plans(16))
