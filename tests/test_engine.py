"""The engine: in-flight batching over the paged KV cache gives every request the tokens it gets alone.

Requests arrive in a random order at random steps, with prompts of different lengths; prompts are prefilled in
chunks mixed with other requests' decoding (a small token budget), over blocks of 4 tokens. References are
Hugging Face transformers' greedy tokens for each prompt alone (float32 tiny random checkpoints), and, under
mpirun, the same requests at tp=2 and pp=2.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.build import Builder
from pipeline.engine.scheduler import EngineError
from pipeline.params import ParamError, SamplingParams
from pipeline.recipe import recipe_from_dict
from tests.conftest import PYTHON, REPO, child_env, mpirun_binary

NEW_TOKENS = 10


def build(shape: str, tp: int = 1, pp: int = 1, dtype: str = "float32"):
    recipe = recipe_from_dict({"model": {"random": shape}, "precision": {"dtype": dtype},
                               "parallel": {"tp": tp, "pp": pp}}, name=f"engine-{shape}-tp{tp}-pp{pp}")
    result = Builder(recipe, log=lambda _: None, show_progress=False).run()
    return result.stages[0].path, result.artifact


def random_prompts(count: int, seed: int, vocab: int = 1000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(count)]


def hf_greedy(source, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def llama(home):
    return build("llama-tiny")


def make_llm(artifact, **options):
    from pipeline import LLM

    return LLM(artifact, verify=False, **options)


def submit_at_random_times(llm, prompts, params, seed: int):
    """Submit the prompts in a shuffled order from another thread, a few milliseconds apart, while the engine
    runs; returns {prompt index: finished output}."""
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    handles = {}

    def feed():
        for i in order:
            handles[i] = llm.submit(prompts[i], params)
            time.sleep(rng.uniform(0, 0.02))

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join(timeout=60)
    return {i: h.result() for i, h in handles.items()}


def test_in_flight_batching_gives_each_request_its_tokens_alone(llama):
    source, artifact = llama
    prompts = random_prompts(12, seed=1)
    expected = hf_greedy(source, prompts, NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with make_llm(artifact, max_num_tokens=24, tokens_per_block=4, max_batch_size=5) as llm:
        outputs = submit_at_random_times(llm, prompts, params, seed=2)
        assert [outputs[i].output_ids for i in range(len(prompts))] == expected
        assert all(o.finish_reason == "length" for o in outputs.values())
        stats = llm.stats()
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
        assert stats["steps"] > NEW_TOKENS  # not one static batch: requests came and went


def test_steps_planned_ahead_give_the_tokens_of_steps_one_at_a_time(llama):
    """The overlap of host and GPU: decoding steps planned before the previous step's tokens are read. Requests
    end at different steps (by length, by a stop token found in a token read while the next step already ran)."""
    source, artifact = llama
    prompts = random_prompts(6, seed=11)
    lengths = [3, 10, 1, 7, 12, 5]
    expected = hf_greedy(source, prompts, 12)
    stop = expected[1][4]
    got = {}
    for overlap in (True, False):
        with make_llm(artifact, tokens_per_block=4, overlap=overlap) as llm:
            outs = llm.generate(prompts, [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths])
            stopped = llm.generate([prompts[1], prompts[4]], [
                SamplingParams(max_tokens=12, stop_token_ids=(stop,), ignore_eos=True),
                SamplingParams(max_tokens=12, ignore_eos=True)])
            stats = llm.stats()
            got[overlap] = [o.output_ids for o in outs + stopped]
            assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
            assert (stats["step_counts"]["planned_ahead"] > 0) == overlap
            assert [o.finish_reason for o in stopped] == ["stop", "length"]
    assert got[True] == got[False] == [e[:n] for e, n in zip(expected, lengths)] + [
        expected[1][:expected[1].index(stop) + 1], expected[4]]


def test_pipeline_run_sizes_the_engine_to_its_prompts_and_gives_the_greedy_tokens(home, llama, tmp_path):
    """A one-shot `pipeline.run` holds as many sequences as it has prompts (fewer graphs and KV blocks to set up)."""
    source, artifact = llama
    prompts = [[3, 14, 15, 92], [65, 35]]
    proc = subprocess.run([PYTHON, "-m", "pipeline.run", "--engine", str(artifact), "--no-chat-template",
                           *[a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p)))],
                           "--max-new-tokens", "5", "--json", str(tmp_path / "out.json")],
                          cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_batch_size 2;" in proc.stderr
    # token-id prompts need no tokenizer before the weights: it loads beside them, no stage of its own
    assert re.search(r"start-up: verify [\d.]+ s, load [\d.]+ s\n", proc.stderr)
    got = [r["new_ids"] for r in json.loads((tmp_path / "out.json").read_text())["results"]]
    assert got == hf_greedy(source, prompts, 5)


def test_preemption_recomputes_the_same_tokens_and_frees_its_blocks(llama):
    source, artifact = llama
    prompts = random_prompts(6, seed=3)
    expected = hf_greedy(source, prompts, NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    # 14 blocks of 4 tokens: enough for any one request (at most 50 tokens), far too few for six at once.
    with make_llm(artifact, kv_cache_max_tokens=56, tokens_per_block=4, enable_prefix_reuse=False) as llm:
        outputs = llm.generate(prompts, params)
        assert [o.output_ids for o in outputs] == expected
        assert llm.stats()["preemptions"] > 0
        assert sum(o.preemptions for o in outputs) == llm.stats()["preemptions"]
        assert llm.stats()["kv_blocks_used"] == 0


def test_a_shared_prefix_reuses_blocks_and_changes_no_token(llama):
    source, artifact = llama
    system = list(range(100, 140))
    prompts = [system + [7, 8, 9], system + [11], system + [300, 301, 302, 303, 304]]
    expected = hf_greedy(source, prompts, NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with make_llm(artifact, tokens_per_block=4) as llm:
        first = llm.generate(prompts[:1], params)
        rest = llm.generate(prompts[1:], params)
        assert [o.output_ids for o in first + rest] == expected
        assert llm.stats()["prefix_reused_tokens"] >= 2 * 40


def test_cancelling_a_stream_frees_its_blocks_and_leaves_others_alone(llama):
    source, artifact = llama
    prompts = random_prompts(3, seed=5)
    expected = hf_greedy(source, prompts[1:], 30)
    with make_llm(artifact, tokens_per_block=4) as llm:
        others = [llm.submit(p, SamplingParams(max_tokens=30, ignore_eos=True)) for p in prompts[1:]]
        stream = llm.generate_stream(prompts[0], SamplingParams(max_tokens=200, ignore_eos=True))
        got = [next(stream) for _ in range(3)]
        stream.close()  # the consumer walks away: the request is aborted
        assert [len(o.output_ids) for o in got] == [1, 2, 3]
        assert [h.result().output_ids for h in others] == expected
        deadline = time.monotonic() + 10
        while llm.stats()["kv_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert llm.stats()["kv_blocks_used"] == 0 and llm.stats()["running"] == 0


def test_a_pool_too_small_for_one_request_is_an_error_at_admission(llama):
    _, artifact = llama
    with make_llm(artifact, kv_cache_max_tokens=16, tokens_per_block=4) as llm:
        with pytest.raises(EngineError, match="needs 8 KV blocks of 4 tokens, but the whole pool has 4"):
            llm.generate([list(range(1, 21))], SamplingParams(max_tokens=12))
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))[0].output_ids  # still alive


def test_bad_parameters_are_refused_before_they_reach_the_engine(llama):
    _, artifact = llama
    with make_llm(artifact) as llm:
        cases = [(SamplingParams(temperature=-1), [1, 2], "temperature must be a finite number >= 0"),
                 (SamplingParams(top_p=0.0), [1, 2], "top_p must be in (0, 1]"),
                 (SamplingParams(max_tokens=0), [1, 2], "max_tokens must be a whole number of at least 1"),
                 (SamplingParams(), [], "the prompt is empty"),
                 (SamplingParams(), [5, 99999], "outside the vocabulary"),
                 (SamplingParams(max_tokens=10**6), [1], "past the context of")]
        for params, prompt, message in cases:
            with pytest.raises(ParamError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
                llm.submit(prompt, params)


def test_sampling_is_per_request_and_reproducible_by_seed(llama):
    _, artifact = llama
    prompt = [5, 6, 7, 8]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=7, ignore_eos=True)
    with make_llm(artifact) as llm:
        alone = llm.generate([prompt], sampled)[0].output_ids
        mixed = llm.generate([prompt, prompt, [9, 9]], [sampled, SamplingParams(max_tokens=12, ignore_eos=True),
                                                        SamplingParams(max_tokens=3, temperature=0.8, seed=1)])
        assert mixed[0].output_ids == alone
        assert mixed[1].output_ids != alone  # greedy, in the same steps
        other_seed = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=8,
                                                           ignore_eos=True))[0].output_ids
        assert other_seed != alone


def test_sampled_tokens_do_not_depend_on_overlap_batching_or_preemption(llama):
    """A draw depends on the request's seed and the position of the token it makes, nothing else."""
    _, artifact = llama
    prompts = random_prompts(6, seed=21)
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    got = []
    for options in ({"overlap": True}, {"overlap": False},
                    {"kv_cache_max_tokens": 56, "enable_prefix_reuse": False}):  # 14 blocks: preemptions
        with make_llm(artifact, tokens_per_block=4, **options) as llm:
            got.append([o.output_ids for o in llm.generate(prompts, params)])
            if "kv_cache_max_tokens" in options:
                assert llm.stats()["preemptions"] > 0
    with make_llm(artifact, tokens_per_block=4) as llm:
        alone = [llm.generate([p], [q])[0].output_ids for p, q in zip(prompts, params)]
    assert got[0] == got[1] == got[2] == alone
    assert len({tuple(t) for t in alone}) == 6


