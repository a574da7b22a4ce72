"""Calibration: run the source model over text samples and record activation maxima.

The model runs in float32 on the CPU through this project's own PyTorch backend (a tp=1, pp=1 conversion of the
source into a temporary folder), so the recorded maxima are of exactly the tensors TensorRT-LLM quantizes: the
input of every linear layer (qkv, dense, fc and gate share their input, proj) and the keys (after rotary embedding)
and values that the KV cache stores. With the "activation_stats" kind it also keeps, per linear, the per-input-channel
max |x| and mean |x| over every calibration token and a fixed random sample of input rows, with the float32 weights
(target layout, tp=1) they multiply: what the AWQ and SmoothQuant scale searches read. Deterministic for a given dataset, seed and sample count; the record names
the dataset, its sha256, the window ids and the seed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.backends.torch_model import Linear, RankModel
from pipeline.datasets import token_windows
from pipeline.dist import Comm
from pipeline.mapping import Mapping
from pipeline.progress import progress
from pipeline.recipe import CalibrationSpec

SAMPLED_ROWS = 1024  # input rows kept per linear for the AWQ loss (spread evenly over the calibration windows)


@dataclass
class ActivationStats:
    """One linear's input over the calibration text (activation_stats kind)."""

    channel_amax: torch.Tensor  # [in] float32, max |x| per input channel
    channel_abs_sum: torch.Tensor  # [in] float64, sum of |x| per input channel
    tokens: int
    samples: list[torch.Tensor]  # float32 row blocks [rows, in]

    @property
    def channel_mean_abs(self) -> torch.Tensor:
        return (self.channel_abs_sum / max(self.tokens, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)


@dataclass
class Calibration:
    act_amax: dict[str, float]  # "transformer.layers.{L}.attention.qkv" (global layer index) -> max |input|
    kv_amax: dict[int, float]  # global layer index -> max(|k|, |v|)
    record: dict
    # activation_stats kind only: per linear (global name) its input statistics, and the float32 tp=1 weights
    # (target names, "transformer.layers.{L}.attention.qkv.weight") they were measured with.
    act_stats: dict[str, ActivationStats] | None = None
    weights: dict[str, torch.Tensor] | None = None


class ObservedLinear(Linear):
    """A linear that records max |input| under `prefix` in `amax` (and, with `stats`, the activation_stats)."""

    def __init__(self, prefix: str, weight, bias, amax: dict[str, float], stats: dict | None = None, rows: int = 0,
                 generator: torch.Generator | None = None):
        super().__init__(weight, bias)
        self.prefix, self.amax, self.stats, self.rows, self.generator = prefix, amax, stats, rows, generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        value = float(x.detach().abs().amax())
        self.amax[self.prefix] = max(self.amax.get(self.prefix, 0.0), value)
        if self.stats is not None:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            s = self.stats.get(self.prefix)
            if s is None:
                s = self.stats[self.prefix] = ActivationStats(torch.zeros(flat.shape[1]),
                                                              torch.zeros(flat.shape[1], dtype=torch.float64), 0, [])
            s.channel_amax = torch.maximum(s.channel_amax, flat.abs().amax(dim=0))
            s.channel_abs_sum += flat.abs().sum(dim=0, dtype=torch.float64)
            s.tokens += flat.shape[0]
            pick = torch.randperm(flat.shape[0], generator=self.generator)[:self.rows]
            s.samples.append(flat[pick.sort().values].clone())
        return super().__call__(x)


def _load_tokenizer(folder: Path | None):
    from pipeline.convert import TOKENIZER_FILES

    if folder is None or not any((Path(folder) / n).is_file() for n in TOKENIZER_FILES if n != "generation_config.json"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def calibrate(source_dir: Path, tokenizer_dir: Path | None, spec: CalibrationSpec, work_dir: Path,
              log=print, kinds: tuple[str, ...] = ("activation_amax", "kv_amax")) -> Calibration:
    from pipeline.backends.torch_backend import read_checkpoint_config
    from pipeline.convert import convert_checkpoint

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="calibration-", dir=work_dir))
    try:
        convert_checkpoint(source_dir, tmp, dtype="float32", tp=1, pp=1)
        config = read_checkpoint_config(tmp)
        from safetensors.torch import load_file

        weights = load_file(tmp / "rank0.safetensors")
        act_amax: dict[str, float] = {}
        kv_amax: dict[int, float] = {}
        stats: dict[str, ActivationStats] | None = {} if "activation_stats" in kinds else None
        rows = -(-SAMPLED_ROWS // spec.samples)
        generator = torch.Generator().manual_seed(spec.seed)
        model = RankModel(config, weights, Comm(Mapping(1, 1, 0), torch.device("cpu")), torch.device("cpu"),
                          make_linear=lambda prefix, w, b: ObservedLinear(prefix, w, b, act_amax, stats, rows, generator))

        def observe_kv(index: int, k: torch.Tensor, v: torch.Tensor) -> None:
            value = max(float(k.abs().amax()), float(v.abs().amax()))
            kv_amax[index] = max(kv_amax.get(index, 0.0), value)

        model.observe_kv = observe_kv
        tokenizer = _load_tokenizer(tokenizer_dir or source_dir)
        windows = token_windows(spec.dataset, tokenizer, spec.seq_len, spec.samples, spec.seed,
                                vocab_size=config["vocab_size"])
        log(f"calibrating on {len(windows.windows)} x {spec.seq_len} tokens of {windows.record['dataset']}")
        with torch.no_grad():
            for window in progress(windows.windows, desc="calibrating", unit="window"):
                ids = torch.tensor([window])
                positions = torch.arange(len(window))[None]
                cache = model.new_cache(1, len(window))
                cache.valid[:] = True
                model.forward(ids, positions, cache, slot_start=0)
        record = {**windows.record, "samples": spec.samples, "seconds": round(time.perf_counter() - start, 2),
                  "runtime": "pipeline torch backend, float32, CPU"}
        return Calibration(act_amax, kv_amax, record, stats, weights if stats is not None else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
