"""Accuracy of a build against the Hugging Face model in float32, on held-out text.

    python -m pipeline eval RECIPE [a.b=v]                         one build
    python -m pipeline eval RECIPE --precisions fp32,fp16,...,int4wo  the same recipe at several precisions
                                                                   (pipeline.eval_precisions builds them)

The reference is transformers' own model in float32 on the CPU. The build is scored by the real runner under
mpirun (`python -m pipeline.run --score-only --logits-out`), so what is measured is the artifact as it runs,
sharded and quantized. Reported per build:

- perplexity of the held-out tokens, and its relative change against the reference;
- top-1 agreement: the fraction of positions whose most likely next token is the reference's;
- mean KL divergence KL(reference || build) of the next-token distributions, in nats.

Results go to `<artifact>.eval.json` beside the artifact and into its manifest.
"""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from pathlib import Path

import torch

from pipeline import hub
from pipeline.datasets import token_windows
from pipeline.dist import mpirun_command, mpirun_env
from pipeline.errors import PipelineError
from pipeline.manifest import read_manifest, stage_key, write_manifest
from pipeline.progress import progress
from pipeline.recipe import Recipe

PRECISIONS = {
    "fp32": ["precision.dtype=float32", "precision.quantization.quant=none", "precision.quantization.kv_cache=auto"],
    "fp16": ["precision.dtype=float16", "precision.quantization.quant=none", "precision.quantization.kv_cache=auto"],
    "bf16": ["precision.dtype=bfloat16", "precision.quantization.quant=none", "precision.quantization.kv_cache=auto"],
    "fp8": ["precision.dtype=bfloat16", "precision.quantization.quant=fp8", "precision.quantization.kv_cache=auto"],
    "fp8-kvfp8": ["precision.dtype=bfloat16", "precision.quantization.quant=fp8",
                  "precision.quantization.kv_cache=fp8"],
    "int8wo": ["precision.dtype=bfloat16", "precision.quantization.quant=int8_weight_only",
               "precision.quantization.kv_cache=auto"],
    "int4wo": ["precision.dtype=bfloat16", "precision.quantization.quant=int4_weight_only",
               "precision.quantization.kv_cache=auto"],
    "int4g128": ["precision.dtype=bfloat16", "precision.quantization.quant=int4_awq",
                 "precision.quantization.awq_search=false", "precision.quantization.group_size=128",
                 "precision.quantization.kv_cache=auto"],
    "int4awq-g128": ["precision.dtype=bfloat16", "precision.quantization.quant=int4_awq",
                     "precision.quantization.group_size=128", "precision.quantization.kv_cache=auto"],
    "int4g64": ["precision.dtype=bfloat16", "precision.quantization.quant=int4_awq",
                "precision.quantization.awq_search=false", "precision.quantization.group_size=64",
                "precision.quantization.kv_cache=auto"],
    "int4awq-g64": ["precision.dtype=bfloat16", "precision.quantization.quant=int4_awq",
                    "precision.quantization.group_size=64", "precision.quantization.kv_cache=auto"],
    "w8a8": ["precision.dtype=bfloat16", "precision.quantization.quant=w8a8_smoothquant",
             "precision.quantization.smoothing=false", "precision.quantization.kv_cache=auto"],
    "w8a8sq": ["precision.dtype=bfloat16", "precision.quantization.quant=w8a8_smoothquant",
               "precision.quantization.smoothing=true", "precision.quantization.kv_cache=auto"],
}


def eval_windows(recipe: Recipe, source: Path, vocab_size: int):
    from pipeline.quantize.calibrate import _load_tokenizer

    tokenizer = _load_tokenizer(hub.tokenizer_source(recipe.model, source))
    e = recipe.eval
    return token_windows(e.dataset, tokenizer, e.seq_len, max(1, e.tokens // e.seq_len), seed=None,
                         vocab_size=vocab_size)


def reference_logits(source: Path, windows: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([w])).logits[0]
                for w in progress(windows, desc="eval: transformers reference", unit="window")]


