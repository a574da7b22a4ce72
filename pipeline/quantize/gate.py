"""The accuracy gate a recipe declares (eval.gate), checked by `build`."""

from __future__ import annotations

from pathlib import Path

from pipeline.recipe import Recipe


def gate_declared(recipe: Recipe) -> bool:
    g = recipe.eval.gate
    return any(v is not None for v in (g.max_ppl_increase, g.min_top1_agreement, g.max_kl))


def run_gate(recipe: Recipe, artifact: Path, log=print) -> dict | None:
    if not gate_declared(recipe):
        return None
    raise NotImplementedError("eval.gate")
