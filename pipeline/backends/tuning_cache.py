"""The decode path's kernel choices kept across processes: the PyTorch backend's counterpart of TensorRT's timing cache.

FusedStep.tune (the batch-1 GEMVs) and batched_gemm.tune (cuBLAS or the split-K kernel at batch > 1) time each
GEMM shape's candidate configs at warm-up and keep the fastest. Candidates within a percent or two of each other
trade places from one process to the next, and their float32 sums run in different orders: two runs of one recipe
could then round differently and, on a near-tie, pick other greedy tokens (H100 run 49: two decode variants' tokens
of a random-weight 8B parted after 27). As trtllm-build's timing cache fixes an engine's tactics, this file fixes
the choices: the first process on a GPU model times and writes them, later ones read them and time nothing.

    checkpoints/timing-cache/<gpu>-sm<cc>-torch<version>-triton<version>-tuning-v1.json
    {"<tuner> <GEMM and shape>|<candidates' digest>": "<the chosen config, as str(config)>", ...}

A key holds a digest of the candidate list, so a new or changed config (a new kernel release) is timed again
rather than hidden behind an old choice. PIPELINE_TUNING_CACHE=0 times afresh and writes nothing; a value other
than 0 or 1 is the file to use (a copy pinned beside a deployment, say).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from pipeline import hub
from pipeline.errors import PipelineError

ENV = "PIPELINE_TUNING_CACHE"
FORMAT = "tuning-v1"
_loaded: dict[Path, dict[str, str]] = {}  # each file read once per process, then kept in step with what we write


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def path_for(device: torch.device) -> Path:
    """The cache file for this device's GPU model (or the CPU) and the torch and Triton that compile the kernels."""
    override = os.environ.get(ENV)
    if override and override not in ("0", "1"):
        return Path(override)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        machine = f"{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        machine = device.type
    name = re.sub(r"[^A-Za-z0-9.]+", "-", f"{machine}-torch{torch.__version__}-triton{triton_version}").strip("-")
    return hub.checkpoints_dir() / "timing-cache" / f"{name}-{FORMAT}.json"


def key(tuner: str, gemm: str, candidates: list[str]) -> str:
    """'<tuner> <gemm>|<digest of the candidates, in order>'."""
    digest = hashlib.sha256("\n".join(candidates).encode()).hexdigest()[:16]
    return f"{tuner} {gemm}|{digest}"


def _read(path: Path) -> dict[str, str]:
    if path not in _loaded:
        entries: dict[str, str] = {}
        if path.exists():
            try:
                entries = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise PipelineError(f"tuning cache {path}: unreadable ({type(exc).__name__}: {exc}). Delete the file "
                                    f"(it is rebuilt at the next warm-up) or set {ENV}=0 to time without it") from None
            if not isinstance(entries, dict) or not all(isinstance(v, str) for v in entries.values()):
                raise PipelineError(f"tuning cache {path}: expected a JSON object of strings. Delete the file (it is "
                                    f"rebuilt at the next warm-up) or set {ENV}=0 to time without it")
        _loaded[path] = entries
    return _loaded[path]


def lookup(device: torch.device, entry: str) -> str | None:
    """The choice stored under `entry` (see key), or None (not stored, or the cache is off)."""
    if not enabled():
        return None
    return _read(path_for(device)).get(entry)


def cached(device: torch.device, entry: str, candidates: list, label=str):
    """The candidate whose label(candidate) the cache holds under `entry`, or None (not stored, or the cache is off)."""
    stored = lookup(device, entry)
    return next((c for c in candidates if label(c) == stored), None) if stored is not None else None


def store(device: torch.device, entry: str, choice: str) -> None:
    """Record a choice: merged into the file as it is now (another rank or process may have added to it) and
    written whole to a temporary file that then replaces it, so a reader never sees half a file."""
    if not enabled():
        return
    path = path_for(device)
    _loaded.pop(path, None)
    entries = {**_read(path), entry: choice}  # what is on disk now, plus this choice
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    temporary.replace(path)
    _loaded[path] = entries
