"""The engine: in-flight batching over a paged KV cache, and the `LLM` API on top of it.

    blocks.py     KV blocks: free list, block tables, prefix reuse (rank 0)
    scheduler.py  which requests run in each step, and how many tokens of each (rank 0)
    runner.py     the step every rank runs: packed forward pass, paged attention, sampling
    core.py       the loop tying them together, and the worker ranks' side of it
    llm.py        LLM + SamplingParams: generate, stream, async, chat
"""

from pipeline.engine.core import RequestOutput
from pipeline.engine.llm import LLM, EngineConfig
from pipeline.params import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]
