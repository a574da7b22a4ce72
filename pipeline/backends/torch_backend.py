"""Load a TensorRT-LLM checkpoint folder into the PyTorch backend, one rank at a time.

The checks mirror what TensorRT-LLM 1.2 applies when it reads a checkpoint (`PretrainedConfig.from_dict`,
`Mapping.__init__`, `PretrainedModel.load`): required fields, world_size == tp * pp, known QuantAlgo names, every
required tensor present with its shape. They run before any weights load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.architectures import by_trtllm_name
from pipeline.backends.torch_model import RankModel
from pipeline.dist import Comm
from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import CheckpointError
from pipeline.quantize.registry import TRTLLM_QUANT_ALGOS, kv_cache_formats
from pipeline.safetensors_io import read_header

REQUIRED_FIELDS = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                   "mapping", "quantization")


def checkpoint_config_problems(config: dict) -> list[str]:
    """What TensorRT-LLM 1.2 would reject in a checkpoint config.json, as messages."""
    problems = [f"missing required field '{k}'" for k in REQUIRED_FIELDS if k not in config]
    if problems:
        return problems
    try:
        by_trtllm_name(config["architecture"])
    except CheckpointError as exc:
        problems.append(str(exc))
    if config["dtype"] not in TORCH_DTYPES:
        problems.append(f"dtype '{config['dtype']}' is not one of {list(TORCH_DTYPES)}")
    m = config["mapping"]
    tp, pp, cp = m.get("tp_size", 1), m.get("pp_size", 1), m.get("cp_size", 1)
    world = m.get("world_size", tp * pp * cp)
    if world != tp * pp * cp:
        problems.append(f"mapping.world_size {world} != tp_size {tp} * pp_size {pp} * cp_size {cp}")
    if m.get("moe_tp_size", tp) * m.get("moe_ep_size", 1) != tp:
        problems.append("mapping: moe_tp_size * moe_ep_size must equal tp_size")
    if config["num_attention_heads"] % tp:
        problems.append(f"num_attention_heads {config['num_attention_heads']} is not divisible by tp_size {tp}")
    if config["num_hidden_layers"] % pp:
        problems.append(f"num_hidden_layers {config['num_hidden_layers']} is not divisible by pp_size {pp}")
    q = config["quantization"]
    if q.get("quant_algo") is not None and q["quant_algo"] not in TRTLLM_QUANT_ALGOS:
        problems.append(f"quantization.quant_algo '{q['quant_algo']}' is not a TensorRT-LLM QuantAlgo name")
    kv_algos = tuple(f.quant_algo for f in kv_cache_formats() if f.quant_algo)  # those this backend stores
    if q.get("kv_cache_quant_algo") is not None and q["kv_cache_quant_algo"] not in kv_algos:
        problems.append(f"quantization.kv_cache_quant_algo '{q['kv_cache_quant_algo']}' must be one of "
                        f"{kv_algos}")
    return problems


def read_checkpoint_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: no config.json; is this a TensorRT-LLM checkpoint folder (made by "
                              f"`python -m pipeline build`)?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); rebuild it") from None
    problems = checkpoint_config_problems(config)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return config


def rank_file_problem(ckpt_dir: Path, rank: int) -> str | None:
    """A message if rank{rank}.safetensors is missing or its header is corrupt; reads the header only."""
    try:
        read_header(Path(ckpt_dir) / f"rank{rank}.safetensors")
    except CheckpointError as exc:
        return str(exc)
    return None


def load_rank_model(ckpt_dir: Path, config: dict, comm: Comm, device: torch.device) -> RankModel:
    """Load this rank's file only and build its part of the model on `device`."""
    path = Path(ckpt_dir) / f"rank{comm.mapping.rank}.safetensors"
    weights = load_file(path, device="cpu")
    from pipeline.quantize.runtime import linear_factory

    make_linear = linear_factory(config, weights, device)
    return RankModel(config, weights, comm, device, make_linear=make_linear)
