"""On a CUDA GPU (run with `pytest -m gpu`): the Triton GEMV and FP8 GEMMs against float64 and CPU references,
every decode path (CUDA graph, torch.compile, Triton GEMV) against the plain loop, and GPU logits against the CPU."""

import json

import pytest
import torch

from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
from pipeline.build import Builder
from pipeline.dist import Comm
from pipeline.generate import generate, score
from pipeline.mapping import Mapping
from pipeline.params import SamplingParams
from pipeline.quantize.formats import fp8_linear, fp8_scale, quantize_fp8
from pipeline.recipe import recipe_from_dict

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(got).all()
    return float((got.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm())


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("n, k, bias", [(4096, 4096, False), (1000, 576, True), (37, 1001, True), (14336, 4096, False)])
def test_gemv_against_float64(dtype, tol, n, k, bias):
    from pipeline.kernels.gemv import linear_1row

    x = torch.randn(1, 1, k, device=GPU).to(dtype)
    w = (torch.randn(n, k, device=GPU) / k**0.5).to(dtype)
    b = torch.randn(n, device=GPU).to(dtype) if bias else None
    ref = x.double()[0, 0] @ w.double().t() + (b.double() if bias else 0)
    y = linear_1row(x, w, b)
    assert y.shape == (1, 1, n) and y.dtype == dtype
    assert rel_err(y[0, 0], ref) < tol


@pytest.mark.parametrize("n, k", [(4096, 4096), (1000, 576), (28672, 4096)])
def test_fp8_gemv_equals_the_fp8_emulation(n, k):
    from pipeline.kernels.gemv import linear_1row

    x = torch.randn(1, k, device=GPU).to(torch.bfloat16) * 3
    w = torch.randn(n, k, device=GPU) / k**0.5
    sa, sw = fp8_scale(x.float().abs().max()).to(GPU), fp8_scale(w.abs().max()).to(GPU)
    wq = quantize_fp8(w, sw)
    y = linear_1row(x, wq, None, sa, sw, torch.bfloat16)
    ref = fp8_linear(x.cpu(), wq.cpu(), sa.cpu(), sw.cpu(), None, torch.float32)  # exact FP8 products, float32 sums
    assert rel_err(y, ref) < 4e-3  # bfloat16 output rounding only


def test_scaled_mm_equals_the_fp8_emulation():
    x = torch.randn(8, 4096, device=GPU).to(torch.bfloat16)
    w = torch.randn(2048, 4096, device=GPU) / 64
    sa, sw = fp8_scale(x.float().abs().max()).to(GPU), fp8_scale(w.abs().max()).to(GPU)
    wq = quantize_fp8(w, sw)
    y = fp8_linear(x, wq, sa, sw, None, torch.bfloat16)
    ref = fp8_linear(x.cpu(), wq.cpu(), sa.cpu(), sw.cpu(), None, torch.float32)
    assert rel_err(y, ref) < 4e-3


def _artifact(shape, dtype="bfloat16", quant="none"):
    recipe = recipe_from_dict({"model": {"random": shape}, "precision": {
        "dtype": dtype, "quantization": {"quant": quant, "calibration": {"samples": 2, "seq_len": 32}}}},
        name=f"gpu-{shape}-{dtype}-{quant}")
    result = Builder(recipe, log=lambda _: None, show_progress=False).run()
    return result.stages[0].path, result.artifact


def _model(artifact, device):
    config = read_checkpoint_config(artifact)
    return load_rank_model(artifact, config, Comm(Mapping(1, 1, 0), device), device)


@pytest.mark.parametrize("shape", ["gpt2-tiny", "llama-tiny"])
def test_every_decode_path_gives_the_plain_loops_tokens(home, shape):
    from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate

    _, artifact = _artifact(shape)
    prompts = [[5, 9, 2, 7, 1, 3, 8]]
    expected = generate(_model(artifact, GPU), prompts, SamplingParams(max_tokens=24), eos_id=None, pad_id=0)
    model = accelerate(_model(artifact, GPU), DecodeOptions(fuse_gate_up=False))
    for graph, compiled, triton_gemv in ((False, False, True), (True, False, True), (True, True, True),
                                         (True, True, False)):
        for layer in model.layers:
            for value in layer.values():
                if hasattr(value, "triton_gemv"):
                    value.triton_gemv = triton_gemv
        options = DecodeOptions(cuda_graph=graph, compile=compiled, triton_gemv=triton_gemv, fuse_gate_up=False,
                                fused_step=False)
        decoder = CudaDecoder(model, 1, 64, options)
        decoder.warm_up()
        assert decoder.generate(prompts, 24) == expected, options.label
    fused_model = accelerate(_model(artifact, GPU), DecodeOptions())
    for label in ("graph+triton-gemv+fused-mlp+fused-step", "graph+compile+triton-gemv+fused-mlp+fused-step",
                  "graph+triton-gemv+fused-mlp+fused-step+pdl"):
        decoder = CudaDecoder(fused_model, 1, 64, DecodeOptions.from_label(label))
        decoder.warm_up()
        hopper = torch.cuda.get_device_capability(GPU)[0] >= 9
        assert decoder.path == ("fused step, PDL" if label.endswith("pdl") and hopper else "fused step")
        assert decoder.generate(prompts, 24) == expected, label
    # batches > 1 (layer by layer, the attention kernel, tuned GEMMs): three prompts of unequal lengths
    batch = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 2, 3, 5, 7]]
    expected = generate(_model(artifact, GPU), batch, SamplingParams(max_tokens=24), eos_id=None, pad_id=0)
    decoder = CudaDecoder(fused_model, 3, 64, DecodeOptions())
    decoder.warm_up()
    assert decoder.path == "layer by layer, fused attention (batch 3)"
    assert decoder.generate(batch, 24) == expected


