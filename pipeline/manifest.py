"""Content hashes, stage cache keys and the manifest.json written beside every artifact.

A stage's key is the sha256 of a canonical JSON of exactly what determines its output: the slice of the resolved
recipe it reads, the sha256 of its input files, and the versions of the code and libraries that shape its bytes.
Same key, same bytes; so a key that exists on disk is reused, and a changed byte of input gives a new key.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pipeline

MANIFEST = "manifest.json"
_DIGEST_CACHE = ".digests.json"
_lock = threading.Lock()


def sha256_file(path: Path, cache_dir: Path | None = None, advance: Callable[[int], object] | None = None) -> str:
    """sha256 of a file; with cache_dir, remembered by (path, size, mtime) so big sources hash once. `advance` is
    called with each block's size (with the whole size for a remembered digest)."""
    path = Path(path)
    stat = path.stat()
    cache_key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = Path(cache_dir) / _DIGEST_CACHE if cache_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            cached = json.loads(cache_file.read_text()).get(cache_key)
        except json.JSONDecodeError:
            cached = None
        if cached:
            if advance is not None:
                advance(stat.st_size)
            return cached
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 * 1024 * 1024):
            h.update(block)
            if advance is not None:
                advance(len(block))
    digest = h.hexdigest()
    if cache_file is not None:
        with _lock:
            try:
                data = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
            except json.JSONDecodeError:
                data = {}
            data[cache_key] = digest
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache_file, json.dumps(data, indent=0, sort_keys=True))
            except OSError:  # a read-only home: the digest is still right, only not remembered
                pass
    return digest


def folder_digests(folder: Path, names: list[str] | None = None, cache_dir: Path | None = None,
                   desc: str | None = None) -> dict[str, str]:
    """sha256 of each file in `folder` (or of `names`), by relative name; the manifest itself is excluded. With
    `desc`, a progress bar over the bytes (a model's first hashing reads every shard: a minute for 16 GB)."""
    folder = Path(folder)
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p.name not in (MANIFEST, _DIGEST_CACHE))
    if desc is None:
        return {name: sha256_file(folder / name, cache_dir) for name in names}
    from pipeline.progress import progress

    with progress(desc=desc, total=sum((folder / n).stat().st_size for n in names), unit="B", unit_scale=True) as bar:
        return {name: sha256_file(folder / name, cache_dir, bar.update) for name in names}


def canonical_json(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(inputs: dict) -> str:
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()[:20]


def library_versions(names=("torch", "transformers", "safetensors", "huggingface_hub", "numpy", "mpi4py",
                            "tensorrt", "tensorrt_llm")) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"pipeline": pipeline.__version__, "python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [
                {"name": torch.cuda.get_device_name(i),
                 "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i)))}
                for i in range(torch.cuda.device_count())
            ]
    except ImportError:
        pass
    return info


def lock_drift(lock_file: Path) -> dict[str, dict]:
    """Packages whose installed version differs from requirements.lock: {name: {locked, installed}}."""
    drift = {}
    if not lock_file.is_file():
        return {"requirements.lock": {"locked": "present", "installed": "missing"}}
    for line in lock_file.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" not in line:
            continue
        name, version = (s.strip() for s in line.split("==", 1))
        version = version.split(";")[0].strip()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != version.split("+")[0]:
            drift[name] = {"locked": version, "installed": installed}
    return drift


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_manifest(folder: Path, data: dict) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(data, indent=2, default=str) + "\n")


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def verify_folder(folder: Path) -> list[str]:
    """Problems found re-hashing an artifact against its manifest (empty list: it verifies)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no readable {MANIFEST}; the artifact is incomplete or was not made by this pipeline"]
    expected: dict[str, str] = manifest.get("outputs", {})
    problems = []
    for name, digest in sorted(expected.items()):
        path = folder / name
        outside = _outside(folder, name)
        if outside:
            problems.append(f"{name}: {outside}; refused (a manifest lists files inside its artifact folder only: "
                            f"rebuild the artifact with `make build`)")
        elif not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from the manifest (modified after the build)")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for extra in sorted(present - set(expected)):
        problems.append(f"{extra}: not listed in the manifest")
    return problems


def _outside(folder: Path, name: str) -> str | None:
    """Why manifest entry `name` is not a file inside `folder` (an absolute path, "..", a symlink leading out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return "an absolute path, outside the artifact"
    if ".." in Path(name).parts:
        return "a path through '..', outside the artifact"
    if not (folder / name).resolve().is_relative_to(folder.resolve()):
        return f"a symlink leading out of the artifact (to {(folder / name).resolve()})"
    return None


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
