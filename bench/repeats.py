"""Figures over repeated runs: every run kept, each figure read as its median with its spread.

A benchmark that claims a figure from one run reports noise. These helpers turn a list of runs
(each a dict of figure -> number) into, per figure, the median, the min and max, and the spread
(max - min, also as a fraction of the median); a target holds only if the median meets it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def summary(values: Iterable[float | None], *, digits: int = 4) -> dict[str, Any]:
    """Median, min, max, spread and count of the finite values (None and NaN are left out, and
    counted in `missing`). All None when no finite value is left."""
    given = list(values)
    finite = [float(v) for v in given if v is not None and math.isfinite(float(v))]
    out: dict[str, Any] = {"n": len(finite), "missing": len(given) - len(finite)}
    if not finite:
        return {**out, "median": None, "min": None, "max": None, "spread": None,
                "relative_spread": None}
    median = statistics.median(finite)
    lo, hi = min(finite), max(finite)
    return {
        **out,
        "median": round(median, digits),
        "min": round(lo, digits),
        "max": round(hi, digits),
        "spread": round(hi - lo, digits),
        "relative_spread": round((hi - lo) / abs(median), digits) if median else None,
    }


def summarize_runs(runs: Sequence[Mapping[str, Any]], *, digits: int = 4) -> dict[str, dict[str, Any]]:
    """Per figure (every numeric key that any run has), the summary over the runs; a run that
    lacks a figure counts as missing for it."""
    keys: list[str] = []
    for run in runs:
        for key, value in run.items():
            if key not in keys and _is_number(value):
                keys.append(key)
    return {key: summary((run.get(key) for run in runs), digits=digits) for key in keys}


def meets(value: float | None, op: str, target: float) -> bool | None:
    """Whether `value op target` holds ("<=" or ">="); None when there is no value."""
    if op not in ("<=", ">="):
        raise ValueError(f"a target's operator is <= or >=, got {op!r}")
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


def judged(medians: Mapping[str, dict[str, Any]],
           targets: Mapping[str, tuple[str, float]]) -> dict[str, bool | None]:
    """Each target judged on its figure's median."""
    return {name: meets(medians.get(name, {}).get("median"), op, value)
            for name, (op, value) in targets.items()}


def interleaved(systems: Sequence[str], rounds: int) -> list[list[str]]:
    """Each round's order: the systems rotated by one more place each round (A B C, B C A,
    C A B, ...), so that no system always runs first or after the same one."""
    n = len(systems)
    return [[systems[(r + i) % n] for i in range(n)] for r in range(rounds)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
