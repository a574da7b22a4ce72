"""The accuracy gate a recipe declares (eval.gate), checked by `build` after conversion.

A build whose accuracy falls below its recipe's promise fails, naming the numbers; it is not recorded as the
latest build, so `python -m pipeline.run` will not pick it up.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import GateError
from pipeline.recipe import Recipe


def gate_declared(recipe: Recipe) -> bool:
    g = recipe.eval.gate
    return any(v is not None for v in (g.max_ppl_increase, g.min_top1_agreement, g.max_kl))


def gate_failures(recipe: Recipe, m: dict) -> list[str]:
    g = recipe.eval.gate
    failures = []
    if g.max_ppl_increase is not None and m["relative_perplexity_change"] > g.max_ppl_increase:
        failures.append(f"perplexity {m['perplexity']:.4f} is {m['relative_perplexity_change']:+.2%} against the "
                        f"reference {m['reference_perplexity']:.4f}; eval.gate.max_ppl_increase allows "
                        f"{g.max_ppl_increase:+.2%}")
    if g.min_top1_agreement is not None and m["top1_agreement"] < g.min_top1_agreement:
        failures.append(f"top-1 agreement {m['top1_agreement']:.4f} is below eval.gate.min_top1_agreement "
                        f"{g.min_top1_agreement}")
    if g.max_kl is not None and m["mean_kl"] > g.max_kl:
        failures.append(f"mean KL {m['mean_kl']:.5f} exceeds eval.gate.max_kl {g.max_kl}")
    return failures


def run_gate(recipe: Recipe, artifact: Path, source: Path, log=print) -> dict | None:
    if not gate_declared(recipe):
        return None
    from pipeline.eval import evaluate

    m = evaluate(recipe, artifact, source, log=log)
    failures = gate_failures(recipe, m)
    if failures:
        raise GateError(f"accuracy gate of recipe '{recipe.name}' missed by {artifact}:\n"
                        + "\n".join(f"  - {f}" for f in failures)
                        + "\n  The artifact is kept for inspection (python -m pipeline eval) but not recorded as a "
                          "build; fix the calibration or precision, or relax eval.gate with evidence.")
    log(f"gate     passed: perplexity {m['relative_perplexity_change']:+.2%}, top-1 {m['top1_agreement']:.4f}, "
        f"KL {m['mean_kl']:.5f}")
    return m
