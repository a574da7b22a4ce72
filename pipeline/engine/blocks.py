"""The paged KV cache's bookkeeping: fixed-size blocks, a free list, per-request block tables and prefix reuse.

Runs on rank 0 only (the scheduler's side); the ranks hold the storage (pipeline.engine.runner) and receive block
ids in each step's plan. A block holds `block_size` consecutive tokens of one sequence for every layer.

Prefix reuse follows vLLM's automatic prefix caching: a full block is named by a hash of its tokens and of the
block before it, so two prompts that share their first N full blocks share those blocks' storage. A block whose
last user finished keeps its contents and its name until the space is needed (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


class OutOfBlocks(Exception):
    """Not enough free blocks for an allocation (the scheduler waits or preempts)."""


@dataclass
class Block:
    index: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its tokens are known


@dataclass
class BlockTable:
    """One request's blocks, in order, and how many of its leading full blocks are named for reuse."""

    blocks: tuple[int, ...] = ()  # a tuple: every step hands it to the plan as it is (it grows a block at a time)
    named: int = 0  # leading full blocks already registered for reuse
    last_hash: int = 0  # the chain hash of the last of them


class BlockPool:
    """Free list, reference counts and the hash -> block map of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_reuse: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs at least one block of at least one token ({num_blocks}, {block_size})")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_reuse = prefix_reuse
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, least recently freed first; a freed block with a hash can still be reused by that hash.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[int, int] = {}
        self.reused_tokens = 0  # prompt tokens served from cached blocks since start (a metric)

    # ------------------------------------------------------------------------------------------- counts

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ------------------------------------------------------------------------------------------- allocation

    def _take(self, index: int) -> None:
        block = self.blocks[index]
        if block.ref_count == 0:
            del self._free[index]
        block.ref_count += 1

    def allocate(self) -> int:
        """A fresh block (its old contents, if any, are forgotten)."""
        if not self._free:
            raise OutOfBlocks
        index, _ = self._free.popitem(last=False)
        block = self.blocks[index]
        if block.hash is not None and self._by_hash.get(block.hash) == index:
            del self._by_hash[block.hash]
        block.hash = None
        block.ref_count = 1
        return index

    def free(self, table: BlockTable) -> None:
        """Drop a request's hold on its blocks; blocks nobody holds go back to the free list (last)."""
        for index in reversed(table.blocks):  # the tail first: a prefix stays cached longer than its suffix
            block = self.blocks[index]
            assert block.ref_count > 0, f"block {index} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[index] = None
        table.blocks = ()
        table.named, table.last_hash = 0, 0

    # ------------------------------------------------------------------------------------------- prefix reuse

    @staticmethod
    def chain_hashes(tokens: list[int], block_size: int) -> list[int]:
        """The hash of each full block of `tokens`, each covering its predecessors too."""
        hashes, parent = [], 0
        for start in range(0, len(tokens) - block_size + 1, block_size):
            parent = hash((parent, tuple(tokens[start:start + block_size])))
            hashes.append(parent)
        return hashes

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Blocks already holding the longest cached run of `tokens`' full blocks (not yet taken)."""
        if not self.prefix_reuse:
            return []
        found = []
        for h in self.chain_hashes(tokens, self.block_size):
            index = self._by_hash.get(h)
            if index is None:
                break
            found.append(index)
        return found

    def take_prefix(self, table: BlockTable, blocks: list[int]) -> None:
        for index in blocks:
            self._take(index)
            table.blocks += (index,)
        if blocks:
            table.named, table.last_hash = len(blocks), self.blocks[blocks[-1]].hash

    def register_full_blocks(self, table: BlockTable, tokens: list[int], computed: int) -> None:
        """Name the request's blocks that are full of computed tokens, so later prompts can reuse them."""
        if not self.prefix_reuse:
            return
        size = self.block_size
        for i in range(table.named, computed // size):  # only blocks filled since the last call
            table.last_hash = hash((table.last_hash, tuple(tokens[i * size:(i + 1) * size])))
            index = table.blocks[i]
            block = self.blocks[index]
            if block.hash is None and table.last_hash not in self._by_hash:
                block.hash = table.last_hash
                self._by_hash[table.last_hash] = index
        table.named = max(table.named, computed // size)
