"""A chaos soak on the fault lab: the tiny job, elastic between 2 and 4 hosts, through a seeded
schedule of faults of every kind, then to the end; then every invariant is checked.

The daemon and S3 (moto behind the fault proxy) run on the lab's head host, one agent on each
of four worker hosts (see spotwise.cloud.labfleet). The schedule (spotwise.cloud.chaos) has
`--faults` faults (default 60: at least 10 daemon kills and 10 partitions among them). Once it
is applied the job runs to its last step, and the checker verifies: no job lost; every sample
once per epoch in the committed history; no restore of a torn, fenced or uncommitted
checkpoint; no commit by a stale generation; no two generations stepping at once; no process
left on any host; the final loss within 1e-4 relative of an uninterrupted run (one process,
same seed and global batch, run first).

Writes bench/results/chaos.json: seed, faults_applied and by kind, invariants_checked,
violations (each described), wall_s, uninterrupted_wall_s and their ratio. Needs root and the
lab's tools (`make setup-lab`). A failing seed reproduces:

    python bench/chaos.py --seed 7            # 60 faults, several minutes
    python bench/chaos.py --seed 7 --faults 9 --steps 150
    python bench/chaos.py --seed 11 --faults 9 --steps 100 --workers 3 --gap-s 1 3  # make test's

Each fault is held 2-6 s and followed by a quiet gap of 2-6 s (`--gap-s`); the JSON records the
gap range and the whole schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spotwise.client import state_name  # noqa: E402
from spotwise.cloud.chaos import GAP_S, apply, check, faults_json, schedule  # noqa: E402
from spotwise.cloud.labfleet import BUCKET, LabFleet  # noqa: E402
from spotwise.cloud.netlab import Lab  # noqa: E402

DATASET, BATCH, MICRO = 1000, 24, 2
"""1,000 samples: the tiny model cannot memorize them in 600 steps, so the final loss stays at
the data's noise (about 0.01). On 100 it falls to about 1e-6, where summing a batch over 2
ranks instead of 1 alone moves it by 9e-4 relative (measured without any fault), and the 1e-4
comparison with the uninterrupted run would test rounding, not the restored state."""


def _train_args(steps: int, seed: int, ledger: Path, loss_log: Path) -> list[str]:
    return ["tests/workloads/tiny_train.py", "--steps", str(steps), "--global-batch-size",
            str(BATCH), "--micro-batch-size", str(MICRO), "--dataset-size", str(DATASET),
            "--seed", str(seed), "--step-sleep", "0.05", "--ledger", str(ledger),
            "--loss-log", str(loss_log)]


def _final_loss(loss_log: Path, steps: int) -> float | None:
    """The loss of the last step as last recorded (a replayed step's last run is the one in
    the committed history)."""
    last = None
    for line in loss_log.read_text().splitlines() if loss_log.exists() else []:
        parts = line.split()
        if len(parts) >= 2 and int(parts[0]) == steps:
            last = float(parts[1])
    return last


def uninterrupted(steps: int, seed: int, work: Path) -> tuple[float | None, float]:
    """One process, same seed and global batch, no faults: (final loss, wall seconds)."""
    loss = work / "reference.loss"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "OMP_NUM_THREADS": "1",
           "SPOTWISE_CHECKPOINT_URI": str(work / "reference-ck")}
    t0 = time.monotonic()
    subprocess.run([sys.executable, *_train_args(steps, seed, work / "reference.ledger", loss)],
                   cwd=REPO, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
    return _final_loss(loss, steps), time.monotonic() - t0


def run(*, seed: int, faults: int, steps: int, workers: int, work: Path,
        gap_s: tuple[float, float] = GAP_S) -> dict:
    ref_loss, ref_wall = uninterrupted(steps, seed, work)
    print(f"the uninterrupted run took {ref_wall:.1f}s", flush=True)
    names = [f"w{i + 1}" for i in range(workers)]
    plan = schedule(seed, faults, names, gap_s=gap_s)
    ledger, loss_log = work / "chaos.ledger", work / "chaos.loss"
    with Lab(["head", *names]) as lab:
        fleet = LabFleet(lab, workdir=work / "fleet", seed=seed).start()
        t0 = time.monotonic()
        job_id = fleet.submit({
            "name": "chaos", "entrypoint": ["python", *_train_args(steps, seed, ledger, loss_log)],
            "working_dir": str(REPO), "nodes": {"min": 2, "max": workers}, "nproc_per_node": 1,
            "checkpoint": {"uri": f"s3://{BUCKET}/chaos", "every_steps": 5, "keep": 5},
            "global_batch_size": BATCH, "total_steps": steps, "max_failures": 10 * faults,
        })
        fleet.wait_job(job_id, lambda j: j.step >= 3, 300, "the first steps")
        print(f"{time.monotonic() - t0:6.1f}s the job steps", flush=True)
        applied: list[str] = []
        for i, fault in enumerate(plan):
            print(f"{time.monotonic() - t0:6.1f}s fault {i + 1}/{len(plan)}: {fault.kind} on "
                  f"{fault.host} for {fault.hold_s}s", flush=True)
            apply(fleet, fault)
            applied.append(fault.kind)
            time.sleep(fault.gap_s)
        during = fleet.wait_job(job_id, lambda _j: True, 30, "the job after the schedule")
        print(f"{time.monotonic() - t0:6.1f}s the schedule is over: {state_name(during.state)} "
              f"at step {during.step}", flush=True)
        job = fleet.wait_job(job_id, lambda j: state_name(j.state) in (
            "SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED"), 1800, "the end of the job")
        wall = time.monotonic() - t0
        print(f"{wall:6.1f}s the job is {state_name(job.state)} at step {job.step}", flush=True)
        # The agents stop a finished job's processes; give them their grace to do it.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(fleet.rank_pids(h) for h in fleet.workers):
            time.sleep(0.5)
        result = check(fleet=fleet, job=job, ledger=ledger, dataset_size=DATASET,
                       global_batch=BATCH, final_loss=_final_loss(loss_log, steps),
                       reference_loss=ref_loss, job_state=state_name(job.state))
    return {
        "seed": seed,
        "faults_applied": len(applied),
        "faults_by_kind": dict(Counter(applied)),
        "gap_s": list(gap_s),
        "step_after_faults": during.step,
        "state_after_faults": state_name(during.state),
        "schedule": faults_json(plan),
        **result,
        "wall_s": round(wall, 1),
        "uninterrupted_wall_s": round(ref_wall, 1),
        "wall_over_uninterrupted": round(wall / ref_wall, 2),
        "generations": job.generation,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", type=int, default=60)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--workers", type=int, default=4, help="worker hosts (the job uses 2 to all)")
    p.add_argument("--gap-s", type=float, nargs=2, default=GAP_S, metavar=("MIN", "MAX"),
                   help="quiet time after each fault, drawn from [MIN, MAX] seconds")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "chaos.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="spotwise-chaos-") as tmp:
        report = run(seed=args.seed, faults=args.faults, steps=args.steps,
                     workers=args.workers, work=Path(tmp), gap_s=tuple(args.gap_s))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for key in ("seed", "faults_applied", "faults_by_kind", "violations", "wall_over_uninterrupted"):
        print(f"{key}: {report[key]}")
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
