"""Batched generation over the ranks of a RankModel: prefill, decode, sample, stop.

Every rank runs the same loop. Prompts of different lengths are left-padded into one batch; each sequence's
positions count its own tokens only, and padding slots are masked out of attention. The last stage's first tp
rank samples the next tokens and broadcasts them, so all ranks agree on what comes next and when to stop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.backends.torch_model import RankModel
from pipeline.params import SamplingParams, seed_of


def sample_next(logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of float32 logits [B, V]: greedy, or temperature -> top-k -> top-p -> draw."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    scores = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_scores.softmax(dim=-1) >= sampling.top_p  # keep the token that crosses p
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


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
    generator = torch.Generator().manual_seed(seed_of(sampling)) if sampling.temperature > 0 else None

    outputs: list[list[int]] = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    next_positions = positions[:, -1]
    logits = model.forward(tokens, positions, cache, slot_start=0)
    for step in range(sampling.max_tokens):
        next_tokens = torch.empty(batch, dtype=torch.long, device=device)
        if is_sampler:
            next_tokens = sample_next(logits[:, -1], sampling, generator)
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
