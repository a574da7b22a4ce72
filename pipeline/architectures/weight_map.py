"""The vocabulary of weight maps: how one TensorRT-LLM tensor is made from Hugging Face tensors.

A weight map (one per architecture module) is data: target name -> Rule. The streaming converter
(pipeline/convert/streaming.py) is the only code that applies rules, so every architecture shares the same
splitting, padding, casting and accounting.

Splits (T = tp size, r = tp rank; shapes in TensorRT-LLM's [out, in] layout):
- replicate: every rank of the stage gets the whole tensor (norms, embeddings, RowLinear biases);
- column:    dim 0 cut into T contiguous blocks, block r (ColumnLinear weights and biases);
- row:       dim 1 cut into T contiguous blocks, block r (RowLinear weights);
- qkv:       q, k and v each cut by heads and concatenated per rank as [q_r; k_r; v_r]; when there are fewer
             KV heads than ranks, KV head r // (T / kv_heads) is replicated onto rank r;
- vocab:     dim 0 zero-padded to a multiple of T, then cut like column (lm_head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.architectures.base import ArchInfo

Shape = Callable[[ArchInfo], tuple[int, ...]]


@dataclass(frozen=True)
class Rule:
    split: str  # replicate | column | row | qkv | vocab
    sources: tuple[str, ...]  # Hugging Face names; {l} = layer index, {p} = the checkpoint's optional prefix
    shape: Shape  # the whole target tensor before splitting, [out, in] for linear weights
    transpose: bool = False  # the source is stored [in, out] (GPT-2's Conv1D)
    when: Callable[[ArchInfo], bool] | None = None  # the tensor exists only when this holds (optional biases)
    tied_sources: tuple[str, ...] | None = None  # used instead of `sources` when the embeddings are tied
    gemm: bool = False  # a GEMM weight: quantized by fp8 / weight-only formats unless excluded
    stage: str = "layer"  # layer | first | last: which pipeline stage holds it

    def applies(self, arch: ArchInfo) -> bool:
        return self.when is None or self.when(arch)


@dataclass(frozen=True)
class WeightMap:
    top: dict[str, Rule]  # whole-model tensors (embeddings, final norm, lm_head)
    layer: dict[str, Rule]  # per-layer tensors, named under transformer.layers.{l}.
    ignored: tuple[str, ...]  # source names (with {l}/{p}) deliberately not converted
    prefixes: tuple[str, ...] = ("",)  # candidates for {p}; the first under which `probe` exists wins
    probe: str = ""  # a source name (with {p}) that tells which prefix a checkpoint uses


def H(a: ArchInfo) -> tuple[int, ...]:
    return (a.hidden_size,)


def HxH(a: ArchInfo) -> tuple[int, ...]:
    return (a.hidden_size, a.hidden_size)


def qkv_rows(a: ArchInfo) -> int:
    return (a.num_heads + 2 * a.num_kv_heads) * a.head_size
