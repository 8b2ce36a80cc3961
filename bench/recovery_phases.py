"""The phases of one recovery, read from the signals the systems themselves write.

Every phase is the time from the kill (the benchmark's clock, just before SIGKILL) to one
recorded moment; all times are Unix seconds on this one machine's clock:

- detected: the controller knows. spotwise: the daemon's first `node` job event after the kill
  (a rank exit its agent reported, or the lease lost); torchrun: the surviving agent's
  `Worker group FAILED` log line (its monitor saw the worker die).
- old_stopped: the survivor's old worker processes (the trainer and its checkpoint writer) are
  gone from /proc (polled every 10 ms).
- rendezvous: the new membership is decided. spotwise: the daemon's `generation` job event for
  the next generation; torchrun: the agent's `Rendezvous complete for workers` log line.
- imported: the new rank 0's first line of Python after its imports (the workload's timeline;
  `python_started`, before the imports, is kept beside it).
- process_group: the new rank 0's process group is up (the runtime's `ready` event).
- restored: the checkpoint is loaded (the runtime's `restored` event).
- first_step: the new rank 0 finished its first step (the workload's timeline).

torchrun logs (at LOGLEVEL=INFO) in glog's format, `I1201 12:07:48.821000 17152 file:line] ...`,
with the local time of the line but no year; the benchmark also stamps each line as it reads it
from the agent's pipe, which is the fallback for a line without glog's prefix. Functions here
are pure: they take parsed records and return times.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

PHASES = ("detected", "old_stopped", "rendezvous", "imported", "process_group", "restored",
          "first_step")
"""In the order a recovery normally passes them (old_stopped may come after rendezvous)."""

TORCHRUN_FAILED = re.compile(r"\] Worker group (FAILED|UNHEALTHY)\b")
TORCHRUN_RENDEZVOUS = re.compile(r"\] Rendezvous complete for workers")
GLOG = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)(\.\d+)? ")


def glog_time(line: str, near: float) -> float | None:
    """The Unix time of a glog-prefixed line (local time, no year: the year of `near`, the
    line's approximate time, taken within a day of it across a new year); None without one."""
    m = GLOG.match(line)
    if m is None:
        return None
    month, day, hh, mm, ss = (int(g) for g in m.groups()[:5])
    frac = float(m.group(6) or 0.0)
    year = time.localtime(near).tm_year
    best = None
    for y in (year - 1, year, year + 1):
        try:
            t = time.mktime((y, month, day, hh, mm, ss, 0, 0, -1)) + frac
        except (OverflowError, ValueError):
            continue
        if best is None or abs(t - near) < abs(best - near):
            best = t
    return best


def stamped(lines: Iterable[tuple[float, str]]) -> list[tuple[float, str]]:
    """(time, line) with each line's own glog time where it has one, else its arrival time."""
    return [(glog_time(line, arrived) or arrived, line) for arrived, line in lines]


def first_after(records: Iterable[tuple[float, Any]], t: float, match=lambda _v: True) -> float | None:
    """The earliest time after `t` of a record whose value matches."""
    times = [rt for rt, value in records if rt > t and match(value)]
    return min(times) if times else None


def daemon_marks(kill: float, events: Iterable[Mapping[str, Any]], generation_at_kill: int) -> dict[str, float | None]:
    """detected and rendezvous from the daemon's job events (dicts of time, kind, generation)."""
    events = list(events)
    detected = first_after(((e["time"], e) for e in events), kill, lambda e: e["kind"] == "node")
    rendezvous = first_after(((e["time"], e) for e in events), kill,
                             lambda e: e["kind"] == "generation" and e["generation"] > generation_at_kill)
    return {"detected": detected, "rendezvous": rendezvous}


def torchrun_marks(kill: float, lines: Iterable[tuple[float, str]]) -> dict[str, float | None]:
    """detected and rendezvous from the surviving agent's log lines, (arrival time, line)."""
    lines = stamped(lines)
    detected = first_after(lines, kill, lambda line: bool(TORCHRUN_FAILED.search(line)))
    rendezvous = None
    if detected is not None:
        # The rendezvous of the restart, not the one the job started with.
        rendezvous = first_after(lines, detected, lambda line: bool(TORCHRUN_RENDEZVOUS.search(line)))
    return {"detected": detected, "rendezvous": rendezvous}


def workload_marks(kill: float, timeline: Iterable[Mapping[str, Any]], world_size: int) -> dict[str, float | None]:
    """imported, python_started and first_step of the new rank 0: the first process after the
    kill to complete a step at `world_size`, and that same process's import records."""
    timeline = list(timeline)
    firsts = [r for r in timeline if r["event"] == "first_step" and r["time"] > kill
              and r["world_size"] == world_size]
    if not firsts:
        return {"imported": None, "python_started": None, "first_step": None}
    first = min(firsts, key=lambda r: r["time"])
    imports = [r for r in timeline if r["event"] == "imported" and r["pid"] == first["pid"]
               and r["time"] > kill]
    imported = min(imports, key=lambda r: r["time"]) if imports else None
    return {
        "imported": imported["time"] if imported else None,
        "python_started": imported.get("python_started") if imported else None,
        "first_step": first["time"],
    }


def runtime_marks(kill: float, events: Iterable[Mapping[str, Any]], world_size: int) -> dict[str, float | None]:
    """process_group and restored from the runtime's events: the first `restored` at
    `world_size` after the kill, and the last `ready` between the kill and it."""
    events = list(events)
    restored = first_after(((e["time"], e) for e in events), kill,
                           lambda e: e["event"] == "restored" and e.get("world_size") == world_size)
    ready = [e["time"] for e in events if e["event"] == "ready" and e["time"] > kill
             and (restored is None or e["time"] <= restored)]
    return {"process_group": max(ready) if ready else None, "restored": restored}


def phases(kill: float, marks: Mapping[str, float | None]) -> dict[str, float | None]:
    """Each mark as seconds after the kill (None where the signal was not seen), rounded to
    the millisecond; marks beyond PHASES (python_started) are kept after them."""
    names = [*PHASES, *(k for k in marks if k not in PHASES)]
    return {name: (None if marks.get(name) is None else round(marks[name] - kill, 3))
            for name in names}


def out_of_order(p: Mapping[str, float | None]) -> list[str]:
    """Phases seen before one that must precede them (a sign of a misread signal), as
    "a<b" strings; old_stopped and rendezvous may come in either order."""
    chain = ["detected", "rendezvous", "imported", "process_group", "restored", "first_step"]
    seen = [(n, p[n]) for n in chain if p.get(n) is not None]
    return [f"{a}<{b}" for (a, ta), (b, tb) in zip(seen, seen[1:], strict=False) if tb < ta]
