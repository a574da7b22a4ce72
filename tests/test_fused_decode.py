"""The fused batch-1 decode step (pipeline.backends.fused_step) and its kernels (pipeline.kernels) against the model's own layer-by-layer step.

On a GPU the kernels run compiled; on the CPU in Triton's emulator (TRITON_INTERPRET=1, set by conftest.py), so
these tests need the `triton` package and a CPU-only install without it skips them. The emulator rounds float32 ->
FP8 wrongly for some values, so FP8 is checked here with inputs FP8 represents exactly; tests/test_gpu.py checks
the real conversion, and bfloat16 (whose dots the emulator gets wrong)."""

import json
import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET before triton loads"

from pipeline.backends.cuda_decode import CudaDecoder, DecodeOptions, accelerate  # noqa: E402
from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config  # noqa: E402
from pipeline.build import Builder  # noqa: E402
from pipeline.dist import Comm  # noqa: E402
from pipeline.kernels import attention, gemv, sampling, tuning  # noqa: E402
from pipeline.kernels.common import ACT_GELU, ACT_NONE, ACT_SILU_GATE, NORM_LAYER, NORM_NONE, NORM_RMS  # noqa: E402
from pipeline.mapping import Mapping  # noqa: E402
from pipeline.quantize.formats import fp8_linear, fp8_scale, quantize_fp8  # noqa: E402
from pipeline.recipe import recipe_from_dict  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # compiled on a GPU, emulated on the CPU
# programmatic dependent launch (on by default) needs Hopper: the fused step drops it elsewhere
HOPPER = DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] >= 9


def _model(shape: str, dtype: str):
    recipe = recipe_from_dict({"model": {"random": shape}, "precision": {"dtype": dtype}}, name=f"fused-{shape}")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    config = read_checkpoint_config(artifact)
    return load_rank_model(artifact, config, Comm(Mapping(1, 1, 0), DEVICE), DEVICE)


@pytest.mark.parametrize("shape, dtype, tol", [
    ("llama-tiny", "float32", 1e-5), pytest.param("gpt2-tiny", "float32", 1e-5, marks=pytest.mark.slow),
    pytest.param("llama-tiny-tied", "float16", 5e-3, marks=pytest.mark.slow)])
def test_fused_step_matches_the_layer_by_layer_step(home, shape, dtype, tol):
    """Batch 1: the fused step's GEMV and attention kernels against torch's ops, layer by layer."""
    fused = DecodeOptions(cuda_graph=False, compile=False, fused_step=True)
    _compare_steps(shape, dtype, tol, 1, fused, "fused step, PDL" if HOPPER else "fused step")


