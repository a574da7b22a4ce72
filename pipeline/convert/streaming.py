"""The streaming converter: Hugging Face safetensors -> TensorRT-LLM checkpoint, streamed.

Planning (`plan_conversion`) turns a weight map into, for every rank, the exact list of target tensors (name,
dtype, shape) and a list of copy pieces: "rows [a, b) and columns [c, d) of source S go to rows [e, ...) of
target X on rank r". It accounts for every tensor: a source that no rule uses and no `ignored` pattern covers is
an error, as is a missing source or a source of the wrong shape; each target byte is written by exactly one
piece (the writer checks this on close).

Execution (`execute_plan`) opens all rank files at once with their final layout, then reads each source tensor
once, in row chunks of a bounded size, and writes each chunk's pieces straight to their places with pwrite. Peak
memory is a few chunks per worker, whatever the model's size or tp; the bytes do not depend on the number of
workers or the order in which sources finish (tests check both).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.architectures import ArchInfo, for_model
from pipeline.architectures.weight_map import Rule
from pipeline.dtypes import TORCH_DTYPES
from pipeline.errors import WeightMapError
from pipeline.safetensors_io import SafetensorsIndex, SafetensorsWriter, TensorInfo

CHUNK_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Copy rows [src_rows) (and columns [src_cols), if set) of `source` to rows from `dst_row` of a target."""

    rank: int
    target: str
    dst_row: int
    source: str | None  # None: fill with zeros (vocab padding)
    src_rows: tuple[int, int]
    src_cols: tuple[int, int] | None = None


@dataclass
class TargetSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    gemm: bool = False  # a linear weight that quantized formats may change
    # How a block of source rows becomes target bytes; None = cast to `dtype`. Quantizers set this.
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None
    literal: torch.Tensor | None = None  # a tensor known at plan time (scales), written as is


@dataclass
class ConversionPlan:
    arch: ArchInfo
    tp: int
    pp: int
    dtype: str
    targets: list[dict[str, TargetSpec]]  # per rank
    pieces: list[Piece]
    sources: dict[str, TensorInfo]
    transposed: frozenset[str]
    target_sources: dict[tuple[int, str], tuple[str, ...]] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def source_bytes(self) -> int:
        return sum(self.sources[s].nbytes for s in {p.source for p in self.pieces if p.source})

    def add_literal(self, rank: int, name: str, tensor: torch.Tensor) -> None:
        assert name not in self.targets[rank], name
        self.targets[rank][name] = TargetSpec(tensor.dtype, tuple(tensor.shape), literal=tensor.contiguous())

    def sources_of(self, rank: int, target: str) -> tuple[str, ...]:
        return self.target_sources[(rank, target)]


# --------------------------------------------------------------------------------------------- planning


def _fmt(template: str, layer: int | None, prefix: str) -> str:
    return template.replace("{p}", prefix).replace("{l}", str(layer) if layer is not None else "{l}")


def _even_split(total: int, parts: int, what: str, rank: int) -> tuple[int, int]:
    if total % parts:
        raise WeightMapError(f"{what}: {total} does not split into {parts} equal parts for tensor parallelism; "
                             f"choose a tp that divides {total}")
    size = total // parts
    return rank * size, (rank + 1) * size


