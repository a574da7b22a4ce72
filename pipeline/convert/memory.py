"""The conversion plan applied in memory: rank weights built straight on a device, no files.

For GPU machines that have no network and no room for a 16 GB checkpoint: the source tensors are produced on the
device by a function (seeded random weights of a named shape), and the same plan the file converter follows
(names, splits, padding, placement) cuts this rank's tensors out of them. tp=1 and tp=2 thus run one same model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.convert.streaming import ConversionPlan
from pipeline.safetensors_io import TensorInfo


class VirtualIndex:
    """The parts of SafetensorsIndex the planner uses, over tensors made on demand by `make(name)`."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, make: Callable[[str], torch.Tensor]):
        self.infos = {n: TensorInfo(n, dtype, tuple(s), Path("<memory>"), 0, math.prod(s) * dtype.itemsize)
                      for n, s in shapes.items()}
        self.make = make

    @property
    def names(self) -> list[str]:
        return sorted(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def read(self, name: str) -> torch.Tensor:
        return self.make(name)


def materialize_rank(plan: ConversionPlan, index: VirtualIndex, rank: int, device: torch.device) -> dict:
    """This rank's tensors, on `device`, exactly as the file converter would write them."""
    specs = plan.targets[rank]
    out = {name: torch.empty(spec.shape, dtype=spec.dtype, device=device) for name, spec in specs.items()}
    by_source = defaultdict(list)
    for piece in plan.pieces:
        if piece.rank == rank:
            by_source[piece.source].append(piece)
    for source, pieces in by_source.items():
        whole = None
        if source is not None:
            whole = index.read(source).to(device)
            if source in plan.transposed:
                whole = whole.t().contiguous()
        for piece in pieces:
            spec = specs[piece.target]
            rows = piece.src_rows[1] - piece.src_rows[0]
            if whole is None:
                block = torch.zeros((rows, *spec.shape[1:]), device=device)
            else:
                block = whole[piece.src_rows[0]:piece.src_rows[1]]
                if piece.src_cols is not None:
                    block = block[:, piece.src_cols[0]:piece.src_cols[1]]
            encoded = spec.encode(block) if spec.encode is not None else block.to(spec.dtype)
            out[piece.target][piece.dst_row:piece.dst_row + rows] = encoded
        del whole
    for name, spec in specs.items():
        if spec.literal is not None:
            out[name] = spec.literal.to(device)
    return out