@pytest.mark.slow
def test_tuning_keeps_the_fastest_config_per_gemm_for_the_process(home, monkeypatch):
    """FusedStep.tune with a stand-in timer (a GPU times each config over all layers in a CUDA graph): each GEMM
    keeps its fastest candidate, a second decoder of the model reuses the choices without timing, and the step
    with them gives the untuned step's logits (the emulator runs its one config; the GPU test runs the tuned
    ones)."""
    monkeypatch.setattr(tuning, "_chosen", {})
    options = DecodeOptions(cuda_graph=False, compile=False)
    model = accelerate(_model("llama-tiny", "float32"), options)
    speed = {id(c): i for i, c in enumerate(gemv.CONFIGS)}  # stand-in: later configs time faster
    timed = []

    def timer(run):
        config = run.config
        timed.append(config)
        return 1.0 / (1 + speed[id(config)])

    tuned = CudaDecoder(model, 1, 24, options)
    chosen = tuned.fused.tune(timer=timer)
    assert set(chosen) == set(tuned.fused.configs) == {"qkv", "dense", "mlp", "proj", "head"}
    expected_timings = 0
    for name, (gemms, _, act, _) in tuned.fused._gemv_calls().items():
        rows, k = gemms[0].weight.shape
        n = rows // 2 if act == ACT_SILU_GATE else rows
        candidates = gemv._prune(gemv.CONFIGS, {"N": n, "K": k}, FP8=False)
        assert tuned.fused.configs[name] is candidates[-1], name
        assert chosen[name].startswith(f"{candidates[-1]} (") and "GB/s" in chosen[name], chosen[name]
        expected_timings += len(candidates)
    assert len(timed) == expected_timings  # every candidate of every GEMM, once
    again = CudaDecoder(model, 1, 24, options)
    calls = len(timed)
    assert again.fused.tune(timer=timer) == {} and len(timed) == calls  # reused: nothing timed, nothing new
    assert again.fused.configs == tuned.fused.configs
    plain = CudaDecoder(model, 1, 24, options)
    prompt = [[3, 14, 15, 92, 65]]
    for decoder in (plain, tuned):
        decoder.prefill(prompt)
    for _ in range(2):  # the emulator: the same config, the same logits; a GPU: other tiles, other sum orders
        got, want = tuned._step(), plain._step()
        assert torch.equal(got, want) if DEVICE.type == "cpu" else torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_tuning_cache_keeps_choices_across_processes(home, monkeypatch, tmp_path):
    """Choices timed once are written to the tuning cache; a later process (fresh in-process state) takes them
    without timing, even where its own timings would choose otherwise; PIPELINE_TUNING_CACHE=0 times afresh; a
    changed candidate list is timed again; an unreadable file is an error that names it and the fix."""
    from pipeline.errors import PipelineError

    assert tuning.path_for(torch.device("cpu")).parent == home / "timing-cache"
    assert tuning.path_for(torch.device("cpu")).name.endswith("-tuning-v1.json")
    cache_file = tmp_path / "tuning.json"
    monkeypatch.setenv(tuning.ENV, str(cache_file))
    options = DecodeOptions(cuda_graph=False, compile=False)
    model = accelerate(_model("llama-tiny", "float32"), options)
    speed = {id(c): i for i, c in enumerate(gemv.CONFIGS)}
    timed = []

    def new_process():  # what a new process starts from: nothing tuned, nothing read
        monkeypatch.setattr(tuning, "_chosen", {})
        monkeypatch.setattr(tuning, "_loaded", {})

    def tune(later_faster: bool):
        def timer(run):
            timed.append(run)
            rank = speed[id(run.config)]
            return 1.0 / (1 + rank) if later_faster else 1.0 + rank
        decoder = CudaDecoder(model, 1, 24, options)
        return decoder.fused.tune(timer=timer, persist=True), decoder.fused.configs

    def candidates(name):
        gemms, _, act, _ = decoder_calls[name]
        rows, k = gemms[0].weight.shape
        return gemv._prune(gemv.CONFIGS, {"N": rows // 2 if act else rows, "K": k}, FP8=False)

    new_process()
    decoder_calls = CudaDecoder(model, 1, 24, options).fused._gemv_calls()
    first, configs = tune(later_faster=True)
    stored = json.loads(cache_file.read_text())
    assert len(stored) == 5 and all(key.startswith("fused-gemv ") for key in stored)
    assert sorted(stored.values()) == sorted(str(candidates(name)[-1]) for name in first)
    new_process()
    calls = len(timed)
    second, configs = tune(later_faster=False)  # its own timings would take each GEMM's first candidate
    assert len(timed) == calls, "a cached choice is not timed again"
    assert all(configs[name] is candidates(name)[-1] for name in configs) and len(configs) == 5
    assert all(text.endswith("(tuning cache)") for text in second.values())
    new_process()
    monkeypatch.setenv(tuning.ENV, "0")
    _, configs = tune(later_faster=False)
    assert all(configs[name] is candidates(name)[0] for name in configs) and len(timed) > calls
    assert json.loads(cache_file.read_text()) == stored, "with the cache off nothing is written"
    monkeypatch.setenv(tuning.ENV, str(cache_file))
    new_process()
    dropped = candidates("qkv")[-1]  # a release without qkv's cached choice: its candidates changed
    monkeypatch.setattr(gemv, "CONFIGS", [c for c in gemv.CONFIGS if c is not dropped])
    calls = len(timed)
    _, configs = tune(later_faster=False)
    assert len(timed) > calls and configs["qkv"] is candidates("qkv")[0]
    assert len(json.loads(cache_file.read_text())) > 5  # the new choices beside the old
    new_process()
    cache_file.write_text('{"fused-gemv qkv": ')
    with pytest.raises(PipelineError, match=f"tuning cache {cache_file}: unreadable.*Delete the file"):
        tune(later_faster=True)
    assert cache_file.read_text() == '{"fused-gemv qkv": ', "an unreadable cache is left as it was"


@pytest.mark.parametrize("shape", ["llama-tiny", "gpt2-tiny"])
def test_fused_attention_in_the_layer_by_layer_step(home, shape):
    """Batches > 1: the layer-by-layer step with the decode attention kernel, prompts of unequal lengths."""
    options = DecodeOptions(cuda_graph=False, compile=False)
    _compare_steps(shape, "float32", 1e-5, 3, options, "layer by layer, fused attention (batch 3)")


def _torch_decoder(model, batch: int, max_len: int) -> CudaDecoder:
    """The layer-by-layer decoder with torch's attention and argmax in place of the kernels: the reference."""
    decoder = CudaDecoder(model, batch, max_len, DecodeOptions(cuda_graph=False, compile=False, fused_step=False))
    decoder.attention, decoder.fused_argmax = None, False
    return decoder


def _compare_steps(shape, dtype, tol, batch, fused, path):
    """Four decode steps of `fused` against the plain layer-by-layer step: logits, tokens, caches."""
    plain = DecodeOptions(cuda_graph=False, compile=False, fused_step=False)
    reference = _torch_decoder(accelerate(_model(shape, dtype), plain), batch, 24)
    decoder = CudaDecoder(accelerate(_model(shape, dtype), fused), batch, 24, fused)
    assert decoder.path == path
    prompt = [[3, 14, 15, 92, 65, 7, 1], [2, 71, 82], [5, 9, 26, 53, 58]][:batch]
    reference.prefill(prompt)
    decoder.prefill(prompt)
    for _ in range(4):  # logits, tokens and the cache each step
        want, got = reference._step(), decoder._step()
        assert ((got - want).norm() / want.norm()).item() < tol
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        for layer in (0, len(decoder.cache.k) - 1):
            assert torch.allclose(decoder.cache.k[layer].float(), reference.cache.k[layer].float(), atol=tol * 10)
            assert torch.allclose(decoder.cache.v[layer].float(), reference.cache.v[layer].float(), atol=tol * 10)
    assert torch.equal(decoder.history, reference.history)


def test_fused_gemv_prologue_and_epilogue_against_float64():
    torch.manual_seed(0)
    K, N = 200, 24  # K not a multiple of the block: the ragged path
    x, r, g, b = (torch.randn(K, device=DEVICE) for _ in range(4))
    w, bias = torch.randn(2 * N, K, device=DEVICE) / K**0.5, torch.randn(2 * N, device=DEVICE)
    h = (x + r).double()
    rms = h * torch.rsqrt(h.pow(2).mean() + 1e-5) * g.double()
    layer = (h - h.mean()) / torch.sqrt(h.var(unbiased=False) + 1e-5) * g.double() + b.double()
    wd, bd = w.double(), bias.double()

    def run(norm, act, weight=w, with_bias=True):
        return gemv.fused_gemv(x, r, g, b if norm == NORM_LAYER else None, weight,
                                       bias[: weight.shape[0]] if with_bias and act != ACT_SILU_GATE
                                       else (bias if with_bias else None), None, None, 1e-5, norm, act, torch.float32)

    y, h_out = run(NORM_RMS, ACT_SILU_GATE)
    fc, gate = (wd @ rms + bd).chunk(2)
    assert torch.allclose(h_out.double(), h, atol=1e-6)
    assert torch.allclose(y.double(), torch.nn.functional.silu(fc) * gate, atol=1e-4)
    y, _ = run(NORM_LAYER, ACT_GELU, w[:N])
    want = torch.nn.functional.gelu(wd[:N] @ layer + bd[:N], approximate="tanh")
    assert torch.allclose(y.double(), want, atol=1e-4)
    y, _ = run(NORM_RMS, ACT_NONE, w[:N], with_bias=False)
    assert torch.allclose(y.double(), wd[:N] @ rms, atol=1e-4)


def test_fused_fp8_gemv_is_an_fp8_gemm():
    torch.manual_seed(1)
    K, N = 256, 48  # torch._scaled_mm (the GPU reference) wants multiples of 16
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    sw = fp8_scale(w.abs().max()).to(DEVICE)
    wq = quantize_fp8(w, sw)
    x = torch.randn(1, K, device=DEVICE).half() * 3
    sa = fp8_scale(x.float().abs().max()).to(DEVICE)
    x = (quantize_fp8(x.float(), sa).float() * sa).half()  # exactly representable: no emulator rounding involved
    y, _ = gemv.fused_gemv(x, None, None, None, wq, None, sa, sw, 1e-5, NORM_NONE,
                                   ACT_NONE, torch.float32)
    # on the CPU: exact FP8 products with float32 sums (cuBLAS's FP8 GEMM on a GPU need not sum in float32)
    want = fp8_linear(x.cpu(), wq.cpu(), sa.cpu(), sw.cpu(), None, torch.float32)[0]
    assert ((y.cpu() - want).norm() / want.norm()).item() < 1e-5  # the same products; the sums differ in order


@pytest.mark.parametrize("norm, fp8", [(NORM_LAYER, False), (NORM_RMS, True)])
def test_statistics_pass_over_several_blocks_gives_the_same_gemv(monkeypatch, norm, fp8):
    """The statistics pass (LayerNorm's mean and variance; RMSNorm's before FP8 quantizes the normalized row) reads
    the row in blocks of STATS_K (K rounded up to a power of 2, at most STATS_K_MAX): one block at the 8B shape.
    With the cap at 64, K = 300 takes five blocks, the last one ragged: the same GEMV within rounding."""
    torch.manual_seed(5)
    K, N = 300, 16
    x, r, g, nb = (torch.randn(K, device=DEVICE).half() for _ in range(4))
    w = torch.randn(N, K, device=DEVICE) / K**0.5
    sw = fp8_scale(w.abs().max()).to(DEVICE)
    weight = quantize_fp8(w, sw) if fp8 else w.half()
    scales = (fp8_scale(torch.tensor(4.0)).to(DEVICE), sw) if fp8 else (None, None)

    def run():
        return gemv.launch_fused_gemv(x, r, g, nb if norm == NORM_LAYER else None, weight, None,
                                              *scales, 1e-5, norm, ACT_NONE, torch.float32)

    one_block, one_h = run()
    monkeypatch.setattr(gemv, "STATS_K_MAX", 64)
    blocks, blocks_h = run()
    assert torch.equal(blocks_h, one_h)
    assert ((blocks - one_block).norm() / one_block.norm()).item() < (2e-2 if fp8 else 1e-3)


def _gated_gemv_inputs(seed: int, K: int, N: int, fp8: bool) -> tuple:
    """A gated GEMV's fp16 input row, residual and norm weight, its [2N, K] weight (FP8 or fp16) and scales."""
    torch.manual_seed(seed)
    x, r, g = (torch.randn(K, device=DEVICE).half() for _ in range(3))
    w = torch.randn(2 * N, K, device=DEVICE) / K**0.5
    sw = fp8_scale(w.abs().max()).to(DEVICE)
    weight = quantize_fp8(w, sw) if fp8 else w.half()
    scales = (fp8_scale(torch.tensor(4.0)).to(DEVICE), sw) if fp8 else (None, None)
    return x, r, g, weight, scales


@pytest.mark.parametrize("fp8", [False, True])
def test_grouped_accumulator_gives_the_same_gemv(monkeypatch, fp8):
    """The CUDA-core form with its products summed in groups of ACC_R neighbours before they are accumulated
    (a smaller accumulator) against ACC_R = 1: RMSNorm and silu-gate around it, K not a multiple of the block.
    Only the order of the float32 sums differs."""
    K, N = 200, 32
    x, r, g, weight, scales = _gated_gemv_inputs(9, K, N, fp8)

    def run(acc_r):
        if DEVICE.type == "cpu":
            monkeypatch.setitem(gemv.INTERPRETER_CONFIG, "ACC_R", acc_r)
            return gemv.fused_gemv(x, r, g, None, weight, None, *scales, 1e-5, NORM_RMS,
                                           ACT_SILU_GATE, torch.float32)[0]
        y = torch.empty(N, device=DEVICE)
        h = torch.empty(K, device=DEVICE, dtype=x.dtype)
        gemv._fused_gemv_gpu[(triton.cdiv(N, 4),)](
            x, r, h, g, y, weight, y, y, *(scales if fp8 else (y, y)), y, y, N, K, 1e-5, ADD_RESIDUAL=True, NORM=1,
            HAS_BIAS=False, FP8=fp8, ACT=1, W_F32=False, BLOCK_N=4, BLOCK_K=64, USE_DOT=0, ACC_R=acc_r)
        return y

    plain = run(1)
    for acc_r in (4, 8):
        grouped = run(acc_r)
        assert ((grouped - plain).norm() / plain.norm()).item() < 1e-5, acc_r


@pytest.mark.parametrize("norm, act", [(1, 1), (0, 0)])
def test_split_k_fp8_gemv_sums_the_same_products(monkeypatch, norm, act):
    """Split-K (each program a share of K, the last to finish adds the shares up and runs the epilogue) against
    the unsplit GEMV: FP8 weights, the RMSNorm's statistics pass and silu-gate, or neither; twice in a row (the
    counters must be back at 0 for the second call)."""
    torch.manual_seed(3)
    K, N = 512, 48
    rows = 2 * N if act == ACT_SILU_GATE else N
    w = torch.randn(rows, K, device=DEVICE) / K**0.5
    sw = fp8_scale(w.abs().max()).to(DEVICE)
    wq = quantize_fp8(w, sw)
    sa = fp8_scale(torch.tensor(4.0)).to(DEVICE)
    g = torch.rand(K, device=DEVICE).half() + 0.5

    def run(split, x, r):
        args = (x, r if norm else None, g if norm else None, None, wq, None, sa, sw, 1e-5, norm, act, torch.float32)
        if DEVICE.type == "cpu":
            monkeypatch.setitem(gemv.INTERPRETER_CONFIG, "SPLIT_K", split)
            return gemv.fused_gemv(*args)
        y = torch.empty(N, device=DEVICE)
        h = torch.empty(K if norm else 0, device=DEVICE, dtype=x.dtype)
        part, counter = gemv.gemv_split_buffers(DEVICE, N)
        gemv._fused_gemv_gpu[(triton.cdiv(N, 64), split)](
            x, r if norm else y, h if norm else y, g if norm else y, y, wq, y, y, sa, sw, part, counter, N, K, 1e-5,
            ADD_RESIDUAL=bool(norm), NORM=norm, HAS_BIAS=False, FP8=True, ACT=act, W_F32=False, BLOCK_N=64,
            BLOCK_K=128, USE_DOT=2, SPLIT_K=split)
        return y, h

    for call in range(2):
        x, r = torch.randn(K, device=DEVICE).half(), torch.randn(K, device=DEVICE).half()
        (want, want_h), (got2, h2), (got4, h4) = run(1, x, r), run(2, x, r), run(4, x, r)
        for got, h in ((got2, h2), (got4, h4)):
            assert ((got - want).norm() / want.norm()).item() < 1e-5, call
            assert torch.equal(h, want_h)  # x + r, each share's part written by its own programs


def _decode_attention_float64(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads, kv_heads, head_size):
    """decode_attention in float64: rotate-half rope at `positions`, the new k, v at `slot`, softmax over the new
    token and the valid slots before it (those after it are not attended, as RankModel.attention_mask has it).
    Returns (out [B, heads * head_size], rotated k and v [B, kv_heads, head_size])."""
    batch, group = qkv.shape[0], heads // kv_heads
    x = qkv.double().view(batch, heads + 2 * kv_heads, head_size)
    q, k, v = x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:]
    angle = positions.double()[:, None, None] * inv_freq.double()
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def rotate(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rotate(q), rotate(k)
    keys, values, mask = k_cache.double().clone(), v_cache.double().clone(), valid.clone()
    keys[:, :, slot], values[:, :, slot], mask[:, slot] = k, v, True
    mask[:, slot + 1:] = False
    values = values.masked_fill(~mask[:, None, :, None], 0.0)  # a slot that is not attended adds nothing
    scores = torch.einsum("bhgd,bhsd->bhgs", q.view(batch, kv_heads, group, head_size), keys) / head_size ** 0.5
    probs = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bhgs,bhsd->bhgd", probs, values).reshape(batch, -1), k, v


@pytest.mark.parametrize("splits,block_s,preload", [(1, 64, False), (2, 64, False), (3, 64, False), (2, 16, False),
                                                     (5, 16, False), (1, 64, True), (3, 64, True), (2, 16, True)])
def test_split_decode_attention_against_float64(splits, block_s, preload):
    """Flash-decoding (the slots before the new token's split over programs, the last one to finish combining):
    160 slots, the new token at 100 and 101, so 64-slot blocks give 2 blocks to share (3 splits: one empty) and
    16-slot ones 7 (each split loops over several). Valid slots after the new token's are not attended. Two calls
    in a row: the second only combines if the first set its counters back to 0. 1 split is the unsplit kernel.
    preload: each split's first block loaded before the qkv row (the kernel's PRELOAD), the same result."""
    torch.manual_seed(5)
    batch, heads, kv_heads, head_size, max_len = 2, 8, 2, 16, 160
    k_cache = torch.randn(batch, kv_heads, max_len, head_size, device=DEVICE)
    v_cache = torch.randn(batch, kv_heads, max_len, head_size, device=DEVICE)
    valid = torch.rand(batch, max_len, device=DEVICE) < 0.7
    valid[0, 64:100] = False  # sequence 0: nothing to attend in its second 64-slot block
    valid[1, :12] = False  # sequence 1 left-padded
    v_cache[1, :, :12] = float("nan")  # what a slot that is not valid holds is never used
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_size, 2, device=DEVICE).float() / head_size)
    positions = torch.tensor([100, 88], device=DEVICE)
    slot = torch.tensor(100, device=DEVICE)
    for call in range(2):
        valid[:, slot] = True  # as the decoder marks the new token's slot before the step
        qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_size, device=DEVICE)
        before = k_cache.clone(), v_cache.clone()
        want, k, v = _decode_attention_float64(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads,
                                               kv_heads, head_size)
        got = attention.launch_decode_attention(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads,
                                                   kv_heads, head_size, False, splits, block_s, preload=preload)
        assert torch.allclose(got.double(), want, atol=1e-4), (call, (got.double() - want).abs().max().item())
        assert torch.allclose(k_cache[:, :, slot].double(), k, atol=1e-5)
        assert torch.equal(v_cache[:, :, slot], v.float())
        others = torch.arange(max_len, device=DEVICE) != slot
        assert torch.equal(k_cache[:, :, others], before[0][:, :, others])
        assert torch.equal(v_cache[:, :, others].nan_to_num(), before[1][:, :, others].nan_to_num())
        positions, slot = positions + 1, slot + 1  # the next step: the token just written is attended


