"""Real spot-market traces (the ../shared/traces format) and their replay schedules (pure).

A trace file is ``{"metadata": {"gap_seconds": 300}, "data": [0, 0, 3, 3, 7, ...]}``:
``data[i]`` instances are available at trace time ``i * gap_seconds``. `replay_schedule`
turns a trace into wall-clock events for a provider to carry out:

- time is compressed by ``compression`` (300 means 300 s of trace per 1 s of wall clock);
- the node count is scaled from the trace's capacity to ``nodes``, rounding half up:
  ``round_half_up(count * nodes / source_nodes)``, clamped to 0..nodes. So 16 -> 4 maps
  1 -> 0, 2 -> 1, 6 -> 2, 10 -> 3 (2.5 rounds up), 16 -> 4;
- a fall from ``a`` to ``b`` (after scaling) is ``a - b`` nodes removed; each removed node
  comes with a notice with probability ``notice_fraction`` (a seeded draw, so a schedule is
  reproducible), ``notice_lead_s`` wall seconds before the removal. A notice never reaches back
  past the previous change of the count, so it always names nodes that exist;
- a rise is that many nodes added.

Events are ``ReplayEvent(t, kind, count)`` with kind "add", "remove" or "notice", sorted by t.
At equal t, changes come before a notice that was held back to that time, and a notice with
zero lead comes just before its own removal.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

EVENT_KINDS = ("add", "remove", "notice")


@dataclass(frozen=True, kw_only=True)
class Trace:
    """A validated availability trace."""

    name: str
    """File stem (or "" for an in-memory trace)."""
    gap_seconds: float
    """Trace seconds between two samples."""
    data: tuple[int, ...]
    """Instances available at each sample."""
    source_nodes: int
    """The capacity the trace counts out of (from the file name's "<N>node", else the maximum)."""

    @property
    def duration_s(self) -> float:
        return len(self.data) * self.gap_seconds


def parse_trace(doc: object, *, name: str = "") -> Trace:
    """Validate a decoded trace document; ValueError naming the first problem."""
    if not isinstance(doc, dict):
        raise ValueError("trace: top level must be an object with metadata and data")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError("trace: metadata must be an object")
    gap = meta.get("gap_seconds")
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not math.isfinite(gap) or gap <= 0:
        raise ValueError(f"trace: metadata.gap_seconds must be a positive number, got {gap!r}")
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        raise ValueError("trace: data must be a non-empty list")
    for i, value in enumerate(data):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"trace: data[{i}] must be a non-negative integer, got {value!r}")
    match = re.search(r"(\d+)node", name)
    source = int(match.group(1)) if match else max(data)
    if source < max(data):
        raise ValueError(f"trace: name says {source} nodes but data reaches {max(data)}")
    return Trace(name=name, gap_seconds=float(gap), data=tuple(data), source_nodes=max(source, 1))


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file; ValueError if it is not in the shared format."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"trace {path}: not JSON: {exc}") from exc
    try:
        return parse_trace(doc, name=path.stem)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class ReplayConfig:
    """How to replay a trace on this machine."""

    compression: float = 300.0
    """Trace seconds per wall-clock second (300: one 5-minute sample per second)."""
    nodes: int = 4
    """Node count the trace's full capacity maps to."""
    notice_fraction: float = 1.0
    """Fraction of removed nodes that get a notice first (0..1), drawn per node with `seed`."""
    notice_lead_s: float = 2.0
    """Wall seconds between a notice and its removal (AWS gives 120 s; compressed runs use less)."""
    seed: int = 0
    """Seed of the notice draw."""
    start: int = 0
    """First trace sample to replay."""
    length: int | None = None
    """How many samples to replay from `start` (None: to the end)."""

    def __post_init__(self) -> None:
        if not (self.compression > 0 and math.isfinite(self.compression)):
            raise ValueError(f"compression must be positive, got {self.compression}")
        if self.nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {self.nodes}")
        if not 0.0 <= self.notice_fraction <= 1.0:
            raise ValueError(f"notice_fraction must be in 0..1, got {self.notice_fraction}")
        if self.notice_lead_s < 0:
            raise ValueError(f"notice_lead_s must be >= 0, got {self.notice_lead_s}")
        if self.start < 0 or (self.length is not None and self.length < 1):
            raise ValueError("start must be >= 0 and length >= 1")


