"""The GPU GEMMs of the int4 AWQ and W8A8 SmoothQuant formats against their CPU emulations (the references,
pipeline/quantize/runtime.py): the W4A16 kernel (pipeline.kernels.int4_gemm) and the W8A8 kernels
(pipeline.kernels.int8_gemm) in Triton's CPU emulator, the fused fc/gate GEMMs and the bench's device quantizers; the tests
marked gpu run the same compiled on a GPU (bench/quant_gpu.sh)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET before triton loads"

from pipeline.dist import Comm  # noqa: E402
from pipeline.kernels import int4_gemm  # noqa: E402
from pipeline.mapping import Mapping  # noqa: E402
from pipeline.quantize.formats import (  # noqa: E402
    groupwise_int4_dequantize,
    groupwise_int4_quantize,
    int8_weight_quantize,
    pack_int4_rows,
    smoothquant_linear,
    unpack_int4_rows,
)
from pipeline.quantize.runtime import GroupwiseInt4Linear, SmoothQuantLinear  # noqa: E402

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0) if torch.cuda.is_available() else None


def exact_weight(packed: torch.Tensor, scales: torch.Tensor, group: int, out: int, inp: int) -> torch.Tensor:
    """float64 q * scale, unrounded: what the FMA form (one row) multiplies by, its scales applied to sums."""
    w = groupwise_int4_dequantize(unpack_int4_rows(packed.cpu()), scales.cpu(), group)  # exact in float32
    return w[:out, :inp].double().to(packed.device)


def int4_weight(out_p: int, in_p: int, group: int, dtype, device=CPU, seed: int = 0, zero_group: bool = True):
    """A packed int4 weight, its scales (a group of zeros among them: scale 0) and a prequant scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_p, in_p, generator=g)
    if zero_group:
        w[1, :group] = 0
    q, s = groupwise_int4_quantize(w, group)
    prequant = (torch.rand(in_p, generator=g) + 0.5).to(dtype)
    return pack_int4_rows(q).to(device), s.to(dtype).to(device), prequant.to(device)


# out (real) / out_p (padded), in (real) / in_p, group: padding sliced off, an odd count of groups (96 / 32), a
# row-parallel rank's half of the input (in_p 128 of a 256-wide linear at tp=2), an odd number of outputs
SHAPES = [(48, 64, 96, 128, 32), (30, 32, 96, 96, 32), (64, 64, 128, 128, 64), (31, 32, 40, 64, 16)]


@pytest.mark.parametrize("rows, dot", [(1, 0), (1, 1), (5, 1), (20, 1)])
@pytest.mark.parametrize("out, out_p, inp, in_p, group", SHAPES)
def test_int4_kernel_equals_the_cpu_emulation(rows, dot, out, out_p, inp, in_p, group):
    """float16 (the emulator rounds float32 to bfloat16 toward zero; the GPU test takes bfloat16): the dot form's
    dequantized tiles are the emulation's weights bit for bit, so only float32 summation order differs: the output
    within one unit in the last place. The FMA form scales sums, not weights: the same bound against the exact
    q * scale weights in float64 (and it fails against the emulation's rounded ones). With prequant and bias, rows
    past one BLOCK_M."""
    dtype = torch.float16
    torch.manual_seed(rows * out)
    packed, scales, prequant = int4_weight(out_p, in_p, group, dtype, seed=rows + out)
    bias = torch.randn(out).to(dtype)
    x = torch.randn(rows, inp).to(dtype)
    if dot == 1:
        ref = GroupwiseInt4Linear(packed, scales, prequant, bias, group, out, dtype)(x)
    else:
        ref = (x * prequant[:inp]).double() @ exact_weight(packed, scales, group, out, inp).t() + bias.double()
    got = int4_gemm.int4_mm(x, packed, scales, prequant, bias, out, group, dot)
    assert got.shape == (rows, out) and got.dtype == dtype
    # one unit in the last place: float32 sums in another order can round a float16 output the other way
    assert ((got.double() - ref.double()).abs() <= 2.0**-10 * ref.double().abs() + 1e-3).all()


