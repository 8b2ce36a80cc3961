"""What a window of a run counts, read from the exactly-once ledger the same way for every system.

Every rank of every system appends to one ledger (spotwise.worker.runtime.ledger): a record per
executed step, and rank 0's restore point and commits. The harness notes the ledger's length
when the window starts and when it ends; records past the end were written after the window
and count for nothing (no exit checkpoint, no late async commit).

- **Committed steps** (the numerator): the steps of the committed history as it stood at the
  window's end (`verify_ledger` of the ledger cut there: the newest commit made inside the
  window and the chain of generations that led to it) that lie past the newest commit as it
  stood at the window's start. Commit-to-commit, so an uninterrupted run counts its rate times
  the window on average, whatever its checkpoint interval.
- **Lost steps**: for every generation that restored inside the window, the steps between
  where the job was (the newest step of the generation that stepped last before it, or the
  step the previous restore went back to if nothing stepped since) and the step it restored: the daemon's rule (`daemon.admission.replayed_after_restore`, the count
  the fault lab checks), applied to the ledger's own records. Steps still uncommitted at the
  window's end are not lost, only not counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from spotwise.daemon.admission import replayed_after_restore
from spotwise.worker.runtime.ledger import verify_ledger


@dataclass(frozen=True, kw_only=True)
class WindowCount:
    """One run's window, from its ledger."""

    committed_steps: int
    """Steps of the committed history at the window's end past the commit at its start."""
    start_commit: int
    """The newest committed step when the window started."""
    end_commit: int
    """The newest committed step when the window ended."""
    lost_steps: int
    """Steps replayed because a generation that restored inside the window went back."""
    restores: list[tuple[int, int, int]]
    """(generation, step restored, steps lost) of each restore inside the window."""
    generations: int
    """Generations that stepped inside the window."""
    executed_steps: int
    """Step records (one per step and generation, ranks merged) written inside the window."""


def ledger_length(path: Path) -> int:
    """The ledger's length in bytes now (0 before its first record)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def read_records(path: Path, end: int, start: int = 0) -> list[dict]:
    """The whole records between byte offsets `start` and `end` (a record cut by `end` is
    left out: it was still being written)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(max(0, end - start))
    except FileNotFoundError:
        return []
    cut = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:cut].splitlines() if line.strip()]


def _committed_at(path: Path, end: int, *, dataset_size: int, global_batch: int) -> int:
    """The newest step of the committed history in the ledger cut at `end` (0 if no commit),
    checked exactly-once."""
    records = read_records(path, end)
    if not any(r["kind"] == "committed" for r in records):
        return 0
    cut = path.with_name(path.name + f".cut{end}")
    cut.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        return verify_ledger(str(cut), dataset_size=dataset_size,
                             global_batch_size=global_batch).final_step
    finally:
        cut.unlink()


def unsaved_at(path: Path, offset: int, *, dataset_size: int, global_batch: int) -> int:
    """Steps run past the newest commit, in the ledger cut at `offset`: what a removal of every
    node at that moment loses, however long the restore takes to come (0 before any step)."""
    committed = _committed_at(path, offset, dataset_size=dataset_size, global_batch=global_batch)
    newest, current = 0, None
    for r in read_records(path, offset):
        if r["kind"] == "step":
            newest = r["step"] if r["generation"] != current else max(newest, r["step"])
            current = r["generation"]
        elif r["kind"] == "restored":
            newest, current = r["step"], r["generation"]
    return max(0, newest - committed)


def training_state(path: Path) -> tuple[int, int, int, bool]:
    """(generation, ranks, newest step, whether it committed) of the generation that stepped
    last, from the ledger as it is now ((-1, 0, 0, False) before any step): a harness waits
    for its job to train at full size with a commit before it starts the clock."""
    gen, ranks, step, committed = -1, set(), 0, set()
    for r in read_records(path, ledger_length(path)):
        if r["kind"] == "step":
            if r["generation"] != gen:
                gen, ranks, step = r["generation"], set(), 0
            ranks.add(r["rank"])
            step = max(step, r["step"])
        elif r["kind"] == "committed":
            committed.add(r["generation"])
    return gen, len(ranks), step, gen in committed


def count_window(path: Path, start: int, end: int, *, dataset_size: int,
                 global_batch: int) -> WindowCount:
    """The window between ledger offsets `start` and `end` (see the module docstring).
    Raises LedgerError if the committed history at either end reads a sample twice."""
    start_commit = _committed_at(path, start, dataset_size=dataset_size, global_batch=global_batch)
    end_commit = _committed_at(path, end, dataset_size=dataset_size, global_batch=global_batch)
    where, current = 0, None  # the step the job was at, and the generation that took it there
    restores: list[tuple[int, int, int]] = []
    stepped: set[tuple[int, int]] = set()
    for inside, records in ((False, read_records(path, start)),
                            (True, read_records(path, end, start))):
        for r in records:
            if r["kind"] == "step":
                where = r["step"] if r["generation"] != current else max(where, r["step"])
                current = r["generation"]
                if inside:
                    stepped.add((r["generation"], r["step"]))
            elif r["kind"] == "restored":
                _, lost = replayed_after_restore(step_before=where, restored_step=r["step"],
                                                 lost_total=0, lost_this_generation=0)
                if inside:
                    restores.append((r["generation"], r["step"], lost))
                where, current = r["step"], r["generation"]
    return WindowCount(
        committed_steps=max(0, end_commit - start_commit), start_commit=start_commit,
        end_commit=end_commit, lost_steps=sum(lost for _, _, lost in restores),
        restores=restores, generations=len({g for g, _ in stepped}),
        executed_steps=len(stepped))