def test_prefill_graphs_give_the_eager_prefills_state(home):
    """Captured prefills (one graph per prompt width, the least recently used evicted) leave the same first
    tokens, cache and decode state as the eager prefill, for new prompts replayed into an old width's graph."""
    from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate

    _, artifact = _artifact("llama-tiny", dtype="float32")
    options = DecodeOptions.from_label("graph+triton-gemv+fused-mlp+fused-step")
    model = accelerate(_model(artifact, GPU), options)
    eager = CudaDecoder(model, 2, 32, options, prefill_graphs=0)
    graphed = CudaDecoder(model, 2, 32, options, prefill_graphs=1)
    rounds = [[[5, 9, 2, 7], [4, 4]], [[1, 2, 3, 4, 5, 6], [8]], [[9, 9, 9, 1], [2, 3, 4]], [[7, 7], [6, 5]]]
    for prompts in rounds:  # widths 4, 6, 4 (re-captured after eviction), 2
        want, got = eager.prefill(prompts).clone(), graphed.prefill(prompts).clone()
        assert torch.equal(want, got), prompts
        for name in ("tokens", "positions", "slot"):
            assert torch.equal(getattr(eager, name), getattr(graphed, name)), name
        assert torch.equal(eager.cache.valid, graphed.cache.valid)
        assert torch.allclose(eager.cache.k[1], graphed.cache.k[1], atol=1e-6)
        assert len(graphed._prefill_cache) == 1


def test_tuning_times_every_gemm_and_keeps_the_tokens(home, monkeypatch):
    """FusedStep.tune (each GEMV's config timed over all layers' weights in a CUDA graph) picks one of autotuning's
    candidates for each of the step's five GEMMs, and the tuned step gives the autotuned step's tokens."""
    from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate
    from pipeline.kernels import gemv

    _, artifact = _artifact("llama-tiny", dtype="float32")
    options = DecodeOptions.from_label("graph+triton-gemv+fused-mlp+fused-step")
    model = accelerate(_model(artifact, GPU), options)
    prompts = [[5, 9, 2, 7, 1, 3, 8]]
    autotuned = CudaDecoder(model, 1, 64, options)
    monkeypatch.setattr(autotuned.fused, "tune", lambda *args, **kwargs: {})  # the reference: Triton's autotuner
    autotuned.warm_up()
    assert autotuned.fused.configs == {}
    want = autotuned.generate(prompts, 16)
    tuned = CudaDecoder(model, 1, 64, options)
    tuned.warm_up()
    assert set(tuned.fused.configs) == {"qkv", "dense", "mlp", "proj", "head"}
    assert all(config in gemv.CONFIGS for config in tuned.fused.configs.values())
    assert tuned.generate(prompts, 16) == want


