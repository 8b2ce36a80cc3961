"""An audit trail of which sample ids each step read, and the exactly-once check over it.

Every rank appends one record per executed step (committed or not); rank 0 also records where
each generation restored from and every checkpoint it committed. `verify_ledger` rebuilds the
committed history (the chain of generations that led to the newest commit, each contributing
the steps between its restore point and the next generation's) and checks that it reads every
sample exactly once per epoch. It is independent of the sampler: it only counts ids.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


class LedgerError(AssertionError):
    """The committed history does not read every sample exactly once per epoch."""


class Ledger:
    """Append-only JSON-lines writer shared by all ranks (one write() per record)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _write(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record) + "\n").encode())

    def step(self, *, generation: int, step: int, rank: int, ids: Iterable[int]) -> None:
        self._write({"kind": "step", "generation": generation, "step": step, "rank": rank, "ids": [int(i) for i in ids]})

    def restored(self, *, generation: int, step: int) -> None:
        self._write({"kind": "restored", "generation": generation, "step": step})

    def committed(self, *, generation: int, step: int) -> None:
        self._write({"kind": "committed", "generation": generation, "step": step})

    def close(self) -> None:
        os.close(self._fd)


@dataclass(frozen=True)
class LedgerReport:
    """What the committed history looks like."""

    final_step: int
    generations: list[int]
    """The generations of the committed history, oldest first."""
    samples: int
    replayed_steps: int
    """Steps executed but not part of the committed history (lost work)."""


def verify_ledger(path: str, *, dataset_size: int, global_batch_size: int) -> LedgerReport:
    """Raise LedgerError unless the committed history reads each sample once per epoch."""
    # (generation, step) -> rank -> ids; a step's window is the ranks' slices in rank order.
    steps: dict[tuple[int, int], dict[int, list[int]]] = defaultdict(dict)
    restored: dict[int, int] = {}
    committed_by: dict[int, int] = {}  # step -> generation
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r["kind"] == "step":
                steps[(r["generation"], r["step"])][r["rank"]] = r["ids"]
            elif r["kind"] == "restored":
                restored[r["generation"]] = r["step"]
            elif r["kind"] == "committed":
                # Two generations may both commit a step (each under its own key, see
                # spotwise.worker.runtime.fencing: a newer one that restored an older step replays
                # it); restore takes the newer generation's, so the history follows that one.
                committed_by[r["step"]] = max(r["generation"], committed_by.get(r["step"], -1))
    executed = len(steps)
    if not committed_by:
        raise LedgerError("no checkpoint was ever committed")
    final = max(committed_by)
    history: dict[int, list[int]] = {}
    chain = []
    upto, gen = final, committed_by[final]
    while True:
        if gen not in restored:
            raise LedgerError(f"generation {gen} has no restore record")
        start = restored[gen]
        chain.append(gen)
        for s in range(start + 1, upto + 1):
            by_rank = steps.get((gen, s))
            if by_rank is None:
                raise LedgerError(f"step {s} of generation {gen} is in the committed history but was never recorded")
            ids = [i for rank in sorted(by_rank) for i in by_rank[rank]]
            if len(ids) != global_batch_size:
                raise LedgerError(f"step {s} of generation {gen} read {len(ids)} samples, not {global_batch_size}")
            history[s] = ids
        if start == 0:
            break
        if start not in committed_by:
            raise LedgerError(f"generation {gen} restored step {start}, which was never committed")
        upto, gen = start, committed_by[start]
    ordered = [i for s in sorted(history) for i in history[s]]
    for e in range(0, len(ordered), dataset_size):
        epoch = ordered[e : e + dataset_size]
        counts = Counter(epoch)
        dupes = [i for i, c in counts.items() if c > 1]
        if dupes:
            raise LedgerError(f"epoch {e // dataset_size}: samples read more than once: {sorted(dupes)[:10]}")
        if len(epoch) == dataset_size and set(epoch) != set(range(dataset_size)):
            missing = sorted(set(range(dataset_size)) - set(epoch))
            raise LedgerError(f"epoch {e // dataset_size}: samples never read: {missing[:10]}")
    return LedgerReport(
        final_step=final,
        generations=list(reversed(chain)),
        samples=len(ordered),
        replayed_steps=executed - len(history),
    )
