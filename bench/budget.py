"""Does a job stay within its budget when every second of its machines counts?

    python bench/budget.py [--rounds 3] [--nodes 2] [--budget-s 150] [--out PATH]

Each round starts a real `spotwise daemon --provider local` with its defaults (accounting every
5 s, a 35 s teardown margin, 30 s agent grace), whose local provider runs node agents priced at
the offline table's p3.2xlarge spot price (`local_instance_type = "p3.2xlarge"`). It submits
tests/workloads/tiny_train.py on `--nodes` nodes with a budget worth `--budget-s` seconds of
them, far less than the job would cost. The daemon launches the machines, stops the job when
the budget says so (final checkpoint), and terminates the machines.

The machines' real lifetimes are measured from outside the daemon: the benchmark scans /proc
every 0.1 s for the processes carrying each local node's marker (the agent and its training
processes), from the first scan that shows one to the last. Lifetime x price, summed, is what
the machines really cost; beyond the budget, that is `budget_overspend_usd`. Beside it: what
the daemon charged (GetCost), the teardown (the stop to the last machine gone) against the
margin the stop left, and how much of the budget the margin left unused.

Writes bench/results/budget.json (every round, medians and spreads) and prints `name: value`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step_watch import until  # noqa: E402 - bench/, beside this script

from spotwise.client import Client, state_name  # noqa: E402
from spotwise.cloud.local import scan_marked, stop_process_group  # noqa: E402
from spotwise.cloud.pricing import load_offline_table  # noqa: E402
from spotwise.config import DaemonConfig  # noqa: E402

INSTANCE_TYPE = "p3.2xlarge"
SCAN_S = 0.1
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED")


@dataclass
class Round:
    """One run's figures (USD and seconds)."""

    budget_usd: float
    state: str
    charged_usd: float
    """What the daemon charged the job (GetCost), after its last machine was gone."""
    real_cost_usd: float
    """The machines' measured lifetimes x price."""
    budget_overspend_usd: float
    """max(0, real cost - budget)."""
    charged_minus_real_usd: float
    """How far the daemon's charge is from the real cost (positive: it errs high)."""
    unused_budget_usd: float
    """Budget left when the last machine was gone (the margin's price)."""
    teardown_s: float
    """From the budget stop to the last machine gone."""
    margin_s: float
    """The teardown margin the daemon's stop left (its config, or the longest it measured)."""
    lifetimes_s: dict[str, float]
    wall_s: float


class Lifetimes:
    """Scans /proc for the processes of a local provider's nodes (its marker prefix) and keeps
    each node's first and last sighting."""

    def __init__(self, cluster: str) -> None:
        self.prefix = cluster + "/"
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lifetimes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for value in scan_marked(self.prefix).values():
                handle = value[len(self.prefix):]
                self.first.setdefault(handle, now)
                self.last[handle] = now
            self._stop.wait(SCAN_S)

    def live(self) -> bool:
        return bool(scan_marked(self.prefix))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=10)
        return {h: self.last[h] - self.first[h] for h in sorted(self.first)}


