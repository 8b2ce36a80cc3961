"""A seeded schedule of faults for the lab, how to apply each, and the invariants checked after.

`schedule(seed, count, workers)` is pure: the same seed gives the same faults, in the same order,
on the same hosts, with the same durations, so a failing seed reproduces from the command line
(`python bench/chaos.py --seed N`). Every kind appears at least once; daemon kills and
partitions are weighted so that a long schedule has at least 10 of each (`MIN_COUNTS`).

`check(...)` verifies, from the ledger, the events files, the job's final view and the hosts'
process tables, the invariants of DESIGN.md and returns every violation it found, described.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spotwise.cloud.labfleet import LabFleet
from spotwise.cloud.netlab import kill9
from spotwise.cloud.s3_faults import set_rates
from spotwise.worker.runtime.ledger import LedgerError, verify_ledger

KINDS = ("kill_rank", "kill_agent", "kill_daemon", "pause_host", "link_down", "cut_from_head",
         "cut_workers", "slow_s3_link", "s3_errors")
PARTITIONS = ("link_down", "cut_from_head", "cut_workers")
MIN_COUNTS = {"kill_daemon": 10, "partition": 10}
"""In a schedule of at least 60 faults: daemon kills, and partitions of any kind."""


@dataclass(frozen=True)
class Fault:
    """One fault of a schedule."""

    kind: str
    """One of KINDS."""
    host: str
    """The worker host it hits (the second host too for cut_workers: "w1+w3")."""
    hold_s: float
    """How long it lasts before it is undone (pauses, partitions, slow links, S3 errors)."""
    gap_s: float
    """Quiet time after it is undone, before the next fault."""


GAP_S = (2.0, 6.0)
"""Quiet time after each fault, drawn uniformly from this range (seconds)."""


def schedule(seed: int, count: int, workers: list[str], *,
             gap_s: tuple[float, float] = GAP_S) -> list[Fault]:
    """`count` faults (>= len(KINDS)) over `workers` (>= 2 host names), seeded; each hold
    2-6 s, each gap drawn from `gap_s`."""
    if count < len(KINDS):
        raise ValueError(f"a schedule needs at least {len(KINDS)} faults (one of each kind)")
    if len(workers) < 2:
        raise ValueError("a schedule needs at least two worker hosts")
    rng = random.Random(seed)
    kinds = list(KINDS)
    if count >= 60:
        kinds += ["kill_daemon"] * (MIN_COUNTS["kill_daemon"] - 1)
        kinds += [PARTITIONS[i % 3] for i in range(MIN_COUNTS["partition"] - 1)]
    while len(kinds) < count:
        kinds.append(rng.choice(KINDS))
    rng.shuffle(kinds)
    out = []
    for kind in kinds[:count]:
        a, b = rng.sample(workers, 2)
        out.append(Fault(kind=kind, host=f"{a}+{b}" if kind == "cut_workers" else a,
                         hold_s=round(rng.uniform(2.0, 6.0), 2), gap_s=round(rng.uniform(*gap_s), 2)))
    return out


def apply(fleet: LabFleet, fault: Fault) -> None:
    """Apply `fault`, hold it, undo it (a killed agent is started again, as systemd would; a
    killed daemon too). Blocks for about hold_s."""
    hosts = fleet.lab.hosts
    first = hosts[fault.host.split("+")[0]]
    if fault.kind == "kill_rank":
        pids = fleet.rank_pids(first)
        if pids:
            kill9(pids[0])
        time.sleep(fault.hold_s)
    elif fault.kind == "kill_agent":
        fleet.kill_agent(first)
        time.sleep(fault.hold_s)
        fleet.start_agent(first)
    elif fault.kind == "kill_daemon":
        fleet.kill_daemon()
        time.sleep(fault.hold_s)
        fleet.start_daemon()
    elif fault.kind == "pause_host":
        first.pause(fault.hold_s).join(fault.hold_s + 5)
    elif fault.kind == "link_down":
        first.link_down()
        time.sleep(fault.hold_s)
        first.link_up()
    elif fault.kind == "cut_from_head":
        first.cut_from(fleet.head)
        time.sleep(fault.hold_s)
        first.heal()
    elif fault.kind == "cut_workers":
        second = hosts[fault.host.split("+")[1]]
        first.cut_from(second)
        second.cut_from(first)
        time.sleep(fault.hold_s)
        first.heal()
        second.heal()
    elif fault.kind == "slow_s3_link":
        first.limit_bandwidth(fleet.head, fleet.s3_port, "2mbit")
        time.sleep(fault.hold_s)
        first.heal()
    elif fault.kind == "s3_errors":
        set_rates(fleet.s3_url, error_rate=0.3, timeout_rate=0.05, timeout_s=2.0)
        time.sleep(fault.hold_s)
        set_rates(fleet.s3_url, error_rate=0.0, timeout_rate=0.0)
    else:
        raise ValueError(f"unknown fault kind {fault.kind!r}")


def _step_times(log_dir: Path, job_id: str) -> dict[int, tuple[float, float]]:
    """generation -> (first, last) time a rank of it reported a step (progress events)."""
    spans: dict[int, list[float]] = defaultdict(list)
    for events in log_dir.glob(f"*/{job_id}/g*/rank*.events.jsonl"):
        for e in _events(events):
            if e.get("event") == "progress":
                spans[int(e["generation"])].append(float(e["time"]))
    return {g: (min(ts), max(ts)) for g, ts in spans.items()}


def _restores(log_dir: Path, job_id: str) -> dict[int, tuple[int, int | None]]:
    """generation -> (step, generation of the commit) of its rank 0's restored event."""
    out = {}
    for events in log_dir.glob(f"*/{job_id}/g*/rank0.events.jsonl"):
        for e in _events(events):
            if e.get("event") == "restored":
                out[int(e["generation"])] = (int(e["step"]), e.get("from_generation"))
    return out


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill -9
    return out


