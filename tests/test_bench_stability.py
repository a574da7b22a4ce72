"""Benchmarks never print a ratio from an unstable baseline: the baseline repeats until its runs agree within
STABLE_SPREAD, and otherwise the summary prints the runs and their spread instead of a ratio."""

from __future__ import annotations

from pipeline.bench import STABLE_SPREAD, ratio_text, repeat_until_stable


def runs(*seconds: float):
    it = iter(seconds)
    return lambda: next(it)


def test_noisy_first_run_is_repeated_until_the_runs_agree():
    timing = repeat_until_stable(runs(6.77, 0.88, 0.90), min_runs=2)  # the 6.77 s and 0.88 s
    assert timing["runs_s"] == [6.77, 0.88, 0.90] and timing["stable"]
    assert timing["best_s"] == (0.88 + 0.90) / 2
    assert ratio_text(423.87, timing) == "423.87x"


def test_baseline_that_never_settles_gives_no_ratio():
    timing = repeat_until_stable(runs(1.0, 2.0, 4.0, 8.0), min_runs=2, max_runs=4)
    assert len(timing["runs_s"]) == 4 and not timing["stable"] and timing["spread"] == 2.0
    text = ratio_text(5.0, timing)
    assert text.startswith("baseline unstable: runs 1.00, 2.00, 4.00, 8.00 s, spread 2.00x")
    assert f"> {STABLE_SPREAD}" in text and "5.00x" not in text
