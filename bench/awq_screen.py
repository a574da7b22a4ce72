"""Screen int4_awq search variants on SmolLM2-135M in minutes instead of a 36-minute `pipeline eval` run.

    PIPELINE_HOME=/tmp/x PYTHONPATH=$PWD python bench/awq_screen.py VARIANT [VARIANT ...]

The model is this project's PyTorch backend (RankModel, tp=1 pp=1) in float32 with every quantized linear replaced by
its fake-quantized weight: int4 group values times the bfloat16 group scale, times the bfloat16 pre-quant scale, as
the W4A16_AWQ runtime computes them (activations stay float32, so the numbers sit a little below the bfloat16
build's). Scored on the same held-out windows as `pipeline eval` (pydoc-topics-heldout, 4 x 512) against
transformers float32; calibrated on the same text, seed and sample count as the recipe's calibration. Variants
(comma-joined options, e.g. `duo,seq`):

- base: the product's search (ModelOpt's x^a / w^(1-a) scale, int4_awq.search_group's loss, then the clip search)
- plain: group-wise int4 without a search;  noclip: the scale search without the clip search
- duo: AutoAWQ's activation-only x^a candidates as well, the best of both forms by the same loss
- sink: every calibration window's first position always among the search's rows
- nosink: every calibration window's first position left out of the search's rows and mean |x|
- seq: each layer searched on the inputs that the already-quantized earlier layers produce
- rowsN: N sampled input rows per linear (default the product's calibrate.SAMPLED_ROWS)
- topkN: re-score the N best scale candidates with their clip search, keep the best after clipping
- gridN: N alphas (default 20, ModelOpt's);  clipN: N clip ratios evenly from 1.0 to 0.5 (default 11)
- sinkstat: mean |x| (the scale's statistic) without each window's first position; the loss rows keep it
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from pipeline.backends.torch_model import Linear, RankModel
from pipeline.datasets import token_windows
from pipeline.dist import Comm
from pipeline.eval import metrics, reference_logits
from pipeline.mapping import Mapping
from pipeline.quantize import calibrate as cal_mod
from pipeline.quantize.formats import (
    awq_clip_amax,
    awq_scale,
    awq_weight_mean_rel,
    groupwise_int4_dequantize,
    groupwise_int4_quantize,
)
from pipeline.quantize.schemes import int4_awq

SOURCE = Path(os.environ.get("SCREEN_SOURCE", "/work/main/checkpoints/sources/smollm2-135m-instruct"))
WORK = Path(os.environ["PIPELINE_HOME"]) / "awq-screen"
GROUP, DTYPE = 128, torch.bfloat16
GROUPS = int4_awq.GROUPS
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(11))  # awq_clip_amax's default: 1.0 down to 0.5


def search_scales(weight, x, x_mean_abs, grid, activation_only, topk, clip_ratios):
    """The product's search (int4_awq.search_group: ModelOpt's x^a / w^(1-a), scored by the quantized output's
    mean squared error) plus, with activation_only, AutoAWQ's x^a form (its duo_scaling=False) as more candidates;
    with topk, the topk best re-scored with their clip search and the best after clipping kept."""
    pad = int4_awq._pad_in
    reference = x @ weight.t()
    w_rel = awq_weight_mean_rel(pad(weight, GROUP), GROUP)[:weight.shape[1]]

    def loss(s, clip):
        w, xs = pad(weight * s, GROUP), x / s
        amax = awq_clip_amax(w, pad(xs, GROUP), GROUP, clip_ratios) if clip else None
        q, scale = groupwise_int4_quantize(w, GROUP, amax)
        wq = groupwise_int4_dequantize(q, scale, GROUP)[:, :weight.shape[1]]
        return float((xs @ wq.t() - reference).pow(2).mean())

    forms = [("weight_activation", w_rel)] + ([("activation", torch.ones_like(w_rel))] if activation_only else [])
    scored = []
    for form, w_mean in forms:
        for i in range(grid):
            s = int4_awq.stored_scale(awq_scale(x_mean_abs, w_mean, i / grid), DTYPE)
            scored.append((loss(s, False), form, i / grid, s))
    scored.sort(key=lambda c: c[0])
    if topk:
        scored = sorted(((loss(s, True), form, alpha, s) for _, form, alpha, s in scored[:topk]), key=lambda c: c[0])
    value, form, alpha, s = scored[0]
    return s, {"form": form, "alpha": alpha, "loss": value}


def setup():
    from safetensors.torch import load_file

    from pipeline.backends.torch_backend import read_checkpoint_config
    from pipeline.convert import convert_checkpoint
    from pipeline.quantize.calibrate import _load_tokenizer

    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = WORK / "fp32"
    if not (ckpt / "rank0.safetensors").is_file():
        ckpt.mkdir(exist_ok=True)
        convert_checkpoint(SOURCE, ckpt, dtype="float32", tp=1, pp=1)
    config, weights = read_checkpoint_config(ckpt), load_file(ckpt / "rank0.safetensors")
    tok = _load_tokenizer(SOURCE)
    calib = token_windows("pydoc-topics", tok, 256, 32, 1234, vocab_size=config["vocab_size"]).windows
    held = token_windows("pydoc-topics-heldout", tok, 512, 4, None, vocab_size=config["vocab_size"]).windows
    ref_path = WORK / "reference.pt"
    if not ref_path.is_file():
        torch.save(reference_logits(SOURCE, held), ref_path)
    return config, weights, calib, held, torch.load(ref_path)


class Swap(Linear):
    """A linear whose weight the screen replaces, recording its inputs while `record` is a dict."""

    def __init__(self, prefix, weight, bias):
        super().__init__(weight, bias)
        self.prefix, self.record = prefix, None

    def __call__(self, x):
        if self.record is not None:
            self.record[self.prefix] = x.detach().reshape(-1, x.shape[-1]).float()
        return super().__call__(x)


def build(config, weights):
    linears = {}

    def make(prefix, w, b):
        linears[prefix] = Swap(prefix, w, b)
        return linears[prefix]

    model = RankModel(config, weights, Comm(Mapping(1, 1, 0), torch.device("cpu")), torch.device("cpu"),
                      make_linear=make)
    return model, linears


def run_layer(model, index, h, positions, cache, mask, rope):
    layer = model.layers[index]
    h = h + model._attention(layer, model._norm(h, layer["ln1"]), positions, cache, index, 0, mask, None, rope, None)
    return h + model._mlp(layer, model._norm(h, layer["ln2"]))


def fake_quant(weight, x, s, clip, ratios):
    """The runtime's effective float weight [out, in] for the checkpoint this search writes."""
    inp = weight.shape[1]
    extra = -inp % GROUP
    w = weight * s if s is not None else weight
    w = torch.nn.functional.pad(w, (0, extra))
    amax = None
    if clip:
        xs = x / s if s is not None else x
        amax = awq_clip_amax(w, torch.nn.functional.pad(xs, (0, extra)), GROUP, ratios)
    q, scale = groupwise_int4_quantize(w, GROUP, amax)
    dq = groupwise_int4_dequantize(q, scale.to(DTYPE).float(), GROUP)[:, :inp]
    return dq / s if s is not None else dq


