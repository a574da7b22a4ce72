"""The PyTorch backend: runs one rank's shard of a TensorRT-LLM checkpoint, as TensorRT-LLM would.

It reads the same config.json and rank{r}.safetensors that `trtllm-build` reads, with the same names, layouts
and splits, so a conversion bug shows up here as a logit mismatch against Hugging Face (tests/test_run_mpi.py).

Layers follow TensorRT-LLM's modules: Attention with a fused `qkv` ColumnLinear and a `dense` RowLinear, an MLP
(GPT-2: fc -> gelu -> proj) or GatedMLP (LLaMA: proj(silu(fc(x)) * gate(x))), RowLinear outputs all-reduced across
the tp group before their (unsplit) bias is added, and lm_head column-split then gathered.

The KV cache is preallocated for the whole generation ([batch, kv_heads, max_len, head_size] per layer) and a
decode step has static shapes (one query against every cache slot, masked), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.architectures import for_checkpoint
from pipeline.dist import Comm
from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import RunError
from pipeline.kernels.activation import silu_mul
from pipeline.kernels.norm import add_rms_norm, rms_norm
from pipeline.quantize.formats import dequantize_kv
from pipeline.quantize.registry import kv_cache_format_for_algo


def rope_inv_freq(config: dict) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama-3 frequency scaling when the checkpoint asks for it."""
    dim = config.get("rotary_embedding_dim") or config["head_size"]
    base = float(config.get("rotary_base", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.get("rotary_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class KVCache:
    """Preallocated keys and values of every local layer, and which slots hold real tokens."""

    k: list[torch.Tensor]  # per layer [batch, kv_heads_local, max_len, head_size]
    v: list[torch.Tensor]
    valid: torch.Tensor  # [batch, max_len] bool: slot holds a real (non-padding) token

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


class Linear:
    """y = x W^T (+ b): the unquantized GEMM. Quantized formats provide the same call (pipeline.quantize)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RankModel:
    """One rank's part of the model: its pipeline stage's layers, split for its tensor-parallel rank."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor], comm: Comm, device: torch.device,
                 make_linear=None):
        self.config = config
        self.comm = comm
        self.mapping = comm.mapping
        self.device = device
        self.dtype = TORCH_DTYPES[config["dtype"]]
        self.arch = for_checkpoint(config)  # the registry entry: norm, mlp, position kinds; the sliding window
        tp = self.mapping.tp
        self.hidden = config["hidden_size"]
        self.head_size = config["head_size"]
        self.vocab_size = config["vocab_size"]
        self.heads = config["num_attention_heads"] // tp
        self.kv_heads = max(config["num_key_value_heads"] // tp, 1)
        self.eps = config["norm_epsilon"]
        self.num_local_layers = config["num_hidden_layers"] // self.mapping.pp
        make_linear = make_linear or (lambda prefix, w, b: Linear(w, b))
        kv_algo = config.get("quantization", {}).get("kv_cache_quant_algo")
        # The KV-cache format's entry (pipeline/quantize/schemes/kv_*.py) and its name; None: the model dtype.
        self.kv_cache_format = kv_cache_format_for_algo(kv_algo) if kv_algo is not None else None
        self.kv_format = self.kv_cache_format.name if self.kv_cache_format is not None else None
        self.fused_norm = False  # RMS norms through pipeline.kernels.norm (the engine sets it on a GPU)
        # the fused [fc; gate] GEMM's activation through pipeline.kernels.activation for more than one row (the
        # engine sets it on a GPU; the decode runner's torch.compile fuses it there instead)
        self.fused_activation = False
        # Calibration sets this to a callable(layer_index, k, v) that sees the keys and values the cache stores.
        self.observe_kv = None

        def get(name: str) -> torch.Tensor | None:
            t = weights.get(name)
            return None if t is None else t.to(device)

        self.embed = get("transformer.vocab_embedding.weight")
        self.pos_embed = get("transformer.position_embedding.weight")
        self.ln_f = (get("transformer.ln_f.weight"), get("transformer.ln_f.bias"))
        self.lm_head = get("lm_head.weight")
        self.head = Linear(self.lm_head) if self.lm_head is not None else None
        self.layers = []
        for i in range(self.num_local_layers):
            p = f"transformer.layers.{i}."
            layer = {
                "ln1": (get(p + "input_layernorm.weight"), get(p + "input_layernorm.bias")),
                "ln2": (get(p + "post_layernorm.weight"), get(p + "post_layernorm.bias")),
                "qkv": make_linear(p + "attention.qkv", get(p + "attention.qkv.weight"), get(p + "attention.qkv.bias")),
                "dense": make_linear(p + "attention.dense", get(p + "attention.dense.weight"), None),
                "dense_bias": get(p + "attention.dense.bias"),
                "fc": make_linear(p + "mlp.fc", get(p + "mlp.fc.weight"), get(p + "mlp.fc.bias")),
                "proj": make_linear(p + "mlp.proj", get(p + "mlp.proj.weight"), None),
                "proj_bias": get(p + "mlp.proj.bias"),
            }
            if self.arch.mlp == "gated_silu":
                layer["gate"] = make_linear(p + "mlp.gate", get(p + "mlp.gate.weight"), get(p + "mlp.gate.bias"))
            if self.kv_format is not None:
                layer["kv_scale"] = get(p + self.kv_cache_format.scale_tensor).float()
            self.layers.append(layer)
        if self.arch.position == "rope":
            self.inv_freq = rope_inv_freq(config).to(device)

    # ------------------------------------------------------------------------------------- pieces

    def _norm(self, x: torch.Tensor, weight_bias) -> torch.Tensor:
        weight, bias = weight_bias
        if self.arch.norm == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.eps)
        if self.fused_norm and weight.dtype == x.dtype and x.stride(-1) == 1:
            return rms_norm(x, weight, self.eps)
        xf = x.float()  # once (each .float() of a half-precision x is a kernel)
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor, weight_bias) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding delta, and its norm: one kernel where the RMS norm kernel runs (h is
        updated in place there), else the add and then _norm."""
        weight = weight_bias[0]
        if (self.fused_norm and self.arch.norm != "layernorm" and weight.dtype == h.dtype == delta.dtype
                and h.is_contiguous() and delta.stride(-1) == 1):
            return h, add_rms_norm(h, delta, weight, self.eps)
        h = h + delta
        return h, self._norm(h, weight_bias)

    def _rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary embedding's (cos, sin) [B, 1, T, D] in `dtype` (the activations') at positions [B, T]: the
        same for every layer, so forward makes them once (a prefill launched seven kernels a layer for them)."""
        freqs = positions[:, :, None].float() * self.inv_freq[None, None, :]  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    @staticmethod
    def _rope(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        cos, sin = rope
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def _attention(self, layer: dict, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, index: int,
                   slot_start: int | torch.Tensor, mask: torch.Tensor, decode_attention=None,
                   rope: tuple | None = None, attention=None) -> torch.Tensor:
        batch = x.shape[0]
        qkv = layer["qkv"](x)
        if attention is not None:  # the engine's paged KV cache (pipeline.engine.runner)
            out = attention(index, qkv, rope, layer.get("kv_scale"))
        elif decode_attention is not None:  # one kernel: rotary embedding, cache write, attention (see forward)
            out = decode_attention(qkv.view(batch, -1), cache.k[index], cache.v[index], cache.valid,
                                   positions.view(batch), slot_start).view(batch, 1, -1)
        else:
            out = self._cached_attention(qkv, rope, cache, index, slot_start, mask, layer.get("kv_scale"))
        out = self.comm.all_reduce_tp(layer["dense"](out))
        return out + layer["dense_bias"] if layer["dense_bias"] is not None else out

    def _cached_attention(self, qkv: torch.Tensor, rope: tuple | None, cache: KVCache, index: int,
                          slot_start: int | torch.Tensor, mask: torch.Tensor, kv_scale) -> torch.Tensor:
        """Rotary embedding (rope: _rope_tables' (cos, sin); None for GPT), the cache write at slot_start, and
        attention over the cache: [B, T, heads * hd]."""
        batch, seq, _ = qkv.shape
        hd = self.head_size
        q, k, v = qkv.split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.view(batch, seq, self.heads, hd).transpose(1, 2)
        k = k.view(batch, seq, self.kv_heads, hd).transpose(1, 2)
        v = v.view(batch, seq, self.kv_heads, hd).transpose(1, 2)
        if rope is not None:
            q, k = self._rope(q, k, rope)
        if self.observe_kv is not None:
            self.observe_kv(index, k, v)
        k_cache, v_cache = cache.k[index], cache.v[index]
        keys_len = mask.shape[-1]
        if self.kv_format is not None:  # a quantized cache: store q(k), q(v); attention reads them dequantized
            k, v = self.kv_cache_format.quantize(k, kv_scale), self.kv_cache_format.quantize(v, kv_scale)
        if isinstance(slot_start, torch.Tensor):  # a decode step with the slot on the device (CUDA-graph safe)
            k_cache.index_copy_(2, slot_start.view(1), k)
            v_cache.index_copy_(2, slot_start.view(1), v)
        else:
            k_cache[:, :, slot_start:slot_start + seq] = k
            v_cache[:, :, slot_start:slot_start + seq] = v
        keys, values = k_cache[:, :, :keys_len], v_cache[:, :, :keys_len]
        if self.kv_format is not None:
            keys = dequantize_kv(keys, kv_scale, q.dtype)
            values = dequantize_kv(values, kv_scale, q.dtype)
        if seq == 1:
            out = self._grouped_attention(q, keys, values, mask)
        else:
            if self.kv_heads != self.heads:
                repeat = self.heads // self.kv_heads
                keys = keys.repeat_interleave(repeat, dim=1)
                values = values.repeat_interleave(repeat, dim=1)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, seq, self.heads * hd)

    def _grouped_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        """One query per sequence against the cache, each KV head serving its group of query heads in place
        (no copies of the cache per query head): the memory-bound decode case."""
        batch, heads, seq, hd = q.shape
        group = heads // self.kv_heads
        qg = q.reshape(batch, self.kv_heads, group * seq, hd)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * (hd ** -0.5)
        scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, L] broadcasts over heads
        probs = scores.softmax(dim=-1).to(values.dtype)
        return torch.matmul(probs, values).reshape(batch, heads, seq, hd)

    def _mlp(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        if self.arch.mlp == "gelu":
            h = F.gelu(layer["fc"](x), approximate="tanh")
        elif "fc_gate" in layer:  # the CUDA path fuses the two GEMMs of the gated MLP into one
            h = self._silu_gate(layer, x)
        else:
            h = F.silu(layer["fc"](x)) * layer["gate"](x)
        out = self.comm.all_reduce_tp(layer["proj"](h))
        return out + layer["proj_bias"] if layer["proj_bias"] is not None else out

    def _silu_gate(self, layer: dict, x: torch.Tensor) -> torch.Tensor:
        """silu(fc) * gate of the fused [fc; gate] GEMM: in the split-K kernel's epilogue where tuning chose it
        (CudaLinear.silu_gate); with fused_activation and more than one row, the GEMM and then one kernel whose h
        is already FP8 where the proj would cast it (one row keeps torch's ops: the GEMVs take the model dtype)."""
        fc_gate, proj = layer["fc_gate"], layer["proj"]
        activation = None
        rows = x.numel() // x.shape[-1]
        if self.fused_activation and rows > 1:
            fp8_input = getattr(proj, "fp8_input_scale", None)
            scale = fp8_input(rows, x.device) if fp8_input is not None else None
            activation = functools.partial(silu_mul, scale=scale)
        if hasattr(fc_gate, "silu_gate"):
            return fc_gate.silu_gate(x, activation)
        y = fc_gate(x)
        if activation is not None:
            return activation(y)
        fc, gate = y.chunk(2, dim=-1)
        return F.silu(fc) * gate

    # ------------------------------------------------------------------------------------- steps

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        shape = (batch, self.kv_heads, max_len, self.head_size)
        dtype = self.kv_cache_format.storage_dtype if self.kv_cache_format is not None else self.dtype
        return KVCache(
            k=[torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers],
            v=[torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers],
            valid=torch.zeros((batch, max_len), dtype=torch.bool, device=self.device),
        )

    def attention_mask(self, cache: KVCache, slot_start: int | torch.Tensor, seq: int, keys_len: int) -> torch.Tensor:
        """[B, 1, seq, keys_len] bool: a query sees valid slots at or before its own (and, with a sliding window,
        after its own minus the window); each sees itself. A sequence's slots are consecutive, so slot distance is
        position distance."""
        query_slots = slot_start + torch.arange(seq, device=self.device)
        key_slots = torch.arange(keys_len, device=self.device)
        causal = key_slots[None, :] <= query_slots[:, None]
        if self.arch.sliding_window is not None:
            causal &= key_slots[None, :] > query_slots[:, None] - self.arch.sliding_window
        mask = causal[None] & cache.valid[:, None, :keys_len]
        mask |= key_slots[None, None, :] == query_slots[None, :, None]  # padding queries see themselves (no NaN)
        return mask[:, None]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                slot_start: int | torch.Tensor = 0, keys_len: int | None = None, all_logits: bool = False,
                decode_attention=None, attention=None, logit_rows: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run this rank's stage on tokens [B, T] at cache slots [slot_start, slot_start + T).

        Returns float32 logits [B, T or 1, vocab] on last-stage ranks, None elsewhere. The caller marks the
        new slots valid in `cache.valid` before calling. A decode step may pass slot_start as a 0-d device tensor
        and keys_len = the cache length: then every shape is static and nothing reads back to the host. Such a
        step may also pass decode_attention(qkv [B, n], k_cache, v_cache, valid, positions [B], slot) -> [B, m],
        a fused kernel for everything between the qkv and dense GEMMs (pipeline.backends.fused_decode).

        The engine passes `attention(layer_index, qkv [B, T, n], rope, kv_scale) -> [B, T, heads * hd]` instead
        of a cache (it owns the paged KV cache), packed sequences as B = 1, and `logit_rows` [R]: the positions of
        T whose logits it wants ([1, R, vocab]).
        """
        if decode_attention is not None and self.arch.sliding_window is not None:
            raise RunError(f"the fused decode attention kernel has no sliding window (this model's is "
                           f"{self.arch.sliding_window}); decode it with the plain attention path")
        batch, seq = tokens.shape
        keys_len = keys_len or (slot_start + seq if attention is None else None)
        if self.mapping.is_first_stage:
            h = F.embedding(tokens, self.embed)
            if self.pos_embed is not None:
                h = h + F.embedding(positions, self.pos_embed)
        else:
            h = self.comm.recv_prev((batch, seq, self.hidden), self.dtype)
        mask = self.attention_mask(cache, slot_start, seq, keys_len) if attention is None else None
        rope = self._rope_tables(positions, h.dtype) if self.arch.position == "rope" and decode_attention is None \
            else None
        # each residual add goes into the norm after it (_add_norm); the last layer's add stays on its own (the
        # final norm reads only the logit rows)
        x = self._norm(h, self.layers[0]["ln1"]) if self.layers else None
        for index, layer in enumerate(self.layers):
            h, x = self._add_norm(h, self._attention(layer, x, positions, cache, index, slot_start, mask,
                                                     decode_attention, rope, attention), layer["ln2"])
            if index + 1 < len(self.layers):
                h, x = self._add_norm(h, self._mlp(layer, x), self.layers[index + 1]["ln1"])
            else:
                h = h + self._mlp(layer, x)
        if not self.mapping.is_last_stage:
            self.comm.send_next(h)
            return None
        if logit_rows is not None:
            h = h[:, logit_rows]
        elif not all_logits:
            h = h[:, -1:]
        h = self._norm(h, self.ln_f)
        logits = self.comm.all_gather_tp(self.head(h).float())
        return logits[..., : self.vocab_size]
