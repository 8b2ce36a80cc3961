"""The goodput benchmark's scenarios: what happens to the nodes, as data (pure).

A `Scenario` is a name, the systems it runs, why its window is as long as it is, and a fault
schedule generator: one of `TraceWindow` (a window of a real availability trace, replayed by
spotwise.cloud.trace), `PeriodicFailures` (a seeded SIGKILL of one node without notice every
`period_s`, a replacement `replacement_delay_s` later) or `MassPreemption` (every node noticed
and removed at once, capacity back after a gap). A generator's `schedule(seed)` is a
`ReplaySchedule` (events plus the node count the cloud offers at each moment), the same
for every system of a round: the trace replayer (spotwise.cloud.replay) carries it out on
whichever provider the system runs on, and the denominator integrates over its levels.

`NoticeModel` is the one notice model of every system and scenario: AWS's two-minute notice
and spotwise's time settings divided by the trace's time compression (see `spotwise_env`).
`load_scenario` reads a held-back scenario from JSON (`{"name": ..., "kind": "periodic_failures",
...fields}`), validated like the built-in ones.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from spotwise.cloud.trace import (
    ReplayConfig,
    ReplayEvent,
    ReplaySchedule,
    load_trace,
    replay_schedule,
)

SYSTEMS = ("spotwise", "torchrun", "torchrun_tuned", "restart")
"""Every system the harness can run (see goodput_systems)."""
COMPARED = ("spotwise", "torchrun", "torchrun_tuned")
"""The systems of every scenario; the generous restart model runs on the real trace only."""
BUILTIN = ("real_trace", "no_notice", "failure_every_60s", "failure_every_15s", "mass_preemption")
"""The default run's scenarios (builtin_scenarios), in the order a round runs them."""
GRID_S = 0.5
"""Wall seconds per level sample of a synthetic schedule (its events fall on this grid)."""


@dataclass(frozen=True, kw_only=True)
class NoticeModel:
    """How removals are announced and how fast spotwise may react, for every system."""

    compression: float = 60.0
    """Trace seconds per wall second (a 5-minute trace sample lasts 5 s)."""
    aws_lead_s: float = 120.0
    """AWS's spot interruption notice, real seconds."""
    spotwise_drain_margin_s: float = 10.0
    """spotwise's default drain margin (daemon drain_margin_s), real seconds."""
    spotwise_imds_poll_s: float = 2.0
    """spotwise's default metadata poll (agent imds_poll_s), real seconds."""

    @property
    def lead_s(self) -> float:
        """Wall seconds from a notice to its removal."""
        return self.aws_lead_s / self.compression

    def spotwise_env(self) -> dict[str, str]:
        """spotwise's time settings scaled by the same compression as the notice."""
        return {"SPOTWISE_DAEMON_DRAIN_MARGIN_S": f"{self.spotwise_drain_margin_s / self.compression:.4f}",
                "SPOTWISE_AGENT_IMDS_POLL_S": f"{self.spotwise_imds_poll_s / self.compression:.4f}"}


@dataclass(frozen=True, kw_only=True)
class TraceWindow:
    """A window of a real availability trace, scaled to `nodes` and compressed."""

    kind: str = "trace"
    trace: str
    """The trace file (../shared/traces format)."""
    start: int
    """First trace sample of the window."""
    length: int
    """Trace samples in the window."""
    nodes: int = 3
    """Node count the trace's full capacity maps to."""
    notice_fraction: float = 1.0
    """Fraction of removals that come with a notice (seeded draw per node)."""
    lead_s: float = 2.0
    """Wall seconds of notice (NoticeModel.lead_s)."""
    compression: float = 60.0
    """Trace seconds per wall second (NoticeModel.compression)."""

    def schedule(self, seed: int) -> ReplaySchedule:
        return replay_schedule(load_trace(self.trace), ReplayConfig(
            compression=self.compression, nodes=self.nodes, notice_fraction=self.notice_fraction,
            notice_lead_s=self.lead_s, seed=seed, start=self.start, length=self.length))

    @property
    def window_s(self) -> float:
        return self.length * load_trace(self.trace).gap_seconds / self.compression