def test_decode_attention_op_reads_no_slot_after_the_new_one():
    """The op (attention_splits' choice of splits): valid slots after the new token's change nothing."""
    torch.manual_seed(6)
    batch, heads, kv_heads, head_size, max_len = 1, 4, 2, 16, 96
    k_cache = torch.randn(batch, kv_heads, max_len, head_size, device=DEVICE)
    v_cache = torch.randn(batch, kv_heads, max_len, head_size, device=DEVICE)
    valid = torch.zeros(batch, max_len, dtype=torch.bool, device=DEVICE)
    valid[:, :71] = True
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_size, device=DEVICE)
    positions, slot = torch.tensor([70], device=DEVICE), torch.tensor(70, device=DEVICE)
    outs = []
    for after in (False, True):
        valid[:, 71:] = after
        outs.append(torch.ops.pipeline.decode_attention(qkv, k_cache.clone(), v_cache.clone(), valid, positions, slot,
                                                        None, heads, kv_heads, head_size))
    assert torch.equal(outs[0], outs[1])
    want, _, _ = _decode_attention_float64(qkv, k_cache, v_cache, valid, positions, slot,
                                           torch.zeros(head_size // 2, device=DEVICE), heads, kv_heads, head_size)
    assert torch.allclose(outs[0].double(), want, atol=1e-4)


def test_decode_attention_for_many_sequences_against_float64():
    """136 (sequence, KV head) pairs: the op's choice is one program each (no split; on a GPU without software
    pipelining, attention_stages), over several blocks of slots."""
    torch.manual_seed(7)
    batch, heads, kv_heads, head_size, max_len = 17, 32, 8, 16, 200
    assert attention.attention_splits(batch, kv_heads, max_len) == 1
    k_cache = torch.randn(batch, kv_heads, max_len, head_size, device=DEVICE)
    v_cache = torch.randn(batch, kv_heads, max_len, head_size, device=DEVICE)
    valid = torch.rand(batch, max_len, device=DEVICE) < 0.8
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_size, 2, device=DEVICE).float() / head_size)
    positions = torch.arange(150, 150 + batch, device=DEVICE)
    slot = torch.tensor(150, device=DEVICE)
    valid[:, slot] = True
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_size, device=DEVICE)
    want, _, _ = _decode_attention_float64(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads, kv_heads,
                                           head_size)
    got = torch.ops.pipeline.decode_attention(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads,
                                              kv_heads, head_size)
    assert torch.allclose(got.double(), want, atol=1e-4), (got.double() - want).abs().max().item()


