"""The engine's sampler (pipeline.generate.sample_rows): per-row parameters on the device, one Gumbel-max draw
from a counter-based hash of (seed, step, token). Frequencies over many seeds follow softmax(logits / T); top-k and
top-p cut the support as specified; a row's draw does not depend on the rows beside it. Fixed seeds: the test is
deterministic."""

from __future__ import annotations

import torch

from pipeline.generate import gumbel_noise, sample_rows
from pipeline.params import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 20000


def frequencies(params: SamplingParams, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    rows = logits.expand(DRAWS, -1).clone()
    tokens = sample_rows(rows, [params] * DRAWS, list(range(DRAWS)), [7] * DRAWS)
    return torch.bincount(tokens, minlength=logits.numel()).float() / DRAWS


def test_draws_follow_the_tempered_softmax():
    for temperature in (1.0, 0.5, 2.0):
        expected = (LOGITS / temperature).softmax(-1)
        got = frequencies(SamplingParams(temperature=temperature))
        # 20,000 draws: a frequency's standard error is at most 0.0036; 0.015 is over four of them
        assert (got - expected).abs().max() < 0.015, (temperature, got, expected)


def test_top_k_and_top_p_cut_the_support_and_renormalize():
    got = frequencies(SamplingParams(temperature=1.0, top_k=2))
    assert got[2:].sum() == 0
    expected = LOGITS[:2].softmax(-1)
    assert (got[:2] - expected).abs().max() < 0.015
    probs = LOGITS.softmax(-1)  # 0.61, 0.22, 0.14, ...: top_p 0.7 keeps the first two (the second crosses 0.7)
    got = frequencies(SamplingParams(temperature=1.0, top_p=0.7))
    assert got[2:].sum() == 0 and (got[:2] - probs[:2] / probs[:2].sum()).abs().max() < 0.015


def test_greedy_rows_take_the_argmax_beside_sampled_ones_and_a_draw_ignores_its_neighbours():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
              SamplingParams(), SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=1.0)]
    seeds, steps = [11, 12, 13, 14, 15, 16], [3, 4, 5, 6, 7, 8]
    together = sample_rows(logits.clone(), params, seeds, steps)
    alone = [int(sample_rows(logits[i:i + 1].clone(), params[i:i + 1], seeds[i:i + 1], steps[i:i + 1])[0])
             for i in range(6)]
    assert together.tolist() == alone
    assert together[0] == logits[0].argmax() and together[3] == logits[3].argmax()
    other_seed = sample_rows(logits.clone(), params, [s + 100 for s in seeds], steps)
    assert other_seed[0] == together[0] and other_seed.tolist() != together.tolist()


def test_the_noise_is_a_function_of_seed_step_and_token_alone():
    a = gumbel_noise(torch.tensor([5, 5, 6]), torch.tensor([1, 2, 1]), 1000)
    b = gumbel_noise(torch.tensor([5]), torch.tensor([2]), 1000)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    # standard Gumbel: mean 0.5772 (Euler's constant), variance pi^2 / 6
    assert abs(a.mean().item() - 0.5772) < 0.06 and abs(a.var().item() - 1.6449) < 0.15
