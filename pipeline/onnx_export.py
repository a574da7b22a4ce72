"""The `onnx` stage: the converted checkpoint as one ONNX decoder graph with its KV cache as inputs and outputs.

The graph is the PyTorch backend's RankModel (tp = pp = 1) with the cache made explicit, as Hugging Face Optimum
lays it out, so one graph serves prefill (past length 0) and decode (one token, past length > 0):

    inputs   input_ids [batch, seq] int64, position_ids [batch, seq] int64,
             attention_mask [batch, past + seq] int64 (1 = a real token; left padding is 0),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_size] (the model dtype)
    outputs  logits [batch, seq, vocab] float32, present.{i}.key / .value [batch, kv_heads, past + seq, head_size]

With `onnx.qdq: int8` every linear layer except lm_head gets QuantizeLinear/DequantizeLinear nodes: weights
per output channel (symmetric int8, scale = max|row| / 127) and inputs per tensor with the activation maxima of
pipeline.quantize.calibrate (scale = amax / 127). `FakeQuantLinear` is that arithmetic in PyTorch, the emulation
the graph is checked against.
"""

from __future__ import annotations

import fnmatch
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.backends.torch_model import Linear, RankModel
from pipeline.errors import BuildError

OPSET = 18
GRAPH_FILE = "model.onnx"
WEIGHTS_FILE = "model.onnx.data"  # external weights, so graphs over protobuf's 2 GB limit export too
EXPORTER_VERSION = 1  # bump when DecoderGraph or the export settings change the graph
ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16"}


def kv_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, present


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past, present = kv_names(layers)
    return ["input_ids", "position_ids", "attention_mask", *past], ["logits", *present]


def planned_graph(layers: int, kv_heads: int, head_size: int, dtype: str, max_positions: int) -> dict:
    """The graph record (as describe_graph gives it) an export will have, from the model's shape alone: what
    `plan` needs for the trtexec shapes before anything is exported."""
    kv_shape = ["batch", kv_heads, "past", head_size]
    past, present = kv_names(layers)
    return {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                       {"name": "position_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                       {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past + seq"]},
                       *({"name": n, "dtype": dtype, "shape": kv_shape} for n in past)],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", "vocab"]},
                        *({"name": n, "dtype": dtype, "shape": ["batch", kv_heads, "past + seq", head_size]}
                          for n in present)],
            "max_positions": max_positions}


@torch.library.custom_op("pipeline::qdq_int8", mutates_args=())
def qdq_int8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """dq(q(x)) in symmetric int8: per tensor (a 0-d scale) or per channel along `axis`; exported as a
    QuantizeLinear/DequantizeLinear pair (onnx_qdq), so this eager arithmetic is the graph's emulation."""
    xf = x.float()
    if scale.dim() == 0:
        out = torch.fake_quantize_per_tensor_affine(xf, scale.float(), zero_point.int(), -128, 127)
    else:
        out = torch.fake_quantize_per_channel_affine(xf, scale.float(), zero_point.int(), axis, -128, 127)
    return out.to(x.dtype)


@qdq_int8.register_fake
def _(x, scale, zero_point, axis):
    return torch.empty_like(x)


def onnx_qdq(x, scale, zero_point, axis: int):
    from onnxscript import opset18 as op

    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero_point, axis=axis), scale, zero_point, axis=axis)