@pytest.mark.parametrize("batch, vocab", [(1, 128256), (3, 5000), (4, 1000)])
def test_greedy_argmax_is_torchs_first_maximum(batch, vocab):
    """greedy_argmax against torch.argmax: rows with a row stride longer than the vocabulary, a tie across blocks
    (the first wins), a row of equal values (index 0), a NaN (counted as +inf); twice in a row (counters reset)."""
    torch.manual_seed(8)
    logits = torch.randn(batch, vocab + 7, device=DEVICE)[:, :vocab]
    logits[0, 77] = logits[0, vocab - 1] = 50.0
    if batch > 1:
        logits[1] = 1.0
    if batch > 2:
        logits[2, vocab // 2] = float("nan")
    want = torch.where(logits.isnan(), float("inf"), logits).argmax(-1)
    for _ in range(2):
        assert torch.equal(torch.ops.pipeline.greedy_argmax(logits), want)


def test_decoder_with_the_fused_argmax_gives_the_same_tokens(home, monkeypatch):
    """The prefill and the decode steps pick their tokens with greedy_argmax: torch.argmax's tokens."""
    model = accelerate(_model("llama-tiny", "float32"), DecodeOptions())
    options = DecodeOptions(cuda_graph=False, compile=False, fused_step=False)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6]]
    kernel, launches = sampling._greedy_argmax_kernel, []

    class Counted:  # the kernel, its launches counted
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sampling, "_greedy_argmax_kernel", Counted())
    runs = []
    for fused_argmax in (False, True):
        decoder = CudaDecoder(model, 2, 32, options)
        assert decoder.fused_argmax
        decoder.fused_argmax = fused_argmax  # the reference: torch.argmax
        decoder.warm_up()
        runs.append(decoder.generate(prompts, 8))
        assert bool(launches) == fused_argmax  # each step's pick: warm-up's, the prefill's, 7 decode steps'
    assert runs[0] == runs[1] and len(runs[0][0]) == 8
    warm_up = 3 if DEVICE.type == "cuda" else 1  # a GPU's warm-up runs 3 steps before capturing none (no graph)
    assert len(launches) == warm_up + 1 + 7 and launches[0] == (2, 1)


