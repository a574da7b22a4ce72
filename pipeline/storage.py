"""What a build holds on disk while it runs: a lock that `gc` respects, and room to write.

Lock: each building process keeps `checkpoints/locks/<host>-<pid>.json`, naming the folders it is writing or
reading (its `.tmp-*` folders, and the finished stage folders a later stage reads before any build record names
them). `gc` leaves those alone while the process lives; a lock whose process is gone (same host, pid not running)
is stale, and `gc` removes it with the debris it protected.

Room: a stage checks the free space of its folder against an estimate from the plan before it writes, and a write
that fails for lack of space (ENOSPC, EDQUOT) or a read-only folder (EROFS, EACCES) becomes a BuildError naming the
folder and the bytes needed, after the stage's temporary folder is removed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import BuildError
from pipeline.hub import checkpoints_dir

_held: Counter = Counter()  # path -> how many holders in this process
_mutex = threading.Lock()
_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY_ERRORS = (errno.EROFS, errno.EACCES, errno.EPERM)


def locks_dir() -> Path:
    return checkpoints_dir() / "locks"


def _lock_file() -> Path:
    return locks_dir() / f"{socket.gethostname()}-{os.getpid()}.json"


def _write_lock() -> None:
    path = _lock_file()
    if not _held:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "paths": sorted(_held)}))
    os.replace(tmp, path)  # gc never reads half a lock


class Hold:
    """Paths this process must keep while the `with` block runs; `add` more as the build finds them."""

    def __init__(self, *paths: Path):
        self.paths: list[str] = []
        for p in paths:
            self.add(p)

    def add(self, path: Path) -> None:
        key = str(Path(path).resolve())
        with _mutex:
            _held[key] += 1
            try:
                _write_lock()
            except OSError as exc:
                _held[key] -= 1
                error = write_error(exc, locks_dir(), None, "the build's lock file")
                if error is None:
                    raise
                raise error from None
            self.paths.append(key)

    def release(self) -> None:
        with _mutex:
            for key in self.paths:
                _held[key] -= 1
                if _held[key] <= 0:
                    del _held[key]
            self.paths = []
            try:
                _write_lock()
            except OSError:  # a read-only or full disk must not hide the error that ended the build
                pass

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def held_paths() -> tuple[set[Path], list[Path]]:
    """(paths held by live builds, lock files of dead ones). A lock from another host is taken as live."""
    held, stale = set(), []
    folder = locks_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            lock = json.loads(path.read_text())
            host, pid, paths = lock["host"], int(lock["pid"]), lock["paths"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours: leave it
        if host == socket.gethostname() and not _alive(pid):
            stale.append(path)
        else:
            held |= {Path(p) for p in paths}
    return held, stale


# ------------------------------------------------------------------------------------------------ room


def _existing(folder: Path) -> Path:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse to start writing `what` into `folder` when its disk has less free space than `needed_bytes`."""
    free = shutil.disk_usage(_existing(folder)).free
    if needed_bytes > free:
        raise BuildError(f"{what} needs about {_size(needed_bytes)} in {folder} but its disk has {_size(free)} "
                         f"free; free space (python -m pipeline gc removes unused artifacts) or set PIPELINE_HOME "
                         f"to a folder on a larger disk")


def write_error(exc: BaseException, folder: Path, needed_bytes: int | None, what: str) -> BuildError | None:
    """The BuildError for a full disk or a read-only folder met while writing `what` into `folder`; None for any
    other exception (a bug keeps its traceback)."""
    if not isinstance(exc, OSError):
        return None
    need = f" (it needs about {_size(needed_bytes)})" if needed_bytes else ""
    if exc.errno in _SPACE_ERRORS:
        free = shutil.disk_usage(_existing(folder)).free
        return BuildError(f"{what}: the disk of {folder} is full{need}, {_size(free)} free; nothing of it was kept "
                          f"and earlier builds are untouched; free space (python -m pipeline gc) or set "
                          f"PIPELINE_HOME to a larger disk")
    if exc.errno in _READ_ONLY_ERRORS:
        return BuildError(f"{what}: {exc.filename or folder} is not writable ({os.strerror(exc.errno)}){need}; "
                          f"nothing of it was kept; make it writable or set PIPELINE_HOME to a writable folder")
    return None


@contextmanager
def write_errors(folder: Path, needed_bytes: int | None, what: str):
    """Raise write_error's BuildError for an OSError of the block that has one."""
    try:
        yield
    except OSError as exc:
        error = write_error(exc, folder, needed_bytes, what)
        if error is None:
            raise
        raise error from None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
