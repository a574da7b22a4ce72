"""Tuning: each GEMM shape's kernel config chosen by timing, as TensorRT's builder chooses tactics, and kept.

`choose` times every candidate over all layers' weights of one GEMM shape, launched back to back in a CUDA graph
(`graph_seconds`), and keeps the fastest: for the process, and across processes in a tuning cache, the PyTorch
backend's counterpart of TensorRT's timing cache. Candidates within a percent or two of each other trade places
from one process to the next, and their float32 sums run in different orders, so two runs of one recipe could
round differently and, on a near-tie, pick other greedy tokens; the cache fixes the choices: the first process on
a GPU model times and writes them, later ones read them and time nothing.

    checkpoints/timing-cache/<gpu>-sm<cc>-torch<version>-triton<version>-tuning-v1.json
    {"<tuner> <GEMM and shape>|<candidates' digest>": "<the chosen config, as str(config)>", ...}

A key holds a digest of the candidate list, so a new or changed config is timed again rather than hidden behind
an old choice. PIPELINE_TUNING_CACHE=0 times afresh and writes nothing; a value other than 0 or 1 is the file to
use (a copy pinned beside a deployment, say).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from pipeline import hub
from pipeline.errors import PipelineError
from pipeline.progress import progress

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


_chosen: dict[tuple[str, str], object] = {}  # (cache entry, device) -> the candidate chosen in this process
_notes: dict[str, str] = {}  # "<tuner> <GEMM and shape>" -> what was chosen and how fast, for the bench's record


def choose(device: torch.device, tuner: str, gemm: str, candidates: list, run_for, read_bytes: int,
           label=str, timer=None, persist: bool | None = None, replays: int = 10):
    """The fastest of `candidates` for one GEMM shape: run_for(candidate) returns a function that launches the
    GEMM over all its layers' weights, timed by timer(run) -> seconds (default: graph_seconds). A choice is kept
    for the process (another decoder of the model times nothing) and, with persist (default: when timing for
    real, not with a stand-in timer), in the tuning cache. A candidate this GPU cannot run (shared memory) is
    skipped. Returns (choice, note): choice None when none ran; note (what was chosen, how fast, or "(tuning
    cache)") None when the process had chosen already. label(candidate) names it in the cache and the record."""
    persist = timer is None if persist is None else persist
    entry = key(tuner, gemm, [label(c) for c in candidates])
    memo = (entry, str(device))
    if memo in _chosen:
        return _chosen[memo], None
    stored = cached(device, entry, candidates, label) if persist else None
    if stored is not None:
        _chosen[memo] = stored
        note = _notes[f"{tuner} {gemm}"] = f"{label(stored)} (tuning cache)"
        return stored, note
    timer = timer or functools.partial(graph_seconds, replays=replays)
    timed = []
    for candidate in progress(candidates, desc=f"tuning {tuner} {gemm}", unit="config"):
        try:
            timed.append((timer(run_for(candidate)), candidate))
        except Exception as exc:  # noqa: BLE001 - a config this GPU cannot run (shared memory) is skipped
            warnings.warn(f"{tuner} config {label(candidate)} skipped for {gemm}: {type(exc).__name__}: "
                          f"{str(exc)[:200]}", stacklevel=2)
    if not timed:
        return None, None
    seconds, best = min(timed, key=lambda t: t[0])  # the first of equals, in the candidates' order
    _chosen[memo] = best
    if persist:
        store(device, entry, label(best))
    # beside the choice, the first candidate (the batched GEMMs': cuBLAS) or, where that won, the runner-up
    others = sorted((t for t in timed if t[1] is not best), key=lambda t: t[0])
    other_s, other = timed[0] if timed[0][1] is not best else (others[0] if others else (None, None))
    name = "" if timed[0][1] is not best else "runner-up "
    reference = f"; {name}{label(other)} {read_bytes / other_s / 1e9:.0f} GB/s" if other_s else ""
    note = _notes[f"{tuner} {gemm}"] = f"{label(best)} ({read_bytes / seconds / 1e9:.0f} GB/s{reference})"
    return best, note


def chosen_configs() -> dict[str, str]:
    """What choose() timed or read in this process, per tuner and GEMM: for the bench's record."""
    return dict(_notes)


def graph_seconds(fn, replays: int) -> float:
    """Median seconds of fn() replayed from a CUDA graph, after two runs outside it (which compile the kernels and
    make the split-K buffers)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()  # the first replay uploads the graph
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return sorted(times)[len(times) // 2]