def test_attention_splits_fill_the_gpu_with_at_least_a_block_each():
    """(sequence, KV head) pairs x splits reach ~264 programs (2 per SM of an H100/H200), each split >= 64 slots."""
    assert attention.attention_splits(1, 8, 384) == 6  # Llama-3-8B at batch 1: 6 blocks, one each
    assert attention.attention_splits(1, 8, 2048) == 32  # 33 wanted, 32 blocks
    assert attention.attention_splits(16, 8, 384) == 3  # 128 pairs: 3 splits of 2 blocks
    assert attention.attention_splits(10, 8, 384) == 3  # 4 wanted: 2 blocks each already needs only 3
    assert attention.attention_splits(64, 8, 384) == 1  # 512 pairs fill the GPU: no split
    assert attention.attention_splits(32, 8, 384) == 1  # 256 pairs: combining splits costs more than it gains
    assert attention.attention_splits(2, 2, 80) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning runs on a GPU only")
def test_autotuning_without_the_swap_ab_forms_computes_the_same_gemv(monkeypatch):
    """Where autotuning over every form fails (a config this GPU's Triton cannot compile), the known forms take over."""
    torch.manual_seed(3)
    K, N = 512, 40
    x, r, g = (torch.randn(K, device=DEVICE) for _ in range(3))
    w = torch.randn(N, K, device=DEVICE) / K**0.5

    def run():
        return gemv.fused_gemv(x, r, g, None, w, None, None, None, 1e-5, NORM_RMS,
                                       ACT_NONE, torch.float32)[0]

    tuned = run()
    monkeypatch.setattr(gemv, "_autotune_failed", ["a config did not compile"])
    assert torch.allclose(run(), tuned, rtol=1e-5, atol=1e-6)