class FakeQuantLinear(Linear):
    """W8A8 INT8 as QDQ: y = dq(q(x)) dq(q(W))^T + b, per-tensor input scale, per-channel weight scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_amax: float):
        super().__init__(weight, bias)
        rows = weight.shape[0]
        self.weight_scale = (weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(weight.dtype)
        self.weight_zero = torch.zeros(rows, dtype=torch.int8)
        self.input_scale = torch.tensor(max(input_amax, 1e-8) / 127.0, dtype=weight.dtype)
        self.input_zero = torch.tensor(0, dtype=torch.int8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = qdq_int8(self.weight, self.weight_scale, self.weight_zero, 0)
        return F.linear(qdq_int8(x, self.input_scale, self.input_zero, 0), w, self.bias)


def qdq_linear_factory(act_amax: dict[str, float], exclude: tuple[str, ...] = ()):
    """make_linear for RankModel: FakeQuantLinear for every layer not excluded (fnmatch patterns, as in
    precision.quantization.exclude; lm_head is never quantized: RankModel builds it without make_linear)."""

    def make(prefix: str, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight is None or any(fnmatch.fnmatchcase(prefix, p) for p in exclude):
            return Linear(weight, bias)
        if prefix not in act_amax:
            raise BuildError(f"{prefix}: no calibrated activation maximum; the calibration did not reach this layer")
        return FakeQuantLinear(weight, bias, act_amax[prefix])

    return make


class DecoderGraph(torch.nn.Module):
    """RankModel's forward with the KV cache passed in and returned (concatenated), for export."""

    def __init__(self, model: RankModel):
        super().__init__()
        if model.mapping.tp != 1 or model.mapping.pp != 1:
            raise BuildError(f"the ONNX export takes a tp=1 pp=1 checkpoint; this one is tp={model.mapping.tp} "
                             f"pp={model.mapping.pp}; set parallel.tp: 1 and parallel.pp: 1 in the recipe")
        if model.kv_format is not None:
            raise BuildError("the ONNX export keeps the KV cache in the model dtype; set "
                             "precision.quantization.kv_cache: auto")
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, *past):
        m = self.model
        batch, seq = input_ids.shape
        h = F.embedding(input_ids, m.embed)
        if m.pos_embed is not None:
            h = h + F.embedding(position_ids, m.pos_embed)
        total = attention_mask.shape[1]
        past_len = total - seq
        # A query at slot past + i sees valid slots at or before its own, and always itself (no empty rows).
        query_slots = past_len + torch.arange(seq, device=h.device)
        key_slots = torch.arange(total, device=h.device)
        causal = key_slots[None, :] <= query_slots[:, None]
        allowed = (causal[None] & (attention_mask[:, None, :] > 0)) | (key_slots[None, None, :] == query_slots[None, :, None])
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=h.device).masked_fill(~allowed, float("-inf"))
        bias = bias[:, None]  # [B, 1, T, L]
        rope = m._rope_tables(position_ids, h.dtype) if m.arch.position == "rope" else None
        presents = []
        hd, heads, kv_heads = m.head_size, m.heads, m.kv_heads
        for index, layer in enumerate(m.layers):
            x = m._norm(h, layer["ln1"])
            qkv = layer["qkv"](x)
            q, k, v = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
            q = q.view(batch, seq, heads, hd).transpose(1, 2)
            k = k.view(batch, seq, kv_heads, hd).transpose(1, 2)
            v = v.view(batch, seq, kv_heads, hd).transpose(1, 2)
            if rope is not None:
                q, k = m._rope(q, k, rope)
            keys = torch.cat([past[2 * index], k], dim=2)
            values = torch.cat([past[2 * index + 1], v], dim=2)
            presents += [keys, values]
            group = heads // kv_heads
            qg = q.reshape(batch, kv_heads, group * seq, hd)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * (hd ** -0.5)
            scores = scores.view(batch, kv_heads, group, seq, total).reshape(batch, heads, seq, total) + bias
            probs = scores.softmax(dim=-1).to(values.dtype).view(batch, kv_heads, group * seq, total)
            out = torch.matmul(probs, values).reshape(batch, heads, seq, hd)
            out = layer["dense"](out.transpose(1, 2).reshape(batch, seq, heads * hd))
            h = h + (out + layer["dense_bias"] if layer["dense_bias"] is not None else out)
            h = h + m._mlp(layer, m._norm(h, layer["ln2"]))
        logits = m.head(m._norm(h, m.ln_f)).float()[..., : m.vocab_size]
        return (logits, *presents)


def example_inputs(model: RankModel, batch: int = 2, seq: int = 3, past: int = 2) -> tuple:
    """Inputs of the shapes the export traces with (every dynamic size distinct and > 1)."""
    ids = torch.randint(0, model.vocab_size, (batch, seq))
    positions = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    cache = [torch.zeros(batch, model.kv_heads, past, model.head_size, dtype=model.dtype)
             for _ in range(2 * len(model.layers))]
    return (ids, positions, mask, *cache)


