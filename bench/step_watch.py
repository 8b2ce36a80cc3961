"""Steps as a benchmark sees them: the workload's loss log and ledger, polled.

`StepWatch` tails the loss log (rank 0 appends `step loss generation` after each step) and the
ledger (each rank's sample ids per step, restores and commits) every 10 ms, so a benchmark knows
when each step completed and at which world size its generation ran.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

GLOBAL_BATCH = 24
"""The benchmarks' global batch: a generation's world size is this over a rank's ids per step."""


@dataclass
class StepWatch:
    """Polls the loss log and the ledger: when each step completed, at which world size."""

    loss_log: Path
    ledger: Path
    completed: list[tuple[float, int, int]] = field(default_factory=list)
    """(monotonic arrival time, step, generation), in arrival order."""
    world_of: dict[int, int] = field(default_factory=dict)
    """generation -> world size."""
    restored: dict[int, int] = field(default_factory=dict)
    """generation -> step it restored from."""
    committed_in: set[int] = field(default_factory=set)
    """Generations that committed a checkpoint."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _offsets: dict[Path, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="step-watch").start()

    def stop(self) -> None:
        self._stop.set()

    def _lines(self, path: Path) -> list[str]:
        try:
            with open(path) as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind("\n") + 1]
        self._offsets[path] = self._offsets.get(path, 0) + len(complete.encode())
        return complete.splitlines()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                for line in self._lines(self.loss_log):
                    step, _loss, gen = line.split()[:3]
                    self.completed.append((now, int(step), int(gen)))
                for line in self._lines(self.ledger):
                    r = json.loads(line)
                    if r["kind"] == "step" and r["generation"] not in self.world_of:
                        self.world_of[r["generation"]] = GLOBAL_BATCH // len(r["ids"])
                    elif r["kind"] == "restored":
                        self.restored[r["generation"]] = r["step"]
                    elif r["kind"] == "committed":
                        self.committed_in.add(r["generation"])
            time.sleep(0.01)

    def last(self) -> tuple[float, int, int] | None:
        with self._lock:
            return self.completed[-1] if self.completed else None

    def world_now(self) -> int:
        last = self.last()
        return self.world_of.get(last[2], 0) if last else 0

    def settled_at(self, world: int) -> bool:
        """The newest step's generation runs at `world` and has committed a checkpoint (its
        first save, which starts the checkpoint writer, is behind it)."""
        last = self.last()
        return (last is not None and self.world_of.get(last[2]) == world
                and last[2] in self.committed_in)

    def first_at_world_after(self, t: float, world: int) -> tuple[float, int, int] | None:
        with self._lock:
            for rec in self.completed:
                if rec[0] > t and self.world_of.get(rec[2]) == world:
                    return rec
        return None


def until(cond, timeout_s: float, what: str, poll_s: float = 0.02):
    """Call `cond` every `poll_s` until it returns something truthy and return that;
    TimeoutError after `timeout_s`. The benchmarks' one wait."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def killpg_quiet(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
