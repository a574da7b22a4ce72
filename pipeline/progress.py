"""One progress helper for every long stage (calibration, eval, compilation and warm-up, graph capture, kernel
tuning): `progress`, a tqdm bar on stderr with rate and ETA when stderr is a terminal, silent in logs and CI; and
`stage`, a stage's start line and its elapsed time, printed everywhere (logs too), for work a bar cannot count."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             unit_scale: bool = False, file=None):
    """Wrap `iterable` (or count `total` steps with .update()) in a progress bar named `desc` (unit_scale: k, M, G
    prefixes, for bytes)."""
    from tqdm.auto import tqdm

    out = file if file is not None else sys.stderr
    shown = file is not None or out.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, file=out, disable=not shown,
                dynamic_ncols=True, leave=False, mininterval=0.5)


@contextmanager
def stage(name: str, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """`name ...` when the stage starts and `name: done in N.N s` when it ends (through `log`, else on stderr)."""
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"{name} ...")
    start = time.perf_counter()
    yield
    say(f"{name}: done in {time.perf_counter() - start:.1f} s")