def test_the_tuning_cache_gives_a_later_process_the_same_kernels(home, monkeypatch, tmp_path):
    """The choices timed on the GPU are written to the tuning cache; a later process (fresh in-process state) takes
    them without timing a config, and decodes the same tokens."""
    from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate
    from pipeline.kernels import tuning

    cache_file = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(cache_file))
    _, artifact = _artifact("llama-tiny", dtype="float32")
    options = DecodeOptions.from_label("graph+triton-gemv+fused-mlp+fused-step")
    model = accelerate(_model(artifact, GPU), options)
    prompts = [[5, 9, 2, 7, 1, 3, 8]]

    def new_process():
        monkeypatch.setattr(tuning, "_chosen", {})
        monkeypatch.setattr(tuning, "_loaded", {})

    new_process()
    first = CudaDecoder(model, 1, 64, options)
    first.warm_up()
    want = first.generate(prompts, 16)
    assert len([key for key in json.loads(cache_file.read_text()) if key.startswith("fused-gemv ")]) == 5
    new_process()

    def no_timing(*args, **kwargs):
        raise AssertionError("a config the tuning cache holds was timed again")

    monkeypatch.setattr(tuning, "graph_seconds", no_timing)
    second = CudaDecoder(model, 1, 64, options)
    second.warm_up()
    assert {k: str(c) for k, c in second.fused.configs.items()} == {k: str(c) for k, c in first.fused.configs.items()}
    assert second.generate(prompts, 16) == want


@pytest.mark.parametrize("norm, act, n, k", [(1, 1, 14336, 4096), (2, 2, 3072, 768), (0, 0, 4096, 14336)])
def test_fused_gemv_against_float64(norm, act, n, k):
    """Residual add, RMSNorm/LayerNorm, bias, silu-gate/GELU around the GEMV, bfloat16, Llama-3-8B/GPT-2 shapes."""
    from pipeline.kernels import common as fd
    from pipeline.kernels.gemv import fused_gemv

    x, r, g, b = (torch.randn(k, device=GPU).to(torch.bfloat16) for _ in range(4))
    rows = 2 * n if act == fd.ACT_SILU_GATE else n
    w = (torch.randn(rows, k, device=GPU) / k**0.5).to(torch.bfloat16)
    bias = torch.randn(rows, device=GPU).to(torch.bfloat16)
    y, h_out = fused_gemv(x, r if norm else None, g if norm else None, b if norm == fd.NORM_LAYER else None,
                             w, bias, None, None, 1e-5, norm, act, torch.float32)
    h = (x.double() + r.double()) if norm else x.double()
    if norm == fd.NORM_RMS:
        h = h * torch.rsqrt(h.pow(2).mean() + 1e-5) * g.double()
    elif norm == fd.NORM_LAYER:
        h = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5) * g.double() + b.double()
    ref = w.double() @ h + bias.double()
    if act == fd.ACT_SILU_GATE:
        fc, gate = ref.chunk(2)
        ref = torch.nn.functional.silu(fc) * gate
    elif act == fd.ACT_GELU:
        ref = torch.nn.functional.gelu(ref, approximate="tanh")
    assert y.shape == (n,) and rel_err(y, ref) < 1.5e-2  # bfloat16 rounding of the norm and activation inputs
    if norm:
        assert torch.equal(h_out, (x.float() + r.float()).to(torch.bfloat16))


