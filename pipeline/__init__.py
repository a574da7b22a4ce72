"""A recipe-driven build-and-run pipeline for LLM inference, built on TensorRT-LLM 1.2.

Stages: fetch (hub.py) -> convert (convert/) -> engine (backends/) -> run (run.py).
The recipe schema (recipe.py) is the single home of every setting and default.
"""

__version__ = "0.1.0"
