"""Sampling and request parameters: one definition and one validation, shared by the recipe's runtime section,
`python -m pipeline.run`, the Python `LLM` API and the HTTP server.

`SamplingParams.problems()` checks what needs no model (ranges); `request_problems()` checks a request against the
model and the build's limits (vocabulary, positions, max_input_len, max_seq_len). Both return every problem at
once as messages that say what is wrong and what to give instead; `check_request` raises them as a ParamError.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pipeline.errors import PipelineError


def seed_of(params: SamplingParams) -> int:
    """The sampler's seed: the given one, else a fresh draw (seed None)."""
    return params.seed if params.seed is not None else random.randrange(2**63)


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

    def problems(self, names: dict[str, str] | None = None) -> list[str]:
        """What is out of range, independent of any model (empty when valid). `names` renames fields in the
        messages, so each caller names the parameter as its user typed it (e.g. {"top_p": "--top-p"})."""
        n = {f: (names or {}).get(f, f) for f in self.__dataclass_fields__}
        out = []
        if not _is_whole(self.max_tokens) or self.max_tokens < 1:
            out.append(f"{n['max_tokens']} must be a whole number of at least 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0.0 or self.temperature == float("inf"):
            out.append(f"{n['temperature']} must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_whole(self.top_k) or self.top_k < 0:
            out.append(f"{n['top_k']} must be a whole number >= 0 (0 = no limit), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            out.append(f"{n['top_p']} must be in (0, 1] (1 = no limit), got {self.top_p!r}")
        if self.seed is not None and (not _is_whole(self.seed) or self.seed < 0):
            out.append(f"{n['seed']} must be a whole number >= 0, got {self.seed!r}")
        if not _is_whole(self.min_tokens) or self.min_tokens < 0:
            out.append(f"{n['min_tokens']} must be a whole number >= 0, got {self.min_tokens!r}")
        elif _is_whole(self.max_tokens) and self.min_tokens > self.max_tokens:
            out.append(f"{n['min_tokens']} ({self.min_tokens}) must not exceed {n['max_tokens']} ({self.max_tokens})")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            out.append(f"{n['stop']} must be a list of non-empty strings")
        if any(not _is_whole(t) or t < 0 for t in self.stop_token_ids):
            out.append(f"{n['stop_token_ids']} must be whole numbers >= 0")
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


def request_problems(params: SamplingParams, prompt_ids: list[int], limits: Limits,
                     names: dict[str, str] | None = None) -> list[str]:
    """Everything wrong with generating `params.max_tokens` tokens after `prompt_ids` on this artifact."""
    out = params.problems(names)
    max_tokens = (names or {}).get("max_tokens", "max_tokens")
    if len(prompt_ids) == 0:
        out.append("the prompt is empty: give at least one token of text")
    bad = [t for t in prompt_ids if not _is_whole(t) or not 0 <= t < limits.vocab_size]
    if bad:
        out.append(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size}); give ids "
                   f"below {limits.vocab_size}")
    bad_stop = [t for t in params.stop_token_ids if _is_whole(t) and t >= limits.vocab_size]
    if bad_stop:
        out.append(f"stop_token_ids {bad_stop[:5]} are outside the vocabulary [0, {limits.vocab_size})")
    if limits.max_input_len and len(prompt_ids) > limits.max_input_len:
        out.append(f"the prompt has {len(prompt_ids)} tokens, more than the build's max_input_len "
                   f"{limits.max_input_len}; shorten it or rebuild with build.max_input_len={len(prompt_ids)}")
    context = limits.context_len
    if context and len(prompt_ids) >= context:
        out.append(f"the prompt has {len(prompt_ids)} tokens, but the model holds {context} positions (prompt and "
                   f"output together); shorten the prompt to fewer than {context} tokens")
    elif context and _is_whole(params.max_tokens) and len(prompt_ids) + params.max_tokens > context:
        out.append(f"the prompt ({len(prompt_ids)} tokens) plus {max_tokens} ({params.max_tokens}) is past the "
                   f"context of {context} tokens; ask for at most {context - len(prompt_ids)} new tokens")
    return out


def text_problems(texts: list[str], name: str = "prompt") -> list[str]:
    """Prompt texts that cannot be tokenized: empty, or not valid UTF-8 (bytes Python kept as surrogates)."""
    out = []
    for i, text in enumerate(texts):
        where = name if len(texts) == 1 else f"{name} [{i}]"
        if not isinstance(text, str) or text == "":
            out.append(f"{where} is empty: give at least one word of text")
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            out.append(f"{where} is not valid UTF-8 (byte {exc.start}); give the text in UTF-8, or token ids "
                       f"with --prompt-ids")
    return out


def runtime_problems(runtime, prefix: str = "runtime.") -> list[str]:
    """The recipe's `runtime:` section (a RuntimeSpec) checked by the same rules as a request."""
    params = SamplingParams(max_tokens=runtime.max_new_tokens, temperature=runtime.temperature,
                            top_k=runtime.top_k, top_p=runtime.top_p, seed=runtime.seed)
    names = {f: prefix + f for f in ("temperature", "top_k", "top_p", "seed")} | {"max_tokens": prefix + "max_new_tokens"}
    return params.problems(names) + text_problems(list(runtime.prompts), prefix + "prompts")


def check_request(params: SamplingParams, prompt_ids: list[int], limits: Limits) -> None:
    problems = request_problems(params, prompt_ids, limits)
    if problems:
        raise ParamError(problems)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
