"""Batched generation over the ranks of a RankModel: prefill, decode, sample, stop.

Every rank runs the same loop. Prompts of different lengths are left-padded into one batch; each sequence's
positions count its own tokens only, and padding slots are masked out of attention. The last stage's first tp
rank samples the next tokens and broadcasts them, so all ranks agree on what comes next and when to stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.backends.torch_model import RankModel
from pipeline.dist import to_device
from pipeline.params import SamplingParams, seed_of

SEED_MASK = (1 << 63) - 1  # seeds as non-negative int64
# splitmix64's constants, as signed int64 (torch's integers wrap on overflow, as the uint64 arithmetic does)
_GOLDEN, _MIX1, _MIX2 = 0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB
_STEP = 0x2545F4914F6CDD1D


def _shift(h: torch.Tensor, bits: int) -> torch.Tensor:
    """h >> bits as unsigned 64-bit (torch shifts int64 arithmetically)."""
    return (h >> bits) & ((1 << (64 - bits)) - 1)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [R, V] from a counter-based hash (splitmix64's finalizer) of (seed, step, token): row r's
    values depend on seeds[r] and steps[r] alone, never on the batch around it, on any device."""
    h = seeds[:, None] * _GOLDEN + steps[:, None] * _STEP + torch.arange(vocab, device=seeds.device)[None] * _MIX2
    h = (h ^ _shift(h, 30)) * _MIX1
    h = (h ^ _shift(h, 27)) * _MIX2
    h = h ^ _shift(h, 31)
    uniform = (_shift(h, 41).to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # 23 bits, strictly inside (0, 1)
    return -torch.log(-torch.log(uniform))


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
                steps: Sequence[int]) -> torch.Tensor:
    """Next token per row of float32 logits [R, V] (banned tokens already -inf), row r with params[r] (greedy:
    argmax), seeds[r] and steps[r]. Sampling rows: temperature -> top-k -> top-p, then one draw by the Gumbel-max
    trick (argmax of the scores plus gumbel_noise): on the device without a host sync, and a request's draw at a
    step is the same in any batch."""
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy
    device, vocab = logits.device, logits.shape[-1]
    sampled = _on(device, [not p.greedy for p in params], torch.bool)
    scores = logits / _on(device, [p.temperature or 1.0 for p in params], torch.float32)[:, None]
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]  # 0: no cut
    if any(ks):  # keep each row's k best (ties at the k-th kept); one topk for the largest k
        best = torch.topk(scores, max(ks), dim=-1).values
        kth = best.gather(1, _on(device, [max(k, 1) - 1 for k in ks], torch.long)[:, None])
        kth = kth.masked_fill(_on(device, [k == 0 for k in ks], torch.bool)[:, None], float("-inf"))
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if any(p.top_p < 1.0 for p in params):
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(dim=-1)
        remove = probs.cumsum(dim=-1) - probs >= _on(device, [p.top_p for p in params], torch.float32)[:, None]
        scores = torch.full_like(scores, float("-inf")).scatter(  # keep the token that crosses p
            -1, order, sorted_scores.masked_fill(remove, float("-inf")))
    noise = gumbel_noise(_on(device, [s & SEED_MASK for s in seeds], torch.long),
                         _on(device, list(steps), torch.long), vocab)
    return torch.where(sampled, (scores + noise).argmax(dim=-1), greedy)


def sample_next(logits: torch.Tensor, sampling: SamplingParams, seed: int, step: int) -> torch.Tensor:
    """Next token per row of float32 logits [B, V] with one SamplingParams for all rows (the static paths):
    row b draws with seed + b at `step`."""
    rows = logits.shape[0]
    return sample_rows(logits, [sampling] * rows, [seed + b for b in range(rows)], [step] * rows)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return tokens.to(device), mask.to(device)


def generate(model: RankModel, prompts: list[list[int]], sampling: SamplingParams, eos_id: int | None, pad_id: int,
             on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> list[list[int]]:
    """Generate for a batch of token-id prompts; returns the new tokens of each (EOS included if produced).

    `on_tokens(tokens, finished)` is called after each step with the new tokens [B] (for streaming).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    comm = model.comm
    device = model.device
    tokens, mask = left_pad(prompts, pad_id, device)
    batch, width = tokens.shape
    max_len = width + sampling.max_tokens
    cache = model.new_cache(batch, max_len)
    cache.valid[:, :width] = mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    is_sampler = comm.mapping.rank == comm.sampler_rank
    seed = seed_of(sampling) if sampling.temperature > 0 else 0

    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_positions = positions[:, -1]
    logits = model.forward(tokens, positions, cache, slot_start=0)
    for step in range(sampling.max_tokens):
        next_tokens = torch.empty(batch, dtype=torch.long, device=device)
        if is_sampler:
            next_tokens = sample_next(logits[:, -1], sampling, seed, step)
        next_tokens = comm.broadcast_tokens(next_tokens)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        for i in range(batch):
            if not finished[i]:
                outputs[i].append(int(next_tokens[i]))
        if eos_id is not None:
            finished |= next_tokens == eos_id
        if on_tokens is not None:
            on_tokens(next_tokens, finished)
        if bool(finished.all()) or step == sampling.max_tokens - 1:
            break
        slot = width + step
        cache.valid[:, slot] = True
        next_positions = next_positions + 1
        logits = model.forward(next_tokens[:, None], next_positions[:, None], cache, slot_start=slot)
    return outputs


def score(model: RankModel, tokens: list[int]) -> torch.Tensor | None:
    """Float32 logits [T, vocab] for every position of one sequence (last stage only; None elsewhere)."""
    ids = torch.tensor([tokens], dtype=torch.long, device=model.device)
    positions = torch.arange(len(tokens), device=model.device)[None]
    cache = model.new_cache(1, len(tokens))
    cache.valid[:] = True
    logits = model.forward(ids, positions, cache, slot_start=0, all_logits=True)
    return None if logits is None else logits[0]