def test_unsupported_models_fall_back_with_the_reason(home):
    options = DecodeOptions(cuda_graph=False, compile=False, fuse_gate_up=False)
    decoder = CudaDecoder(accelerate(_model("llama-tiny", "float32"), options), 1, 16, options)
    assert decoder.fused is None and "gate and fc are not fused" in decoder.path
    batched = CudaDecoder(_model("gpt2-tiny", "float32"), 2, 16, DecodeOptions(cuda_graph=False, compile=False))
    assert batched.fused is None and batched.path == "layer by layer, fused attention (batch 2)"
    quantized_kv = _model("llama-tiny", "float32")
    quantized_kv.kv_format = "int8"  # a cache the attention kernel does not read
    plain = CudaDecoder(quantized_kv, 2, 16, DecodeOptions(cuda_graph=False, compile=False))
    assert plain.attention is None and plain.path == "layer by layer (batch 2; attention in torch: the int8 KV cache " \
        "(the fused attention reads a cache in the model dtype))"
    with pytest.raises(ValueError, match="not a decode path"):
        DecodeOptions.from_label("graph+turbo")
    with pytest.raises(ValueError, match="not a decode path"):  # the batched fused step lost to cuBLAS: deleted
        DecodeOptions.from_label("graph+triton-gemv+fused-mlp+fused-step+fused-rows")
    assert DecodeOptions.from_label("graph+compile+cublas+fused-mlp+fused-step+pdl") == DecodeOptions(triton_gemv=False)
    pdl = DecodeOptions.from_label("graph+triton-gemv+fused-mlp+fused-step+pdl")
    assert pdl.pdl and DecodeOptions.from_label(pdl.label) == pdl
    if DEVICE.type == "cpu":  # programmatic dependent launch is a Hopper feature: dropped elsewhere
        options = DecodeOptions(cuda_graph=False, compile=False, pdl=True)
        decoder = CudaDecoder(accelerate(_model("gpt2-tiny", "float32"), options), 1, 16, options)
        assert decoder.fused is not None and not decoder.fused.pdl and decoder.path == "fused step"


