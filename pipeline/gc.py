"""`python -m pipeline gc`: remove artifacts that no build record refers to, and debris of interrupted builds.

Kept: every stage folder named by checkpoints/builds/*.json (and latest.json), and offline sources. Removed: other
stage folders, oldest first; with --keep-gb N, also referenced ones (oldest first, never the latest build) until
the stage folders fit in N GB; always the .tmp-* folders that interrupted builds left. Never removed: what a
running build holds (pipeline.storage's locks); a lock whose process is gone is stale and goes too.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from pipeline.hub import checkpoints_dir
from pipeline.storage import held_paths

STAGES = ("fetch", "convert", "engine", "onnx", "tensorrt")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _referenced() -> tuple[set[Path], set[Path]]:
    """(paths referenced by any build record, paths of the latest build)."""
    referenced, latest = set(), set()
    records = list((checkpoints_dir() / "builds").glob("*.json"))
    latest_file = checkpoints_dir() / "latest.json"
    for path in records + ([latest_file] if latest_file.is_file() else []):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        stages = {Path(s["path"]).resolve() for s in record.get("stages", {}).values()}
        referenced |= stages
        if path == latest_file:
            latest |= stages
    return referenced, latest


def collect(keep_gb: float | None = None) -> list[tuple[Path, int, str]]:
    """What gc would remove: (path, bytes, reason)."""
    referenced, latest = _referenced()
    candidates, kept = [], []
    for stage in STAGES:
        folder = checkpoints_dir() / stage
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if not path.is_dir():
                continue
            if path.name.startswith(".tmp-"):
                candidates.append((path, _size(path), "left by an interrupted build"))
            elif path.resolve() not in referenced:
                candidates.append((path, _size(path), "no build record refers to it"))
            else:
                kept.append(path)
    if keep_gb is not None:
        budget = int(keep_gb * 1e9)
        total = sum(_size(p) for p in kept)
        for path in sorted(kept, key=lambda p: p.stat().st_mtime):
            if total <= budget:
                break
            if path.resolve() in latest:
                continue
            size = _size(path)
            candidates.append((path, size, f"over the {keep_gb} GB budget (oldest first)"))
            total -= size
    held, _ = held_paths()  # read after listing: a build creates its lock before its folders
    return [c for c in candidates if c[0].resolve() not in held]


def gc_command(keep_gb: float | None = None, dry_run: bool = False) -> int:
    removed = collect(keep_gb)
    _, stale = held_paths()
    for path, size, reason in removed:
        print(f"{'would remove' if dry_run else 'removed'} {path} ({size / 1e6:.1f} MB): {reason}")
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
            sibling = path.parent / f"{path.name}.eval.json"
            if sibling.is_file():
                sibling.unlink()
    for lock in stale:
        print(f"{'would remove' if dry_run else 'removed'} {lock}: a lock left by a build that is no longer running")
        if not dry_run:
            lock.unlink(missing_ok=True)
    freed = sum(size for _, size, _ in removed)
    print(f"gc: {len(removed)} folder(s), {freed / 1e9:.2f} GB {'to free' if dry_run else 'freed'} "
          f"({time.strftime('%H:%M:%S')})")
    return 0