def test_pdl_changes_no_result():
    """Programmatic dependent launch (the first weight tile loaded before the wait) gives the same bits, kernel
    after kernel."""
    from pipeline.kernels import common as fd
    from pipeline.kernels import gemv

    k, n = 4096, 6144
    x, r, g = (torch.randn(k, device=GPU).to(torch.bfloat16) for _ in range(3))
    w = (torch.randn(n, k, device=GPU) / k**0.5).to(torch.bfloat16)

    def chain(pdl):  # three dependent launches: each reads the previous one's output
        y = x
        for _ in range(3):
            y, _ = gemv.fused_gemv(y[:k], r, g, None, w, None, None, None, 1e-5, fd.NORM_RMS, fd.ACT_NONE,
                                   torch.bfloat16, pdl)
        return y

    assert torch.equal(chain(True), chain(False))


def test_fused_fp8_gemv_with_rmsnorm_equals_the_fp8_emulation():
    from pipeline.kernels import common as fd
    from pipeline.kernels import gemv

    k, n = 4096, 6144
    x, r, g = (torch.randn(k, device=GPU).to(torch.bfloat16) for _ in range(3))
    h = (x.float() + r.float()).to(torch.bfloat16)
    xn = g * (h.float() * torch.rsqrt(h.float().pow(2).mean() + 1e-5)).to(torch.bfloat16)  # RankModel._norm
    w = torch.randn(n, k, device=GPU) / k**0.5
    sa, sw = fp8_scale(xn.float().abs().max()).to(GPU), fp8_scale(w.abs().max()).to(GPU)
    wq = quantize_fp8(w, sw)
    y, _ = gemv.fused_gemv(x, r, g, None, wq, None, sa, sw, 1e-5, fd.NORM_RMS, fd.ACT_NONE, torch.float32)
    ref = fp8_linear(xn[None].cpu(), wq.cpu(), sa.cpu(), sw.cpu(), None, torch.float32)[0]
    assert rel_err(y, ref) < 1e-2  # a few inputs may round to the neighbouring E4M3 value (sums in another order)


