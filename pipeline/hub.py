"""Fetch a model: a Hugging Face repo at a pinned revision, a local folder, or random weights of a named shape
(written by pipeline.random_weights).

Whatever the source, the result is a folder in Hugging Face layout (config.json, *.safetensors, tokenizer files),
which is all the converter reads.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from pipeline.errors import FetchError
from pipeline.recipe import REPO_ROOT, ModelSpec
from pipeline.shapes import SHAPE_TOKENIZERS, SHAPES

# What a snapshot needs: the config, the weights and the tokenizer; never *.bin, *.pt, *.gguf, onnx, ...
HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
    "added_tokens.json", "chat_template.jinja",
]


def checkpoints_dir() -> Path:
    return Path(os.environ.get("PIPELINE_HOME", REPO_ROOT / "checkpoints"))


def hf_cache_dir() -> Path:
    return checkpoints_dir() / "hf-cache"


def resolve_local(path: str) -> Path:
    """A recipe's folder path: absolute, or under the pipeline's home for `checkpoints/...` (so $PIPELINE_HOME moves
    the offline sources with everything else), or relative to the project root."""
    p = Path(path)
    if p.is_absolute():
        return p
    if p.parts[0] == "checkpoints":
        return checkpoints_dir().joinpath(*p.parts[1:])
    return REPO_ROOT / p


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _offline_error(spec: ModelSpec, what: str) -> FetchError:
    return FetchError(
        f"the Hugging Face Hub is unreachable from this machine and {spec.hub}@{spec.revision[:12]} ({what}) is not in "
        f"the local cache {hf_cache_dir()}.\n"
        f"  Fix: download the model where the Hub is reachable (huggingface-cli download {spec.hub} --revision "
        f"{spec.revision} --local-dir DIR), copy DIR here, and point the recipe at it:\n"
        f"    make build RECIPE=... ARGS=\"model.hub=null model.revision=null model.local=DIR\"")


def _hub_download(spec: ModelSpec, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()
    try:
        path = snapshot_download(spec.hub, revision=spec.revision, allow_patterns=patterns,
                                 cache_dir=hf_cache_dir(), local_files_only=offline)
    except LocalEntryNotFoundError:
        raise _offline_error(spec, what) from None
    except HfHubHTTPError as exc:
        raise FetchError(f"the Hub refused {spec.hub}@{spec.revision}: {exc}. For a gated model (Llama), accept its "
                         f"license on huggingface.co and set HF_TOKEN") from None
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise _offline_error(spec, what) if offline else FetchError(f"{spec.hub}@{spec.revision} has no config.json")
    return folder


def model_config(spec: ModelSpec) -> dict:
    """The model's Hugging Face config.json, read without fetching weights (used to validate a recipe early)."""
    if spec.random:
        return dict(SHAPES[spec.random])
    if spec.local:
        folder = resolve_local(spec.local)
        if not (folder / "config.json").is_file():
            hint = ""
            if "checkpoints/sources" in spec.local:
                hint = " (prepare offline models with `python -m pipeline.offline all`, or `make demo`)"
            raise FetchError(f"model.local: {folder} has no config.json{hint}; point model.local at a folder in "
                             f"Hugging Face layout (config.json + *.safetensors)")
        return json.loads((folder / "config.json").read_text())
    return json.loads((_hub_download(spec, ["config.json"], "config.json") / "config.json").read_text())


def tokenizer_dir(spec: ModelSpec) -> Path | None:
    """The folder to take tokenizer files from, when it is not the model folder itself."""
    if spec.tokenizer:
        folder = resolve_local(spec.tokenizer)
        if not folder.is_dir():
            raise FetchError(f"model.tokenizer: {folder} is not a folder; give a folder with tokenizer.json or "
                             f"vocab.json + merges.txt (`python -m pipeline.offline gpt2-tokenizer` makes GPT-2's)")
        return folder
    if spec.random and spec.random in SHAPE_TOKENIZERS:
        folder = checkpoints_dir() / "sources" / SHAPE_TOKENIZERS[spec.random]
        return folder if folder.is_dir() else None
    return None


def tokenizer_source(spec: ModelSpec, model_folder: Path) -> Path:
    """Where a build takes its tokenizer files from: model.tokenizer when set, else the fetched model folder
    (the random-weight fetch stage copies its shape's tokenizer into that folder)."""
    return tokenizer_dir(spec) if spec.tokenizer else Path(model_folder)


def fetch_weights(spec: ModelSpec) -> Path:
    """The Hugging Face folder of a Hub or local source (not copied). Random weights are a build stage of their
    own (pipeline.build), written by pipeline.random_weights.make_random_checkpoint."""
    if spec.hub:
        return _hub_download(spec, HUB_PATTERNS, "weights")
    model_config(spec)  # a clear error for a missing folder
    return resolve_local(spec.local)
