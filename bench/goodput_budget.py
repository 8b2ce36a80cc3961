"""The goodput benchmark's budget run: a job whose budget is below its cost, and what it spent
past the budget (spotwise only; torchrun has no budget to hold)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from goodput_systems import BenchSetup, SpotwiseHarness, until

from spotwise.client import state_name
from spotwise.config import DaemonConfig

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED")


def p3_spot_price(root: Path) -> float:
    """p3.2xlarge spot USD/hour from the offline table (on-demand x the p3 spot fraction)."""
    table = json.loads((root / "cloud" / "offline_prices.json").read_text())
    return round(table["on_demand_usd_per_hour"]["p3.2xlarge"] * table["spot_fraction"]["p3"], 4)


def run_budget(setup: BenchSetup, log: Callable[[str], None], *,
               run_s: float = 45.0) -> dict[str, float | str]:
    """A job on `setup.nodes` nodes with a budget of about a third of what `run_s` seconds of
    them would cost: how far past the budget did it spend?"""
    h = SpotwiseHarness("budget", setup, daemon_env={})
    try:
        h.provider.launch(h.request, setup.nodes)
        rate = setup.nodes * setup.price_per_hour / 3600.0  # USD per wall second at full size
        budget = round(rate * run_s / 3, 6)
        job_id = h.submit(nodes=(1, setup.nodes), budget_usd=budget)
        job = until(lambda: (j := h.client.get(job_id)) and state_name(j.state) in TERMINAL
                     and j, run_s + 60, "the budget to stop the job", poll_s=0.5)
        spent = h.client.cost(job_id).spent_usd
        # One tick at the job's full size: accounting_interval_s of all nodes.
        tick_cost = rate * DaemonConfig.model_fields["accounting_interval_s"].default
        log(f"budget run: {state_name(job.state)}, spent {spent:.6f} of {budget:.6f} USD "
            f"(one tick {tick_cost:.6f})")
        return {"budget_usd": budget, "spent_usd": spent, "state": state_name(job.state),
                "overspend_usd": max(0.0, spent - budget), "tick_cost_usd": tick_cost}
    finally:
        h.close()
