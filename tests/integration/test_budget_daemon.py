"""A budget set below a job's cost, watched to stop in time: a real daemon (in-process, gRPC on
port 0), a real local agent subprocess launched by the fleet, tests/workloads/tiny_train.py on
the real runtime. The node is a "g4dn.xlarge" with no price of its own, so it is charged at the
price book's spot price (the shipped offline table: this daemon prices offline).

Checks: BUDGET_EXHAUSTED where the spend plus the teardown margin reaches the budget; the final
checkpoint (SIGTERM -> checkpoint -> exit 143) is committed after the stop; the node is kept
while it takes it and then terminated, and charged until the provider no longer lists it, so
the final spend covers the wind-down and stays within the budget; `spotwise cost JOB` prints
the same spend, rate, projection, budget and savings as GetCost.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from spotwise.client import Client, state_name
from spotwise.cloud.local import LocalProvider
from spotwise.cloud.pricing import load_offline_table
from spotwise.config import DaemonConfig
from spotwise.daemon.server import DaemonThread
from spotwise.live import money
from spotwise.proto.v1 import jobs_pb2
from tests.support.wait import until as _until

REPO = Path(__file__).resolve().parents[2]
OFFLINE = load_offline_table()
SPOT_USD_PER_HOUR = OFFLINE.spot_price("g4dn.xlarge")
OD_USD_PER_HOUR = OFFLINE.on_demand["g4dn.xlarge"]
TICK_S = 0.5
TEARDOWN_S = 10.0
"""The budget stop's margin: the final checkpoint of the tiny job, the agent's stop and the
local provider's termination take a few seconds here."""


def _cli_cost(address: str, job_id: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "spotwise.cli", "--address", address, "cost", job_id],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = {}
    for line in out.stdout.splitlines():
        label, _, value = line.partition(":")
        rows[label.strip()] = value.strip()
    return rows