def test_int4_kernel_without_prequant_or_bias_and_its_errors():
    torch.manual_seed(3)
    packed, scales, _ = int4_weight(32, 64, 32, torch.float16)
    x = torch.randn(3, 64).to(torch.float16)
    ref = GroupwiseInt4Linear(packed, scales, None, None, 32, 32, torch.float16)(x)
    got = int4_gemm.int4_mm(x, packed, scales, None, None, 32, 32)
    assert ((got.double() - ref.double()).abs() <= 2.0**-10 * ref.double().abs() + 1e-3).all()
    with pytest.raises(ValueError, match="cannot give 33 outputs"):
        int4_gemm.int4_mm(x, packed, scales, None, None, 33, 32)
    with pytest.raises(ValueError, match="same dtype"):
        int4_gemm.int4_mm(x, packed, scales.float(), None, None, 32, 32)
    with pytest.raises(ValueError, match="not a power of 2"):
        int4_gemm.int4_mm(torch.zeros(3, 48, dtype=torch.float16), torch.zeros(16, 48, dtype=torch.int8),
                          torch.ones(32, 2, dtype=torch.float16), None, None, 32, 24)


def test_fused_fc_gate_is_the_two_gemms():
    """fused_with concatenates packed rows and scales (int4) or int8 rows and channel scales (W8A8): the fused
    GEMM's outputs are the two GEMMs' outputs side by side; padded rows or different inputs keep two."""
    dtype = torch.float16
    pf, sf, pq = int4_weight(64, 128, 32, dtype, seed=1)
    pg, sg, _ = int4_weight(64, 128, 32, dtype, seed=2)
    fc = GroupwiseInt4Linear(pf, sf, pq, None, 32, 64, dtype)
    gate = GroupwiseInt4Linear(pg, sg, pq, None, 32, 64, dtype)
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(0)).to(dtype)
    # the same products; a CPU GEMM of another width may add them in another order (int8's sums are exact)
    assert torch.allclose(fc.fused_with(gate)(x), torch.cat([fc(x), gate(x)], dim=-1), rtol=2.0**-10, atol=1e-3)
    assert GroupwiseInt4Linear(pf, sf, pq, None, 32, 60, dtype).fused_with(gate) is None  # padded rows
    assert fc.fused_with(GroupwiseInt4Linear(pg, sg, pq * 2, None, 32, 64, dtype)) is None  # another input

    wf, cf = int8_weight_quantize(torch.randn(48, 64), True)
    wg, cg = int8_weight_quantize(torch.randn(48, 64), True)
    fc8, gate8 = (SmoothQuantLinear(w, c, None, None, None, dtype) for w, c in ((wf, cf), (wg, cg)))
    assert torch.equal(fc8.fused_with(gate8)(x[:, :64]), torch.cat([fc8(x[:, :64]), gate8(x[:, :64])], dim=-1))
    assert fc8.fused_with(SmoothQuantLinear(wg, cg, torch.tensor([0.1]), None, None, dtype)) is None


@pytest.mark.parametrize("rows, width, static, smooth, bias", [(1, 96, False, True, True), (16, 96, True, False, False),
                                                                (40, 96, False, True, False), (3, 72, True, True, True)])
def test_the_w8a8_kernels_equal_the_smoothquant_emulation(rows, width, static, smooth, bias):
    """pipeline.kernels.int8_gemm (emulated), float32 model: the per-token (or static) int8 codes and scales are
    int8_activation_quantize's exactly, smoother divided out first; the GEMM's int32 sums are exact (a width of 72
    leaves a ragged last K tile) and its float32 scaling is within a float32 rounding of the float64 emulation's."""
    from pipeline.kernels.int8_gemm import quantize_rows, w8a8_linear
    from pipeline.quantize.formats import int8_activation_quantize

    gen = torch.Generator().manual_seed(rows)
    dtype = torch.float32
    x = (torch.randn(rows, width, generator=gen) * torch.rand(width, generator=gen) * 4).to(dtype)
    x[0, :] = 0.0  # a zero row: scale 1 / 127, codes 0
    wq, ws = int8_weight_quantize(torch.randn(40, width, generator=gen), per_channel=True)
    smoother = torch.rand(width, generator=gen) + 0.5 if smooth else None
    act = torch.tensor([x.abs().max().item() / 127]) if static else None
    b = torch.randn(40, generator=gen) if bias else None
    smoothed = x if smoother is None else (x / smoother).to(dtype)
    q_ref, s_ref = int8_activation_quantize(smoothed, act)
    q, s = quantize_rows(x, smoother, act)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref.reshape(-1))
    ref = smoothquant_linear(smoothed, wq, ws, act, b, dtype).double()
    got = w8a8_linear(x, wq, ws, act, smoother, b)
    assert got.shape == ref.shape and got.dtype == dtype
    assert ((got.double() - ref).abs() <= 2.0**-22 * ref.abs() + 1e-6).all()