@dataclass(frozen=True, kw_only=True)
class PeriodicFailures:
    """One node SIGKILLed without notice about every `period_s`; a replacement arrives
    `replacement_delay_s` after each loss. Loss k is at period_s * (k + 0.5), moved by a seeded
    uniform draw of up to `jitter` periods either way (so no system can phase-lock its
    checkpoints to the faults); the node killed is the replayer's seeded pick."""

    kind: str = "periodic_failures"
    window_s: float
    """Wall seconds the schedule covers."""
    period_s: float
    """Mean wall seconds between two losses."""
    replacement_delay_s: float = 5.0
    """Wall seconds from a loss to its replacement node's launch."""
    jitter: float = 0.2
    """Largest shift of a loss time, in periods (0..0.5)."""
    nodes: int = 3
    """Nodes at the start (and the most there ever are)."""

    def __post_init__(self) -> None:
        if not (self.period_s > 0 and self.window_s > 0 and self.replacement_delay_s >= 0):
            raise ValueError("periodic_failures: period_s and window_s must be positive, "
                             "replacement_delay_s >= 0")
        if not 0 <= self.jitter <= 0.5:
            raise ValueError(f"periodic_failures: jitter must be in 0..0.5, got {self.jitter}")
        if self.nodes < 2:
            raise ValueError("periodic_failures: needs at least 2 nodes (one loss must leave one)")

    @property
    def notice_fraction(self) -> float:
        return 0.0

    def loss_times(self, seed: int) -> list[float]:
        rng = random.Random(seed)
        times = []
        k = 0
        while (t := self.period_s * (k + 0.5)) < self.window_s:
            shifted = t + rng.uniform(-self.jitter, self.jitter) * self.period_s
            times.append(_on_grid(min(max(shifted, GRID_S), self.window_s - GRID_S)))
            k += 1
        return times

    def schedule(self, seed: int) -> ReplaySchedule:
        changes = [(0.0, +self.nodes)]
        for t in self.loss_times(seed):
            changes.append((t, -1))
            changes.append((_on_grid(t + self.replacement_delay_s), +1))
        return _from_changes(changes, self.window_s, nodes=self.nodes, lead_s=0.0)


@dataclass(frozen=True, kw_only=True)
class MassPreemption:
    """Every node noticed `lead_s` ahead and removed at `at_s`; all of them back `gap_s` later."""

    kind: str = "mass_preemption"
    window_s: float
    """Wall seconds the schedule covers."""
    at_s: float
    """When every node is removed."""
    gap_s: float
    """Wall seconds without any capacity."""
    lead_s: float = 2.0
    """Wall seconds of notice (NoticeModel.lead_s)."""
    nodes: int = 3
    """Nodes before the preemption and after the gap."""

    def __post_init__(self) -> None:
        if not (self.lead_s <= self.at_s and self.at_s + self.gap_s < self.window_s
                and self.gap_s > 0):
            raise ValueError("mass_preemption: needs lead_s <= at_s, gap_s > 0 and "
                             "at_s + gap_s < window_s")

    @property
    def notice_fraction(self) -> float:
        return 1.0

    def schedule(self, seed: int) -> ReplaySchedule:
        del seed  # every node goes: nothing to draw
        changes = [(0.0, +self.nodes), (_on_grid(self.at_s), -self.nodes),
                   (_on_grid(self.at_s + self.gap_s), +self.nodes)]
        return _from_changes(changes, self.window_s, nodes=self.nodes, lead_s=self.lead_s)


Generator = TraceWindow | PeriodicFailures | MassPreemption
GENERATORS: dict[str, type] = {"trace": TraceWindow, "periodic_failures": PeriodicFailures,
                               "mass_preemption": MassPreemption}


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A named fault schedule and the systems that run under it."""

    name: str
    description: str
    generator: Generator
    why_window: str
    """Why the window is long enough for every system's figure to mean something."""
    systems: tuple[str, ...] = COMPARED

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ValueError(f"scenario {self.name}: unknown systems {unknown} (known: {SYSTEMS})")

    @property
    def window_s(self) -> float:
        return self.generator.window_s

    def describe(self) -> dict:
        return {"description": self.description, "window_s": round(self.window_s, 2),
                "why_window": self.why_window, "systems": list(self.systems),
                "generator": asdict(self.generator)}


def _on_grid(t: float) -> float:
    return round(t / GRID_S) * GRID_S


def _from_changes(changes: list[tuple[float, int]], window_s: float, *, nodes: int,
                  lead_s: float) -> ReplaySchedule:
    """A schedule from (time, +added / -removed) changes on the GRID_S grid: the level at each
    grid sample, and the events; with lead_s > 0 every removal gets a notice that far ahead."""
    samples = max(1, math.ceil(window_s / GRID_S))
    delta = [0] * (samples + 1)
    events: list[ReplayEvent] = []
    for t, d in sorted(changes, key=lambda c: (c[0], c[1])):
        if t >= window_s:
            continue
        delta[int(round(t / GRID_S))] += d
        if d < 0 and lead_s > 0:
            events.append(ReplayEvent(t=max(0.0, t - lead_s), kind="notice", count=-d))
        events.append(ReplayEvent(t=t, kind="add" if d > 0 else "remove", count=abs(d)))
    levels, level = [], 0
    for i in range(samples):
        level = max(0, min(nodes, level + delta[i]))
        levels.append(level)
    events.sort(key=lambda e: (e.t, e.kind != "notice"))
    return ReplaySchedule(events=tuple(events), levels=tuple(levels), step_s=GRID_S,
                          duration_s=samples * GRID_S)


