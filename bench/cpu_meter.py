"""Where the CPU goes during a benchmark window: CPU seconds per role read from /proc.

A slowdown measured on a small machine is a claim about contention, so the benchmark says who
took the cycles: the training ranks, their checkpoint writer processes, the S3 stand-in. Each
role is a set of pids; a window's figure is the CPU time (user + system, all threads) those
processes used between `start()` and `stop()`, and its share of the machine's cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc stat file after the command name (which may hold spaces)."""
    try:
        with open(path) as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rfind(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads); None once it is gone."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return None
    # utime and stime are fields 14 and 15 of stat(5); fields[0] here is field 3 (state).
    return (int(fields[11]) + int(fields[12])) * TICK_S


def children_of(parents: Sequence[int]) -> list[int]:
    """Live direct children of the given pids (a rank's DCP writer process among them)."""
    wanted = set(parents)
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(f"/proc/{entry.name}/stat")
            if fields is not None and int(fields[1]) in wanted:
                found.append(int(entry.name))
    return found


def threads(pid: int) -> list[dict]:
    """Each thread of a process: its name, niceness and CPU seconds so far."""
    out = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for tid in tids:
        fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if fields is None:
            continue
        # nice is field 19 of stat(5).
        out.append({"tid": tid, "name": name, "nice": int(fields[16]),
                    "cpu_s": round((int(fields[11]) + int(fields[12])) * TICK_S, 3)})
    return out


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, any process), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # guest time is already counted in user; the first 8 fields are the whole of it.
    return (sum(fields[:8]) - idle) * TICK_S


@dataclass
class CpuWindow:
    """CPU seconds per role over one window; roles are re-resolved at start and stop (a
    writer process may appear in between); a process that exits inside the window is left out
    (the benchmark's processes live through every window it meters)."""

    roles: Mapping[str, Callable[[], Sequence[int]]]
    """role -> a function returning the pids in that role now."""
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    """The machine's cores, the denominator of each share."""
    _t0: float = 0.0
    _busy0: float = 0.0
    _first: dict[str, dict[int, float]] = field(default_factory=dict)

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for role, pids in self.roles.items():
            out[role] = {pid: s for pid in pids() if (s := cpu_seconds(pid)) is not None}
        return out

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._busy0 = machine_busy_seconds()
        self._first = self._read()

    def stop(self) -> dict[str, float]:
        """`wall_s`, per role `<role>_cpu_s` and `<role>_share` (of all the cores), and
        `others_cpu_s` / `others_share`: what processes outside every role took (on a shared
        machine, the reason a figure cannot be trusted)."""
        wall = time.perf_counter() - self._t0
        last = self._read()
        busy = machine_busy_seconds() - self._busy0
        out = {"wall_s": round(wall, 4)}
        ours = 0.0
        for role in self.roles:
            before, after = self._first.get(role, {}), last.get(role, {})
            # A pid seen only at stop started inside the window: all its time counts.
            used = sum(after[p] - before.get(p, 0.0) for p in after)
            ours += used
            out[f"{role}_cpu_s"] = round(used, 4)
            out[f"{role}_share"] = round(used / (wall * self.cores), 4) if wall > 0 else None
        others = max(0.0, busy - ours)
        out["others_cpu_s"] = round(others, 4)
        out["others_share"] = round(others / (wall * self.cores), 4) if wall > 0 else None
        return out
