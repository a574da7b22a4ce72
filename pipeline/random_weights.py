"""Random weights of a named shape (pipeline.shapes), written as a Hugging Face folder, deterministically.

Every tensor comes from generators seeded by (seed, tensor name, row chunk), so the bytes depend on the shape and
the seed only, never on the machine or on how the writing is chunked into files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.architectures import by_hf_config
from pipeline.dtypes import TORCH_DTYPES
from pipeline.safetensors_io import SafetensorsWriter
from pipeline.shapes import SHAPES


def seed_for(seed: int, name: str, chunk: int) -> int:
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


def fan_in_dim(hf: dict) -> int:
    """The input dimension of a linear weight in this architecture's Hugging Face files."""
    return by_hf_config(hf).random_fan_in_dim


def _random_block(name: str, shape: tuple[int, ...], rows: tuple[int, int], seed: int, chunk: int,
                  fan_in: int) -> torch.Tensor:
    """Rows of one random tensor, from a generator seeded by (seed, name, chunk)."""
    g = torch.Generator().manual_seed(seed_for(seed, name, chunk))
    noise = torch.randn((rows[1] - rows[0], *shape[1:]), generator=g, dtype=torch.float32)
    return init_random(name, shape, noise, fan_in)


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
    torch_dtype = TORCH_DTYPES[hf["torch_dtype"]]
    fan_in = fan_in_dim(hf)

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
                block = _random_block(name, shape, (start, stop), seed, chunk, fan_in)
                writer.write_rows(name, block.to(torch_dtype), start)
        writer.close()
    if len(shards) > 1:
        total = sum(torch_dtype.itemsize * int(torch.Size(s).numel()) for s in tensors.values())
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out_dir)
