"""Calibration: run the source model over text samples and record activation maxima.

The model runs in float32 on the CPU through this project's own PyTorch backend (a tp=1, pp=1 conversion of the
source into a temporary folder), so the recorded maxima are of exactly the tensors TensorRT-LLM quantizes: the
input of every linear layer (qkv, dense, fc and gate share their input, proj) and the keys (after rotary embedding)
and values that the KV cache stores. Deterministic for a given dataset, seed and sample count; the record names
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
from pipeline.recipe import CalibrationSpec


@dataclass
class Calibration:
    act_amax: dict[str, float]  # "transformer.layers.{L}.attention.qkv" (global layer index) -> max |input|
    kv_amax: dict[int, float]  # global layer index -> max(|k|, |v|)
    record: dict


class _Observed(Linear):
    def __init__(self, prefix: str, weight, bias, amax: dict[str, float]):
        super().__init__(weight, bias)
        self.prefix, self.amax = prefix, amax

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        value = float(x.detach().abs().amax())
        self.amax[self.prefix] = max(self.amax.get(self.prefix, 0.0), value)
        return super().__call__(x)


def _load_tokenizer(folder: Path | None):
    from pipeline.convert import TOKENIZER_FILES

    if folder is None or not any((Path(folder) / n).is_file() for n in TOKENIZER_FILES if n != "generation_config.json"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def calibrate(source_dir: Path, tokenizer_dir: Path | None, spec: CalibrationSpec, work_dir: Path,
              log=print) -> Calibration:
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
        model = RankModel(config, weights, Comm(Mapping(1, 1, 0), torch.device("cpu")), torch.device("cpu"),
                          make_linear=lambda prefix, w, b: _Observed(prefix, w, b, act_amax))

        def observe_kv(index: int, k: torch.Tensor, v: torch.Tensor) -> None:
            value = max(float(k.abs().amax()), float(v.abs().amax()))
            kv_amax[index] = max(kv_amax.get(index, 0.0), value)

        model.observe_kv = observe_kv
        tokenizer = _load_tokenizer(tokenizer_dir or source_dir)
        windows = token_windows(spec.dataset, tokenizer, spec.seq_len, spec.samples, spec.seed,
                                vocab_size=config["vocab_size"])
        log(f"calibrating on {len(windows.windows)} x {spec.seq_len} tokens of {windows.record['dataset']}")
        with torch.no_grad():
            for window in windows.windows:
                ids = torch.tensor([window])
                positions = torch.arange(len(window))[None]
                cache = model.new_cache(1, len(window))
                cache.valid[:] = True
                model.forward(ids, positions, cache, slot_start=0)
        record = {**windows.record, "samples": spec.samples, "seconds": round(time.perf_counter() - start, 2),
                  "runtime": "pipeline torch backend, float32, CPU"}
        return Calibration(act_amax, kv_amax, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
