"""Random weights of a named shape (pipeline.shapes), written as a Hugging Face folder, deterministically.

Every tensor comes from generators seeded by (seed, tensor name, row chunk), so the bytes depend on the shape and
the seed only, never on the machine or on how the writing is chunked into files.
"""

from __future__ import annotations

import hashlib
import json
import random
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


# ------------------------------------------------------------------------------------------------ on a device


def make_prompts(batch: int, input_len: int, vocab: int, seed: int, spread: float = 0.0) -> list[list[int]]:
    """`batch` prompts of random token ids, input_len long each (or drawn within +-spread of it)."""
    rng = random.Random(seed)
    lengths = [max(1, round(input_len * (1 + rng.uniform(-spread, spread)))) for _ in range(batch)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


def device_random_model(shape: str, tp: int, comm, device: torch.device, dtype: str, seed: int = 0):
    """A RankModel of a named shape with seeded random weights made on the device (same model for any tp)."""
    from pipeline.architectures import describe, quantization_block, trtllm_config
    from pipeline.backends.torch_model import RankModel
    from pipeline.convert.memory import VirtualIndex, materialize_rank
    from pipeline.convert.streaming import plan_conversion
    from pipeline.shapes import SHAPES

    hf = dict(SHAPES[shape])
    arch = describe(hf)
    shapes = hf_tensor_shapes(hf)
    fan_in = fan_in_dim(hf)

    def make(name: str) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed_for(seed, name, 0))
        noise = torch.randn(shapes[name], generator=g, device=device, dtype=torch.float32)
        return init_random(name, shapes[name], noise, fan_in)

    index = VirtualIndex(shapes, torch.float32, make)
    plan = plan_conversion(index, arch, tp, 1, dtype)
    weights = materialize_rank(plan, index, comm.mapping.rank, device)
    config = trtllm_config(arch, dtype, comm.mapping, quantization_block())
    return RankModel(config, weights, comm, device), config, arch


def calibrate_on_device(model, vocab: int, tokens: int = 256, seed: int = 0) -> dict[str, float]:
    """Input amax of every linear layer over random token ids (for FP8 activation scales of random models)."""
    from pipeline.quantize.calibrate import ObservedLinear

    amax: dict[str, float] = {}
    saved = []
    for i, layer in enumerate(model.layers):
        for key in ("qkv", "dense", "fc", "gate", "proj"):
            if key in layer:
                saved.append((layer, key, layer[key]))
                layer[key] = ObservedLinear(f"{i}.{key}", layer[key].weight, layer[key].bias, amax)
    ids = torch.tensor([make_prompts(1, tokens, vocab, seed)[0]], device=model.device)
    cache = model.new_cache(1, tokens)
    cache.valid[:] = True
    with torch.no_grad():
        model.forward(ids, torch.arange(tokens, device=model.device)[None], cache, slot_start=0)
    for layer, key, inner in saved:
        layer[key] = inner
    return amax


def random_rank_model(shape: str, comm, device: torch.device, dtype: str, quant: str = "none", seed: int = 0):
    """device_random_model, quantized on the device by `quant`'s format (activation scales calibrated on random
    ids): what the GPU benchmarks run when no checkpoint travels. Returns (model, config, arch)."""
    from pipeline.quantize.registry import weight_format

    model, config, arch = device_random_model(shape, comm.mapping.world_size, comm, device, dtype, seed)
    quantizer = weight_format(quant).device_quantizer
    if quantizer is not None:
        quantizer(model, calibrate_on_device(model, config["vocab_size"]))
    return model, config, arch