def test_the_int8_gemm_rounds_codes_half_to_even():
    """Codes exactly between two integers go to the even one (numpy's and torch's round), both signs."""
    from pipeline.kernels.int8_gemm import quantize_rows

    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49]])  # scale 1: x / scale = x
    q, s = quantize_rows(x)
    assert s.tolist() == [1.0]
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3]]


@pytest.mark.parametrize("quant", ["int4_awq", "w8a8_smoothquant"])
def test_device_quantizer_runs_the_format_on_a_random_model(quant):
    """bench --device-random's quantizer: every GEMM of a bfloat16 model becomes the format's linear, in the
    checkpoint's layout, and the model's logits stay near the unquantized model's."""
    from pipeline.quantize.registry import weight_format
    from pipeline.random_weights import device_random_model

    comm = Comm(Mapping(1, 1, 0), CPU)
    model, _, _ = device_random_model("llama-tiny", 1, comm, CPU, "bfloat16")
    tokens = torch.tensor([[3, 14, 15, 92, 65]])
    positions = torch.arange(5)[None]
    want = model.forward(tokens, positions, model.new_cache(1, 8), slot_start=0).float()
    weight_format(quant).device_quantizer(model, {})
    kind = GroupwiseInt4Linear if quant == "int4_awq" else SmoothQuantLinear
    assert all(isinstance(layer[k], kind) for layer in model.layers for k in ("qkv", "dense", "fc", "gate", "proj"))
    got = model.forward(tokens, positions, model.new_cache(1, 8), slot_start=0).float()
    err = float((got - want).norm() / want.norm())
    assert 0 < err < (0.2 if quant == "int4_awq" else 0.05), err


# ------------------------------------------------------------------------------------------------ GPU (compiled)


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, rows, out, out_p, inp, in_p", [
    (torch.bfloat16, 1, 4096, 4096, 4096, 4096), (torch.bfloat16, 7, 4096, 4096, 4096, 4096),
    (torch.bfloat16, 200, 4096, 4096, 4096, 4096), (torch.bfloat16, 1, 28672, 28672, 4096, 4096),
    (torch.bfloat16, 1, 4096, 4096, 14336, 14336), (torch.float16, 1, 1000, 1024, 576, 640),
    (torch.float16, 33, 1000, 1024, 576, 640)])