@pytest.mark.parametrize("fp8", [False, True])
def test_the_tensor_core_configs_compute_the_same_gemv(monkeypatch, fp8):
    """The USE_DOT configs (1: the input row broadcast to a 16-row dot; 2: the weights as the tall operand) against
    the CUDA-core configs, same inputs, RMSNorm and silu-gate around them."""
    K, N = 256, 128
    x, r, g, weight, scales = _gated_gemv_inputs(2, K, N, fp8)

    def run(use_dot):
        block_n = {0: 4, 1: 16, 2: 64}[use_dot]
        if DEVICE.type == "cpu":
            monkeypatch.setitem(gemv.INTERPRETER_CONFIG, "USE_DOT", use_dot)
            monkeypatch.setitem(gemv.INTERPRETER_CONFIG, "BLOCK_N", block_n)
            return gemv.fused_gemv(x, r, g, None, weight, None, *scales, 1e-5, NORM_RMS,
                                           ACT_SILU_GATE, torch.float32)[0]
        kernel = gemv._fused_gemv_gpu  # one config, compiled
        y = torch.empty(N, device=DEVICE)
        h = torch.empty(K, device=DEVICE, dtype=x.dtype)
        kernel[(triton.cdiv(N, block_n),)](x, r, h, g, y, weight, y, y, *(scales if fp8 else (y, y)), y, y, N, K, 1e-5,
                                           ADD_RESIDUAL=True, NORM=1, HAS_BIAS=False, FP8=fp8, ACT=1, W_F32=False,
                                           BLOCK_N=block_n, BLOCK_K=128, USE_DOT=use_dot)
        return y

    if fp8 and DEVICE.type == "cpu":
        pytest.skip("Triton's CPU emulator has no FP8 dot")
    plain = run(0)
    for use_dot in (1, 2):  # fp16: the dots round x * g to fp16; FP8: the same products, other summation order
        dot = run(use_dot)
        # FP8 form 2 runs wgmma, which sums FP8 products with less than float32 precision: 5e-4 on an H200
        tol = (1e-3 if use_dot == 2 and DEVICE.type == "cuda" else 1e-5) if fp8 else 2e-3
        assert ((dot - plain).norm() / plain.norm()).item() < tol, use_dot


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) run of the fused step; GPUs run it in bench")
@pytest.mark.slow
def test_fused_step_under_mpirun_with_tp2_gives_the_plain_tokens(home, tmp_path):
    """`python -m pipeline.run --decode fast` at batch 1 takes the fused step (its all-reduces over gloo here)."""
    from tests.conftest import run_json

    recipe = recipe_from_dict({"model": {"random": "llama-tiny"}, "precision": {"dtype": "float32"},
                               "parallel": {"tp": 2}}, name="fused-tp2")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    tokens = {}
    for mode in ("engine", "fast"):
        result = run_json(home, 2, artifact, [[3, 14, 15, 92, 65]], tmp_path / f"{mode}.json", 6,
                          extra=("--decode", mode), TRITON_INTERPRET="1")
        tokens[mode] = result["results"][0]["new_ids"]
        if mode == "fast":
            assert "fused step" in result["stderr"]
    assert tokens["fast"] == tokens["engine"] and len(tokens["fast"]) == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run of bench; GPUs run it in bench/gpu_run.sh")
