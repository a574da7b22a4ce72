"""The checkpoint side of quantization: what `convert` writes for each format."""

from __future__ import annotations

from pipeline.errors import RecipeError
from pipeline.recipe import Recipe


def calibration_inputs(recipe: Recipe) -> dict:
    """What calibration reads (dataset digest, sample settings), for the convert stage's cache key; {} if none."""
    return {}


def make_quantizer(recipe: Recipe, source, log=print):
    """A callable (plan, index) -> quantization block for convert_checkpoint, or None for unquantized builds."""
    q = recipe.precision.quantization
    if q.quant == "none" and q.kv_cache == "auto":
        return None
    raise RecipeError([f"precision.quantization: {q.quant} / kv_cache {q.kv_cache} is not implemented yet"])
