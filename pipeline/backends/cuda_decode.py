"""The fast decode path of the PyTorch backend on CUDA GPUs.

Batch-1 decoding is bound by memory bandwidth: each token reads every weight once. What keeps a plain PyTorch
loop far from that limit is launch and host overhead (hundreds of small kernels per token) and GEMM kernels that
stream skinny matrices slowly. This module removes both, for one rank's shard (tensor parallel over NCCL; pp = 1):

- a preallocated KV cache and a decode step whose every shape is static, with the slot index, positions and next
  tokens kept on the device, so the whole step (greedy argmax included) is one CUDA graph replay;
- torch.compile over the step, which fuses norms, rotary embedding, activations and residual adds;
- the gate and fc GEMMs of a gated MLP fused into one, as trtllm-build's use_fused_mlp does (FP8: dequantized,
  concatenated and requantized with the larger of the two weight scales, as TensorRT-LLM's builder does);
- one configuration per situation, the one the measurements in bench/results/ found fastest:
  batch 1: the fused step (pipeline.backends.fused_step: five kernels per layer, with programmatic dependent
  launch on Hopper); batches > 1: the layer-by-layer step with the decode attention kernel (rotary embedding,
  cache write and attention in one) and each GEMM shape on cuBLAS or the split-K kernel, whichever timed faster
  (torch._scaled_mm for FP8 on Ada/Hopper); the greedy pick as one kernel in both.
  Where the fused step does not apply at batch 1, one-row GEMMs run the Triton GEMV (pipeline::gemv).

`DecodeOptions` can switch pieces off, so the benchmark can measure what each one gives.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.backends import fused_step
from pipeline.backends.torch_model import Linear, RankModel
from pipeline.kernels import batched_gemm, fp8, gemv, tuning
from pipeline.kernels.common import ACT_NONE, ACT_SILU_GATE, runs_on
from pipeline.progress import progress
from pipeline.quantize.formats import fp8_linear, fp8_scale, quantize_fp8
from pipeline.quantize.runtime import FP8Linear


def _layernorm_gelu(model: RankModel) -> bool:
    """The architecture's kernel kinds, the one place the decode path reads them: LayerNorm, GELU and learned
    positions (GPT-2) when True, else RMSNorm, a gated SiLU MLP and rotary embedding (Llama, Qwen2, Mistral)."""
    arch = model.arch
    kinds = (arch.norm, arch.mlp, arch.position)
    if kinds not in (("layernorm", "gelu", "learned"), ("rmsnorm", "gated_silu", "rope")):
        raise ValueError(f"the fused decode kernels have no form for {kinds}")
    return arch.norm == "layernorm"


@dataclass(frozen=True)
class DecodeOptions:
    """The decode path's pieces, all on by default (pipeline.run's path); the benchmark switches them off one by
    one to measure each (its --variants labels)."""

    cuda_graph: bool = True
    compile: bool = True
    triton_gemv: bool = True  # one-row GEMMs outside the fused step through the Triton GEMV, else cuBLAS
    fuse_gate_up: bool = True
    fused_step: bool = True  # batch 1: pipeline.backends.fused_step where the model allows it
    pdl: bool = True  # the fused step's kernels with programmatic dependent launch (Hopper+; dropped elsewhere)

    @property
    def label(self) -> str:
        parts = [("graph" if self.cuda_graph else "eager"), ("compile" if self.compile else None),
                 ("triton-gemv" if self.triton_gemv else "cublas"), ("fused-mlp" if self.fuse_gate_up else None),
                 ("fused-step" if self.fused_step else None), ("pdl" if self.pdl else None)]
        return "+".join(p for p in parts if p)

    @classmethod
    def from_label(cls, label: str) -> DecodeOptions:
        """The options a label names (the inverse of `label`), e.g. 'graph+cublas+fused-mlp+fused-step'."""
        parts = set(label.split("+"))
        known = {"graph", "eager", "compile", "triton-gemv", "cublas", "fused-mlp", "fused-step", "pdl"}
        if parts - known or ("graph" in parts) == ("eager" in parts) or ("cublas" in parts) == ("triton-gemv" in parts):
            raise ValueError(f"not a decode path: {label!r} (parts: graph|eager, compile, triton-gemv|cublas, "
                             "fused-mlp, fused-step, pdl)")
        return cls(cuda_graph="graph" in parts, compile="compile" in parts, triton_gemv="triton-gemv" in parts,
                   fuse_gate_up="fused-mlp" in parts, fused_step="fused-step" in parts, pdl="pdl" in parts)


class CudaLinear(Linear):
    """F.linear, or the Triton GEMV when the input is one row, or for a few rows the split-K kernel where
    tune_batched_gemms chose it (`skinny`: padded rows -> config index, -1 for cuBLAS); out_dtype=float32 keeps the
    float32 accumulators (lm_head: logits_dtype float32) instead of rounding them to the model dtype."""

    def __init__(self, weight, bias=None, triton_gemv: bool = True, out_dtype: torch.dtype | None = None):
        super().__init__(weight, bias)
        self.triton_gemv = triton_gemv and gemv.available()
        self.out_dtype = out_dtype
        self.skinny: dict[int, int] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton_gemv and x.numel() == x.shape[-1]:
            return gemv.linear_1row(x, self.weight, self.bias, out_dtype=self.out_dtype)
        index = self._skinny(x)
        if index >= 0:
            y = torch.ops.pipeline.skinny_mm(x.reshape(-1, x.shape[-1]), self.weight, self.bias, index)
            return y.view(*x.shape[:-1], self.weight.shape[0])
        if self.out_dtype is not None and self.bias is None and x.device.type == "cuda":
            y = torch.mm(x.reshape(-1, x.shape[-1]), self.weight.t(), out_dtype=self.out_dtype)
            return y.reshape(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight, self.bias)

    def _skinny(self, x: torch.Tensor) -> int:
        """The split-K kernel's config tuned for x's rows, or -1 (cuBLAS)."""
        rows = x.numel() // x.shape[-1]
        if not self.skinny or not 2 <= rows <= batched_gemm.MAX_ROWS:
            return -1
        return self.skinny.get(batched_gemm.padded_rows(rows), -1)

    def silu_gate(self, x: torch.Tensor, activation=None) -> torch.Tensor:
        """silu(fc(x)) * gate(x) for this fused [fc; gate] GEMM (RankModel._silu_gate): in the split-K kernel's
        epilogue where tuning chose it for x's rows, else the GEMM and then `activation` on its output [..., 2I]
        (torch's ops when None)."""
        index = self._skinny(x)
        if index >= 0:
            y = torch.ops.pipeline.skinny_mm(x.reshape(-1, x.shape[-1]), self.weight, self.bias, index,
                                             ACT_SILU_GATE)
            return y.view(*x.shape[:-1], self.weight.shape[0] // 2)
        if activation is not None:
            return activation(self(x))
        fc, gate = self(x).chunk(2, dim=-1)
        return F.silu(fc) * gate


class CudaFP8Linear(FP8Linear):
    """FP8 x FP8 with float32 accumulation: the Triton GEMV for one row, torch._scaled_mm otherwise."""

    def __init__(self, base: FP8Linear, triton_gemv: bool = True):
        super().__init__(base.weight, base.weight_scale, base.act_scale, base.bias, base.out_dtype)
        self.triton_gemv = triton_gemv and gemv.available()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.fp8_input_scale(rows, x.device) is not None:
            x2d = x.reshape(-1, x.shape[-1])
            if x.dtype != torch.float8_e4m3fn:  # else cast at act_scale already (RankModel's fused activation)
                x2d = fp8.quantize_fp8(x2d, self.act_scale)  # the cast in one pass
            y = torch._scaled_mm(x2d, self.weight.t(), scale_a=self.act_scale, scale_b=self.weight_scale,
                                 out_dtype=self.out_dtype)
            return y.view(*x.shape[:-1], self.weight.shape[0])
        if x.dtype == torch.float8_e4m3fn:
            raise ValueError(f"an FP8 input reaches CudaFP8Linear only where it runs torch._scaled_mm (CUDA, no "
                             f"bias, more than one row); found {rows} row(s) on {x.device}, bias "
                             f"{self.bias is not None}: give it the activations in the model dtype")
        if self.triton_gemv and rows == 1:
            return gemv.linear_1row(x, self.weight, self.bias, self.act_scale, self.weight_scale,
                                            self.out_dtype)
        return fp8_linear(x, self.weight, self.act_scale, self.weight_scale, self.bias, self.out_dtype)

    def fp8_input_scale(self, rows: int, device: torch.device) -> torch.Tensor | None:
        """act_scale where a call with `rows` rows on `device` runs torch._scaled_mm, which also takes its input
        already cast to float8_e4m3fn at that scale (skipping its own cast); None where it needs the model dtype."""
        gemv_row = self.triton_gemv and rows == 1
        if device.type == "cuda" and self.bias is None and fp8.triton is not None and not gemv_row:
            return self.act_scale
        return None


def _fuse(fc, gate):
    """One GEMM computing [fc(x) | gate(x)]."""
    if isinstance(fc, FP8Linear) and isinstance(gate, FP8Linear):
        scale = torch.maximum(fc.weight_scale, gate.weight_scale)
        weight = torch.cat([quantize_fp8(fc.weight.float() * fc.weight_scale, scale),
                            quantize_fp8(gate.weight.float() * gate.weight_scale, scale)])
        act_scale = torch.maximum(fc.act_scale, gate.act_scale)  # both see the same input
        bias = None if fc.bias is None else torch.cat([fc.bias, gate.bias])
        return FP8Linear(weight, scale, act_scale, bias, fc.out_dtype)
    if type(fc) is Linear and type(gate) is Linear:
        bias = None if fc.bias is None else torch.cat([fc.bias, gate.bias])
        return Linear(torch.cat([fc.weight, gate.weight]), bias)
    if type(fc) is type(gate) and hasattr(fc, "fused_with"):  # W4A16_AWQ, SmoothQuant: where their layouts allow
        return fc.fused_with(gate)
    return None  # weight-only formats keep two GEMMs


def accelerate(model: RankModel, options: DecodeOptions) -> RankModel:
    """Swap the model's GEMMs for the CUDA ones (in place) and fuse gate/fc; returns the model."""

    def convert(linear):
        if isinstance(linear, FP8Linear):
            return CudaFP8Linear(linear, options.triton_gemv)
        if type(linear) is Linear:
            return CudaLinear(linear.weight, linear.bias, options.triton_gemv)
        return linear

    for layer in model.layers:
        if options.fuse_gate_up and "gate" in layer:
            fused = _fuse(layer["fc"], layer["gate"])
            if fused is not None:
                layer["fc_gate"] = fused
                del layer["fc"], layer["gate"]
        for key in ("qkv", "dense", "fc", "gate", "proj", "fc_gate"):
            if key in layer:
                layer[key] = convert(layer[key])
    if model.head is not None and type(model.head) is Linear:
        out_dtype = torch.float32 if _mm_out_dtype_works(model.device, model.dtype) else None
        model.head = CudaLinear(model.head.weight, None, options.triton_gemv, out_dtype=out_dtype)
    return model


def set_triton_gemv(model: RankModel, flag: bool) -> None:
    """Switch an accelerated model's one-row GEMMs between the Triton GEMV (True) and cuBLAS (False)."""
    for linear in [value for layer in model.layers for value in layer.values()] + [model.head]:
        if hasattr(linear, "triton_gemv"):
            linear.triton_gemv = flag and gemv.available()  # as CudaLinear decides it (CUDA only)


def _gemm_groups(model: RankModel) -> dict[tuple, list]:
    """The model's GEMMs the split-K kernel can serve, grouped by (name, N, K, dtype): CUDA linears of a dtype it
    runs, with no float32 output (lm_head keeps cuBLAS, which streams it near the copy bandwidth)."""
    groups: dict[tuple, list] = {}
    for layer in model.layers:
        for name in ("qkv", "dense", "fc_gate", "fc", "gate", "proj"):
            linear = layer.get(name)
            if getattr(linear, "skinny", None) is None or linear.out_dtype is not None:
                continue
            if linear.weight.dtype not in batched_gemm.DTYPES:
                continue
            n, k = linear.weight.shape
            groups.setdefault((name, n, k, linear.weight.dtype), []).append(linear)
    return groups


def tune_batched_gemms(model: RankModel, rows: int, replays: int = 10, timer=None,
                       persist: bool | None = None) -> dict[str, str]:
    """For decode steps of `rows` sequences (2 to batched_gemm.MAX_ROWS): per GEMM shape, cuBLAS or the split-K
    kernel's best config, whichever is fastest over all layers' weights of that shape (pipeline.kernels.tuning.
    choose; timer and persist as it has them), kept in each linear's `skinny` map (padded rows -> config index,
    -1 for cuBLAS). Returns {GEMM: what was chosen} for the shapes timed or read from the tuning cache now."""
    if batched_gemm.triton is None or not 2 <= rows <= batched_gemm.MAX_ROWS:
        return {}
    if timer is None and model.device.type != "cuda":
        return {}
    m_p = batched_gemm.padded_rows(rows)
    chosen = {}
    generator = torch.Generator(device=model.device).manual_seed(0)
    for (name, n, k, dtype), linears in _gemm_groups(model).items():
        act = ACT_SILU_GATE if name == "fc_gate" else ACT_NONE  # the activation in the epilogue (silu_gate)
        indices = [-1] + batched_gemm.candidates(n // 2 if act == ACT_SILU_GATE else n, k, act, m_p)
        x = torch.randn(rows, k, device=model.device, generator=generator).to(dtype)

        def run_for(index, linears=linears, act=act, x=x, name=name):
            def run():
                for linear in linears:
                    if index >= 0:
                        batched_gemm.skinny_mm(x, linear.weight, linear.bias, index, act)
                    elif act == ACT_SILU_GATE:  # as RankModel._mlp runs it with cuBLAS
                        fc, gate = F.linear(x, linear.weight, linear.bias).chunk(2, dim=-1)
                        F.silu(fc) * gate
                    else:
                        F.linear(x, linear.weight, linear.bias)
            run.gemm, run.config = name, index  # for a stand-in timer (tests)
            return run

        read = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears)
        index, note = tuning.choose(model.device, "skinny-gemm", f"{name} (N={n}, K={k}, {dtype}, {m_p} padded rows) "
                                    f"layers={len(linears)}", indices, run_for, read, label=batched_gemm.label,
                                    timer=timer, persist=persist, replays=replays)
        if note is not None:
            chosen[name] = note
        for linear in linears:
            linear.skinny[m_p] = -1 if index is None else index
    return chosen


def forget_batched_gemms(model: RankModel) -> None:
    """Back to cuBLAS for every batch: clear the choices tune_batched_gemms left on the model's linears."""
    for linears in _gemm_groups(model).values():
        for linear in linears:
            linear.skinny.clear()


def _mm_out_dtype_works(device: torch.device, dtype: torch.dtype) -> bool:
    """torch.mm(..., out_dtype=float32) (float32 output of a half-precision GEMM) exists on recent CUDA builds."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones((2, 16), dtype=dtype, device=device)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


class HostEvent:
    """The slice of torch.cuda.Event that timings use, on the host clock (CPU runs: the step is done on return)."""

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.at - self.at) * 1e3  # milliseconds, as CUDA events give them


def timing_event(device: torch.device):
    return torch.cuda.Event(enable_timing=True) if device.type == "cuda" else HostEvent()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_attention(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads, kv_heads, head_size):
    return torch.ops.pipeline.decode_attention(qkv, k_cache, v_cache, valid, positions, slot, inv_freq, heads,
                                               kv_heads, head_size)


class CudaDecoder:
    """Prefill, then decode steps replayed from one captured CUDA graph, for a fixed batch and cache length.
    `path` says which step runs (the fused step, or the model's own forward and why)."""

    def __init__(self, model: RankModel, batch: int, max_len: int, options: DecodeOptions,
                 prefill_graphs: int = 4):
        """prefill_graphs: with CUDA graphs on a GPU, the prefill of each prompt width is captured too (the first
        prefill at a width runs it three times: warm-up, capture, replay), and the graphs of this many most recent
        widths are kept. Without a graph a batch-1 prefill is bound by launching ~1000 kernels; 0 turns this off
        (a single generation gains nothing from it)."""
        if model.mapping.pp != 1:
            raise ValueError("the CUDA decode path runs pp = 1 (pipeline stages use the plain path)")
        self.model, self.batch, self.max_len, self.options = model, batch, max_len, options
        device = model.device
        self.cache = model.new_cache(batch, max_len)
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        # history[:, s] = the token generated by the decode step whose input sat at slot s: steps can run back to
        # back and the host read their tokens later, without a synchronization per step
        self.history = torch.zeros((batch, max_len + 1), dtype=torch.long, device=device)
        self.logits = None
        self.fused = None  # the fused step, at batch 1 where the model allows it
        layernorm_gelu = _layernorm_gelu(model)
        if not options.fused_step:
            self.fallback_reason = "not asked"
        elif batch != 1:
            self.fallback_reason = f"batch {batch}"
        else:
            self.fallback_reason = fused_step.unsupported_reason(model, layernorm_gelu)
            if self.fallback_reason is None:
                self.fused = fused_step.FusedStep(model, layernorm_gelu, pdl=options.pdl)
        # the layer-by-layer step's attention as one kernel (rotary embedding, cache write, attention), where it applies
        self.attention = None
        if self.fused is None:
            reason = fused_step.attention_unsupported_reason(model, layernorm_gelu)
            if reason is None:
                inv_freq = None if layernorm_gelu else model.inv_freq.float().contiguous()
                self.attention = functools.partial(_decode_attention, inv_freq=inv_freq, heads=model.heads,
                                                   kv_heads=model.kv_heads, head_size=model.head_size)
            else:
                self.fallback_reason += f"; attention in torch: {reason}"
        # the greedy pick as one kernel of many programs: torch.argmax reads a large vocabulary with few blocks
        self.fused_argmax = runs_on(model.device)
        # compile leaves the fused step's own kernels (custom ops) as they are and compiles only the prefill:
        # compiling the fused step too made the set-up take minutes
        compile_step = options.compile and self.fused is None
        self._step_fn = torch.compile(self._step, fullgraph=True, dynamic=False) if compile_step else self._step
        self.graph = None
        on_gpu = model.device.type == "cuda"
        self.prefill_graphs = prefill_graphs if options.cuda_graph and on_gpu else 0
        # the compiled prefill (GPU only: Inductor's CPU compile takes minutes) fuses the norms, rotary embedding
        # and activations of every prompt token; it recompiles per prompt width
        self._prefill_fn = (torch.compile(self._prefill_body, fullgraph=True, dynamic=False)
                            if options.compile and on_gpu else self._prefill_body)
        self._prefill_cache: dict[int, tuple] = {}  # width -> (graph, tokens, mask, first), most recent last

    @property
    def path(self) -> str:
        if self.fused is not None:
            return "fused step, PDL" if self.fused.pdl else "fused step"
        attention = ", fused attention" if self.attention else ""
        return f"layer by layer{attention} ({self.fallback_reason})"

    def _step(self) -> torch.Tensor:
        """One greedy decode step on the device buffers: write the cache at `slot`, compute logits, advance."""
        self.cache.valid.index_fill_(1, self.slot.view(1), True)
        if self.fused is not None:
            logits = self.fused.forward(self.tokens, self.positions, self.cache, self.slot)[:, -1]
        else:
            logits = self.model.forward(self.tokens, self.positions, self.cache, slot_start=self.slot,
                                        keys_len=self.max_len, decode_attention=self.attention)[:, -1]
        next_tokens = self._argmax(logits).view(-1, 1)
        self.tokens.copy_(next_tokens)
        self.history.index_copy_(1, self.slot.view(1), next_tokens)
        self.positions.add_(1)
        self.slot.add_(1)
        return logits

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy pick of each row of logits [B, V]: [B] int64."""
        if self.fused_argmax:
            return torch.ops.pipeline.greedy_argmax(logits if logits.stride(-1) == 1 else logits.contiguous())
        return logits.argmax(dim=-1)

    def warm_up(self) -> None:
        """Compile, tune and capture with throwaway state (prefill resets everything the graph reads).

        The warm-up steps run on a side stream, as CUDA graph capture (and NCCL inside it) requires."""
        self.slot.fill_(0)
        if self.fused is None and self.batch > 1:  # cuBLAS or the split-K kernel, per GEMM shape
            tune_batched_gemms(self.model, self.batch)
        else:
            forget_batched_gemms(self.model)  # another decoder of this model may have tuned them
        # the first step compiles (torch.compile, Triton): the bar shows that the silence is that
        desc = "warm-up steps (the first compiles)" if self._step_fn != self._step else "warm-up steps"
        if self.model.device.type != "cuda":
            for _ in progress(range(1), desc=desc, unit="step"):
                self._step_fn()
            return
        if self.fused is not None:
            self.fused.tune()  # each GEMV's config, timed as the step runs it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in progress(range(3), desc=desc, unit="step"):
                self._step_fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if self.options.cuda_graph:
            self.slot.fill_(0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step_fn()
            torch.cuda.synchronize()

    def _prefill_body(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Prefill from device buffers (left-padded tokens [B, W] and their mask), with no read back to the host,
        so that it can be captured: reset the cache's valid slots, run the prompts, set the decode state."""
        width = tokens.shape[1]
        self.cache.valid.zero_()
        self.cache.valid[:, :width] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self.model.forward(tokens, positions, self.cache, slot_start=0)
        first = self._argmax(logits[:, -1])
        self.tokens.copy_(first[:, None])
        self.positions.copy_(positions[:, -1:] + 1)
        self.slot.fill_(width)
        return first

    def _capture_prefill(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple:
        """Warm up (compiling, if asked) on a side stream, then capture the prefill of this width."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._prefill_fn(tokens, mask)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            first = self._prefill_fn(tokens, mask)
        return graph, tokens, mask, first

    def prefill(self, prompts: list[list[int]], pad_id: int = 0) -> torch.Tensor:
        """Run the prompts (left-padded) and set the buffers for decoding; returns the first new tokens [B]
        (a device tensor: with a prefill graph, a view of its output, valid until the next prefill)."""
        from pipeline.generate import left_pad

        assert len(prompts) == self.batch
        tokens, mask = left_pad(prompts, pad_id, self.model.device)
        if not self.prefill_graphs:
            return self._prefill_fn(tokens, mask)
        width = tokens.shape[1]
        entry = self._prefill_cache.pop(width, None)
        if entry is None:
            while len(self._prefill_cache) >= self.prefill_graphs:
                self._prefill_cache.pop(next(iter(self._prefill_cache)))  # the least recently used width
            entry = self._capture_prefill(tokens, mask)
        self._prefill_cache[width] = entry
        graph, static_tokens, static_mask, first = entry
        static_tokens.copy_(tokens)
        static_mask.copy_(mask)
        graph.replay()
        return first

    def run_steps(self, count: int, events: list | None = None) -> None:
        """Launch `count` decode steps back to back (no host synchronization); with `events`, record a CUDA event
        after each step (for per-step timings). Their tokens are in history[:, width : width + count]."""
        for _ in range(count):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step_fn()
            if events is not None:
                event = timing_event(self.model.device)
                event.record()
                events.append(event)

    def step(self) -> torch.Tensor:
        """One decode step; returns the next tokens [B] (a view of the device buffer: copy before the next step)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step_fn()
        return self.tokens[:, 0]

    def generate(self, prompts: list[list[int]], new_tokens: int, eos_id: int | None = None,
                 pad_id: int = 0, on_tokens=None) -> list[list[int]]:
        """Greedy generation, stopping at EOS or new_tokens; on_tokens(list of ints) is called after each step."""
        outputs = [[] for _ in prompts]
        finished = [False] * len(prompts)
        current = self.prefill(prompts, pad_id)
        for step in range(new_tokens):
            values = current.tolist()
            if on_tokens is not None:
                on_tokens(values)
            for i, token in enumerate(values):
                if not finished[i]:
                    outputs[i].append(token)
                    finished[i] = eos_id is not None and token == eos_id
            if all(finished) or step == new_tokens - 1:
                break
            current = self.step()
        return outputs


def quantize_model_fp8(model: RankModel, act_amax: dict[str, float]) -> RankModel:
    """FP8 weights and static activation scales for a model loaded in bfloat16 (device-random benchmarks)."""
    for index, layer in enumerate(model.layers):
        for key in ("qkv", "dense", "fc", "gate", "proj"):
            linear = layer.get(key)
            if type(linear) is not Linear:
                continue
            w_scale = fp8_scale(linear.weight.float().abs().amax()).to(linear.weight.device)
            a_scale = fp8_scale(act_amax[f"{index}.{key}"]).to(linear.weight.device)
            layer[key] = FP8Linear(quantize_fp8(linear.weight, w_scale), w_scale, a_scale, linear.bias, model.dtype)
    return model
