"""The batch-1 decode step as five kernels per layer, the way TensorRT-LLM's fused plugins run it.

A decode step at batch 1 must stream every weight once, so its floor is (weight bytes) / (memory bandwidth). What
a layer of separate PyTorch operations adds on top is the kernels between the GEMVs: norms, residual adds, rotary
embedding, cache writes, the attention's several kernels, activations. Each costs a launch gap and a ramp-up and
tail in which the memory system idles. This step folds them into the GEMVs and one attention kernel
(pipeline.kernels.gemv, pipeline.kernels.attention):

    [residual add + norm + qkv GEMV]  [rotary + cache write + attention]  [dense GEMV (+bias)]
    [residual add + norm + fc/gate GEMV + activation]  [proj GEMV (+bias)]

Each GEMV's config is chosen by timing (FusedStep.tune); on Hopper the kernels launch with programmatic dependent
launch, each loading its first weight tile while the previous kernel finishes. Rounding follows the unfused model
where it is cheap, so its greedy tokens stay those of the plain path on the test models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.backends.torch_model import Linear, RankModel
from pipeline.kernels import gemv, tuning
from pipeline.kernels.common import (
    ACT_GELU,
    ACT_NONE,
    ACT_SILU_GATE,
    NORM_LAYER,
    NORM_NONE,
    NORM_RMS,
    hopper,
    runs_on,
    triton,
)
from pipeline.quantize.runtime import FP8Linear, GroupwiseInt4Linear


class _Gemm:
    """The tensors one GEMV reads: weight, bias, and FP8 scales when the weight is FP8; `int4` the W4A16_AWQ linear
    (packed weight, group scales, prequant) when it is one."""

    def __init__(self, linear, bias: torch.Tensor | None = None):
        self.int4 = linear if isinstance(linear, GroupwiseInt4Linear) else None
        self.weight = linear.packed if self.int4 is not None else linear.weight
        self.bias = linear.bias if bias is None else bias
        fp8 = isinstance(linear, FP8Linear)
        self.act_scale = linear.act_scale if fp8 else None
        self.weight_scale = linear.weight_scale if fp8 else None


def attention_unsupported_reason(model: RankModel, layernorm_gelu: bool, paged: bool = False) -> str | None:
    """Why the decode attention kernel cannot serve this model's decode steps (None when it can). layernorm_gelu:
    the GPT-2 family (learned positions, no rotary embedding). paged: the engine's paged attention serves the step
    instead (it reads quantized caches and sliding windows)."""
    if triton is None:
        return "Triton is not installed"
    if not runs_on(model.device):
        return f"the {model.device.type} device (Triton kernels run on CUDA; TRITON_INTERPRET=1 emulates them)"
    if paged:
        return None
    if model.kv_format is not None:
        return f"the {model.kv_format} KV cache (the fused attention reads a cache in the model dtype)"
    if model.arch.sliding_window is not None:
        return f"sliding-window attention (a window of {model.arch.sliding_window}; the kernel attends to every slot)"
    if not layernorm_gelu:
        rotary = model.config.get("rotary_embedding_dim") or model.head_size
        if rotary != model.head_size:
            return "partial rotary embedding"
    if model.head_size % 2:
        return "an odd head size"
    return None


def unsupported_reason(model: RankModel, layernorm_gelu: bool, paged: bool = False) -> str | None:
    """Why the fused step cannot run this model (None when it can); paged: with the engine's attention."""
    reason = attention_unsupported_reason(model, layernorm_gelu, paged)
    if reason is not None:
        return reason
    if model.mapping.pp != 1:
        return "pipeline parallelism (the fused step runs pp = 1)"
    if model.head is None:
        return "no lm_head on this rank"
    for layer in model.layers:
        if not layernorm_gelu and "fc_gate" not in layer:
            return "a gated MLP whose gate and fc are not fused (weight-only or mixed formats)"
        for key in ("qkv", "dense", "fc_gate" if "fc_gate" in layer else "fc", "proj"):
            if isinstance(layer[key], GroupwiseInt4Linear) and layernorm_gelu:
                return "int4 GEMMs with LayerNorm (the int4 GEMV's prologue is RMSNorm)"
            if not isinstance(layer[key], (Linear, FP8Linear, GroupwiseInt4Linear)):
                return f"{type(layer[key]).__name__} GEMMs (weight-only formats)"
    return None