def test_stop_tokens_and_min_tokens(llama):
    source, artifact = llama
    prompt = [3, 14, 15, 92]
    full = hf_greedy(source, [prompt], 12)[0]
    stop = full[4]
    first = full.index(stop)
    with make_llm(artifact) as llm:
        out = llm.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(stop,)))[0]
        assert out.output_ids == full[:first + 1] and out.finish_reason == "stop"
        later = llm.generate([prompt], SamplingParams(max_tokens=12, stop_token_ids=(stop,), min_tokens=first + 2))[0]
        assert stop not in later.output_ids[:first + 2]


@pytest.mark.parametrize("heads, kv_heads, head_size, window, per_tile, kv_int8", [
    (8, 2, 8, None, None, False), (4, 4, 16, None, None, False), (8, 2, 8, 5, None, False),
    (8, 2, 8, None, 2, False), (4, 1, 12, 5, 3, False), (8, 2, 8, None, None, True)])
def test_the_paged_attention_kernel_matches_attention_over_each_sequence(heads, kv_heads, head_size, window,
                                                                         per_tile, kv_int8):
    """pipeline.kernels.paged_attention (Triton's CPU emulator here) against torch's attention over each sequence's
    keys, for a step of a prompt chunk that continues a cached prefix, a whole prompt and two decoding tokens,
    with blocks scattered over the pool; prompt chunks cut into several tiles (per_tile), a head size that is not
    a power of two, and an int8 cache read through its scale."""
    from pipeline.kernels.paged_attention import attention_tiles, paged_attention, tile_tokens

    gen = torch.Generator().manual_seed(0)
    block_size, pool_blocks = 4, 12
    k_cache = torch.randn(pool_blocks * block_size, kv_heads, head_size, generator=gen)
    v_cache = torch.randn(pool_blocks * block_size, kv_heads, head_size, generator=gen)
    kv_scale = None
    if kv_int8:
        kv_scale = torch.tensor([0.02])
        k_cache = (k_cache / kv_scale).round().clamp(-127, 127).to(torch.int8)
        v_cache = (v_cache / kv_scale).round().clamp(-127, 127).to(torch.int8)
    tables = torch.tensor([[7, 2, 9], [0, 11, 4], [5, 1, 0], [3, 8, 10]], dtype=torch.int32)
    steps = [(0, 6, 3), (1, 0, 5), (2, 9, 1), (3, 11, 1)]  # (sequence, first position, tokens)
    pos = torch.tensor([p for _, start, n in steps for p in range(start, start + n)], dtype=torch.int32)
    lens = [n for _, _, n in steps]
    per_tile = per_tile or tile_tokens(heads // kv_heads, lens)
    tiles = attention_tiles(lens, per_tile)
    assert tiles.shape[0] == sum(-(-n // per_tile) for n in lens)
    seq = [s for s, start, n in steps for _ in range(n)]
    q = torch.randn(len(seq), heads, head_size, generator=gen)
    out = paged_attention(q, k_cache, v_cache, tables, pos, tiles, per_tile, block_size, window, kv_scale)
    keys_all = k_cache.float() * (kv_scale if kv_int8 else 1)
    values_all = v_cache.float() * (kv_scale if kv_int8 else 1)
    for t in range(len(seq)):
        p = int(pos[t])
        slots = tables[seq[t]].long()[torch.arange(p + 1) // block_size] * block_size + torch.arange(p + 1) % block_size
        keys = keys_all[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)  # [heads, L, hd]
        values = values_all[slots].transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
        mask = torch.ones(p + 1, dtype=torch.bool) if window is None else torch.arange(p + 1) > p - window
        expected = torch.nn.functional.scaled_dot_product_attention(q[t][:, None], keys, values,
                                                                    attn_mask=mask[None, None])[:, 0]
        assert (out[t] - expected).abs().max().item() < 1e-5, t


@pytest.mark.parametrize("heads, kv_heads, head_size, rope, kv_cache", [
    (8, 2, 8, True, None), (4, 4, 12, True, None), (4, 2, 8, False, None), (8, 2, 8, True, "int8")])
def test_the_rotary_cache_write_kernel_matches_the_model_rotation_and_the_cache_format(heads, kv_heads, head_size,
                                                                                       rope, kv_cache):
    """pipeline.kernels.paged_attention.write_rope_kv (emulated) against RankModel's rotate-half rotation and the
    KV format's own quantizer: the rotated queries it returns, and the bytes it leaves in the cache slots (only
    there: other slots untouched)."""
    from pipeline.backends.torch_model import rotate_half
    from pipeline.kernels.paged_attention import write_rope_kv
    from pipeline.quantize.schemes.kv_int8 import quantize as int8_quantize

    gen = torch.Generator().manual_seed(1)
    tokens, slots_total = 5, 24
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=gen)
    positions = torch.tensor([3, 4, 0, 9, 17])
    freqs = positions[:, None].float() * (1e4 ** (-torch.arange(0, head_size, 2).float() / head_size))[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    tables = (emb.cos(), emb.sin()) if rope else None
    dtype = torch.int8 if kv_cache == "int8" else torch.float32
    k_cache = torch.full((slots_total, kv_heads, head_size), 7, dtype=dtype)
    v_cache = torch.full((slots_total, kv_heads, head_size), 7, dtype=dtype)
    slots = torch.tensor([11, 2, 23, 5, 6])
    scale = torch.tensor([0.03]) if kv_cache else None
    q = write_rope_kv(qkv, tables, k_cache, v_cache, slots, heads, scale)
    q_ref, k_ref, v_ref = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    q_ref, k_ref = q_ref.view(tokens, heads, head_size), k_ref.view(tokens, kv_heads, head_size)
    v_ref = v_ref.view(tokens, kv_heads, head_size)
    if rope:
        cos, sin = tables[0][:, None], tables[1][:, None]
        q_ref, k_ref = q_ref * cos + rotate_half(q_ref) * sin, k_ref * cos + rotate_half(k_ref) * sin
    assert q.shape == (tokens, heads, head_size)
    assert (q - q_ref).abs().max().item() < 1e-5
    if kv_cache == "int8":
        assert torch.equal(k_cache[slots], int8_quantize(k_ref, scale))
        assert torch.equal(v_cache[slots], int8_quantize(v_ref, scale))
    else:
        assert (k_cache[slots] - k_ref).abs().max().item() < 1e-5 and torch.equal(v_cache[slots], v_ref)
    others = torch.ones(slots_total, dtype=torch.bool)
    others[slots] = False
    assert (k_cache[others] == 7).all() and (v_cache[others] == 7).all()


@pytest.mark.parametrize("rows, hidden, dtype", [(3, 64, torch.float32), (5, 96, torch.bfloat16)])
def test_the_rms_norm_kernel_matches_the_model_norm(rows, hidden, dtype):
    """pipeline.kernels.norm.rms_norm (emulated) against RankModel's own RMS norm, on a hidden size that is not a
    power of two and on a strided view of rows."""
    from pipeline.kernels.norm import rms_norm

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(rows, 2 * hidden, generator=gen).to(dtype)[:, :hidden]  # rows strided by 2 * hidden
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    xf = x.float()
    expected = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = rms_norm(x, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    ulps = 1e-6 if dtype == torch.float32 else 2 ** -6  # bfloat16: two last-bit steps (the emulator truncates)
    assert ((out.float() - expected.float()).abs() <= ulps * expected.float().abs() + 1e-6).all()


@pytest.mark.parametrize("rows, hidden, dtype", [(3, 64, torch.float32), (5, 96, torch.bfloat16)])
def test_the_add_rms_norm_kernel_gives_the_bits_of_the_add_then_the_norm(rows, hidden, dtype):
    """pipeline.kernels.norm.add_rms_norm (emulated): h becomes exactly torch's h + delta, in place, and the norm is
    the RMS norm kernel's of that sum; delta may be a strided view."""
    from pipeline.kernels.norm import add_rms_norm, rms_norm

    gen = torch.Generator().manual_seed(3)
    h = (4 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    delta = torch.randn(rows, 2 * hidden, generator=gen).to(dtype)[:, hidden:]
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    expected_h = h + delta
    if dtype == torch.bfloat16:  # the emulator rounds float32 to bfloat16 toward zero (the GPU test: to nearest)
        bits = (h.float() + delta.float()).view(torch.int32) & -65536
        expected_h = bits.view(torch.float32).to(dtype)
    expected = rms_norm(expected_h, weight, 1e-5)
    pointer = h.data_ptr()
    out = add_rms_norm(h, delta, weight, 1e-5)
    assert h.data_ptr() == pointer and torch.equal(h, expected_h)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_the_model_with_the_norm_kernels_gives_the_same_logits(home, monkeypatch):
    """RankModel with fused_norm (the engine's GPU model, emulated): every residual add but the last layer's runs
    inside the next norm's kernel, and the logits are the unfused model's."""
    from pipeline.backends import torch_model
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.engine.runner import ModelRunner
    from pipeline.engine.scheduler import SeqWork, StepPlan
    from pipeline.kernels.norm import add_rms_norm
    from pipeline.mapping import Mapping

    _, artifact = build("llama-tiny")
    device = torch.device("cpu")
    model = load_rank_model(artifact, read_checkpoint_config(artifact), Comm(Mapping(1, 1), device), device)
    calls = []

    def spy(h, delta, weight, eps):
        calls.append(h.shape)
        return add_rms_norm(h, delta, weight, eps)

    monkeypatch.setattr(torch_model, "add_rms_norm", spy)
    params = SamplingParams()
    plan = StepPlan((SeqWork(0, (5, 17, 3, 99, 42, 7), 0, (4, 1), True, params, 0),
                     SeqWork(1, (8, 12, 30), 0, (2, 3), True, params, 0)))
    logits = {}
    for fused in (True, False):
        model.fused_norm = fused
        logits[fused] = ModelRunner(model, 6, 4).forward(plan)
    assert calls == [(1, 9, model.hidden)] * (2 * len(model.layers) - 1)
    assert logits[True].shape == logits[False].shape == (1, 2, model.vocab_size)
    assert (logits[True] - logits[False]).abs().max().item() <= 1e-5 * logits[False].abs().max().item()


@pytest.mark.parametrize("shape", ["llama-tiny", pytest.param("gpt2-tiny", marks=pytest.mark.slow)])
def test_the_fused_batch1_step_around_the_paged_attention_gives_the_runner_logits(shape):
    """The engine's batch-1 graph body (emulated here): the fused step (norms and residual adds inside the GEMVs)
    with the paged attention as its attention gives the logits of the runner's layer-by-layer step."""
    from pipeline.backends.cuda_decode import DecodeOptions, _layernorm_gelu, accelerate
    from pipeline.backends.fused_step import FusedStep
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.engine.runner import ModelRunner, _Batch
    from pipeline.engine.scheduler import SeqWork, StepPlan
    from pipeline.mapping import Mapping

    _, artifact = build(shape)
    device = torch.device("cpu")
    model = load_rank_model(artifact, read_checkpoint_config(artifact), Comm(Mapping(1, 1), device), device)
    accelerate(model, DecodeOptions())  # fc and gate as one GEMM, as the engine's GPU model has them
    runner = ModelRunner(model, 6, 4)
    runner.kernel = True  # the Triton kernels, emulated on this CPU
    params = SamplingParams()
    prompt = [5, 17, 3, 99, 42, 7]
    runner.forward(StepPlan((SeqWork(0, tuple(prompt), 0, (4, 1), True, params, 0),)))
    decode = StepPlan((SeqWork(0, (11,), len(prompt), (4, 1), True, params, 0),))
    expected = runner.forward(decode)
    batch = _Batch(decode.work, 4, None, device, kernel=True, group=model.heads // model.kv_heads)
    positions = torch.tensor([[len(prompt)]])
    rope = model._rope_tables(positions, model.dtype) if model.arch.position == "rope" else None

    def attention(index, qkv):
        return runner._attention(index, qkv.view(1, 1, -1), rope, None, batch).view(1, -1)

    fused = FusedStep(model, _layernorm_gelu(model), paged=True)
    ours = fused.forward(torch.tensor([[11]]), positions, None, None, attention=attention)
    assert ours.shape == expected.shape == (1, 1, model.vocab_size)
    assert (ours - expected).abs().max().item() < 1e-4 * expected.abs().max().item() + 1e-5
    assert ours.argmax() == expected.argmax()


def test_the_warm_up_steps_touch_only_their_block_and_change_no_later_logits(llama):
    """ModelRunner.warm_up (run at start-up beside the CUDA graphs, here on the emulated kernels): its prompt and
    mixed steps write the block they are given and no other, and a request run after it gets the logits of a
    runner that never warmed up."""
    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.engine.runner import ModelRunner
    from pipeline.engine.scheduler import SeqWork, StepPlan
    from pipeline.mapping import Mapping

    _, artifact = llama
    device = torch.device("cpu")
    model = load_rank_model(artifact, read_checkpoint_config(artifact), Comm(Mapping(1, 1), device), device)
    warmed, fresh = ModelRunner(model, 6, 4), ModelRunner(model, 6, 4)
    warmed.kernel = fresh.kernel = True
    warmed.warm_up(5)
    slots = warmed.cache.block_size
    for store in warmed.cache.k + warmed.cache.v:
        assert not store[:5 * slots].any() and store[5 * slots:].any()
    plan = StepPlan((SeqWork(0, (5, 17, 3, 99, 42, 7), 0, (2, 0), True, SamplingParams(), 0),))
    assert torch.equal(warmed.forward(plan), fresh.forward(plan))


DRIVER = """
import json, random, sys, time
from pipeline import LLM, SamplingParams
artifact, prompts_json, out = sys.argv[1:4]
llm = LLM(artifact, verify=False, max_num_tokens=24, tokens_per_block=4)   # ranks other than 0 serve, then exit
prompts = json.loads(prompts_json)
rng = random.Random(0)
order = list(range(len(prompts))); rng.shuffle(order)
handles = {}
for i in order:
    handles[i] = llm.submit(prompts[i], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    time.sleep(rng.uniform(0, 0.02))
result = {"tokens": [handles[i].result().output_ids for i in range(len(prompts))], "stats": llm.stats()}
llm.shutdown()
open(out, "w").write(json.dumps(result))
""".replace("NEW_TOKENS", str(NEW_TOKENS))


@pytest.mark.parametrize("shape, tp, pp", [("llama-tiny", 2, 1), ("llama-tiny", 1, 2),
                                            pytest.param("gpt2-tiny", 2, 2, marks=pytest.mark.slow)])
def test_in_flight_batching_under_mpirun_gives_the_tokens_of_one_rank(home, tmp_path, shape, tp, pp):
    source, artifact = build(shape, tp, pp)
    prompts = random_prompts(6, seed=11)
    proc = subprocess.run([mpirun_binary(), "-n", str(tp * pp), "--oversubscribe", PYTHON, "-c", DRIVER,
                           str(artifact), json.dumps(prompts), str(tmp_path / "out.json")],
                          cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["tokens"] == hf_greedy(source, prompts, NEW_TOKENS)
    assert result["stats"]["kv_blocks_used"] == 0


def test_the_progress_bar_shows_rate_and_eta_on_a_terminal_and_nothing_in_logs(capsys):
    import io

    from pipeline.progress import progress

    terminal = io.StringIO()
    assert list(progress(range(3), desc="calibrating", unit="window", file=terminal)) == [0, 1, 2]
    shown = terminal.getvalue()
    assert "calibrating" in shown and "/3 [" in shown and "window/s" in shown  # count, rate and ETA fields
    assert list(progress(range(3), desc="calibrating")) == [0, 1, 2]  # stderr is no terminal under pytest
    assert capsys.readouterr().err == ""


def test_outputs_at_the_end_equal_the_streamed_ones_and_time_every_token(llama):
    """LLM.generate's requests do not stream (one output each, at the end, with each token's time); the tokens,
    finish reasons and the per-token times agree with the streamed outputs of the same requests."""
    _, artifact = llama
    prompts = random_prompts(5, seed=11)
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    with make_llm(artifact, max_batch_size=3) as llm:
        finals = llm.generate(prompts, params)
        streamed = [list(llm.generate_stream(p, params)) for p in prompts]
    for final, outs, prompt in zip(finals, streamed, prompts):
        assert final.finished and final.output_ids == outs[-1].output_ids and len(final.output_ids) == 7
        assert final.finish_reason == outs[-1].finish_reason == "length" and final.prompt_ids == prompt
        assert len(final.token_times) == 7 and final.token_times == sorted(final.token_times)
        assert final.made_s == final.token_times[-1]
        assert [o.delta_ids for o in outs] == [[t] for t in final.output_ids] and outs[-1].token_times is None


def test_a_lone_prompt_chunk_padded_to_its_graph_bucket_gives_the_eager_logits_and_cache(llama, monkeypatch):
    """_PromptGraphs' body (emulated kernels; each "replay" runs the captured forward again): a chunk of n tokens
    padded to its bucket -- the extra rows at the chunk's last position, writing to the scratch block -- gives the
    logits of the eager step, writes the same keys and values, and touches no block but its own and the scratch."""
    import contextlib

    from pipeline.backends.torch_backend import load_rank_model, read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.engine.runner import ModelRunner, _PromptGraphs
    from pipeline.engine.scheduler import SeqWork, StepPlan
    from pipeline.mapping import Mapping

    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    _, artifact = llama
    device = torch.device("cpu")
    model = load_rank_model(artifact, read_checkpoint_config(artifact), Comm(Mapping(1, 1), device), device)
    padded, eager = ModelRunner(model, 8, 4), ModelRunner(model, 8, 4)
    padded.kernel = eager.kernel = True
    graphs = _PromptGraphs(padded, max_tokens=16, max_blocks_per_seq=5, scratch=7, pool=None)
    assert graphs.sizes == [16]

    class Replay:  # what the graph holds: the forward of the bucket, into the captured logits
        def replay(self):
            graphs.graphs[16][1].copy_(graphs._forward(16))

    graphs.graphs = {16: (Replay(), graphs.graphs[16][1])}
    params, prompt = SamplingParams(), [5, 17, 3, 99, 42, 7, 8, 60, 11, 23, 31]
    for plan in (StepPlan((SeqWork(0, tuple(prompt[:6]), 0, (2, 0), True, params, 0),)),  # 6 of 16 rows real
                 StepPlan((SeqWork(0, tuple(prompt[6:]), 6, (2, 0, 4), True, params, 0),))):  # a later chunk
        assert graphs.fits(plan)
        ours, expected = graphs.run(plan), eager.forward(plan)
        assert ours.shape == expected.shape == (1, 1, model.vocab_size)
        assert (ours - expected).abs().max().item() < 1e-4 * expected.abs().max().item() + 1e-5
    real = [slot for block in (2, 0, 4) for slot in range(block * 4, block * 4 + 4)][:len(prompt)]
    for ours, theirs in zip(padded.cache.k + padded.cache.v, eager.cache.k + eager.cache.v):
        assert torch.allclose(ours[real], theirs[real], atol=1e-5)
        untouched = [s for s in range(7 * 4) if s not in real]
        assert not ours[untouched].any()
    assert graphs.replays == 2