def _rank_pieces(split: str, arch: ArchInfo, full: tuple[int, ...], names: tuple[str, ...], parts: list | None,
                 target: str, tp: int, rank: int) -> tuple[tuple[int, ...], list[Piece]]:
    """One rank's shape of `target` and the source rows (and columns) that fill it, by the rule's split kind;
    parts: the qkv split's (source, first row, rows) of q, k and v."""
    t_rank = rank % tp
    local: list[Piece] = []
    if split == "replicate":
        shape = full
        local.append(Piece(rank, target, 0, names[0], (0, full[0])))
    elif split == "column":
        r0, r1 = _even_split(full[0], tp, f"{target} rows", t_rank)
        shape = (r1 - r0, *full[1:])
        local.append(Piece(rank, target, 0, names[0], (r0, r1)))
    elif split == "row":
        c0, c1 = _even_split(full[1], tp, f"{target} columns", t_rank)
        shape = (full[0], c1 - c0)
        local.append(Piece(rank, target, 0, names[0], (0, full[0]), (c0, c1)))
    elif split == "vocab":
        per_rank = -(-full[0] // tp)
        r0, r1 = t_rank * per_rank, (t_rank + 1) * per_rank
        shape = (per_rank, *full[1:])
        real_end = min(r1, full[0])
        if real_end > r0:
            local.append(Piece(rank, target, 0, names[0], (r0, real_end)))
        if r1 > real_end:
            local.append(Piece(rank, target, max(real_end - r0, 0), None, (0, r1 - max(real_end, r0))))
    elif split == "qkv":
        hd, nh, nkv = arch.head_size, arch.num_heads, arch.num_kv_heads
        q0, q1 = _even_split(nh, tp, f"{target} attention heads", t_rank)
        if nkv >= tp:
            k0, k1 = _even_split(nkv, tp, f"{target} KV heads", t_rank)
        else:  # fewer KV heads than ranks: each rank holds one, replicated tp / nkv times
            if tp % nkv:
                raise WeightMapError(f"{target}: tp {tp} is not a multiple of the {nkv} KV heads")
            k0 = t_rank // (tp // nkv)
            k1 = k0 + 1
        head_ranges = [(q0, q1), (k0, k1), (k0, k1)]
        row = 0
        for (src, start, _rows), (h0, h1) in zip(parts, head_ranges):
            local.append(Piece(rank, target, row, src, (start + h0 * hd, start + h1 * hd)))
            row += (h1 - h0) * hd
        shape = (row, *full[1:])
    else:
        raise AssertionError(split)
    return shape, local


def plan_conversion(index: SafetensorsIndex, arch: ArchInfo, tp: int, pp: int, dtype: str) -> ConversionPlan:
    """Decide every target tensor of every rank and where each of its rows comes from."""
    wmap = for_model(arch).weight_map
    prefix = next((p for p in wmap.prefixes if _fmt(wmap.probe, None, p) in index.infos), wmap.prefixes[0]) \
        if wmap.probe else wmap.prefixes[0]
    torch_dtype = TORCH_DTYPES[dtype]
    world = tp * pp
    targets: list[dict[str, TargetSpec]] = [{} for _ in range(world)]
    pieces: list[Piece] = []
    used: set[str] = set()
    target_sources: dict[tuple[int, str], tuple[str, ...]] = {}
    transposed: set[str] = set()
    problems: list[str] = []

    def source_shape(name: str, rule: Rule) -> tuple[int, ...] | None:
        info = index.infos.get(name)
        if info is None:
            problems.append(f"missing source tensor '{name}'")
            return None
        return tuple(reversed(info.shape)) if rule.transpose else info.shape

    def emit(rule: Rule, target: str, layer: int | None, ranks: list[int]) -> None:
        tied = arch.tie_word_embeddings and rule.tied_sources is not None
        names = tuple(_fmt(s, layer, prefix) for s in (rule.tied_sources if tied else rule.sources))
        full = rule.shape(arch)
        shapes = [source_shape(n, rule) for n in names]
        if any(s is None for s in shapes):
            return
        if rule.split == "qkv":
            q_rows, kv_rows = arch.num_heads * arch.head_size, arch.num_kv_heads * arch.head_size
            part_rows = [q_rows, kv_rows, kv_rows]
            if len(names) == 1:  # fused [q | k | v] source (GPT-2's c_attn)
                expected = [full]
                parts = [(names[0], start, rows) for start, rows in zip((0, q_rows, q_rows + kv_rows), part_rows)]
            else:
                expected = [(r, *full[1:]) for r in part_rows]
                parts = [(n, 0, rows) for n, rows in zip(names, part_rows)]
        else:
            expected = [full]
        for name, want, got in zip(names, expected, shapes):
            if tuple(want) != tuple(got):
                layout = " (after transposing HF Conv1D [in, out])" if rule.transpose else ""
                problems.append(f"source tensor '{name}' has shape {list(got)}{layout}, the config implies {list(want)} "
                                f"for '{target}'; the weights do not match config.json")
                return
        used.update(names)
        if rule.transpose:
            transposed.update(names)
        for rank in ranks:
            shape, local = _rank_pieces(rule.split, arch, full, names, parts if rule.split == "qkv" else None,
                                        target, tp, rank)
            targets[rank][target] = TargetSpec(torch_dtype, tuple(shape), gemm=rule.gemm)
            target_sources[(rank, target)] = names
            pieces.extend(local)

    stage_ranks = [[p * tp + t for t in range(tp)] for p in range(pp)]
    for target, rule in wmap.top.items():
        if not rule.applies(arch):
            continue
        stage = 0 if rule.stage == "first" else pp - 1
        emit(rule, target, None, stage_ranks[stage])
    layers_per_stage = arch.num_layers // pp
    for layer in range(arch.num_layers):
        stage = layer // layers_per_stage
        local_layer = layer - stage * layers_per_stage
        for suffix, rule in wmap.layer.items():
            if rule.applies(arch):
                emit(rule, f"transformer.layers.{local_layer}.{suffix}", layer, stage_ranks[stage])

    ignore_patterns = [re.compile(re.escape(_fmt(p, None, prefix)).replace(r"\{l\}", r"\d+")) for p in wmap.ignored]
    if arch.tie_word_embeddings:  # a tied checkpoint may still carry the lm_head copy
        ignore_patterns += [re.compile(re.escape(_fmt(s, None, prefix)))
                            for r in wmap.top.values() if r.tied_sources for s in r.sources]
    unexpected = [n for n in index.names if n not in used and not any(p.fullmatch(n) for p in ignore_patterns)]
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" (and {len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        problems.append(f"{len(unexpected)} source tensor(s) that the {for_model(arch).name} weight map neither uses nor ignores: "
                        f"{shown}. Is config.json (model_type {arch.model_type}, {arch.num_layers} layers) the one "
                        f"that goes with these weights?")
    if problems:
        raise WeightMapError("the checkpoint does not match its weight map:\n" + "\n".join(f"  - {p}" for p in problems))
    return ConversionPlan(arch, tp, pp, dtype, targets, pieces, dict(index.infos), frozenset(transposed), target_sources)


