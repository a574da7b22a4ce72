"""Which part of the model a global rank holds, numbered as TensorRT-LLM numbers it.

Tensor parallelism varies fastest: rank = pp_rank * tp + tp_rank. A TP group is `tp` consecutive ranks;
stage `p` owns layers [p * L / pp, (p + 1) * L / pp).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    tp: int
    pp: int
    rank: int = 0

    def __post_init__(self):
        assert self.tp >= 1 and self.pp >= 1 and 0 <= self.rank < self.world_size, self

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def stage_layers(self, num_layers: int) -> range:
        """Global indices of the layers this rank's stage runs (the rank file numbers them from 0)."""
        per_stage = num_layers // self.pp
        return range(self.pp_rank * per_stage, (self.pp_rank + 1) * per_stage)

    def peer_in_stage(self, pp_rank: int) -> int:
        """The rank of stage `pp_rank` with this rank's tp_rank (pipeline send/recv partner)."""
        return pp_rank * self.tp + self.tp_rank

    def to_trtllm(self) -> dict:
        """The `mapping` block of a TensorRT-LLM checkpoint config.json.

        Only keys every 1.x Mapping accepts are written (later keys default); `rank` is never written.
        """
        return {
            "world_size": self.world_size,
            "gpus_per_node": 8,
            "cp_size": 1,
            "tp_size": self.tp,
            "pp_size": self.pp,
            "moe_tp_size": self.tp,
            "moe_ep_size": 1,
        }