def test_int4_kernel_on_the_gpu(dtype, rows, out, out_p, inp, in_p):
    """Compiled, with the config autotuning picks for the rows, at 8B shapes and a padded one: the rounded input
    times the emulation's weights (one row: the exact q * scale, the FMA form) in float64, within the output's
    rounding."""
    packed, scales, prequant = int4_weight(out_p, in_p, 128, dtype, device=GPU, seed=rows)
    x = torch.randn(rows, inp, device=GPU).to(dtype)
    lin = GroupwiseInt4Linear(packed, scales, prequant, None, 128, out, dtype)
    assert lin.kernel
    weight = exact_weight(packed, scales, 128, out, inp) if rows == 1 else lin.dequantized(inp).double()
    ref = (x * prequant[:inp]).double() @ weight.t()
    got = lin(x)
    assert got.shape == (rows, out) and got.dtype == dtype
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert float((got.double() - ref).norm() / ref.norm()) < ulp  # summation order and output rounding only


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("act, rows, inp", [(0, 6144, 4096), (1, 28672, 4096), (0, 4096, 14336)])
def test_int4_fused_gemv_on_the_gpu(act, rows, inp):
    """Compiled and autotuned at the 8B shapes (qkv with RMSNorm, [fc; gate] with silu-gate, proj): the unfused
    ops in float64 on the exact q * scale weights, within bfloat16 rounding."""
    from pipeline.kernels.common import ACT_SILU_GATE, NORM_RMS

    dtype = torch.bfloat16
    packed, scales, prequant = int4_weight(rows, inp, 128, dtype, device=GPU, seed=act)
    x, r = torch.randn(inp, device=GPU).to(dtype), torch.randn(inp, device=GPU).to(dtype)
    g = (torch.rand(inp, device=GPU) + 0.5).to(dtype)
    norm = NORM_RMS if inp == 4096 else 0
    y, h = int4_gemm.int4_fused_gemv(x, r, g if norm else None, packed, scales, prequant, None, rows, 128, 1e-5, norm,
                                     ACT_SILU_GATE if act else 0)
    hx = (x + r).double()
    normed = hx / (hx.pow(2).mean() + 1e-5).sqrt() * g.double() if norm else hx
    ref = exact_weight(packed, scales, 128, rows, inp) @ (normed * prequant.double())
    if act:
        fc, gate = ref.chunk(2)
        ref = torch.nn.functional.silu(fc) * gate
    assert torch.equal(h, x + r)
    assert float((y.double() - ref).norm() / ref.norm()) < 2.0**-7


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 256, 1000])
def test_the_w8a8_kernels_on_the_gpu_equal_the_emulation(rows):
    """The W8A8 kernels compiled at the 8B shape's fc+gate (both row classes' tiles): int8 codes and scales exactly
    the reference's; outputs within one bfloat16 rounding step of the float64 emulation (float32 scaling may round
    to the other neighbour)."""
    from pipeline.kernels.int8_gemm import quantize_rows
    from pipeline.quantize.formats import int8_activation_quantize

    dtype = torch.bfloat16
    x = (torch.randn(rows, 4096, device=GPU) * 3).to(dtype)
    wq, ws = int8_weight_quantize(torch.randn(14336, 4096, device=GPU), per_channel=True)
    smoother = torch.rand(4096, device=GPU) + 0.5
    lin = SmoothQuantLinear(wq, ws, None, smoother, None, dtype)
    assert lin.kernel
    smoothed = (x.float() / smoother).to(dtype)
    q_ref, s_ref = int8_activation_quantize(smoothed, None)
    q, s = quantize_rows(x, smoother)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref.reshape(-1))
    ref = smoothquant_linear(smoothed, wq, ws, None, None, dtype).double()
    got = lin(x).double()
    assert ((got - ref).abs() <= 2.0**-7 * ref.abs() + 1e-3).all()
    assert float((got - ref).norm() / ref.norm()) < 2.0**-9


