"""Fetch a model: a Hugging Face repo at a pinned revision, a local folder, or random weights of a named shape
(written by pipeline.random_weights).

Whatever the source, the result is a folder in Hugging Face layout (config.json, *.safetensors, tokenizer files),
which is all the converter reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import FetchError
from pipeline.recipe import REPO_ROOT, ModelSpec, Recipe
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
    """The standard Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), read at
    call time, so a model any other tool downloaded is found here too."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_commit_sha(revision: str | None) -> bool:
    return bool(revision and re.fullmatch(r"[0-9a-f]{40}", revision))


def _resolve_on_hub(repo: str, revision: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi().model_info(repo, revision=revision).sha
    except HfHubHTTPError as exc:
        raise FetchError(f"model.revision: the Hub has no revision '{revision}' of {repo} ({exc}); give a branch, "
                         f"a tag or a commit sha from the repo's 'Files and versions' history") from None


# Asks the Hub for a branch's or tag's commit; a test replaces it (no network here).
resolve_on_hub: Callable[[str, str], str] = _resolve_on_hub


def _cached_ref(repo: str, revision: str) -> str | None:
    """The commit huggingface_hub recorded for a branch or tag when it last downloaded it (refs/<revision>)."""
    ref = hf_cache_dir() / f"models--{repo.replace('/', '--')}" / "refs" / revision
    sha = ref.read_text().strip() if ref.is_file() else ""
    return sha if is_commit_sha(sha) else None


def pin_revision(recipe: Recipe, log: Callable[[str], None] = print) -> Recipe:
    """The recipe with model.revision as a commit sha: a branch or tag (main, v1.0) is resolved once, here, and the
    build (its keys, manifests and record) is pinned to that commit from then on."""
    m = recipe.model
    if not m.hub or is_commit_sha(m.revision):
        return recipe
    offline = hub_offline()
    sha = _cached_ref(m.hub, m.revision) if offline else resolve_on_hub(m.hub, m.revision)
    if sha is None:
        raise _offline_error(m, f"which commit '{m.revision}' is")
    where = "the local cache's ref" if offline else "the Hub"
    log(f"model.revision '{m.revision}' of {m.hub} is commit {sha} ({where}); this build is pinned to it "
        f"(write model.revision: {sha} in the recipe to keep it)")
    return dataclasses.replace(recipe, model=dataclasses.replace(m, revision=sha))


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
    """One HEAD request to the Hub's endpoint through httpx, which honours HTTPS_PROXY / HTTP_PROXY / NO_PROXY (as
    huggingface_hub's own downloads do)."""
    import httpx

    try:
        httpx.head(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout=timeout_s)
        return True
    except httpx.HTTPError:
        return False


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable()


def _offline_error(spec: ModelSpec, what: str) -> FetchError:
    return FetchError(
        f"the Hugging Face Hub is unreachable from this machine (HF_HUB_OFFLINE, or no route; HTTPS_PROXY is used when "
        f"set) and {spec.hub}@{spec.revision[:12]} ({what}) is not in the Hugging Face cache {hf_cache_dir()}.\n"
        f"  Fix: download it into the cache where the Hub is reachable (hf download {spec.hub} --revision "
        f"{spec.revision}) and copy that cache here (HF_HOME), or download it to a folder (add --local-dir DIR), "
        f"copy DIR here, and point the recipe at it:\n"
        f"    make build RECIPE=... ARGS=\"model.hub=null model.revision=null model.local=DIR\"")


def _hub_download(spec: ModelSpec, patterns: list[str], what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
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