def run_round(nodes: int, budget_s: float, log: Callable[[str], None]) -> Round:
    price = load_offline_table().spot_price(INSTANCE_TYPE)
    assert price is not None
    budget = round(nodes * price * budget_s / 3600.0, 6)
    tmp = Path(tempfile.mkdtemp(prefix="spotwise-budget-"))
    state_dir = tmp / "state"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir), OMP_NUM_THREADS="1",
               SPOTWISE_DAEMON_LOCAL_INSTANCE_TYPE=INSTANCE_TYPE,
               SPOTWISE_DAEMON_LOCAL_MAX_NODES=str(nodes))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    daemon_log = tmp / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
         "--state-dir", str(state_dir), "--provider", "local"],
        stdout=subprocess.DEVNULL, stderr=open(daemon_log, "wb"), env=env, cwd=ROOT,
        start_new_session=True)
    # The daemon's local provider marks its nodes' processes with its log dir.
    lifetimes = Lifetimes(str((state_dir / "logs").absolute()))
    t0 = time.monotonic()
    try:
        address = until(lambda: (m := re.search(r"daemon serving on (\S+)",
                                                 daemon_log.read_text())) and m.group(1),
                         60, "the daemon")
        with Client(str(address), timeout=10) as client:
            job_id = client.submit({
                "name": "budget",
                "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", "1000000",
                               "--step-sleep", "0.1", "--dataset-size", "960",
                               "--global-batch-size", "24", "--micro-batch-size", "4"],
                "working_dir": str(ROOT),
                "nodes": {"min": nodes, "max": nodes},
                "checkpoint": {"uri": str(tmp / "ck"), "every_steps": 50, "keep": 2},
                "global_batch_size": 24,
                "total_steps": 1000000,
                "budget_usd": budget,
            })
            job = until(lambda: (j := client.get(job_id)) and state_name(j.state) in TERMINAL
                         and j, budget_s * 3 + 120, "the budget stop", poll_s=0.5)
            stopped_at = time.time()
            until(lambda: not lifetimes.live(), 120, "the machines to be gone")
            gone_at = max(lifetimes.last.values(), default=stopped_at)
            # The daemon sees them gone at its next fleet listing; then its charge is final.
            fleet_s = DaemonConfig.model_fields["fleet_interval_s"].default
            time.sleep(2 * fleet_s + 1.0)
            charged = client.cost(job_id).spent_usd
            events = client.history(job_id, quiet_s=2.0, timeout=30.0)
            stop_times = [e.time for e in events if e.kind == "state"
                          and e.message.startswith("BUDGET_EXHAUSTED")]
            stop_t = stop_times[0] if stop_times else stopped_at
            margin = re.search(r"teardown \((\d+(?:\.\d+)?) s\)", job.message)
    finally:
        stop_process_group(daemon)
        lives = lifetimes.stop()
    real = sum(lives.values()) * price / 3600.0
    result = Round(
        budget_usd=budget, state=state_name(job.state), charged_usd=round(charged, 6),
        real_cost_usd=round(real, 6), budget_overspend_usd=round(max(0.0, real - budget), 6),
        charged_minus_real_usd=round(charged - real, 6),
        unused_budget_usd=round(max(0.0, budget - real), 6),
        teardown_s=round(gone_at - stop_t, 2),
        margin_s=float(margin.group(1)) if margin else float("nan"),
        lifetimes_s={h: round(v, 2) for h, v in lives.items()},
        wall_s=round(time.monotonic() - t0, 1))
    log(f"  round: {result.state}, real ${result.real_cost_usd:.6f} of ${budget:.6f}, charged "
        f"${result.charged_usd:.6f}, teardown {result.teardown_s:.1f} s (margin "
        f"{result.margin_s:g} s), lifetimes {result.lifetimes_s}")
    return result


def summary(values: list[float]) -> dict[str, float]:
    """Median and spread (min, max) of one figure over the rounds."""
    return {"median": round(statistics.median(values), 6), "min": round(min(values), 6),
            "max": round(max(values), 6)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="the budget, in seconds of all the job's nodes (default 150)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "budget.json")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.nodes < 1 or args.budget_s <= 0:
        ap.error("--rounds and --nodes must be >= 1 and --budget-s > 0")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rounds = []
    for i in range(args.rounds):
        log(f"round {i + 1}/{args.rounds}")
        rounds.append(run_round(args.nodes, args.budget_s, log))
    figures = ("budget_overspend_usd", "real_cost_usd", "charged_usd", "charged_minus_real_usd",
               "unused_budget_usd", "teardown_s")
    medians = {f: summary([getattr(r, f) for r in rounds]) for f in figures}
    defaults = DaemonConfig()
    out = {
        "setup": {
            "rounds": args.rounds, "nodes": args.nodes, "budget_s": args.budget_s,
            "instance_type": INSTANCE_TYPE,
            "usd_per_hour": load_offline_table().spot_price(INSTANCE_TYPE),
            "price_source": load_offline_table().source,
            "daemon": "spotwise daemon --provider local, defaults: accounting_interval_s="
                      f"{defaults.accounting_interval_s:g}, budget_teardown_s="
                      f"{defaults.budget_teardown_s:g}, grace_s={defaults.grace_s:g}, "
                      f"fleet_interval_s={defaults.fleet_interval_s:g}",
            "overrides": {"local_instance_type": INSTANCE_TYPE, "local_max_nodes": args.nodes},
            "lifetime_scan_s": SCAN_S,
            "lifetime_note": "first to last /proc sighting of a node's processes: errs low by "
                             "at most one scan at each end",
        },
        "rounds": [asdict(r) for r in rounds],
        "summary": medians,
        "targets": {"budget_overspend_usd": {"target": "0 (median)",
                                             "holds": medians["budget_overspend_usd"]["median"]
                                             == 0.0}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for f in figures:
        print(f"{f}: {medians[f]['median']} (min {medians[f]['min']}, max {medians[f]['max']})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