@pytest.mark.slow
def test_a_budget_below_the_jobs_cost_stops_it_in_time_with_a_final_checkpoint(tmp_path: Path) -> None:
    rate_per_s = SPOT_USD_PER_HOUR / 3600
    # The machine is charged from its launch: its boot (agent start, imports) takes a good
    # part of the budget on a loaded machine.
    budget = round(rate_per_s * (TEARDOWN_S + 30.0), 8)  # about 40 seconds of one node
    # The lease is long: no node is meant to be lost here, and on a loaded CI machine (the
    # whole suite on 2 cores) a 5 s lease once expired before the final checkpoint was reported;
    # the lost node's checkpoint report was then fenced, as it must be.
    config = DaemonConfig(listen="127.0.0.1:0", agent_prices=True, state_dir=tmp_path / "state", heartbeat_interval_s=0.2,
                          lease_s=20.0, settle_s=0.2, accounting_interval_s=TICK_S,
                          fleet_interval_s=0.5, restart_grace_s=5.0,
                          budget_teardown_s=TEARDOWN_S)
    assert config.pricing_offline
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    provider = LocalProvider(log_dir=tmp_path / "logs", cluster=f"budget-{uuid.uuid4().hex[:8]}",
                             grace_s=20.0, env=env, max_nodes=1, instance_type="g4dn.xlarge",
                             cwd=str(REPO))
    try:
        with DaemonThread(config, provider=provider) as daemon, Client(daemon.address, timeout=10) as client:
            job_id = client.submit({
                "name": "over-budget",
                "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", "100000",
                               "--step-sleep", "0.05", "--dataset-size", "96"],
                "working_dir": str(REPO),
                "checkpoint": {"uri": str(tmp_path / "ckpt"), "every_steps": 100000, "keep": 2},
                "global_batch_size": 24,
                "budget_usd": budget,
                "total_steps": 100000,
            })
            _until(lambda: client.get(job_id).step > 5, 60, "training steps")

            # While it runs: the CLI shows what GetCost shows.
            before = client.cost(job_id)
            rows = _cli_cost(daemon.address, job_id)
            after = client.cost(job_id)
            assert before.rate_usd_per_hour == pytest.approx(SPOT_USD_PER_HOUR)
            assert before.price_source == OFFLINE.source == rows["price source"]
            assert rows["rate"] == f"{money(before.rate_usd_per_hour)}/h"
            assert rows["budget"] == money(budget)
            spent = float(rows["spent"].lstrip("$"))
            assert round(before.spent_usd, 4) <= spent <= round(after.spent_usd, 4)
            projected = float(rows["projected"].lstrip("$").replace(",", ""))
            assert projected > budget and before.projected_usd > budget  # 100000 steps won't fit
            # savings against on-demand: the spot discount of the table
            discount = round(100 * (1 - SPOT_USD_PER_HOUR / OD_USD_PER_HOUR))
            assert rows["savings"].endswith(f"({discount}%)")
            assert after.on_demand_equivalent_usd == pytest.approx(
                after.spent_usd * OD_USD_PER_HOUR / SPOT_USD_PER_HOUR, rel=1e-6)

            job = _until(lambda: (j := client.get(job_id)).state == jobs_pb2.JOB_STATE_BUDGET_EXHAUSTED
                         and j, 60, "BUDGET_EXHAUSTED")
            one_tick = rate_per_s * TICK_S
            margin = rate_per_s * TEARDOWN_S
            # It stopped where one more tick and the teardown would pass the budget (a late
            # tick on a loaded machine may add one), not earlier.
            assert job.cost_usd <= budget - margin + 2 * one_tick, (job.cost_usd, budget, one_tick)
            assert job.cost_usd > budget - margin - 2 * one_tick
            assert "budget" in job.message and f"teardown ({TEARDOWN_S:g} s)" in job.message

            # The final checkpoint: the agent SIGTERMs the rank, which commits and exits 143.
            final = _until(lambda: (j := client.get(job_id)).last_checkpoint_step > 0 and j, 40,
                           "the final checkpoint")
            assert list((tmp_path / "ckpt" / job_id).iterdir())

            def kinds() -> list[str]:
                events = daemon.call(lambda: [(e.kind, e.message)
                                              for e in daemon.daemon.store.events(job_id)])
                return [k if k != "state" else m.split(":")[0] for k, m in events]

            # The stored history shows it after the stop (events reach SQLite in batches, a
            # moment after the job's state in memory).
            stored = _until(lambda: (k := kinds()) and "BUDGET_EXHAUSTED" in k
                            and "checkpoint" in k[k.index("BUDGET_EXHAUSTED"):] and k, 10,
                            "the final checkpoint's event")
            assert "checkpoint" not in stored[:stored.index("BUDGET_EXHAUSTED")]  # every_steps is huge
            assert state_name(final.state) == "BUDGET_EXHAUSTED"

            # The node was kept for that checkpoint, then the fleet terminates it; it is
            # charged until the fleet's next listing no longer shows it.
            _until(lambda: not provider.list_nodes(), 40, "the fleet to terminate the node")
            teardowns = _until(lambda: daemon.call(
                lambda: list(daemon.daemon.coordinator.billing.teardowns)), 20,
                "the daemon to see the machine gone")
            ended = client.cost(job_id)
            assert ended.rate_usd_per_hour == 0
            # The wind-down was paid for: the spend at the stop plus the teardown measured.
            assert ended.spent_usd > job.cost_usd
            # (within the fleet's listing interval and an accounting tick or two, loaded)
            assert ended.spent_usd == pytest.approx(job.cost_usd + rate_per_s * teardowns[0],
                                                    abs=rate_per_s * 3.0)
            # The margin held: the last machine was gone before the budget ran out.
            assert teardowns[0] < TEARDOWN_S, teardowns
            assert ended.spent_usd <= budget + 2 * one_tick, (ended.spent_usd, budget)

            rows = _cli_cost(daemon.address, job_id)
            assert rows["spent"] == money(ended.spent_usd) and rows["rate"] == "$0.0000/h"
            assert rows["projected"] == money(ended.spent_usd)
            assert rows["savings"].startswith(money(ended.savings_usd))
    finally:
        provider.shutdown()