# --------------------------------------------------------------------------------------------- execution


class Progress:
    """Bytes done, rate and time left, printed at most once a second (to stderr)."""

    def __init__(self, total_bytes: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total_bytes, label, enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.perf_counter()
            if self.enabled and (now - self._last > 1.0 or self.done >= self.total):
                self._last = now
                elapsed = max(now - self.start, 1e-9)
                rate = self.done / elapsed
                left = (self.total - self.done) / rate if rate else 0.0
                print(f"\r  {self.label}: {self.done / 1e9:6.2f} / {self.total / 1e9:.2f} GB  "
                      f"{rate / 1e6:7.1f} MB/s  {left:5.0f} s left", end="", file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def _return_freed_memory_to_the_os() -> None:
    """Make glibc give large freed buffers back at once. Its default raises the mmap threshold to the size of the
    largest block freed (up to 32 MiB), after which chunk buffers come from per-thread heaps that keep their pages:
    resident memory would then grow with workers x chunk size x history instead of staying at a few chunks."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB, which also fixes the threshold (no adaptation)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def execute_plan(plan: ConversionPlan, index: SafetensorsIndex, out_dir: Path, workers: int = 1,
                 show_progress: bool = False) -> list[Path]:
    """Write rank{r}.safetensors for every rank of the plan into out_dir; returns their paths. Its helpers are
    nested because they share the open writers, which one failure must abort together."""
    _return_freed_memory_to_the_os()
    out_dir = Path(out_dir)
    writers = [
        SafetensorsWriter(out_dir / f"rank{rank}.safetensors",
                          {name: (spec.dtype, spec.shape) for name, spec in specs.items()})
        for rank, specs in enumerate(plan.targets)
    ]
    by_source: dict[str | None, list[Piece]] = defaultdict(list)
    for piece in plan.pieces:
        by_source[piece.source].append(piece)
    progress = Progress(plan.source_bytes(), "convert", show_progress)

    def write(piece: Piece, block: torch.Tensor, dst_offset: int) -> None:
        spec = plan.targets[piece.rank][piece.target]
        encoded = spec.encode(block) if spec.encode is not None else block.to(spec.dtype)
        writers[piece.rank].write_rows(piece.target, encoded, piece.dst_row + dst_offset)

    def direct(piece: Piece, info: TensorInfo) -> bool:
        """Bytes that go over unchanged: whole rows, same dtype, no encoder, no transpose."""
        spec = plan.targets[piece.rank][piece.target]
        return (piece.source not in plan.transposed and piece.src_cols is None and spec.encode is None
                and spec.dtype == info.dtype)

    def convert_source(source: str) -> None:
        info = index.info(source)
        group = []
        for piece in by_source[source]:
            if direct(piece, info):
                nbytes = (piece.src_rows[1] - piece.src_rows[0]) * info.row_bytes
                writers[piece.rank].copy_rows_from_file(piece.target, piece.dst_row, info.path,
                                                        info.offset + piece.src_rows[0] * info.row_bytes, nbytes)
            else:
                group.append(piece)
        if not group:
            progress.add(info.nbytes)
            return
        if source in plan.transposed:  # Conv1D weights are small; transposing needs the whole tensor
            whole = index.read(source).t().contiguous()
            chunks = [(0, whole.shape[0], whole)]
        else:
            rows = info.shape[0] if info.shape else 1
            chunk_rows = max(1, CHUNK_BYTES // max(info.row_bytes, 1))
            chunks = ((s, min(s + chunk_rows, rows), None) for s in range(0, rows, chunk_rows))
        for start, stop, block in chunks:
            if block is None:
                block = index.read_rows(source, start, stop)
            for piece in group:
                lo, hi = max(start, piece.src_rows[0]), min(stop, piece.src_rows[1])
                if lo >= hi:
                    continue
                part = block[lo - start:hi - start]
                if piece.src_cols is not None:
                    part = part[:, piece.src_cols[0]:piece.src_cols[1]]
                write(piece, part, lo - piece.src_rows[0])
            if source not in plan.transposed:
                progress.add(block.numel() * block.element_size())
                del block
        if source in plan.transposed:
            progress.add(info.nbytes)

    try:
        for piece in by_source.pop(None, []):
            spec = plan.targets[piece.rank][piece.target]
            rows = piece.src_rows[1] - piece.src_rows[0]
            write(piece, torch.zeros((rows, *spec.shape[1:]), dtype=torch.float32), 0)
        for rank, specs in enumerate(plan.targets):
            for name, spec in specs.items():
                if spec.literal is not None:
                    writers[rank].write_rows(name, spec.literal)
        # Largest sources first, so a long tensor does not start last and leave the other workers idle.
        order = sorted(by_source, key=lambda s: -index.info(s).nbytes)
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(convert_source, s) for s in order]:
                    future.result()
        else:
            for source in order:
                convert_source(source)
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    finally:
        progress.finish()
    return [w.path for w in writers]
