"""The engine's step on a GPU: the paged attention kernel (pipeline.kernels.paged_attention) gives the logits of
the reference path (gathered keys and values through scaled_dot_product_attention), for prompt chunks, chunk
continuations, decoding, GQA and a sliding window. Run on a lent GPU: pytest -m gpu."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.runner import ModelRunner
from pipeline.engine.scheduler import SeqWork, StepPlan
from pipeline.params import SamplingParams
from tests.test_engine import build

pytestmark = pytest.mark.gpu


def rank_model(artifact):
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.mapping import Mapping

    config = read_checkpoint_config(artifact)
    device = torch.device("cuda", 0)
    return load_rank_model(artifact, config, Comm(Mapping(1, 1), device), device)


def plans(block_size: int) -> list[StepPlan]:
    """Three steps of three sequences: whole prompts, then a prompt's second chunk beside decoding, then decoding."""
    params = SamplingParams()
    prompt = [list(range(3, 3 + n)) for n in (19, 40, 7)]
    blocks = [(2, 0, 1), (5, 4, 3), (6, 8, 7)]  # 3 blocks of >= 16 tokens each hold 41 tokens, in any order

    def work(i, tokens, start, sample=True):
        return SeqWork(i, tuple(tokens), start, blocks[i], sample, params, 0)

    return [
        StepPlan((work(0, prompt[0], 0), work(1, prompt[1][:25], 0, False), work(2, prompt[2], 0))),
        StepPlan((work(0, [5], 19), work(1, prompt[1][25:], 25), work(2, [9], 7))),
        StepPlan((work(0, [6], 20), work(1, [8], 40), work(2, [11], 8))),
    ]


@pytest.mark.parametrize("shape", ["llama-tiny", "mistral-tiny", "gpt2-tiny"])
def test_the_paged_attention_kernel_gives_the_reference_logits(home, shape):
    _, artifact = build(shape, dtype="bfloat16")
    model = rank_model(artifact)
    block_size = 16
    kernel, reference = ModelRunner(model, 9, block_size), ModelRunner(model, 9, block_size)
    assert kernel.kernel
    reference.kernel = False
    for plan in plans(block_size):
        model.fused_norm = True  # the engine's GPU path: RMS norm kernel, rotary + cache write kernel, paged kernel
        ours = kernel.forward(plan)
        model.fused_norm = False
        expected = reference.forward(plan)
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 1e-3


@pytest.mark.parametrize("kv_cache", ["fp8", "int8"])
def test_the_paged_attention_kernel_reads_a_quantized_kv_cache(home, kv_cache):
    """An FP8 / INT8 KV cache: the kernel dequantizes what it reads with the layer's scale, as the reference does."""
    from pipeline.build import Builder
    from pipeline.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"random": "llama-tiny"}, "precision": {"dtype": "bfloat16", "quantization": {
        "kv_cache": kv_cache, "calibration": {"samples": 2, "seq_len": 16}}},
        "build": {"plugins": {"use_paged_context_fmha": False}}}, name=f"engine-gpu-kv-{kv_cache}")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    model = rank_model(artifact)
    assert model.kv_format is not None
    kernel, reference = ModelRunner(model, 9, 16), ModelRunner(model, 9, 16)
    reference.kernel = False
    assert kernel.cache.k[0].element_size() == 1
    for plan in plans(16):
        ours, expected = kernel.forward(plan), reference.forward(plan)
        assert (ours - expected).abs().max().item() < 0.05 * expected.abs().max().item() + 1e-3


@pytest.mark.parametrize("shape, max_batch", [("llama-tiny", 8), ("llama-tiny", 1), ("gpt2-tiny", 1)])
def test_decoding_through_cuda_graphs_gives_the_eager_tokens(home, shape, max_batch):
    """Steps replayed from the captured graphs (batches padded up to a captured size onto the scratch block; at
    max_batch 1 the fused batch-1 step around the paged attention) give the tokens of the same engine without
    graphs, for requests of different lengths arriving together."""
    from pipeline import LLM
    from tests.test_engine import random_prompts

    _, artifact = build(shape)
    prompts = random_prompts(11 if max_batch > 1 else 3, seed=4)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    results = {}
    for graphs in (True, False):
        with LLM(artifact, verify=False, max_batch_size=max_batch, tokens_per_block=4, cuda_graphs=graphs) as llm:
            assert (llm.runner.graphs is not None) == graphs
            if graphs and max_batch == 1:
                assert llm.runner.graphs.fused is not None
            before = llm.runner.prompt_graphs.replays if graphs else 0  # the warm-up's prompts
            results[graphs] = [o.output_ids for o in llm.generate(prompts, params)]
            assert llm.stats()["kv_blocks_used"] == 0
            if graphs and max_batch == 1:  # each prompt of 2-40 tokens ran alone: from a prompt graph
                assert llm.runner.prompt_graphs.replays - before == sum(len(p) > 1 for p in prompts)
    assert results[True] == results[False]


