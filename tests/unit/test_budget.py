"""The ledger and the budget policy: pure functions with the clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotwise.daemon.budget import (
    BudgetAction,
    BudgetJob,
    Growth,
    InstanceOption,
    Ledger,
    NodePrice,
    choose_instance_types,
    cost_summary,
    plan_budget,
    project_cost,
)

HOUR = 3600.0


def test_ledger_charges_each_node_between_ticks_at_its_price() -> None:
    ledger = Ledger.start(1000.0)
    ledger = ledger.tick(1000.0, {"a": NodePrice(usd_per_hour=3.6, on_demand_usd_per_hour=7.2)})
    ledger = ledger.tick(1100.0, {"a": NodePrice(usd_per_hour=3.6, on_demand_usd_per_hour=7.2),
                                  "b": NodePrice(usd_per_hour=1.8)})
    assert ledger.spent_usd == pytest.approx(0.1)  # a: 100 s at $3.6/h
    assert ledger.rate_usd_per_hour == pytest.approx(5.4)
    ledger = ledger.tick(1200.0, {"b": NodePrice(usd_per_hour=1.8)})
    assert ledger.node_spent_usd["a"] == pytest.approx(0.2)
    assert ledger.node_spent_usd["b"] == pytest.approx(0.05)
    assert ledger.spent_usd == pytest.approx(0.25)
    # on-demand equivalent: a at 7.2 for 200 s, b (no on-demand price known) at its own price
    assert ledger.on_demand_equivalent_usd == pytest.approx(0.4 + 0.05)
    assert ledger.savings_usd == pytest.approx(0.2)
    # the running interval is visible before the next tick
    assert ledger.spent_at(1300.0) == pytest.approx(0.3)
    # a clock step backwards charges nothing
    assert ledger.tick(1100.0, {}).spent_usd == pytest.approx(0.25)


def test_cost_summary_includes_the_running_interval() -> None:
    ledger = Ledger.start(0.0).tick(0.0, {"a": NodePrice(usd_per_hour=1.0, on_demand_usd_per_hour=3.0)})
    ledger = ledger.tick(1800.0, ledger.billing)
    job = BudgetJob(job_id="j", budget_usd=5.0, remaining_samples=3600, samples_per_second=1.0, nodes=1)
    summary = cost_summary(3600.0, job, ledger)
    assert summary.spent_usd == pytest.approx(1.0)
    assert summary.on_demand_equivalent_usd == pytest.approx(3.0)
    assert summary.savings_usd == pytest.approx(2.0)
    assert summary.projected_usd == pytest.approx(2.0)  # one more hour at $1/h
    assert summary.rate_usd_per_hour == 1.0 and summary.budget_usd == 5.0


def test_node_price_rejects_nonsense() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            NodePrice(usd_per_hour=bad)


def test_projection() -> None:
    p = project_cost(spent_usd=1.0, rate_usd_per_hour=3.6, samples_per_second=100, remaining_samples=360_000)
    assert p.remaining_s == pytest.approx(3600)
    assert p.projected_usd == pytest.approx(4.6)
    unknown = project_cost(spent_usd=1.0, rate_usd_per_hour=3.6, samples_per_second=0, remaining_samples=10)
    assert unknown.projected_usd is None
    done = project_cost(spent_usd=1.0, rate_usd_per_hour=3.6, samples_per_second=0, remaining_samples=0)
    assert done.projected_usd == 1.0


def _ledger(spent: float, rate: float, at: float = 0.0) -> Ledger:
    return Ledger(last_tick=at, spent_usd=spent, billing={"n": NodePrice(usd_per_hour=rate)})


def test_stop_when_one_more_tick_would_exceed() -> None:
    job = BudgetJob(job_id="j", budget_usd=10.0, remaining_samples=10**9, samples_per_second=10, nodes=1)
    # $36/h for a 60 s tick = $0.60
    ok = plan_budget(0.0, job, _ledger(9.39, 36.0), tick_s=60)
    assert ok.action is BudgetAction.ALLOW
    stop = plan_budget(0.0, job, _ledger(9.41, 36.0), tick_s=60)
    assert stop.action is BudgetAction.STOP
    assert "BUDGET_EXHAUSTED" in stop.reason and "9.41" in stop.reason
    # time since the last tick counts too
    assert plan_budget(30.0, job, _ledger(9.2, 36.0), tick_s=60).action is BudgetAction.STOP


def test_no_budget_always_allows() -> None:
    job = BudgetJob(job_id="j", budget_usd=0.0, remaining_samples=10**9)
    d = plan_budget(0.0, job, _ledger(1e6, 1e3), tick_s=60, growth=Growth(added_nodes=5, added_usd_per_hour=100))
    assert d.action is BudgetAction.ALLOW and d.reason == "no budget set"


def test_growth_refused_when_projection_exceeds_budget() -> None:
    # 1 node at $3.6/h doing 100 samples/s; 720k samples left: 2 h, $7.2 -> total $8.2 at $1 spent.
    job = BudgetJob(job_id="j", budget_usd=10.0, remaining_samples=720_000, samples_per_second=100, nodes=1)
    base = plan_budget(0.0, job, _ledger(1.0, 3.6), tick_s=60)
    assert base.action is BudgetAction.ALLOW and base.projected_usd == pytest.approx(8.2)
    # A second node at the same price and linear throughput: same total ($1 + 7.2/h x 1 h).
    same = plan_budget(0.0, job, _ledger(1.0, 3.6), tick_s=60, growth=Growth(added_nodes=1, added_usd_per_hour=3.6))
    assert same.action is BudgetAction.ALLOW and same.projected_usd == pytest.approx(8.2)
    # A pricier node that adds little throughput: $1 + (3.6+14.4) x 720k/(100+20)/3600 = $31 > $10.
    pricey = Growth(added_nodes=1, added_usd_per_hour=14.4, added_samples_per_second=20)
    refused = plan_budget(0.0, job, _ledger(1.0, 3.6), tick_s=60, growth=pricey)
    assert refused.action is BudgetAction.REFUSE_GROWTH
    assert "projection" in refused.reason and refused.projected_usd == pytest.approx(31.0)


def test_growth_refused_when_one_tick_of_it_would_overrun() -> None:
    job = BudgetJob(job_id="j", budget_usd=10.0, remaining_samples=10, samples_per_second=0, nodes=1)
    d = plan_budget(0.0, job, _ledger(9.0, 3.6), tick_s=600, growth=Growth(added_nodes=2, added_usd_per_hour=7.2))
    # 600 s at $10.8/h = $1.8 > $1 left
    assert d.action is BudgetAction.REFUSE_GROWTH and "within one tick" in d.reason
    # unmeasured throughput but affordable: allowed
    d2 = plan_budget(0.0, job, _ledger(1.0, 3.6), tick_s=600, growth=Growth(added_nodes=2, added_usd_per_hour=7.2))
    assert d2.action is BudgetAction.ALLOW and "not measured" in d2.reason


def test_bad_tick_is_value_error() -> None:
    with pytest.raises(ValueError):
        plan_budget(0.0, BudgetJob(job_id="j", budget_usd=1, remaining_samples=1), Ledger.start(0), tick_s=0)


def test_instance_type_by_price_per_throughput() -> None:
    choice = choose_instance_types([
        InstanceOption(instance_type="p3.2xlarge", usd_per_hour=0.918, samples_per_second=300),
        InstanceOption(instance_type="g4dn.xlarge", usd_per_hour=0.158, samples_per_second=100),
        InstanceOption(instance_type="g5.xlarge", usd_per_hour=0.30),
        InstanceOption(instance_type="g4dn.12xlarge", usd_per_hour=1.2),
    ])
    # g4dn.xlarge: 0.158/3600/100*1e6 = $0.44/M; p3.2xlarge: $0.85/M; then unmeasured by price.
    assert choice.ranked == ("g4dn.xlarge", "p3.2xlarge", "g5.xlarge", "g4dn.12xlarge")
    assert choice.reason.startswith("g4dn.xlarge first")
    with pytest.raises(ValueError):
        choose_instance_types([])


# ---- property: the spend never exceeds the budget by more than one tick ------------------

step = st.tuples(
    st.floats(min_value=0.01, max_value=1.0),  # interval as a fraction of tick_s
    st.sampled_from(["none", "grow", "leave", "reprice"]),
    st.floats(min_value=0.01, max_value=40.0),  # a price
    st.integers(min_value=1, max_value=4),  # nodes to add
)


@settings(max_examples=300, deadline=None)
@given(
    budget=st.floats(min_value=0.01, max_value=50.0),
    tick_s=st.floats(min_value=1.0, max_value=900.0),
    start_nodes=st.lists(st.floats(min_value=0.01, max_value=40.0), min_size=0, max_size=4),
    sps=st.floats(min_value=0.0, max_value=1e4),
    remaining=st.integers(min_value=0, max_value=10**9),
    steps=st.lists(step, min_size=1, max_size=60),
    teardown=st.floats(min_value=0.0, max_value=1.0),
)
def test_spend_never_exceeds_budget_plus_one_tick(budget, tick_s, start_nodes, sps, remaining, steps, teardown) -> None:
    """A daemon loop: tick, decide, act. Prices may change at any tick (up or down), nodes
    leave, growth happens only when allowed; at STOP one more interval (<= one tick) of
    teardown is charged. The total stays within budget + one tick at the highest rate seen."""
    now = 0.0
    billing = {f"n{i}": NodePrice(usd_per_hour=p) for i, p in enumerate(start_nodes)}
    ledger = Ledger.start(now).tick(now, billing)
    max_rate = ledger.rate_usd_per_hour
    next_id = len(billing)
    stopped = False
    job = BudgetJob(job_id="j", budget_usd=budget, remaining_samples=remaining,
                    samples_per_second=sps, nodes=len(billing))
    decision = plan_budget(now, job, ledger, tick_s=tick_s)
    for frac, action, price, count in steps:
        if decision.action is BudgetAction.STOP:
            stopped = True
            break
        now += frac * tick_s
        if action == "leave" and billing:
            billing.pop(sorted(billing)[0])
        elif action == "reprice" and billing:
            billing[sorted(billing)[-1]] = NodePrice(usd_per_hour=price)
        ledger = ledger.tick(now, billing)
        assert ledger.spent_usd <= budget * (1 + 1e-9), "overspent before any STOP"
        max_rate = max(max_rate, ledger.rate_usd_per_hour)
        job = BudgetJob(job_id="j", budget_usd=budget, remaining_samples=remaining,
                        samples_per_second=sps, nodes=len(billing))
        growth = Growth(added_nodes=count, added_usd_per_hour=count * price) if action == "grow" else None
        decision = plan_budget(now, job, ledger, tick_s=tick_s, growth=growth)
        if growth is not None and decision.action is BudgetAction.ALLOW:
            for _ in range(count):
                billing[f"n{next_id}"] = NodePrice(usd_per_hour=price)
                next_id += 1
            ledger = ledger.tick(now, billing)
            max_rate = max(max_rate, ledger.rate_usd_per_hour)
    if decision.action is BudgetAction.STOP:
        stopped = True
    if stopped:
        # final checkpoint and teardown: at most one more tick, then nothing is billed
        now += teardown * tick_s
        ledger = ledger.tick(now, {})
        assert ledger.rate_usd_per_hour == 0
    one_tick = max_rate * tick_s / HOUR
    assert ledger.spent_usd <= budget + one_tick + 1e-9
    if not stopped:
        assert ledger.spent_usd <= budget * (1 + 1e-9)
