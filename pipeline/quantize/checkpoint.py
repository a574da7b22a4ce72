"""The checkpoint side of quantization: what `convert` writes for each format (trtllm-checkpoint-and-build.md, 3).

- FP8 (quant_algo FP8): every GEMM weight not excluded becomes float8_e4m3fn with a per-tensor
  `weights_scaling_factor` (amax of the unsplit tensor / 448; q, k and v share one) and a static
  `activation_scaling_factor` (calibrated input amax / 448); the same scalars on every tp rank.
- W8A16 / W4A16: weights stay in the model dtype and config.json names the algorithm; `trtllm-build` quantizes
  them for the GPU it builds on (the recommended route; the packed layout depends on the GPU's architecture).
- KV cache (kv_cache_quant_algo FP8 / INT8): a per-layer `attention.kv_cache_scaling_factor` from calibration.
lm_head always stays in high precision, as in TensorRT-LLM.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

from pipeline.architectures import quantization_block
from pipeline.convert.streaming import CHUNK_BYTES, ConversionPlan
from pipeline.datasets import dataset_digest
from pipeline.quantize.formats import fp8_scale, kv_scale, quantize_fp8
from pipeline.recipe import Recipe
from pipeline.safetensors_io import SafetensorsIndex

QUANT_ALGOS = {"none": None, "fp8": "FP8", "int8_weight_only": "W8A16", "int4_weight_only": "W4A16"}
KV_ALGOS = {"auto": None, "fp8": "FP8", "int8": "INT8"}


def needs_calibration(recipe: Recipe) -> bool:
    q = recipe.precision.quantization
    return q.quant == "fp8" or q.kv_cache != "auto"


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
        return calibrate(self.source, tok, self.recipe.precision.quantization.calibration, work, log=self.log)

    def __call__(self, plan: ConversionPlan, index: SafetensorsIndex) -> dict:
        q = self.recipe.precision.quantization
        quant_algo, kv_algo = QUANT_ALGOS[q.quant], KV_ALGOS[q.kv_cache]
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

        if quant_algo == "FP8":
            weight_amax: dict[str, float] = {}
            scales: dict[str, dict] = {}
            for rank, specs in enumerate(plan.targets):
                for name, spec in list(specs.items()):
                    prefix = name.removesuffix(".weight")
                    if not spec.gemm or any(fnmatch.fnmatchcase(prefix, p) for p in excluded):
                        continue
                    module = global_name(rank, prefix)
                    for source in plan.sources_of(rank, name):
                        if source not in weight_amax:
                            weight_amax[source] = source_amax(index, source)
                    w_scale = fp8_scale(max(weight_amax[s] for s in plan.sources_of(rank, name)))
                    act_amax = self.calibration.act_amax[module]
                    a_scale = fp8_scale(act_amax)
                    spec.dtype = torch.float8_e4m3fn
                    spec.encode = lambda block, s=w_scale: quantize_fp8(block, s)
                    plan.add_literal(rank, prefix + ".weights_scaling_factor", w_scale)
                    plan.add_literal(rank, prefix + ".activation_scaling_factor", a_scale)
                    scales[module] = {"weight_amax": float(w_scale) * 448.0, "activation_amax": act_amax}
            self.record["fp8_scales"] = scales
        if kv_algo is not None:
            fmt = q.kv_cache
            for rank in range(plan.world_size):
                for local in range(layers_per_stage):
                    layer = (rank // plan.tp) * layers_per_stage + local
                    scale = kv_scale(self.calibration.kv_amax[layer], fmt)
                    plan.add_literal(rank, f"transformer.layers.{local}.attention.kv_cache_scaling_factor", scale)
            self.record["kv_cache_amax"] = {str(k): v for k, v in sorted(self.calibration.kv_amax.items())}
        return quantization_block(quant_algo, kv_algo, excluded if quant_algo else None)


def make_quantizer(recipe: Recipe, source: Path, log=print) -> Quantizer | None:
    q = recipe.precision.quantization
    if q.quant == "none" and q.kv_cache == "auto":
        return None
    return Quantizer(recipe, source, log=log)
