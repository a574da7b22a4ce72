"""The ONNX artifact under ONNX Runtime: the same generation loop as pipeline.generate, over the exported graph.

Prompts are left-padded into one batch, positions count each sequence's own tokens, the prefill runs with an
empty cache (past length 0) and each decode step feeds one token and the previous step's present.* tensors.
The CUDA execution provider is used where onnxruntime-gpu provides it, the CPU provider otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import RunError
from pipeline.generate import left_pad, sample_next
from pipeline.onnx_export import GRAPH_FILE
from pipeline.params import SamplingParams, seed_of

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def providers(device: str = "auto") -> list[str]:
    """Execution providers in preference order for --device (auto: CUDA where installed, then CPU)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RunError(f"--device cuda: this onnxruntime has no CUDAExecutionProvider (it has {available}); "
                           f"install onnxruntime-gpu, or run with --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class GraphDecoder:
    """pipeline.generate.generate's loop (same padding, positions, sampling and stopping) over any `step` that runs
    the exported graph on torch tensors; ONNX Runtime and TensorRT engines provide `step` and `empty_cache`."""

    device = torch.device("cpu")

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             past: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Float32 logits [B, T, V] and the new cache, for tokens [B, T] after `past` (mask covers both)."""
        raise NotImplementedError

    def score(self, tokens: list[int]) -> torch.Tensor:
        """Float32 logits [T, vocab] of every position of one sequence."""
        ids = torch.tensor([tokens], device=self.device)
        logits, _ = self.step(ids, torch.arange(len(tokens), device=self.device)[None], torch.ones_like(ids),
                              self.empty_cache(1))
        return logits[0].cpu()

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, eos_id: int | None, pad_id: int,
                 on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> list[list[int]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        tokens, valid = left_pad(prompts, pad_id, self.device)
        batch = tokens.shape[0]
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        mask = valid.long()
        seed = seed_of(sampling) if sampling.temperature > 0 else 0
        logits, cache = self.step(tokens, positions, mask, self.empty_cache(batch))
        next_positions = positions[:, -1]
        outputs: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        ones = torch.ones((batch, 1), dtype=torch.long, device=self.device)
        for step in range(sampling.max_tokens):
            next_tokens = sample_next(logits[:, -1], sampling, seed, step)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
            for i, token in enumerate(next_tokens.tolist()):
                if not finished[i]:
                    outputs[i].append(token)
            if eos_id is not None:
                finished |= next_tokens == eos_id
            if on_tokens is not None:
                on_tokens(next_tokens, finished)
            if bool(finished.all()) or step == sampling.max_tokens - 1:
                break
            mask = torch.cat([mask, ones], dim=1)
            next_positions = next_positions + 1
            logits, cache = self.step(next_tokens[:, None], next_positions[:, None], mask, cache)
        return outputs


class OnnxDecoder(GraphDecoder):
    """One ONNX Runtime session over an `onnx` stage folder."""

    def __init__(self, artifact: Path, graph: dict, device: str = "auto", threads: int = 0):
        import onnxruntime as ort

        path = Path(artifact) / GRAPH_FILE
        if not path.is_file():
            raise RunError(f"{artifact}: no {GRAPH_FILE}; is this an `onnx` stage folder (build.backend: onnx)?")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=providers(device))
        self.provider = self.session.get_providers()[0]
        self.past_names = [t["name"] for t in graph["inputs"] if t["name"].startswith("past_key_values.")]
        first = next(t for t in graph["inputs"] if t["name"].startswith("past_key_values."))
        self.kv_heads, self.head_size = first["shape"][1], first["shape"][3]
        self.kv_dtype = NUMPY_DTYPES[first["dtype"]]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> list[torch.Tensor]:
        return [torch.from_numpy(np.zeros((batch, self.kv_heads, 0, self.head_size), self.kv_dtype))
                for _ in self.past_names]

    def step(self, tokens, positions, mask, past):
        feeds = {"input_ids": tokens.numpy(), "position_ids": positions.numpy(), "attention_mask": mask.numpy(),
                 **{name: t.numpy() for name, t in zip(self.past_names, past)}}
        logits, *present = self.session.run(self.output_names, feeds)
        return torch.from_numpy(logits), [torch.from_numpy(t) for t in present]