class FusedStep:
    """A batch-1 decode step (pp = 1, tp any) as 5 kernels per layer; `forward` matches RankModel.forward's decode
    call and returns float32 logits [1, 1, vocab]. layernorm_gelu: LayerNorm and GELU (GPT-2), else RMSNorm,
    a gated SiLU MLP and rotary embedding (Llama). pdl: programmatic dependent launch where the GPU has it.
    paged: `forward` is given the attention (the engine's paged cache) instead of a cache."""

    def __init__(self, model: RankModel, layernorm_gelu: bool, pdl: bool = False, paged: bool = False):
        reason = unsupported_reason(model, layernorm_gelu, paged)
        if reason is not None:
            raise ValueError(f"the fused decode step does not support {reason}")
        self.model = model
        first_tp_rank = model.mapping.tp_rank == 0  # RowLinear biases are added once, before the all-reduce
        self.norm = NORM_LAYER if layernorm_gelu else NORM_RMS
        self.act = ACT_GELU if layernorm_gelu else ACT_SILU_GATE
        self.layers = []
        for layer in model.layers:
            mlp = layer["fc_gate"] if "fc_gate" in layer else layer["fc"]
            self.layers.append({
                "ln1": layer["ln1"], "ln2": layer["ln2"], "qkv": _Gemm(layer["qkv"]),
                "dense": _Gemm(layer["dense"], layer["dense_bias"] if first_tp_rank else None),
                "mlp": _Gemm(mlp), "proj": _Gemm(layer["proj"], layer["proj_bias"] if first_tp_rank else None),
            })
        self.head = _Gemm(model.head)
        self.inv_freq = None if layernorm_gelu else model.inv_freq.float().contiguous()
        self.pdl = pdl and hopper(model.device)
        self.configs: dict[str, object] = {}  # GEMM name -> the triton.Config tune() chose for it

    def _gemv(self, x, residual, norm, gemm: _Gemm, act=ACT_NONE, out_dtype=None, name: str | None = None):
        """The fused GEMV of the row x [1, K]: (y [1, N], x + residual [1, K]), in the config tune() chose for the
        GEMM `name` if it did (by its index: the op is what torch.compile sees), else autotuned."""
        if gemm.int4 is not None:  # autotuned (pipeline.kernels.int4_gemm)
            lin = gemm.int4
            weight = norm[0] if norm is not None else None
            y, h_out = torch.ops.pipeline.int4_fused_gemv(
                x, residual, weight, lin.packed, lin.scales, lin.prequant, gemm.bias, lin.out_features,
                lin.group_size, float(self.model.eps), NORM_NONE if norm is None else self.norm, act, self.pdl)
            return y.view(1, -1), h_out.view(1, -1)
        config = gemv.CONFIGS.index(self.configs[name]) if name in self.configs else -1
        y, h_out = torch.ops.pipeline.fused_gemv(*self._args(x, residual, norm, gemm, act, out_dtype), config)
        return y.view(1, -1), h_out.view(1, -1)

    def _args(self, x, residual, norm, gemm: _Gemm, act, out_dtype) -> tuple:
        """The arguments of fused_gemv (and launch_fused_gemv) for one GEMM."""
        weight, bias = norm if norm is not None else (None, None)
        kind = NORM_NONE if norm is None else self.norm
        return (x, residual, weight, bias if kind == NORM_LAYER else None, gemm.weight, gemm.bias, gemm.act_scale,
                gemm.weight_scale, float(self.model.eps), kind, act, out_dtype or self.model.dtype, self.pdl)

    def _gemv_calls(self) -> dict[str, tuple[list[_Gemm], list | None, int, torch.dtype | None]]:
        """Each GEMM of the step: (its GEMMs over the layers, the norm of its prologue per layer or None, its
        activation, its output dtype (None: the model's))."""
        layers = self.layers
        return {"qkv": ([ly["qkv"] for ly in layers], [ly["ln1"] for ly in layers], ACT_NONE, None),
                "dense": ([ly["dense"] for ly in layers], None, ACT_NONE, None),
                "mlp": ([ly["mlp"] for ly in layers], [ly["ln2"] for ly in layers], self.act, None),
                "proj": ([ly["proj"] for ly in layers], None, ACT_NONE, None),
                "head": ([self.head], [self.model.ln_f], ACT_NONE, torch.float32)}

    def tune(self, replays: int = 10, timer=None, persist: bool | None = None) -> dict[str, str]:
        """Choose each GEMV's config as the step runs it (pipeline.kernels.tuning.choose): every config autotuning
        would time, over all layers' weights of that GEMM launched back to back in a CUDA graph. Triton's
        autotuner times each kernel alone on one weight and chose differently from process to process. GPU only
        unless timer(run) -> seconds stands in (tests); persist as choose has it. Returns {GEMM: what was chosen}
        for the GEMMs timed or read from the tuning cache now."""
        model = self.model
        if timer is None and model.device.type != "cuda":
            return {}
        chosen = {}
        generator = torch.Generator(device=model.device).manual_seed(0)
        for name, (gemms, norms, act, out_dtype) in self._gemv_calls().items():
            if gemms[0].int4 is not None:  # the int4 GEMV is autotuned by Triton
                continue
            weight = gemms[0].weight
            k = weight.shape[1]
            n = weight.shape[0] // 2 if act == ACT_SILU_GATE else weight.shape[0]
            x = torch.randn(1, k, device=model.device, generator=generator).to(model.dtype)
            residual = torch.randn(1, k, device=model.device, generator=generator).to(model.dtype)

            def run_for(config, gemms=gemms, norms=norms, act=act, out_dtype=out_dtype, x=x, residual=residual):
                def run():
                    for i, gemm in enumerate(gemms):
                        norm = norms[i] if norms is not None else None
                        gemv.launch_fused_gemv(*self._args(x, residual if norm is not None else None, norm, gemm,
                                                           act, out_dtype), config=config)
                run.config = config  # for a stand-in timer (tests)
                return run

            shape = (f"{name} (N={n}, K={k}, {weight.dtype}) layers={len(gemms)} activations={model.dtype} "
                     f"norm={self.norm} act={act} pdl={self.pdl} padded=1")
            read = sum(g.weight.numel() * g.weight.element_size() for g in gemms)
            config, note = tuning.choose(model.device, "fused-gemv", shape,
                                         gemv.candidates(n, k, gemms[0].act_scale is not None), run_for, read,
                                         timer=timer, persist=persist, replays=replays)
            if config is not None:  # else autotuning chooses for this GEMM
                self.configs[name] = config
            if note is not None:
                chosen[name] = note
        return chosen

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache, slot: torch.Tensor | None,
                attention=None) -> torch.Tensor:
        """attention(layer index, qkv [1, n]) -> [1, heads * head_size], when given, replaces the decode
        attention kernel over `cache` (the engine: rotary, paged cache write and paged attention)."""
        model = self.model
        comm = model.comm
        if tokens.shape[0] != 1:
            raise ValueError(f"the fused step runs batch 1, not {tokens.shape[0]}")
        h = F.embedding(tokens.view(1), model.embed)
        if model.pos_embed is not None:
            h = h + F.embedding(positions.view(1), model.pos_embed)
        residual = None
        for index, layer in enumerate(self.layers):
            qkv, h_new = self._gemv(h, residual, layer["ln1"], layer["qkv"], name="qkv")
            h = h_new if residual is not None else h
            if attention is not None:
                attn = attention(index, qkv)
            else:
                attn = torch.ops.pipeline.decode_attention(
                    qkv, cache.k[index], cache.v[index], cache.valid, positions.view(1), slot,
                    self.inv_freq, model.heads, model.kv_heads, model.head_size, self.pdl)
            residual, _ = self._gemv(attn, None, None, layer["dense"], name="dense")
            residual = comm.all_reduce_tp(residual)
            hidden, h = self._gemv(h, residual, layer["ln2"], layer["mlp"], self.act, name="mlp")
            residual, _ = self._gemv(hidden, None, None, layer["proj"], name="proj")
            residual = comm.all_reduce_tp(residual)
        logits, _ = self._gemv(h, residual, model.ln_f, self.head, out_dtype=torch.float32, name="head")
        logits = comm.all_gather_tp(logits.view(1, 1, -1))
        return logits[..., : model.vocab_size]