def test_gpu_logits_match_the_cpu_reference(home):
    from transformers import AutoModelForCausalLM

    source, artifact = _artifact("llama-tiny", "bfloat16")
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    gpu = score(_model(artifact, GPU), ids).cpu()
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    assert rel_err(gpu, reference) < 2e-2  # bfloat16 weights and activations
    assert (gpu.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


def test_fp8_on_the_gpu_matches_the_cpu_emulation(home):
    """GPU (torch._scaled_mm) and CPU (exact emulation) run one FP8 checkpoint; they differ only where float16
    activations, summed in another order, tip an FP8 rounding: far less than FP8 differs from float16 itself."""
    _, artifact = _artifact("llama-tiny", "float16", "fp8")
    _, plain = _artifact("llama-tiny", "float16", "none")
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    gpu = score(_model(artifact, GPU), ids).cpu()
    cpu = score(_model(artifact, CPU), ids)
    quantization_error = rel_err(cpu, score(_model(plain, CPU), ids))
    assert rel_err(gpu, cpu) < 0.5 * quantization_error
    assert (gpu.argmax(-1) == cpu.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("rows", [32, 5])
@pytest.mark.parametrize("n, k, bias", [(6144, 4096, False), (4096, 14336, True)])
def test_batched_gemm_every_config_against_float64(rows, n, k, bias):
    """The split-K swap-AB GEMM (pipeline.kernels.batched_gemm) at Llama-3-8B shapes in bfloat16, every config
    tuning may time; a split-K config twice, for the counters' reset (the same bits again)."""
    from pipeline.kernels import batched_gemm

    x = torch.randn(rows, k, device=GPU).to(torch.bfloat16)
    w = (torch.randn(n, k, device=GPU) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, device=GPU).to(torch.bfloat16) if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    indices = batched_gemm.candidates(n, k)
    assert any(batched_gemm.CONFIGS[i].kwargs["SPLIT_K"] > 1 for i in indices)
    ran = 0
    for index in indices:
        try:
            y = batched_gemm.skinny_mm(x, w, b, index)
        except Exception as exc:  # noqa: BLE001 - tuning skips a config this GPU cannot fit in shared memory
            assert "OutOfResources" in type(exc).__name__, exc
            continue
        ran += 1
        assert y.shape == (rows, n) and y.dtype == torch.bfloat16
        assert rel_err(y, ref) < 1e-2, batched_gemm.CONFIGS[index]
        if batched_gemm.CONFIGS[index].kwargs["SPLIT_K"] > 1:
            assert torch.equal(batched_gemm.skinny_mm(x, w, b, index), y)
    assert ran >= len(indices) // 2


def test_tuned_gemm_decode_gives_the_cublas_steps_logits(home, monkeypatch):
    """Batch 3, compiled and in a CUDA graph, with every GEMM forced onto the split-K kernel: the greedy tokens of
    the step with cuBLAS's GEMMs, torch's attention and torch's argmax."""
    from pipeline.backends.cuda_decode import (
        CudaDecoder,
        DecodeOptions,
        accelerate,
        forget_batched_gemms,
        tune_batched_gemms,
    )
    from pipeline.kernels import tuning

    _, artifact = _artifact("llama-tiny", dtype="float16")
    options = DecodeOptions.from_label("graph+compile+cublas+fused-mlp")
    model = accelerate(_model(artifact, GPU), options)
    batch = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 2, 3, 5, 7]]
    eager = DecodeOptions(cuda_graph=False, compile=False, triton_gemv=False)
    plain = CudaDecoder(model, 3, 64, eager)
    plain.attention, plain.fused_argmax = None, False  # the reference: torch's attention and argmax
    plain.warm_up()
    forget_batched_gemms(model)  # and cuBLAS's GEMMs (an eager step reads the choice at each call)
    want = plain.generate(batch, 16)

    def timer(run):  # the kernel "wins" every shape (a config that cannot run raises: tuning skips it)
        run()
        return 1.0 if run.config < 0 else 0.5

    monkeypatch.setattr(tuning, "_chosen", {})
    chosen = tune_batched_gemms(model, 3, timer=timer)
    assert chosen and not any(c.startswith("cuBLAS") for c in chosen.values()), chosen
    decoder = CudaDecoder(model, 3, 64, options)
    decoder.warm_up()  # tunes again: the forced choices are kept for the process
    assert decoder.path == "layer by layer, fused attention (batch 3)"
    assert all(linear.skinny[16] >= 0 for layer in model.layers for key, linear in layer.items()
               if key in ("qkv", "dense", "fc_gate", "proj"))
    assert decoder.generate(batch, 16) == want


def test_batched_gemm_silu_gate_at_the_8b_shape():
    """The gated MLP's fused GEMM (14336 x 2 rows, K 4096) at 32 rows with silu(fc) * gate in the epilogue, every
    config tuning may time, against float64 sums rounded as the unfused ops round."""
    from pipeline.kernels import batched_gemm
    from pipeline.kernels.common import ACT_SILU_GATE

    n, k, bf = 14336, 4096, torch.bfloat16
    x = torch.randn(32, k, device=GPU).to(bf)
    w = (torch.randn(2 * n, k, device=GPU) / k**0.5).to(bf)
    fc, gate = (x.double() @ w.double().T).chunk(2, dim=-1)
    want = torch.nn.functional.silu(fc.to(bf).float()).to(bf).double() * gate.to(bf).double()
    ran = 0
    for index in batched_gemm.candidates(n, k, ACT_SILU_GATE):  # those whose two tiles fit
        y = batched_gemm.skinny_mm(x, w, None, index, ACT_SILU_GATE)
        ran += 1
        assert y.shape == (32, n) and rel_err(y, want) < 1e-2, batched_gemm.CONFIGS[index]
    assert ran >= 4
