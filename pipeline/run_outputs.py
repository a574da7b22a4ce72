"""What a run reads and reports, the same for every backend: sampling settings from the recipe and the command
line, the artifact's tokenizer, and rank 0's output (texts, timing line, --json)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.params import SamplingParams
from pipeline.recipe import RuntimeSpec


def sampling_from(runtime: dict, args: argparse.Namespace) -> SamplingParams:
    spec = RuntimeSpec(**{k: v for k, v in runtime.items() if k in RuntimeSpec.__dataclass_fields__ and k != "prompts"})
    sampling = SamplingParams(spec.max_new_tokens, spec.temperature, spec.top_k, spec.top_p, spec.seed)
    overrides = {"max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                 "top_p": args.top_p, "seed": args.seed}
    return replace(sampling, **{k: v for k, v in overrides.items() if v is not None})


def load_tokenizer(folder: Path):
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class DecodingTokenizer:
    """The artifact's tokenizer for a run whose prompts are token ids, where it only turns new tokens into text:
    decoding reads tokenizer.json through the `tokenizers` library (what transformers' fast tokenizers call; 40 ms
    where importing transformers takes seconds of the run's start-up); anything else (encoding, chat templates,
    other attributes) goes to transformers' AutoTokenizer, loaded on first use. `for_folder` gives one only where
    the two decode alike (see there)."""

    def __init__(self, folder: Path, rust, eos_token_id: int):
        import threading

        self.folder, self._tokenizer, self.eos_token_id = folder, rust, eos_token_id
        self._full = None
        self._lock = threading.Lock()

    @classmethod
    def for_folder(cls, folder: Path) -> DecodingTokenizer | None:
        """None unless the folder has tokenizer.json, an EOS token, no WordPiece clean-up of spaces, and every
        special token its config names is special in tokenizer.json (so skip_special_tokens skips the same ids)."""
        if not (folder / "tokenizer.json").is_file():
            return None
        import tokenizers

        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
            if (folder / name).is_file():
                config.update(json.loads((folder / name).read_text()))
        rust = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        if config.get("clean_up_tokenization_spaces") and type(rust.model).__name__ != "BPE":
            return None

        def content(token) -> str | None:
            return token.get("content") if isinstance(token, dict) else token

        named = [content(config.get(n)) for n in SPECIAL_NAMES]
        named += [content(t) for key in ("additional_special_tokens", "extra_special_tokens")
                  for t in (config.get(key) or [])]
        named += [t.get("content") for t in (config.get("added_tokens_decoder") or {}).values() if t.get("special")]
        special = {t.content for t in rust.get_added_tokens_decoder().values() if t.special}
        eos = content(config.get("eos_token"))
        if eos is None or rust.token_to_id(eos) is None or any(n is not None and n not in special for n in named):
            return None
        return cls(folder, rust, rust.token_to_id(eos))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def full(self):
        with self._lock:
            if self._full is None:
                self._full = load_tokenizer(self.folder)
            return self._full

    def __call__(self, *args, **kwargs):
        return self.full(*args, **kwargs)

    def __getattr__(self, name: str):  # only for attributes not set above
        if name.startswith("__") or name in ("_full", "_lock", "folder"):
            raise AttributeError(name)
        return getattr(self.full, name)


def report_outputs(args: argparse.Namespace, artifact: Path, backend: str, world: int, prompts: list[list[int]],
                   outputs: list[list[int]], tokenizer, seconds: float, streamed: bool = False,
                   texts: list[str] | None = None) -> None:
    """Rank 0's output, the same for every backend: the texts (unless already streamed), a timing line on stderr,
    and with --json the prompts, token ids and texts."""
    if streamed:
        print(flush=True)
    else:
        for i, (prompt, new) in enumerate(zip(prompts, outputs)):
            text = tokenizer.decode(prompt + new, skip_special_tokens=True) if tokenizer else str(prompt + new)
            text = texts[i] if texts is not None else text  # chat: the reply alone
            print(text if len(prompts) == 1 else f"--- [{i}] ---\n{text}", flush=True)
    count = sum(len(o) for o in outputs)
    print(f"[pipeline.run] {count} new tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tok/s)",
          file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "artifact": str(artifact), "backend": backend, "world_size": world,
            "results": [{"prompt_ids": p, "new_ids": o,
                         "text": tokenizer.decode(o, skip_special_tokens=True) if tokenizer else None}
                        for p, o in zip(prompts, outputs)],
        }, indent=2))


class StreamPrinter:
    """Prints one sequence's text as its tokens arrive: the prompt, then each token's new text (incremental
    detokenization, constant work a token: pipeline.engine.core.Detokenizer)."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        from pipeline.engine.core import Detokenizer

        print(tokenizer.decode(prompt_ids, skip_special_tokens=True), end="", flush=True)
        self.detokenizer = Detokenizer(tokenizer, ())

    def add(self, token: int) -> None:
        print(self.detokenizer.add(token)[0], end="", flush=True)
