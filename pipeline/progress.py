"""One progress bar for every long stage (calibration, eval, graph capture, kernel tuning): tqdm on stderr with
rate and ETA when stderr is a terminal, silent in logs and CI (the stages still log a line when they start)."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
             file=None):
    """Wrap `iterable` (or count `total` steps with .update()) in a progress bar named `desc`."""
    from tqdm.auto import tqdm

    out = file if file is not None else sys.stderr
    shown = file is not None or out.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=out, disable=not shown, dynamic_ncols=True,
                leave=False, mininterval=0.5)
