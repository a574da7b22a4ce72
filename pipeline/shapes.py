"""Named model shapes: Hugging Face config.json contents for random-weight checkpoints.

GPU machines here have no network and little room to carry weights, so speed and memory are measured on
random weights of real shapes; tests use the tiny ones. Each architecture module declares its shapes
(pipeline/architectures/); `pipeline.random_weights.make_random_checkpoint` turns one into a Hugging Face folder.
"""

from __future__ import annotations

from pipeline.architectures import random_shapes

SHAPES: dict[str, dict] = random_shapes()

# Tokenizer asset (pipeline.offline) that suits each shape's vocabulary, for random weights that print text.
SHAPE_TOKENIZERS = {"gpt2": "gpt2-tokenizer", "smollm2-135m": "smollm2-135m-instruct"}
