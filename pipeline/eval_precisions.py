"""`python -m pipeline eval`: build a recipe (or the same recipe at several precisions) and measure each build
against transformers with pipeline.eval; the table goes to stdout and, with --out, to JSON and Markdown."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from pipeline.build import Builder
from pipeline.errors import PipelineError
from pipeline.eval import PRECISIONS, evaluate, format_table
from pipeline.recipe import Recipe, apply_overrides, recipe_from_dict


def eval_command(recipe: Recipe, precisions: list[str] | None = None, out: Path | None = None) -> int:
    variants = [(None, recipe)]
    if precisions:
        unknown = [p for p in precisions if p not in PRECISIONS]
        if unknown:
            raise PipelineError(f"--precisions: unknown {unknown}; choose from {', '.join(PRECISIONS)}")
        variants = []
        for name in precisions:
            # the resolved recipe (command-line overrides included) with this precision on top
            data = recipe.to_dict()
            del data["name"]
            base = recipe_from_dict(apply_overrides(data, PRECISIONS[name]), name=recipe.name)
            variants.append((name, replace(base, eval=replace(base.eval, gate=type(base.eval.gate)()))))
    rows, reference_cache = [], {}
    for name, variant in variants:
        result = Builder(variant, show_progress=False, log=lambda _: None).run(gate=False, record=False)
        source = result.stages[0].path
        m = evaluate(variant, result.artifact, source, reference_cache)
        rows.append((name or _precision_label(variant), m))
    ref = rows[0][1]
    header = (f"{recipe.name}: {ref['tokens_scored']} held-out tokens of {ref['dataset']['dataset']} "
              f"(sha256 {ref['dataset'].get('sha256', '-')[:12]}); reference (transformers float32) perplexity "
              f"{ref['reference_perplexity']:.4f}; tp={recipe.parallel.tp} pp={recipe.parallel.pp}")
    table = format_table(rows)
    print(header)
    print(table)
    if out is not None:
        import platform
        import time

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([{"precision": n, **m} for n, m in rows], indent=2) + "\n")
        command = "python -m pipeline eval " + recipe.name + (" --precisions " + ",".join(precisions) if precisions
                                                              else "")
        out.with_suffix(".md").write_text(
            f"# Accuracy of `{recipe.name}` by precision\n\n{header}.\n\n{table}\n\n"
            f"Made by `{command}` on {platform.node()} ({platform.processor() or platform.machine()}, CPU, PyTorch "
            f"backend), {time.strftime('%Y-%m-%d')}. fp8 quantizes GEMM weights and activations (per-tensor, "
            f"calibrated on pydoc-topics, 32 x 256 tokens); fp8-kvfp8 adds an FP8 KV cache; int8wo/int4wo are "
            f"W8A16/W4A16 with one scale per output channel, as TensorRT-LLM's builder makes them; int4g<N> / "
            f"int4awq-g<N> are W4A16_AWQ with one scale per N input channels, without / with AWQ's scale and clipping "
            f"search; w8a8 / w8a8sq are W8A8 (int8 weights per channel, int8 activations per token) without / with "
            f"SmoothQuant smoothing (alpha 0.5).\n")
    return 0


def _precision_label(recipe: Recipe) -> str:
    q = recipe.precision.quantization
    label = recipe.precision.dtype
    if q.quant != "none":
        label += f" + {q.quant}"
    if q.kv_cache != "auto":
        label += f" + kv {q.kv_cache}"
    return label