@dataclass(frozen=True, kw_only=True)
class ReplayEvent:
    t: float
    """Wall seconds from the start of the replay."""
    kind: str
    """"add", "remove" or "notice"."""
    count: int
    """Nodes added, removed, or noticed (the noticed ones are among the next removal's)."""


@dataclass(frozen=True, kw_only=True)
class ReplaySchedule:
    events: tuple[ReplayEvent, ...]
    levels: tuple[int, ...]
    """Scaled node count at each replayed sample."""
    step_s: float
    """Wall seconds per sample."""
    duration_s: float
    """Wall seconds the replay covers."""

    def level_at(self, t: float) -> int:
        """Nodes that should exist at wall time t."""
        if t < 0:
            return 0
        return self.levels[min(int(t // self.step_s), len(self.levels) - 1)]


def scale_count(count: int, source_nodes: int, nodes: int) -> int:
    """Round half up of count * nodes / source_nodes, clamped to 0..nodes."""
    # Integer arithmetic, so 2.5 rounds up exactly: floor((2*count*nodes + source) / (2*source)).
    scaled = (2 * count * nodes + source_nodes) // (2 * source_nodes)
    return max(0, min(nodes, scaled))


def replay_schedule(trace: Trace, config: ReplayConfig) -> ReplaySchedule:
    """The wall-clock events that replay `trace` under `config` (deterministic for a seed)."""
    end = len(trace.data) if config.length is None else min(len(trace.data), config.start + config.length)
    window = trace.data[config.start:end]
    if not window:
        raise ValueError(f"replay window start={config.start} is past the trace's {len(trace.data)} samples")
    levels = tuple(scale_count(v, trace.source_nodes, config.nodes) for v in window)
    step_s = trace.gap_seconds / config.compression
    rng = random.Random(config.seed)
    # Sort key (t, rank, sequence): rank 0 = a notice with no lead (before its removal),
    # 1 = a change, 2 = a notice held back to an earlier change's time (after that change).
    keyed: list[tuple[tuple[float, int, int], ReplayEvent]] = []

    def emit(event: ReplayEvent, rank: int) -> None:
        keyed.append(((event.t, rank, len(keyed)), event))

    if levels[0] > 0:
        emit(ReplayEvent(t=0.0, kind="add", count=levels[0]), 1)
    last_change_t = 0.0
    for i in range(1, len(levels)):
        before, after = levels[i - 1], levels[i]
        if before == after:
            continue
        t = i * step_s
        if after > before:
            emit(ReplayEvent(t=t, kind="add", count=after - before), 1)
        else:
            dropped = before - after
            noticed = sum(1 for _ in range(dropped) if rng.random() < config.notice_fraction)
            if noticed:
                notice_t = max(last_change_t, t - config.notice_lead_s)
                emit(ReplayEvent(t=notice_t, kind="notice", count=noticed), 0 if notice_t == t else 2)
            emit(ReplayEvent(t=t, kind="remove", count=dropped), 1)
        last_change_t = t
    keyed.sort(key=lambda pair: pair[0])
    return ReplaySchedule(events=tuple(e for _, e in keyed), levels=levels, step_s=step_s, duration_s=len(levels) * step_s)


def busy_window(trace: Trace, *, nodes: int, length: int, min_changes: int = 4,
                min_start: int = 2) -> int:
    """The first sample of the earliest `length`-sample window that starts with at least
    `min_start` nodes (at most `nodes`; 2 by default, so that one loss leaves a job running)
    and whose count, scaled to `nodes`, changes at least `min_changes` times; if no window
    changes that often, the earliest of those that change the most. For benchmarks and demos
    that must see spot churn in a short replay of a trace they have not seen. ValueError if the
    trace never has a node once scaled."""
    levels = [scale_count(v, trace.source_nodes, nodes) for v in trace.data]
    if not any(levels):
        raise ValueError(f"trace {trace.name or '(in memory)'}: no sample has a node once "
                         f"scaled to {nodes}")
    floor = max(1, min(min_start, nodes, max(levels)))
    best, best_changes = -1, -1
    for start in range(len(levels)):  # windows near the end are shorter
        if levels[start] < floor:
            continue
        window = levels[start:start + length]
        changes = sum(1 for a, b in zip(window, window[1:], strict=False) if a != b)
        if changes >= min_changes:
            return start
        if changes > best_changes:
            best, best_changes = start, changes
    return best