def artifact_logits(artifact: Path, world_size: int, windows: list[list[int]]) -> list[torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        prompts, out = Path(tmp) / "prompts.json", Path(tmp) / "logits.pt"
        prompts.write_text(json.dumps(windows))
        cmd = mpirun_command(world_size, ["-m", "pipeline.run", "--engine", str(artifact), "--prompt-ids-file",
                                          str(prompts), "--logits-out", str(out), "--score-only"])
        proc = subprocess.run(cmd, env=mpirun_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise PipelineError(f"scoring {artifact} failed:\n{proc.stderr[-3000:]}")
        return torch.load(out)


def metrics(reference: list[torch.Tensor], ours: list[torch.Tensor], windows: list[list[int]]) -> dict:
    nll_ref, nll_ours, agree, kl, count = 0.0, 0.0, 0, 0.0, 0
    for ref, got, ids in zip(reference, ours, windows):
        target = torch.tensor(ids[1:])
        lp_ref = torch.log_softmax(ref[:-1].double(), dim=-1)
        lp_got = torch.log_softmax(got[:-1].double(), dim=-1)
        nll_ref -= float(lp_ref.gather(1, target[:, None]).sum())
        nll_ours -= float(lp_got.gather(1, target[:, None]).sum())
        agree += int((lp_ref.argmax(-1) == lp_got.argmax(-1)).sum())
        kl += float((lp_ref.exp() * (lp_ref - lp_got)).sum())
        count += len(ids) - 1
    ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll_ours / count)
    return {"tokens_scored": count, "reference_perplexity": ppl_ref, "perplexity": ppl,
            "relative_perplexity_change": (ppl - ppl_ref) / ppl_ref, "top1_agreement": agree / count,
            "mean_kl": kl / count}


def _eval_key(recipe: Recipe, artifact: Path) -> str:
    e = recipe.to_dict()["eval"]
    e.pop("gate")
    return stage_key({"artifact": artifact.name, "eval": e})


def evaluate(recipe: Recipe, artifact: Path, source: Path, reference_cache: dict | None = None, log=print) -> dict:
    """Metrics of one artifact (cached beside it by eval settings)."""
    artifact = Path(artifact)
    key = _eval_key(recipe, artifact)
    out = artifact.parent / f"{artifact.name}.eval.json"
    cached = json.loads(out.read_text()) if out.is_file() else {}
    if key in cached:
        return cached[key]
    config = json.loads((artifact / "config.json").read_text())
    windows = eval_windows(recipe, source, config["vocab_size"])
    ref_key = (str(source), json.dumps(windows.record, sort_keys=True))
    if reference_cache is not None and ref_key in reference_cache:
        reference = reference_cache[ref_key]
    else:
        log(f"eval: transformers float32 reference on {len(windows.windows)} x {recipe.eval.seq_len} tokens")
        reference = reference_logits(source, windows.windows)
        if reference_cache is not None:
            reference_cache[ref_key] = reference
    log(f"eval: scoring {artifact.name} on {recipe.world_size} rank(s)")
    ours = artifact_logits(artifact, recipe.world_size, windows.windows)
    result = {**metrics(reference, ours, windows.windows), "dataset": windows.record,
              "precision": recipe.to_dict()["precision"], "parallel": recipe.to_dict()["parallel"]}
    cached[key] = result
    out.write_text(json.dumps(cached, indent=2) + "\n")
    manifest = read_manifest(artifact)
    if manifest is not None:
        manifest.setdefault("eval", {})[key] = result
        write_manifest(artifact, manifest)
    return result


def format_table(rows: list[tuple[str, dict]]) -> str:
    lines = ["| precision | perplexity | relative change | top-1 agreement | mean KL (nats) |",
             "|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['perplexity']:.4f} | {m['relative_perplexity_change']:+.4%} | "
                     f"{m['top1_agreement']:.4f} | {m['mean_kl']:.5f} |")
    return "\n".join(lines)
