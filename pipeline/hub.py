"""Fetch a model: a Hugging Face repo at a pinned revision, a local folder, or random weights of a named shape.

Whatever the source, the result is a folder in Hugging Face layout (config.json, *.safetensors, tokenizer files),
which is all the converter reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from pipeline.errors import FetchError
from pipeline.recipe import REPO_ROOT, ModelSpec
from pipeline.safetensors_io import SafetensorsWriter
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
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p)


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
    own (pipeline.build), written by make_random_checkpoint."""
    if spec.hub:
        return _hub_download(spec, HUB_PATTERNS, "weights")
    model_config(spec)  # a clear error for a missing folder
    return resolve_local(spec.local)


# --------------------------------------------------------------------------------------------- random weights


def _seed_for(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_random(name: str, shape: tuple[int, ...], noise: torch.Tensor, fan_in_dim: int) -> torch.Tensor:
    """Scale standard-normal noise for tensor `name`: norms near 1, small biases, unit-variance embeddings, linear
    weights at 1/sqrt(fan_in). Activations stay O(1) and logits peaked, so greedy tokens are stable."""
    if any(k in name for k in ("norm", "ln_")) and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    if name.endswith("bias"):
        return 0.1 * noise
    if any(k in name for k in ("embed", "wte", "wpe", "lm_head")) or len(shape) < 2:
        return noise
    return noise / (shape[fan_in_dim] ** 0.5)


def _random_block(name: str, shape: tuple[int, ...], rows: tuple[int, int], seed: int, chunk: int,
                  fan_in_dim: int) -> torch.Tensor:
    """Rows of one random tensor, from a generator seeded by (seed, name, chunk)."""
    g = torch.Generator().manual_seed(_seed_for(seed, name, chunk))
    noise = torch.randn((rows[1] - rows[0], *shape[1:]), generator=g, dtype=torch.float32)
    return init_random(name, shape, noise, fan_in_dim)


def hf_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Hugging Face checkpoint of this config (from a model on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if hf.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    return tensors


def make_random_checkpoint(shape_name: str, seed: int, out_dir: Path, shard_bytes: int = 2 * 1024**3,
                           dtype: str | None = None) -> None:
    """Write a Hugging Face checkpoint of the named shape with deterministic random weights, tensor by tensor."""
    from transformers import AutoConfig

    hf = dict(SHAPES[shape_name])
    if dtype is not None:
        hf["torch_dtype"] = dtype
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(**hf)
    tensors = hf_tensor_shapes(hf)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[hf["torch_dtype"]]
    fan_in_dim = 0 if hf["model_type"] == "gpt2" else 1  # GPT-2's Conv1D is [in, out]

    shards: list[dict[str, tuple]] = [{}]
    size = 0
    for name, shape in tensors.items():
        nbytes = torch_dtype.itemsize * max(1, int(torch.Size(shape).numel()))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (torch_dtype, shape)
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        writer = SafetensorsWriter(out_dir / file_name, shard)
        for name, (_, shape) in shard.items():
            weight_map[name] = file_name
            rows = shape[0] if shape else 1
            row_elems = max(1, int(torch.Size(shape[1:]).numel()))
            chunk_rows = max(1, (16 * 1024 * 1024) // row_elems)
            for chunk, start in enumerate(range(0, rows, chunk_rows)):
                stop = min(rows, start + chunk_rows)
                block = _random_block(name, shape, (start, stop), seed, chunk, fan_in_dim)
                writer.write_rows(name, block.to(torch_dtype), start)
        writer.close()
    if len(shards) > 1:
        total = sum(torch_dtype.itemsize * int(torch.Size(s).numel()) for s in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out_dir)
