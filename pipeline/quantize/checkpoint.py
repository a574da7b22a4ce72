"""The checkpoint side of quantization: what `convert` writes for each format (trtllm-checkpoint-and-build.md, 3).

The Quantizer runs calibration when the recipe's formats need it, calls the weight format's `encode_checkpoint`
(pipeline/quantize/schemes/: FP8 writes float8 weights and scales; the weight-only formats leave the weights to
trtllm-build), writes the KV-cache format's per-layer scale, and returns config.json's quantization block.
lm_head always stays in high precision, as in TensorRT-LLM.

exclude_modules: TensorRT-LLM 1.2 replaces its default exclusion list (quantization/quantize.py, quantize_layers:
'*lm_head', '*router', '*vocab_embedding', '*position_embedding', '*block_embedding', '*shared_expert_gate') with
the config's list when one is given, and matches it with fnmatch against module names ("transformer.vocab_embedding")
when it swaps layers, and against tensor names ("transformer.layers.0.mlp.fc.weight") when the weight-only
preprocessing quantizes (models/convert_utils.py, weight_only_quantize_dict). So the list written is that default
followed by each recipe pattern as given and with ".*" (the tensor names under it): a list of only "lm_head" made
TensorRT-LLM turn the embeddings into weight-only embeddings that need tensors no checkpoint carries.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.architectures import quantization_block
from pipeline.convert.streaming import CHUNK_BYTES, ConversionPlan
from pipeline.datasets import dataset_digest
from pipeline.quantize.registry import kv_cache_format, weight_format
from pipeline.recipe import Recipe
from pipeline.safetensors_io import SafetensorsIndex


def needs_calibration(recipe: Recipe) -> bool:
    q = recipe.precision.quantization
    return bool(weight_format(q.quant).calibration or kv_cache_format(q.kv_cache).calibration)


def calibration_inputs(recipe: Recipe) -> dict:
    """What calibration reads (for the convert stage's cache key); {} when the recipe needs none."""
    if not needs_calibration(recipe):
        return {}
    c = recipe.precision.quantization.calibration
    return {"dataset": c.dataset, "dataset_sha256": dataset_digest(c.dataset), "samples": c.samples,
            "seq_len": c.seq_len, "seed": c.seed}


def exclude_patterns(recipe: Recipe) -> list[str]:
    patterns = list(recipe.precision.quantization.exclude)
    return patterns if "lm_head" in patterns else ["lm_head", *patterns]


# tensorrt_llm/quantization/quantize.py (1.2), quantize_layers: the list used when exclude_modules is null.
TRTLLM_DEFAULT_EXCLUDE = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                          "*shared_expert_gate")


def trtllm_exclude_modules(patterns: list[str]) -> list[str]:
    """config.json's exclude_modules for the recipe's patterns (module docstring)."""
    out = list(TRTLLM_DEFAULT_EXCLUDE)
    for p in patterns:
        if any(fnmatch.fnmatchcase(p, d) for d in TRTLLM_DEFAULT_EXCLUDE):
            continue
        out.extend(q for q in (p, p + ".*") if q not in out)
    return out


