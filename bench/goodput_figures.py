"""The goodput benchmark's arithmetic (pure): run order, denominators, medians and spreads,
ratios, and the targets with whether they hold.

- `round_order`: the systems rotated by the round, so each system runs first, in the middle and
  last equally often (A B C, B C A, C A B, ...): a machine whose speed drifts through a round
  tilts no system.
- `expected_samples`: what an uninterrupted run makes through the window at the node count the
  scenario offers at each moment, integrated over its level samples (on 2 shared cores the rate
  is not linear in the world size, so no single average world size is used).
- `spread`: the median of a figure over the rounds with min, max and the interquartile range.
- A `Target` holds only if the median meets it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def round_order(systems: Sequence[str], round_index: int) -> list[str]:
    """The order the systems run in round `round_index` (0-based): rotated left by it."""
    if not systems:
        return []
    k = round_index % len(systems)
    return list(systems[k:]) + list(systems[:k])


def rate_at(rates: Mapping[int, float], world: float) -> float:
    """The reference rate at a (fractional) world size: linear between measured sizes, 0 at 0,
    the largest measured size's rate beyond it."""
    points = sorted({0: 0.0, **rates}.items())
    for (w0, r0), (w1, r1) in zip(points, points[1:], strict=False):
        if w0 <= world <= w1:
            return r0 + (r1 - r0) * (world - w0) / (w1 - w0)
    return points[-1][1]


def expected_samples(levels: Sequence[int], step_s: float, wall_s: float,
                     rates: Mapping[int, float]) -> float:
    """Samples an uninterrupted run makes in the first `wall_s` seconds of a schedule whose
    node count is levels[i] from i * step_s on (the last level holds past the end)."""
    total, t = 0.0, 0.0
    for level in levels:
        if t >= wall_s:
            break
        span = min(step_s, wall_s - t)
        total += rate_at(rates, level) * span
        t += step_s
    if t < wall_s and levels:
        total += rate_at(rates, levels[-1]) * (wall_s - t)
    return total


def mean_rates(before: Mapping[int, float], after: Mapping[int, float]) -> dict[int, float]:
    """The reference rates of a round: the mean of the measurements that bracket it."""
    return {w: (before[w] + after[w]) / 2 for w in before if w in after}


def rates_drift(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """The largest relative change of a reference rate across a round."""
    mean = mean_rates(before, after)
    return max((abs(before[w] - after[w]) / mean[w] for w in mean if mean[w]), default=0.0)


def spread(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Median, min, max and interquartile range of the figures that exist (None: a round
    without the figure)."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return {"median": None, "min": None, "max": None, "iqr": None, "n": 0}
    if len(present) >= 2:
        q = statistics.quantiles(present, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = 0.0
    return {"median": round(statistics.median(present), 4), "min": round(present[0], 4),
            "max": round(present[-1], 4), "iqr": round(iqr, 4), "n": len(present)}


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or not b:
        return None
    return round(a / b, 4)


@dataclass(frozen=True, kw_only=True)
class Target:
    """A claim the benchmark checks: `figure` of `scenario`'s summary `op` `value`, on the median."""

    scenario: str
    figure: str
    """A key of the scenario's summary: "goodput.spotwise", "ratio.spotwise/torchrun_tuned",
    "lost_steps.spotwise"."""
    op: str
    """">=" or "<="."""
    value: float
    note: str = ""
    beside: str = ""
    """A summary key reported next to the median (e.g. the ceiling a ratio can reach)."""

    def evaluate(self, summary: Mapping[str, Mapping[str, Mapping]]) -> dict:
        """The target with the median it is read against and whether it holds (None: the
        scenario or figure was not run)."""
        median = _median(summary, self.figure)
        holds = None
        if median is not None:
            holds = median >= self.value if self.op == ">=" else median <= self.value
        out = {"scenario": self.scenario, "figure": self.figure,
               "target": f"{self.op} {self.value}", "median": median, "holds": holds,
               "note": self.note}
        if self.beside:
            out[self.beside] = _median(summary, self.beside)
        return out


def _median(summary: Mapping[str, Mapping[str, Mapping]], figure: str) -> float | None:
    group, _, name = figure.partition(".")
    return summary.get(group, {}).get(name, {}).get("median")


TARGETS = (
    Target(scenario="real_trace", figure="goodput.spotwise", op=">=", value=0.9),
    Target(scenario="real_trace", figure="ratio.spotwise/torchrun", op=">=", value=1.3),
    Target(scenario="real_trace", figure="ratio.spotwise/torchrun_tuned", op=">=", value=1.1,
           note="the most it can be is the ceiling 1 / tuned torchrun's goodput",
           beside="ceiling.1/torchrun_tuned"),
    Target(scenario="failure_every_60s", figure="goodput.spotwise", op=">=", value=0.85),
    Target(scenario="failure_every_15s", figure="goodput.spotwise", op=">=", value=0.5),
    Target(scenario="failure_every_15s", figure="ratio.spotwise/torchrun_tuned", op=">=",
           value=2.0),
    Target(scenario="mass_preemption", figure="lost_steps.spotwise", op="<=", value=0.0,
           note="replayed at the restores inside the window"),
    Target(scenario="mass_preemption", figure="unsaved_at_outage.spotwise", op="<=", value=0.0,
           note="run past the newest commit when the last node went: the loss whatever the "
                "window, even if the restore comes after it"),
)


def summarize(rounds: Sequence[Mapping], systems: Sequence[str]) -> dict[str, dict]:
    """Medians and spreads over the rounds of each system's goodput, lost steps, steps unsaved
    when every node went, and generations, and of spotwise's ratio to each other system (per round: both share that
    round's denominator), plus the ceiling 1 / tuned torchrun's goodput."""
    keys = ("goodput", "lost_steps", "unsaved_at_outage", "generations")
    out: dict[str, dict] = {key: {} for key in (*keys, "ratio")}
    for s in systems:
        runs = [r["runs"].get(s) for r in rounds]
        for key in keys:
            out[key][s] = spread([run.get(key) if run else None for run in runs])
    for other in systems:
        if other == "spotwise" or "spotwise" not in systems:
            continue
        out["ratio"][f"spotwise/{other}"] = spread([
            ratio(r["runs"]["spotwise"]["goodput"], r["runs"][other]["goodput"])
            if "spotwise" in r["runs"] and other in r["runs"] else None for r in rounds])
    if "torchrun_tuned" in systems:
        out["ceiling"] = {"1/torchrun_tuned": spread([
            ratio(1.0, r["runs"]["torchrun_tuned"]["goodput"]) if "torchrun_tuned" in r["runs"]
            else None for r in rounds])}
    return out
