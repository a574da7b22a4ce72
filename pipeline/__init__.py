"""A recipe-driven build-and-run pipeline for LLM inference, built on TensorRT-LLM 1.2.

Stages: fetch (hub.py) -> convert (convert/) -> engine (backends/) -> run (run.py).
The recipe schema (recipe.py) is the single home of every setting and default.
The engine (engine/) serves a built artifact: `from pipeline import LLM, SamplingParams`.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Lazy, so `python -m pipeline ls` does not import torch.
    if name == "LLM":
        from pipeline.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pipeline.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