def export_graph(model: RankModel, out_dir: Path, opset: int = OPSET, log=print) -> dict:
    """Export `model` to out_dir/model.onnx (+ model.onnx.data), run onnx.checker; returns the graph's I/O record."""
    import onnx

    graph = DecoderGraph(model).eval()
    layers = len(model.layers)
    inputs, outputs = io_names(layers)
    # Named dynamic dims (the exporter infers that the mask's length is past + seq and names it so).
    kv_dims = {0: "batch", 2: "past"}
    dynamic = ({0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}, {0: "batch", 1: "total"},
               tuple([kv_dims] * (2 * layers)))  # *past is one argument
    start = time.perf_counter()
    path = Path(out_dir) / GRAPH_FILE
    with torch.no_grad():
        program = torch.onnx.export(graph, example_inputs(model), dynamo=True, opset_version=opset,
                                    input_names=inputs, output_names=outputs, dynamic_shapes=dynamic,
                                    optimize=True, verbose=False,
                                    custom_translation_table={torch.ops.pipeline.qdq_int8.default: onnx_qdq})
    program.save(str(path), external_data=True)
    onnx.checker.check_model(str(path), full_check=True)
    seconds = time.perf_counter() - start
    log(f"exported {path.name} (opset {opset}, {layers} layers) in {seconds:.1f} s; onnx.checker passed")
    return describe_graph(path) | {"export_seconds": round(seconds, 2)}


def describe_graph(path: Path) -> dict:
    """Opset, and each input's and output's name, dtype and shape (symbolic dims by name), from the file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def tensors(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": dims})
        return out

    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"opset": opset, "inputs": tensors(proto.graph.input), "outputs": tensors(proto.graph.output),
            "op_counts": dict(sorted(ops.items()))}


# ----------------------------------------------------------------------------------------------- the stage


def stage_inputs(recipe, convert_key: str, versions: dict) -> dict:
    """What determines the graph's bytes (the `onnx` stage's cache key): the checkpoint, opset, QDQ, libraries."""
    import importlib.metadata

    inputs = {"stage": "onnx", "convert_key": convert_key, "opset": recipe.onnx.opset, "qdq": recipe.onnx.qdq,
              "exporter_version": EXPORTER_VERSION,
              "versions": {"torch": versions["torch"], "pipeline": versions["pipeline"],
                           **{name: importlib.metadata.version(name) for name in ("onnx", "onnxscript")}}}
    if recipe.onnx.qdq != "none":
        from pipeline.datasets import dataset_digest

        c = recipe.precision.quantization.calibration
        inputs["calibration"] = {"dataset": c.dataset, "dataset_sha256": dataset_digest(c.dataset),
                                 "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
                                 "exclude": list(recipe.precision.quantization.exclude)}
    return inputs


def load_model(checkpoint: Path, make_linear=None, device: str = "cpu") -> RankModel:
    """The PyTorch backend's tp=1 pp=1 model of a converted checkpoint (on the CPU unless `device` says)."""
    from safetensors.torch import load_file

    from pipeline.backends.torch_backend import read_checkpoint_config
    from pipeline.dist import Comm
    from pipeline.mapping import Mapping

    config = read_checkpoint_config(checkpoint)
    weights = load_file(Path(checkpoint) / "rank0.safetensors")
    return RankModel(config, weights, Comm(Mapping(1, 1, 0), torch.device(device)), torch.device(device),
                     make_linear=make_linear)


def build_onnx(recipe, checkpoint: Path, source: Path, tokenizer: Path | None, out_dir: Path, log=print) -> dict:
    """The `onnx` stage's work: (calibrate,) export, check; returns the manifest's `onnx` record."""
    record: dict = {}
    make_linear = None
    if recipe.onnx.qdq == "int8":
        from pipeline.quantize.calibrate import calibrate

        calibration = calibrate(source, tokenizer, recipe.precision.quantization.calibration, Path(out_dir).parent,
                                log=log)
        make_linear = qdq_linear_factory(calibration.act_amax, recipe.precision.quantization.exclude)
        record["calibration"] = calibration.record
        record["act_amax"] = calibration.act_amax
    model = load_model(checkpoint, make_linear)
    record.update(export_graph(model, out_dir, recipe.onnx.opset, log=log))
    record["dtype"] = model.config["dtype"]
    record["qdq"] = recipe.onnx.qdq
    record["architecture"] = model.config["architecture"]
    record["max_positions"] = model.config["max_position_embeddings"]
    from pipeline.manifest import read_manifest

    record["eos_token_id"] = (read_manifest(checkpoint) or {}).get("conversion", {}).get("eos_token_id")
    return record