def quantize_layer(linears, layer, inputs, opts, record):
    for group in GROUPS:
        names = [f"transformer.layers.{layer}.{m}" for m in group if f"transformer.layers.{layer}.{m}" in linears]
        x_all = inputs[names[0]]
        if opts["nosink"]:  # drop every window's first position (the attention sink's outsized activations)
            x_all = x_all.reshape(-1, opts["seq_len"], x_all.shape[1])[:, 1:].reshape(-1, x_all.shape[1])
        g = torch.Generator().manual_seed(layer)
        x = x_all[torch.randperm(x_all.shape[0], generator=g)[:opts["rows"]].sort().values]
        if opts["sink"]:  # every window's first position among the rows, the rest sampled as before
            first = x_all.reshape(-1, opts["seq_len"], x_all.shape[1])[:, 0]
            x = torch.cat([first, x[:opts["rows"] - first.shape[0]]])
        weight = torch.cat([linears[n].weight.float() for n in names])
        s = None
        if opts["search"]:
            stat_rows = x_all
            if opts["sinkstat"]:  # mean |x| without each window's first position; the loss rows keep it
                stat_rows = x_all.reshape(-1, opts["seq_len"], x_all.shape[1])[:, 1:].reshape(-1, x_all.shape[1])
            s, info = search_scales(weight, x, stat_rows.abs().mean(dim=0), opts["grid"], opts["duo"], opts["topk"],
                                    opts["ratios"])
            record[names[0]] = info
        row = 0
        for n in names:
            w = linears[n].weight
            linears[n].weight = fake_quant(weight[row:row + w.shape[0]], x, s, opts["clip"], opts["ratios"])
            row += w.shape[0]