@pytest.mark.slow
def test_bench_compares_batched_decode_paths_on_the_cpu(home, tmp_path):
    """`python -m pipeline bench` end to end under mpirun (CPU, Triton emulated): batch 1 on the fused step; at
    batch 3 it runs each of --batched-variants (both layer by layer there, one with the Triton GEMV asked), reports
    the fastest and whether their greedy tokens agree."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO, child_env

    fused, plain = "eager+triton-gemv+fused-mlp+fused-step", "eager+cublas+fused-mlp"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "gpt2-random", "model.random=gpt2-tiny", "precision.dtype=float32",
         "--device-random", "--batch-sizes", "1,3", "--input-len", "8", "--output-len", "4", "--repeats", "1",
         "--no-baseline", "--out", str(tmp_path), "--variants", fused, "--batched-variants", f"{fused},{plain}"],
        cwd=REPO, env=child_env(home, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench-gpt2-random-tp1.json").read_text())
    one, three = result["batches"]
    assert one["batch"] == 1 and one["variant"] == fused and len(one["tokens"]) == 1
    assert three["batch"] == 3 and set(three["tokens_per_s_by_variant"]) == {fused, plain}
    assert three["variants_agree_on_tokens"] is True and [len(t) for t in three["tokens"]] == [4, 4, 4]
    assert f"{fused}: decode step: fused step" in proc.stderr
    assert f"batch 3 {fused}: decode step: layer by layer, fused attention (batch 3)" in proc.stderr
    assert "same greedy tokens: True" in proc.stdout


def test_bench_with_drawn_prompt_and_output_lengths(home, tmp_path):
    """`python -m pipeline bench` with --input-spread and --output-spread (CPU, under mpirun): each request of a
    batch gets its own drawn output length, its tokens are that many, and they are the first tokens of the same
    requests decoded to the longest length (the same drawn prompts, greedy); tokens/s counts the requests' own
    tokens over the batch's time; each request's E2E ends at its own last token."""
    import json
    import subprocess
    import sys

    from pipeline.bench import output_lengths
    from tests.conftest import REPO, child_env

    plain = "eager+cublas+fused-mlp"
    lengths = output_lengths(3, 6, seed=3, spread=0.5)
    assert len(set(lengths)) > 1 and all(3 <= n <= 9 for n in lengths), lengths

    def bench(out, *spread):
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "bench", "gpt2-random", "model.random=gpt2-tiny",
             "precision.dtype=float32", "--device-random", "--batch-sizes", "3", "--input-len", "8", "--repeats",
             "2", "--no-baseline", "--out", str(out), "--variants", plain, "--batched-variants", plain,
             "--input-spread", "0.25", *spread], cwd=REPO, env=child_env(home), capture_output=True, text=True,
            timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((out / "bench-gpt2-random-tp1.json").read_text())["batches"][0]

    drawn = bench(tmp_path / "drawn", "--output-len", "6", "--output-spread", "0.5")
    longest = bench(tmp_path / "longest", "--output-len", str(max(lengths)))
    assert drawn["output_lens"] == lengths and [len(t) for t in drawn["tokens"]] == lengths
    assert all(t == full[:n] for t, full, n in zip(drawn["tokens"], longest["tokens"], lengths))
    times = drawn["batch_e2e_s"]  # of 2 repeats: p50 the shorter, p99 the longer; tokens/s over their median
    assert sum(lengths) / times["p99"] <= drawn["output_tokens_per_s"] <= sum(lengths) / times["p50"]
    e2e, ttft = drawn["e2e_s"], drawn["ttft_s"]
    assert ttft["p50"] <= e2e["p50"] <= e2e["p99"] <= drawn["batch_e2e_s"]["p99"]
    assert longest["output_lens"] == [max(lengths)] * 3


@pytest.mark.slow
def test_the_gpu_kernels_compile_for_hopper(tmp_path):
    """bench/compile_check.py: every kernel form (each dtype, the dot forms, every autotuning config, the
    batched GEMMs, the int4 GEMMs, the engine's activation / norm / FP8 cast, programmatic dependent launch, the
    split attention) compiles to an sm_90 cubin with the ptxas of Triton's wheel, no GPU needed; with PDL the PTX
    has griddepcontrol, without it none."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not found in a cache
    proc = subprocess.run([sys.executable, "bench/compile_check.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # 179 kernels (35 of them int4's, 8 the engine's), 18 with PDL's wait
    assert len(lines) == 179 and all(line.startswith("ok    sm_90 ") for line in lines)
    assert sum("griddepcontrol" in line for line in lines) == 18


def test_autotuning_candidates_per_shape():
    """What autotuning times: split-K for FP8 only and with K's chunks shared equally; FP8's big GEMVs (a wgmma
    tile per SM and more) in the wgmma form or the CUDA-core form with a grouped accumulator only; bfloat16
    without either restriction; no block of K wider than K needs (GPT-2's 768)."""
    configs = gemv.CONFIGS
    assert gemv.MAX_SPLIT_K == max(c.kwargs.get("SPLIT_K", 1) for c in configs)  # sizes the split-K sums

    def kept(n, k, fp8):
        return [c.kwargs for c in gemv._prune(configs, {"N": n, "K": k}, FP8=fp8)]

    fc_gate = kept(14336, 4096, True)
    assert fc_gate and all(c["USE_DOT"] == 2 and c["BLOCK_N"] >= 64 or c.get("ACC_R", 1) > 1 for c in fc_gate)
    assert any(c.get("ACC_R", 1) > 1 for c in fc_gate) and any(c["USE_DOT"] == 2 for c in fc_gate)
    assert max(c["BLOCK_K"] for c in kept(3072, 768, False)) == 1024
    assert max(c["BLOCK_K"] for c in kept(4096, 4096, True)) == 2048
    dense = kept(4096, 4096, True)
    assert any(c.get("SPLIT_K", 1) > 1 for c in dense) and any(c["USE_DOT"] == 0 for c in dense)
    assert all((4096 // c["BLOCK_K"]) % c.get("SPLIT_K", 1) == 0 for c in dense)
    for n, k in ((14336, 4096), (4096, 4096), (4096, 14336)):
        assert not any(c.get("SPLIT_K", 1) > 1 for c in kept(n, k, False))
    assert any(c["USE_DOT"] == 0 for c in kept(14336, 4096, False))
    assert not any(c.get("SPLIT_K", 1) > 1 for c in kept(4096, 4000, True))  # ragged K: no split


def test_attention_block_is_smaller_with_splits():
    """Unsplit, 64-slot blocks; with splits, 32 (a split's share of the slots is a whole number of blocks: at batch
    1 of the 8B shape, 6 splits and the new token at slot 192, 64-slot blocks would leave three splits idle)."""
    assert attention.attention_block(1) == 64
    assert attention.attention_block(6) == 32
    slot, splits = 192, attention.attention_splits(1, 8, 384)
    for block, idle in ((64, 3), (32, 0)):  # the kernel's share: ceil(ceil(slot / block) / splits) blocks each
        share = (-(-slot // block) + splits - 1) // splits
        assert sum(split * share * block >= slot for split in range(splits)) == idle


def test_compile_leaves_the_fused_step_as_it_is(home):
    """With compile, the layer-by-layer step is compiled, the fused step is not (its kernels are its own; compiling
    it made the 8B set-up take minutes): compile then applies to the prefill alone."""
    options = DecodeOptions(cuda_graph=False, compile=True, fused_step=True)
    fused = CudaDecoder(accelerate(_model("llama-tiny", "float32"), options), 1, 16, options)
    assert fused.fused is not None and fused._step_fn == fused._step
    options = DecodeOptions(cuda_graph=False, compile=True, fused_step=False)
    plain = CudaDecoder(accelerate(_model("llama-tiny", "float32"), options), 1, 16, options)
    assert plain.fused is None and plain._step_fn != plain._step
