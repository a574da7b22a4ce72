"""Offline English text for calibration and evaluation, fixed and versioned.

Built-in sets come from `pydoc_data.topics`, the documentation texts every Python installation ships (several
hundred KB of English prose and code): `pydoc-topics` is every even-numbered topic (sorted by name), for
calibration; `pydoc-topics-heldout` every odd-numbered one, for evaluation, so the two never share text. Any other
value is a path to a UTF-8 text file. The sha256 of the text is recorded wherever it is used.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import RecipeError
from pipeline.recipe import REPO_ROOT

BUILTIN = ("pydoc-topics", "pydoc-topics-heldout")


def dataset_text(name: str) -> str:
    if name in BUILTIN:
        from pydoc_data.topics import topics

        keys = sorted(topics)[0 if name == "pydoc-topics" else 1::2]
        return "\n\n".join(topics[k] for k in keys)
    path = Path(name) if Path(name).is_absolute() else REPO_ROOT / name
    if not path.is_file():
        raise RecipeError([f"dataset '{name}': not a built-in set ({', '.join(BUILTIN)}) and not a text file"])
    return path.read_text(encoding="utf-8")


def dataset_digest(name: str) -> str:
    return hashlib.sha256(dataset_text(name).encode()).hexdigest()


@dataclass(frozen=True)
class Windows:
    """Token windows cut from a dataset: which ones, from what, so a run can be repeated exactly."""

    windows: list[list[int]]
    record: dict


def token_windows(name: str, tokenizer, seq_len: int, count: int | None, seed: int | None,
                  vocab_size: int | None = None) -> Windows:
    """`count` windows of `seq_len` tokens (all, in order, when seed is None; else a seeded sample).

    Without a tokenizer (random-weight models) the windows are seeded random token ids, recorded as such.
    """
    if tokenizer is None:
        rng = random.Random(seed or 0)
        n = count or 1
        windows = [[rng.randrange(vocab_size) for _ in range(seq_len)] for _ in range(n)]
        return Windows(windows, {"dataset": "synthetic-random-token-ids", "seed": seed, "seq_len": seq_len,
                                 "samples": n})
    text = dataset_text(name)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    total = len(ids) // seq_len
    if total == 0:
        raise RecipeError([f"dataset '{name}' has {len(ids)} tokens, fewer than one window of {seq_len}"])
    if seed is None:
        chosen = list(range(min(total, count or total)))
    else:
        if count > total:
            raise RecipeError([f"dataset '{name}' has {total} windows of {seq_len} tokens; asked for {count}"])
        chosen = sorted(random.Random(seed).sample(range(total), count))
    windows = [ids[i * seq_len:(i + 1) * seq_len] for i in chosen]
    return Windows(windows, {"dataset": name, "sha256": hashlib.sha256(text.encode()).hexdigest(),
                             "tokens_in_dataset": len(ids), "seq_len": seq_len, "window_ids": chosen, "seed": seed})