def parse(variant):
    opts = {"search": True, "clip": True, "duo": False, "seq": False, "rows": cal_mod.SAMPLED_ROWS, "topk": 0,
            "ratios": CLIP_RATIOS, "nosink": False, "sink": False, "seq_len": 256, "grid": 20, "sinkstat": False}
    for o in variant.split(","):
        if o == "plain":
            opts.update(search=False, clip=False)
        elif o == "noclip":
            opts["clip"] = False
        elif o == "duo":
            opts["duo"] = True
        elif o == "sink":
            opts["sink"] = True
        elif o == "nosink":
            opts["nosink"] = True
        elif o == "seq":
            opts["seq"] = True
        elif o.startswith("rows"):
            opts["rows"] = int(o[4:])
        elif o.startswith("grid"):
            opts["grid"] = int(o[4:])
        elif o.startswith("clip") and o[4:].isdigit():  # N clip ratios evenly from 1.0 down to 0.5
            n = int(o[4:])
            opts["ratios"] = tuple(1.0 - 0.5 * i / (n - 1) for i in range(n))
        elif o == "sinkstat":
            opts["sinkstat"] = True
        elif o.startswith("topk"):
            opts["topk"] = int(o[4:])
        elif o != "base":
            raise SystemExit(f"unknown option {o}")
    return opts


def screen(variant, config, weights, calib, held, ref):
    opts = parse(variant)
    start = time.perf_counter()
    model, linears = build(config, weights)
    tokens = torch.tensor(calib)
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    record = {}
    with torch.no_grad():
        cache = model.new_cache(*tokens.shape)
        cache.valid[:] = True
        mask = model.attention_mask(cache, 0, tokens.shape[1], tokens.shape[1])
        rope = model._rope_tables(positions, torch.float32)
        h = torch.nn.functional.embedding(tokens, model.embed)
        inputs = {}
        for index in range(len(model.layers)):  # float inputs of every layer (or the quantized prefix's with seq)
            for lin in linears.values():
                lin.record = inputs
            h_next = run_layer(model, index, h, positions, cache, mask, rope)
            for lin in linears.values():
                lin.record = None
            quantize_layer(linears, index, inputs, opts, record)
            if opts["seq"]:  # the next layer sees this layer's quantized output
                h_next = run_layer(model, index, h, positions, cache, mask, rope)
            inputs = {}
            h = h_next
        search_s = time.perf_counter() - start
        ours = []
        for w in held:
            c = model.new_cache(1, len(w))
            c.valid[:] = True
            ours.append(model.forward(torch.tensor([w]), torch.arange(len(w))[None], c, all_logits=True)[0])
    m = metrics(ref, ours, held)
    m.update(variant=variant, search_seconds=round(search_s, 1))
    alphas = [v.get("alpha") for v in record.values()]
    forms = [v.get("form") for v in record.values()]
    m["activation_only_groups"] = sum(f == "activation" for f in forms)
    m["mean_alpha"] = round(sum(alphas) / len(alphas), 3) if alphas else None
    return m


def record(m: dict) -> None:
    """Print a variant's metrics and append them to the screen's results.jsonl."""
    line = json.dumps(m)
    print(line, flush=True)
    with open(WORK / "results.jsonl", "a") as f:
        f.write(line + "\n")


def main():
    config, weights, calib, held, ref = setup()
    for variant in sys.argv[1:]:
        record(screen(variant, config, weights, calib, held, ref))


if __name__ == "__main__":
    main()