def check(*, fleet: LabFleet, job: Any, ledger: Path, dataset_size: int, global_batch: int,
          final_loss: float | None, reference_loss: float | None, job_state: str) -> dict[str, Any]:
    """Every invariant, checked; returns {"invariants_checked": [...], "violations": [...]}."""
    checked: list[str] = []
    violations: list[str] = []

    checked.append("no job lost")
    if job_state != "SUCCEEDED":
        violations.append(f"job {job.id} ended {job_state}: {job.message}")

    checked.append("every sample once per epoch in the committed history")
    records = [json.loads(x) for x in ledger.read_text().splitlines() if x.strip()]
    try:
        verify_ledger(str(ledger), dataset_size=dataset_size, global_batch_size=global_batch)
    except LedgerError as exc:
        violations.append(f"ledger: {exc}")

    checked.append("no restore of a torn, fenced or uncommitted checkpoint")
    committed_steps = {r["step"] for r in records if r["kind"] == "committed"}
    for r in records:
        if r["kind"] == "restored" and r["step"] > 0 and r["step"] not in committed_steps:
            violations.append(f"generation {r['generation']} restored step {r['step']}, never committed")

    checked.append("no commit by a stale generation")
    # Restore takes the newest visible commit, so if generation h (g < h) restored step r_h,
    # every commit of g above r_h was made after h chose: one that a later generation k
    # restores from is a stale generation's commit made visible.
    restores = _restores(fleet.workdir / "logs", job.id)  # k -> (step, from_generation)
    for k, (step, g) in restores.items():
        if g is None:
            continue
        for h, (r_h, _) in restores.items():
            if g < h < k and r_h < step:
                violations.append(f"generation {k} restored step {step} of generation {g}, "
                                  f"committed after generation {h} restored step {r_h}")

    checked.append("no two generations stepping at once")
    spans = sorted(_step_times(fleet.workdir / "logs", job.id).items())
    for (g1, (_a1, b1)), (g2, (a2, _b2)) in zip(spans, spans[1:], strict=False):
        if a2 < b1:
            violations.append(f"generations {g1} and {g2} both stepped between {a2:.2f} and {b1:.2f}")

    checked.append("no process left on any host")
    for host in fleet.workers:
        left = fleet.rank_pids(host)
        if left:
            violations.append(f"{host.name}: training processes {left} still running")

    checked.append("final loss within 1e-4 of an uninterrupted run")
    if final_loss is None or reference_loss is None:
        violations.append(f"no final loss to compare (chaos {final_loss}, reference {reference_loss})")
    elif abs(final_loss - reference_loss) > 1e-4 * max(abs(reference_loss), 1e-12):
        violations.append(f"final loss {final_loss!r} vs uninterrupted {reference_loss!r}")
    return {"invariants_checked": checked, "violations": violations}


def faults_json(faults: list[Fault]) -> list[dict[str, Any]]:
    return [asdict(f) for f in faults]