def builtin_scenarios(*, trace: str, trace_start: int, notice: NoticeModel, nodes: int = 3,
                      length: int = 18) -> list[Scenario]:
    """The default run's scenarios, in the order they run within a round; the trace scenarios
    replay `length` samples of `trace` from `trace_start`."""
    lead, c = notice.lead_s, notice.compression
    window = TraceWindow(trace=trace, start=trace_start, length=length, nodes=nodes,
                         notice_fraction=1.0, lead_s=lead, compression=c)
    scenarios = [
        Scenario(
            name="real_trace",
            description="the 16-node p3.2xlarge availability trace (its first window that starts "
                        "with 2 nodes and changes level 4 times), scaled to 3 nodes; every "
                        "removal with the compressed two-minute notice",
            generator=window,
            systems=(*COMPARED, "restart"),
            why_window=_trace_why(window)),
        Scenario(
            name="no_notice",
            description="the same trace window, every removal without notice (hardware "
                        "failures, or a notice nobody reads)",
            generator=TraceWindow(**{**asdict(window), "notice_fraction": 0.0}),
            why_window="the real trace's window, so the two scenarios differ only in notices"),
        Scenario(
            name="failure_every_60s",
            description="3 nodes; one SIGKILLed without notice every 60 s (seeded jitter of "
                        "+-12 s and victim), its replacement launched 5 s later",
            generator=PeriodicFailures(window_s=120.0, period_s=60.0, nodes=nodes),
            why_window="two losses (near 30 and 90 s), each followed by at least 18 s before the "
                       "next loss or the end: longer than tuned torchrun's and spotwise's "
                       "recovery (a few s) and than default torchrun's, which with the "
                       "replacement back in 5 s completes its rendezvous at full size"),
        Scenario(
            name="failure_every_15s",
            description="3 nodes; one SIGKILLed without notice every 15 s (seeded jitter of "
                        "+-3 s and victim), its replacement launched 5 s later",
            generator=PeriodicFailures(window_s=60.0, period_s=15.0, nodes=nodes),
            why_window="four losses; a longer window repeats the same cycle and adds nothing "
                       "but time (the rounds give the spread)"),
        Scenario(
            name="mass_preemption",
            description="3 nodes, all noticed (the compressed two-minute notice) and removed at "
                        "10 s; 3 nodes back 15 s later",
            generator=MassPreemption(window_s=50.0, at_s=10.0, gap_s=15.0, lead_s=lead,
                                     nodes=nodes),
            why_window="25 s after capacity returns: new agents start, rendezvous and restore "
                       "(about 10 s for every system here when it works); the figure that "
                       "matters, lost steps, is settled by the first restore"),
    ]
    assert tuple(x.name for x in scenarios) == BUILTIN
    return scenarios


def _trace_why(window: TraceWindow) -> str:
    """Why a trace window is long enough, from where its level changes."""
    sched = window.schedule(0)
    levels = sched.levels
    changes = [i * sched.step_s for i in range(1, len(levels)) if levels[i] != levels[i - 1]]
    if not changes:
        return f"{window.length} trace samples ({window.window_s:.0f} s) without a level change"
    tail = window.window_s - changes[-1]
    return (f"{window.length} trace samples ({window.window_s:.0f} s): level changes at "
            f"{', '.join(f'{t:.0f}' for t in changes)} s and {tail:.0f} s after the last. On the "
            "16-node trace (changes at 15, 35, 50, 70 s) the last is a grow to full size, which "
            "every system completes without a last call (its rendezvous is full), and default "
            "torchrun's 30 s last calls after the losses at 15 and 50 s end with the arrivals at "
            "35 and 70 s: each system's recovery from every change lies inside the window")


def load_scenario(path: Path, *, notice: NoticeModel) -> Scenario:
    """A scenario from a JSON file: {"name", "kind" (trace, periodic_failures or
    mass_preemption), its generator's fields, optional "description", "why_window",
    "systems"}. ValueError naming the problem."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"scenario file {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise ValueError(f"scenario file {path}: an object with a string \"name\" is needed")
    kind = doc.get("kind")
    if kind not in GENERATORS:
        raise ValueError(f"scenario file {path}: kind must be one of {sorted(GENERATORS)}")
    cls = GENERATORS[kind]
    known = {f.name for f in fields(cls)} - {"kind"}
    params = {k: v for k, v in doc.items() if k in known}
    extra = set(doc) - known - {"name", "kind", "description", "why_window", "systems"}
    if extra:
        raise ValueError(f"scenario file {path}: unknown fields {sorted(extra)}")
    if cls in (TraceWindow, MassPreemption):
        params.setdefault("lead_s", notice.lead_s)
    if cls is TraceWindow:
        params.setdefault("compression", notice.compression)
    try:
        generator = cls(**params)
    except TypeError as e:
        raise ValueError(f"scenario file {path}: {e}") from e
    return Scenario(name=doc["name"], description=doc.get("description", f"from {path}"),
                    generator=generator, why_window=doc.get("why_window", "set by the file"),
                    systems=tuple(doc.get("systems", COMPARED)))