@pytest.mark.gpu
@pytest.mark.skipif(GPU is None, reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", ["int4_awq", "w8a8_smoothquant"])
def test_quantized_decode_on_the_gpu_matches_the_plain_step(quant):
    """The CUDA decode path (CUDA graph, fused fc/gate; int4 at batch 1: the fused step) of a device-quantized
    model gives the plain loop's greedy tokens on the GPU."""
    from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate
    from pipeline.quantize.registry import weight_format
    from pipeline.random_weights import device_random_model

    def model():
        m, _, _ = device_random_model("llama-tiny-g64", 1, Comm(Mapping(1, 1, 0), GPU), GPU, "float16")
        return weight_format(quant).device_quantizer(m, {})

    prompts = [[3, 14, 15, 92, 65, 7, 1]]
    plain = DecodeOptions(cuda_graph=False, compile=False, triton_gemv=False, fuse_gate_up=False, fused_step=False,
                          pdl=False)
    want = CudaDecoder(model(), 1, 24, plain).generate(prompts, 8)
    fast = DecodeOptions(compile=False)  # the benchmark compiles (bench/quant_gpu.sh); here the kernels and graphs
    fast_model = accelerate(model(), fast)
    assert "fc_gate" in fast_model.layers[0]
    for batch in (1, 3):
        decoder = CudaDecoder(fast_model, batch, 24, fast)
        assert (decoder.fused is not None) == (batch == 1 and quant == "int4_awq"), decoder.path
        decoder.warm_up()
        assert decoder.generate(prompts * batch, 8)[0] == want[0], batch


@pytest.mark.parametrize("act, residual, bias, inp", [(0, True, False, 96), (1, True, True, 128), (0, False, True, 64),
                                                     (1, False, False, 96)])
def test_int4_fused_gemv_equals_the_unfused_ops(act, residual, bias, inp):
    """The fused step's int4 GEMV: residual add (x + residual stored), RMSNorm prologue, prequant, bias and
    silu(fc) * gate epilogue against the same ops in float64 on the exact q * scale weights (float16; the kernel
    normalizes in one pass, unrounded, so within a few units in the last place)."""
    from pipeline.kernels.common import ACT_SILU_GATE, NORM_RMS

    dtype = torch.float16
    rows = 64 if act else 48
    packed, scales, prequant = int4_weight(rows, inp, 32, dtype, seed=inp + act)
    x, r = torch.randn(inp).to(dtype), torch.randn(inp).to(dtype)
    g = (torch.rand(inp) + 0.5).to(dtype)
    b = torch.randn(rows).to(dtype) if bias else None
    y, h = int4_gemm.int4_fused_gemv(x, r if residual else None, g, packed, scales, prequant, b, rows, 32, 1e-5,
                                     NORM_RMS, ACT_SILU_GATE if act else 0)
    hx = (x + r if residual else x).double()
    if residual:
        assert torch.equal(h, x + r)
    normed = hx / (hx.pow(2).mean() + 1e-5).sqrt() * g.double() * prequant.double()
    ref = exact_weight(packed, scales, 32, rows, inp) @ normed + (b.double() if bias else 0)
    if act:
        fc, gate = ref.chunk(2)
        ref = torch.nn.functional.silu(fc) * gate
    assert y.shape == ref.shape
    assert float((y.double() - ref).norm() / ref.norm()) < 2e-3


def test_fused_step_runs_int4_models():
    """Batch 1 with int4 GEMMs (fc and gate fused): the fused step's int4 GEMVs (norm prologue, silu-gate epilogue)
    against the layer-by-layer step of the emulation's GEMMs: logits within float16 rounding, the same tokens."""
    from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate
    from pipeline.quantize.registry import weight_format
    from pipeline.random_weights import device_random_model

    def model():
        m, _, _ = device_random_model("llama-tiny-g64", 1, Comm(Mapping(1, 1, 0), CPU), CPU, "float16")
        return weight_format("int4_awq").device_quantizer(m, {})

    plain = DecodeOptions(cuda_graph=False, compile=False, fused_step=False)
    fused = DecodeOptions(cuda_graph=False, compile=False, fused_step=True)
    reference = CudaDecoder(accelerate(model(), plain), 1, 16, plain)
    reference.attention = None  # torch's attention: the reference is the emulation alone
    decoder = CudaDecoder(accelerate(model(), fused), 1, 16, fused)
    assert decoder.path == "fused step"
    assert isinstance(decoder.model.layers[0]["fc_gate"], GroupwiseInt4Linear)
    prompt = [[3, 14, 15, 92, 65, 7, 1]]
    reference.prefill(prompt)
    decoder.prefill(prompt)
    for _ in range(2):
        want, got = reference._step(), decoder._step()
        assert ((got - want).norm() / want.norm()).item() < 5e-3
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("config", [c for c in int4_gemm.FUSED_CONFIGS if c.kwargs["BLOCK_H"] <= 4],
                         ids=lambda c: f"h{c.kwargs['BLOCK_H']}-k{c.kwargs['BLOCK_K']}")
def test_the_narrow_int4_gemv_configs_give_the_same_numbers(monkeypatch, config):
    """The GPU's narrow autotuning configs (2-4 packed rows, long K blocks) run in the emulator: the fused GEMV
    (silu-gate, ragged K) and the plain one-row GEMM give what the emulator's own configs give."""
    from pipeline.kernels.common import ACT_SILU_GATE, NORM_RMS

    dtype, inp, rows, group = torch.float16, 1088, 32, 64  # K ragged for every BLOCK_K (17 groups of 64)
    packed, scales, prequant = int4_weight(rows, inp, group, dtype, seed=7)
    x, g = torch.randn(inp).to(dtype), (torch.rand(inp) + 0.5).to(dtype)
    fused_want = int4_gemm.int4_fused_gemv(x, None, g, packed, scales, prequant, None, rows, group, 1e-5, NORM_RMS,
                                           ACT_SILU_GATE)[0]
    plain_want = int4_gemm.int4_mm(x[None], packed, scales, prequant, None, rows, group)
    tile = {k: config.kwargs[k] for k in ("BLOCK_H", "BLOCK_K")}
    monkeypatch.setattr(int4_gemm, "FUSED_INTERPRETER_CONFIG", tile)
    monkeypatch.setattr(int4_gemm, "INTERPRETER_CONFIG", tile)
    fused = int4_gemm.int4_fused_gemv(x, None, g, packed, scales, prequant, None, rows, group, 1e-5, NORM_RMS,
                                      ACT_SILU_GATE)[0]
    plain = int4_gemm.int4_mm(x[None], packed, scales, prequant, None, rows, group)
    for got, want in ((fused, fused_want), (plain, plain_want)):
        assert got.shape == want.shape
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-3