def source_amax(index: SafetensorsIndex, name: str) -> float:
    """max |x| of a whole source tensor, read in chunks."""
    info = index.info(name)
    rows = info.shape[0] if info.shape else 1
    step = max(1, CHUNK_BYTES // max(info.row_bytes, 1))
    amax = 0.0
    for start in range(0, rows, step):
        # |x| and max are exact in the stored dtype: no float32 copy of the block
        amax = max(amax, float(index.read_rows(name, start, min(rows, start + step)).abs().amax()))
    return amax


@dataclass
class QuantizedLinear:
    """A GEMM weight of one rank that the format quantizes (not excluded)."""

    rank: int
    name: str  # the target tensor, "transformer.layers.{local}.attention.qkv.weight"
    prefix: str  # the module on this rank, name without ".weight"
    module: str  # the module with its global layer index (calibration's key)
    spec: object  # the plan's TargetSpec: set .dtype and .encode to change what is written


@dataclass
class CheckpointContext:
    """What a format's encode_checkpoint works with: the conversion plan, the source and the calibration."""

    plan: ConversionPlan
    index: SafetensorsIndex
    calibration: object | None  # pipeline.quantize.calibrate.Calibration, when the recipe's formats need it
    excluded: list[str]
    global_name: Callable[[int, str], str]
    options: object = None  # the recipe's pipeline.recipe.QuantizationSpec
    config: dict = field(default_factory=dict)  # fields the format sets in config.json's quantization block
    _amax: dict[str, float] = field(default_factory=dict)

    def read_target(self, rank: int, name: str) -> torch.Tensor:
        """The whole float32 tensor `name` of `rank` as the plan would write it unencoded (for formats that need a
        row's neighbours or the whole tensor to encode it)."""
        spec = self.plan.targets[rank][name]
        out = torch.zeros(spec.shape, dtype=torch.float32)
        for piece in self.plan.pieces:
            if piece.rank != rank or piece.target != name or piece.source is None:
                continue
            if piece.source in self.plan.transposed:
                block = self.index.read(piece.source).t()[piece.src_rows[0]:piece.src_rows[1]]
            else:
                block = self.index.read_rows(piece.source, *piece.src_rows)
            if piece.src_cols is not None:
                block = block[:, piece.src_cols[0]:piece.src_cols[1]]
            out[piece.dst_row:piece.dst_row + block.shape[0]] = block.float()
        return out

    def replace_with_literal(self, rank: int, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor` as target `name` of `rank` instead of what the plan would copy there."""
        self.plan.pieces[:] = [p for p in self.plan.pieces if not (p.rank == rank and p.target == name)]
        del self.plan.targets[rank][name]
        self.plan.add_literal(rank, name, tensor)

    def split_of(self, rank: int, name: str) -> tuple[int, int, int]:
        """(dim, index, parts) of how target `name` of `rank` splits its unsplit tensor: dim 0 column-parallel, 1
        row-parallel, -1 whole."""
        tp = self.plan.tp
        local = rank % tp
        if tp == 1:
            return -1, 0, 1
        if name.endswith(("attention.dense.weight", "mlp.proj.weight")):
            return 1, local, tp
        if name.endswith(("attention.qkv.weight", "mlp.fc.weight", "mlp.gate.weight")):
            return 0, local, tp
        return -1, 0, 1

    def quantized_linears(self) -> Iterator[QuantizedLinear]:
        for rank, specs in enumerate(self.plan.targets):
            for name, spec in list(specs.items()):
                prefix = name.removesuffix(".weight")
                if spec.gemm and not any(fnmatch.fnmatchcase(prefix, p) for p in self.excluded):
                    yield QuantizedLinear(rank, name, prefix, self.global_name(rank, prefix), spec)

    def weight_amax(self, target: QuantizedLinear) -> float:
        """max |W| over the unsplit source tensors of this target (q, k and v together)."""
        sources = self.plan.sources_of(target.rank, target.name)
        for source in sources:
            if source not in self._amax:
                self._amax[source] = source_amax(self.index, source)
        return max(self._amax[s] for s in sources)


class Quantizer:
    """Called by convert_checkpoint with the plan: sets encoders and dtypes, adds scale tensors."""

    def __init__(self, recipe: Recipe, source: Path, log=print):
        self.recipe, self.source, self.log = recipe, Path(source), log
        self.record: dict = {}
        self.calibration = None

    def _calibrate(self):
        from pipeline.hub import checkpoints_dir, tokenizer_source
        from pipeline.quantize.calibrate import calibrate

        work = checkpoints_dir() / "tmp"
        work.mkdir(parents=True, exist_ok=True)
        tok = tokenizer_source(self.recipe.model, self.source)
        q = self.recipe.precision.quantization
        kinds = weight_format(q.quant).calibration + kv_cache_format(q.kv_cache).calibration
        return calibrate(self.source, tok, q.calibration, work, log=self.log, kinds=kinds)

    def __call__(self, plan: ConversionPlan, index: SafetensorsIndex) -> dict:
        q = self.recipe.precision.quantization
        weights, kv = weight_format(q.quant), kv_cache_format(q.kv_cache)
        excluded = exclude_patterns(self.recipe)
        if needs_calibration(self.recipe):
            self.calibration = self._calibrate()
            self.record["calibration"] = self.calibration.record
        layers_per_stage = plan.arch.num_layers // plan.pp

        def global_name(rank: int, name: str) -> str:
            if not name.startswith("transformer.layers."):
                return name
            local = int(name.split(".")[2])
            layer = (rank // plan.tp) * layers_per_stage + local
            return f"transformer.layers.{layer}." + name.split(".", 3)[3]

        ctx = CheckpointContext(plan, index, self.calibration, excluded, global_name, options=q)
        if weights.encode_checkpoint is not None:
            self.record.update(weights.encode_checkpoint(ctx))
        if kv.quant_algo is not None:
            for rank in range(plan.world_size):
                for local in range(layers_per_stage):
                    layer = (rank // plan.tp) * layers_per_stage + local
                    scale = kv.scale(self.calibration.kv_amax[layer])
                    plan.add_literal(rank, f"transformer.layers.{local}.{kv.scale_tensor}", scale)
            self.record["kv_cache_amax"] = {str(k): v for k, v in sorted(self.calibration.kv_amax.items())}
        block = quantization_block(weights.quant_algo, kv.quant_algo,
                                   trtllm_exclude_modules(excluded) if weights.quant_algo else None)
        block.update(weights.config_fields)
        block.update(ctx.config)
        return block


def make_quantizer(recipe: Recipe, source: Path, log=print) -> Quantizer | None:
    q = recipe.precision.quantization
    if weight_format(q.quant).quant_algo is None and kv_cache_format(q.kv_cache).quant_algo is None:
        return None
    return Quantizer(recipe, source, log=log)