@pytest.mark.parametrize("shape", ["llama-tiny", "gpt2-tiny"])
def test_lone_prompt_chunks_through_cuda_graphs_give_the_eager_tokens(home, shape):
    """Prompts longer than max_num_tokens run as chunks, each alone at a later start (the graph's padded rows
    repeat the chunk's last position); a second request reuses the first one's prefix blocks and starts its prompt
    step past them; greedy and sampled. Tokens equal the same engine's without graphs."""
    import random

    from pipeline import LLM

    _, artifact = build(shape)
    rng = random.Random(7)
    shared = [rng.randrange(1000) for _ in range(24)]
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (70, 33, 17)] + [shared + [5, 6, 7], shared + [9]]
    params = [SamplingParams(max_tokens=8, ignore_eos=True),
              SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.8, top_k=20, seed=3)]
    results = {}
    for graphs in (True, False):
        with LLM(artifact, verify=False, max_batch_size=1, max_num_tokens=32, tokens_per_block=8,
                 cuda_graphs=graphs) as llm:
            results[graphs] = [[o.output_ids for o in llm.generate(prompts, p)] for p in params]
            if graphs:
                assert llm.runner.prompt_graphs.sizes == [16, 32]
                assert llm.runner.prompt_graphs.replays >= 3 + 1 + 1 + 1  # the first round's chunks of > 1 token
                assert llm.stats()["prefix_reused_tokens"] > 0
            assert llm.stats()["kv_blocks_used"] == 0
    assert results[True] == results[False]


def test_the_fp8_cast_kernel_gives_the_bytes_of_the_reference_cast():
    """pipeline.kernels.fp8.quantize_fp8 against pipeline.quantize.formats.quantize_fp8: the same float8 bytes,
    saturating values beyond the range and rounding halves to even."""
    from pipeline.kernels.fp8 import quantize_fp8
    from pipeline.quantize.formats import quantize_fp8 as reference

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(37, 3000, generator=gen, device="cuda") * 300).to(torch.bfloat16)
    scale = torch.tensor([0.7], device="cuda")
    ours, expected = quantize_fp8(x, scale), reference(x, scale)
    assert ours.dtype == torch.float8_e4m3fn and ours.shape == x.shape
    assert torch.equal(ours.view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("rows", [1, 5])
def test_the_fp8_linear_keeps_the_input_shape_and_the_reference_values(rows):
    """CudaFP8Linear on [1, T, K] (the engine's packed tokens) gives [1, T, N] (the step's attention reads the
    token count from it; a [T, N] once sent the rotary tables' reshape past their size) and the emulation's
    values, from the model dtype and from an input already cast to FP8."""
    from pipeline.backends.cuda_decode import CudaFP8Linear
    from pipeline.kernels.fp8 import quantize_fp8
    from pipeline.quantize.runtime import FP8Linear

    gen = torch.Generator(device="cuda").manual_seed(1)
    weight = (torch.randn(96, 256, generator=gen, device="cuda") * 8).to(torch.float8_e4m3fn)
    base = FP8Linear(weight, torch.tensor([0.01], device="cuda"), torch.tensor([0.05], device="cuda"), None,
                     torch.bfloat16)
    linear = CudaFP8Linear(base)
    x = torch.randn(1, rows, 256, generator=gen, device="cuda").to(torch.bfloat16)
    expected = base(x)
    assert linear(x).shape == expected.shape == (1, rows, 96)
    assert torch.allclose(linear(x).float(), expected.float(), rtol=1e-2, atol=1e-2)
    if rows > 1:
        cast = quantize_fp8(x.reshape(rows, 256), base.act_scale).view(1, rows, 256)
        assert torch.equal(linear(cast), linear(x))


@pytest.mark.parametrize("rows, hidden", [(1, 4096), (7, 4096), (300, 576)])
def test_the_add_rms_norm_kernel_gives_the_bits_of_the_add_then_the_norm_kernel(rows, hidden):
    """On the GPU the fused kernel rounds as torch does: h is torch's h + delta bit for bit, the norm the RMS norm
    kernel's of it."""
    from pipeline.kernels.norm import add_rms_norm, rms_norm

    gen = torch.Generator(device="cuda").manual_seed(4)
    h = (4 * torch.randn(rows, hidden, generator=gen, device="cuda")).bfloat16()
    delta = torch.randn(rows, hidden, generator=gen, device="cuda").bfloat16()
    weight = (torch.rand(hidden, generator=gen, device="cuda") + 0.5).bfloat16()
    expected_h = h + delta
    expected = rms_norm(expected_h, weight, 1e-5)
    out = add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(h, expected_h) and torch.equal(out, expected)
