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
