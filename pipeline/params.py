"""Sampling and request parameters: one definition and one validation, shared by the recipe's runtime section,
`python -m pipeline.run`, the Python `LLM` API and the HTTP server.

`SamplingParams.problems()` checks what needs no model (ranges); `request_problems()` checks a request against the
model and the build's limits (vocabulary, positions, max_input_len, max_seq_len). Both return every problem at
once as messages that say what is wrong and what to give instead; `check_request` raises them as a ParamError.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import PipelineError


class ParamError(PipelineError):
    """A sampling or request parameter is out of range or past the model's or the build's limits."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class SamplingParams:
    """How one request is generated. Defaults: greedy, 32 new tokens, stop at the tokenizer's EOS."""

    max_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # 1.0 = no limit
    seed: int | None = None  # None: a fresh draw per request (greedy needs none)
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the output (included, as EOS is)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    min_tokens: int = 0  # EOS and stop tokens are ignored before this many new tokens

    def __post_init__(self) -> None:
        # Lists from JSON or the command line become tuples, so the object stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def problems(self) -> list[str]:
        """What is out of range, independent of any model (empty when valid)."""
        out = []
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            out.append(f"max_tokens must be a whole number of at least 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0.0 or self.temperature != self.temperature:
            out.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            out.append(f"top_k must be a whole number >= 0 (0 = no limit), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            out.append(f"top_p must be in (0, 1] (1 = no limit), got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            out.append(f"seed must be a whole number >= 0, got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            out.append(f"min_tokens must be a whole number >= 0, got {self.min_tokens!r}")
        elif isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens:
            out.append(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            out.append("stop must be a list of non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            out.append("stop_token_ids must be whole numbers >= 0")
        return out

    def validated(self) -> SamplingParams:
        problems = self.problems()
        if problems:
            raise ParamError(problems)
        return self


@dataclass(frozen=True)
class Limits:
    """What a built artifact accepts: the model's vocabulary and positions, and the build's limits."""

    vocab_size: int
    max_position_embeddings: int | None = None
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_batch_size: int | None = None

    @property
    def context_len(self) -> int | None:
        """The longest prompt + output this artifact can hold."""
        bounds = [b for b in (self.max_position_embeddings, self.max_seq_len) if b]
        return min(bounds) if bounds else None

    @classmethod
    def from_config(cls, config: dict, build: dict | None = None) -> Limits:
        """From a TensorRT-LLM checkpoint config.json and a resolved recipe's `build` section (None: no limits)."""
        build = build or {}
        return cls(vocab_size=config["vocab_size"], max_position_embeddings=config.get("max_position_embeddings"),
                   max_input_len=build.get("max_input_len"), max_seq_len=build.get("max_seq_len"),
                   max_batch_size=build.get("max_batch_size"))


def request_problems(params: SamplingParams, prompt_ids: list[int], limits: Limits) -> list[str]:
    """Everything wrong with generating `params.max_tokens` tokens after `prompt_ids` on this artifact."""
    out = params.problems()
    if len(prompt_ids) == 0:
        out.append("the prompt is empty: give at least one token of text")
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < limits.vocab_size]
    if bad:
        out.append(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    bad_stop = [t for t in params.stop_token_ids if isinstance(t, int) and t >= limits.vocab_size]
    if bad_stop:
        out.append(f"stop_token_ids {bad_stop[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    if limits.max_input_len and len(prompt_ids) > limits.max_input_len:
        out.append(f"the prompt has {len(prompt_ids)} tokens, more than the build's max_input_len "
                   f"{limits.max_input_len}; shorten it or rebuild with build.max_input_len={len(prompt_ids)}")
    context = limits.context_len
    if context and isinstance(params.max_tokens, int) and len(prompt_ids) + params.max_tokens > context:
        room = context - len(prompt_ids)
        hint = f"ask for at most {room} new tokens" if room > 0 else "shorten the prompt"
        out.append(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is past the "
                   f"context of {context} tokens; {hint}")
    return out


def check_request(params: SamplingParams, prompt_ids: list[int], limits: Limits) -> None:
    problems = request_problems(params, prompt_ids, limits)
    if problems:
        raise ParamError(problems)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
