"""The budget policy driven through a real spot trace: the spend stops within one tick of the cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotwise.cloud.trace import ReplayConfig, load_trace, replay_schedule
from spotwise.daemon.budget import BudgetAction, BudgetJob, Growth, Ledger, NodePrice, plan_budget

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
AVAILABILITY = TRACES / "aws-2023-08-27-us-east-2b-p3.2xlarge-16node-availability.json"
SPOT_USD_PER_HOUR = 0.918  # p3.2xlarge spot, roughly
ON_DEMAND_USD_PER_HOUR = 3.06


@pytest.mark.parametrize("budget_usd", [5.0, 40.0, 120.0])
def test_budget_holds_through_the_16_node_availability_trace(budget_usd: float) -> None:
    if not AVAILABILITY.exists():
        pytest.skip("shared traces not beside the repo")
    # Real time (no compression), 16 -> 4 nodes; one accounting tick per 5-minute sample.
    schedule = replay_schedule(load_trace(AVAILABILITY), ReplayConfig(compression=1, nodes=4))
    tick_s = schedule.step_s
    price = NodePrice(usd_per_hour=SPOT_USD_PER_HOUR, on_demand_usd_per_hour=ON_DEMAND_USD_PER_HOUR)
    ledger = Ledger.start(0.0)
    nodes = 0
    stopped_at = None
    for i in range(len(schedule.levels)):
        now = i * tick_s
        available = schedule.levels[i]
        # capacity that vanished is gone at once; new capacity is only taken if the budget allows
        nodes = min(nodes, available)
        ledger = ledger.tick(now, {f"n{k}": price for k in range(nodes)})
        job = BudgetJob(job_id="trace", budget_usd=budget_usd, remaining_samples=10**12,
                        samples_per_second=50.0 * nodes, nodes=nodes)
        growth = None
        if available > nodes:
            growth = Growth(added_nodes=available - nodes,
                            added_usd_per_hour=(available - nodes) * price.usd_per_hour)
        decision = plan_budget(now, job, ledger, tick_s=tick_s, growth=growth)
        if decision.action is BudgetAction.STOP:
            stopped_at = now
            break
        if growth is not None:
            if decision.action is BudgetAction.ALLOW:
                nodes = available
                ledger = ledger.tick(now, {f"n{k}": price for k in range(nodes)})
        assert ledger.spent_usd <= budget_usd
    assert stopped_at is not None, "the trace is long enough to exhaust every budget here"
    # the final checkpoint and teardown take one more tick at most
    ledger = ledger.tick(stopped_at + tick_s, ledger.billing)
    one_tick = 4 * SPOT_USD_PER_HOUR * tick_s / 3600
    assert budget_usd - one_tick <= ledger.spent_usd <= budget_usd + one_tick
    assert ledger.savings_usd > 0  # spot beat on-demand for the same node-hours
