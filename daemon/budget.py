"""Money: the ledger that charges node seconds, and the budget policy (pure, clock passed in).

Accounting works in ticks. At each tick the daemon calls ``ledger = ledger.tick(now, prices)``:
the time since the previous tick is charged at the prices in force since then (the billing set
handed to the previous tick), and `prices` becomes the billing set until the next tick. The
daemon calls `tick` at every accounting interval and at every membership change, so a node is
billed exactly while it is in the set. Spot prices change only at ticks (the price seen at the
tick holds until the next one).

Right after each tick the daemon calls `plan_budget`. Its STOP rule is: stop when the spend
plus one more tick and one teardown at the current rate would exceed the budget. A node is
charged until its provider confirms the machine is gone, so what a stopped job still costs
(its final checkpoint, its agents stopping, the provider terminating the machines) is charged
too; `teardown_s` is the time that takes, so the spend when the last machine is gone stays
within the budget as long as the teardown takes no longer than `teardown_s` (and ticks are at
most `tick_s` apart).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, kw_only=True)
class NodePrice:
    """What one node costs while it is billed."""

    usd_per_hour: float
    """Its price (spot price for spot nodes, on-demand price otherwise)."""
    on_demand_usd_per_hour: float | None = None
    """The on-demand price of the same type, for the saving report; None if unknown."""

    def __post_init__(self) -> None:
        if not (self.usd_per_hour >= 0 and math.isfinite(self.usd_per_hour)):
            raise ValueError(f"usd_per_hour must be a finite non-negative number, got {self.usd_per_hour}")


@dataclass(frozen=True, kw_only=True)
class Ledger:
    """One job's spend. Immutable: `tick` returns the next ledger (easy to store and test)."""

    last_tick: float
    """Clock seconds of the last charge."""
    spent_usd: float = 0.0
    """Everything charged up to last_tick."""
    on_demand_equivalent_usd: float = 0.0
    """What the same node-seconds would have cost on demand (nodes with a known on-demand price)."""
    node_spent_usd: Mapping[str, float] = field(default_factory=dict)
    """Spend per node id."""
    billing: Mapping[str, NodePrice] = field(default_factory=dict)
    """The nodes billed from last_tick on, with their prices."""

    @classmethod
    def start(cls, now: float) -> Ledger:
        return cls(last_tick=now)

    @property
    def rate_usd_per_hour(self) -> float:
        """What the billed nodes cost per hour now."""
        return sum(p.usd_per_hour for p in self.billing.values())

    def spent_at(self, now: float) -> float:
        """Spend including the running interval since last_tick (what a tick at `now` would show)."""
        return self.spent_usd + self.rate_usd_per_hour * max(0.0, now - self.last_tick) / SECONDS_PER_HOUR

    def tick(self, now: float, prices: Mapping[str, NodePrice]) -> Ledger:
        """Charge (last_tick, now] at the current billing set, then bill `prices` from now on.

        A `now` earlier than last_tick (a clock step backwards) charges nothing.
        """
        elapsed_h = max(0.0, now - self.last_tick) / SECONDS_PER_HOUR
        node_spent = dict(self.node_spent_usd)
        spent = self.spent_usd
        on_demand = self.on_demand_equivalent_usd
        for node_id, price in self.billing.items():
            charge = price.usd_per_hour * elapsed_h
            node_spent[node_id] = node_spent.get(node_id, 0.0) + charge
            spent += charge
            on_demand += (price.on_demand_usd_per_hour if price.on_demand_usd_per_hour is not None
                          else price.usd_per_hour) * elapsed_h
        return replace(
            self,
            last_tick=max(now, self.last_tick),
            spent_usd=spent,
            on_demand_equivalent_usd=on_demand,
            node_spent_usd=node_spent,
            billing=dict(prices),
        )

    @property
    def savings_usd(self) -> float:
        return self.on_demand_equivalent_usd - self.spent_usd


@dataclass(frozen=True, kw_only=True)
class Projection:
    """Cost to completion at the current rate and throughput."""

    remaining_s: float | None
    """Seconds of training left; None when throughput is unknown (nothing measured yet)."""
    projected_usd: float | None
    """Total cost at completion (spent + remaining); None when remaining_s is None."""


def project_cost(
    *, spent_usd: float, rate_usd_per_hour: float, samples_per_second: float,
    remaining_samples: int | None,
) -> Projection:
    """Total cost at completion if rate and throughput stay as measured (remaining_samples
    None: the job's length is unknown, so there is nothing to project)."""
    if remaining_samples is None:
        return Projection(remaining_s=None, projected_usd=None)
    if remaining_samples <= 0:
        return Projection(remaining_s=0.0, projected_usd=spent_usd)
    if samples_per_second <= 0 or not math.isfinite(samples_per_second):
        return Projection(remaining_s=None, projected_usd=None)
    remaining_s = remaining_samples / samples_per_second
    return Projection(remaining_s=remaining_s, projected_usd=spent_usd + rate_usd_per_hour * remaining_s / SECONDS_PER_HOUR)


@dataclass(frozen=True, kw_only=True)
class BudgetJob:
    """What the budget policy needs to know about a job."""

    job_id: str
    budget_usd: float
    """The cap; 0 means no budget."""
    remaining_samples: int | None
    """Samples still to train (steps left x global batch size); None if the job's length is unknown."""
    samples_per_second: float = 0.0
    """Measured throughput at the current membership; 0 if not measured yet."""
    nodes: int = 0
    """Nodes the job has now."""


@dataclass(frozen=True, kw_only=True)
class Growth:
    """A proposed addition of nodes, for the policy to allow or refuse."""

    added_nodes: int
    """How many nodes would join."""
    added_usd_per_hour: float
    """What they would cost per hour together."""
    added_samples_per_second: float | None = None
    """Expected extra throughput; None: assume it scales linearly with the node count."""


class BudgetAction(enum.Enum):
    ALLOW = "allow"
    """Go on; a proposed growth (if any) may happen."""
    REFUSE_GROWTH = "refuse_growth"
    """Go on at the current size; do not add the proposed nodes."""
    STOP = "stop"
    """Take a final checkpoint and stop the job as BUDGET_EXHAUSTED."""


@dataclass(frozen=True, kw_only=True)
class BudgetDecision:
    action: BudgetAction
    reason: str
    spent_usd: float
    rate_usd_per_hour: float
    projected_usd: float | None


def plan_budget(
    now: float, job: BudgetJob, ledger: Ledger, *, tick_s: float, growth: Growth | None = None,
    teardown_s: float = 0.0,
) -> BudgetDecision:
    """Decide what the budget allows at `now` (call it right after `ledger.tick`).

    - STOP when spent + one tick and one teardown (`teardown_s`) at the current rate would
      exceed the budget;
    - REFUSE_GROWTH when `growth` is proposed and either one tick and one teardown at the
      grown rate would exceed the budget or the projection to completion at the grown size
      (its teardown included) does;
    - ALLOW otherwise (also when throughput is unknown: nothing to project from yet, and the
      STOP rule still caps the spend).
    """
    if tick_s <= 0:
        raise ValueError(f"tick_s must be positive, got {tick_s}")
    if not (teardown_s >= 0 and math.isfinite(teardown_s)):
        raise ValueError(f"teardown_s must be a finite non-negative number, got {teardown_s}")
    ahead_s = tick_s + teardown_s
    spent = ledger.spent_at(now)
    rate = ledger.rate_usd_per_hour
    projection = project_cost(
        spent_usd=spent, rate_usd_per_hour=rate,
        samples_per_second=job.samples_per_second, remaining_samples=job.remaining_samples,
    )

    def decide(action: BudgetAction, reason: str, projected: float | None = projection.projected_usd) -> BudgetDecision:
        return BudgetDecision(action=action, reason=reason, spent_usd=spent, rate_usd_per_hour=rate,
                              projected_usd=projected)

    if job.budget_usd <= 0:
        return decide(BudgetAction.ALLOW, "no budget set")
    budget = job.budget_usd
    next_tick = spent + rate * ahead_s / SECONDS_PER_HOUR
    if next_tick > budget:
        teardown = f" and a teardown ({teardown_s:g} s)" if teardown_s else ""
        return decide(
            BudgetAction.STOP,
            f"spent ${spent:.4f} + one tick ({tick_s:g} s){teardown} at ${rate:.4f}/h = "
            f"${next_tick:.4f} would exceed the budget ${budget:.4f}: final checkpoint, then "
            "BUDGET_EXHAUSTED",
        )
    if growth is None or growth.added_nodes <= 0:
        return decide(BudgetAction.ALLOW, _within(spent, budget, projection.projected_usd))

    grown_rate = rate + growth.added_usd_per_hour
    if spent + grown_rate * ahead_s / SECONDS_PER_HOUR > budget:
        return decide(
            BudgetAction.REFUSE_GROWTH,
            f"adding {growth.added_nodes} node(s) (${growth.added_usd_per_hour:.4f}/h) would overrun "
            f"the budget ${budget:.4f} within one tick (spent ${spent:.4f})",
        )
    grown_sps = _grown_throughput(job, growth)
    if job.remaining_samples is None:
        return decide(BudgetAction.ALLOW, f"job length unknown (no total_steps), growth allowed; "
                      f"{_within(spent, budget, None)}")
    if grown_sps is None:
        return decide(BudgetAction.ALLOW, f"throughput not measured yet, growth allowed; {_within(spent, budget, None)}")
    grown = project_cost(spent_usd=spent + grown_rate * teardown_s / SECONDS_PER_HOUR,
                         rate_usd_per_hour=grown_rate, samples_per_second=grown_sps,
                         remaining_samples=job.remaining_samples)
    assert grown.projected_usd is not None
    if grown.projected_usd > budget:
        return decide(
            BudgetAction.REFUSE_GROWTH,
            f"with {growth.added_nodes} more node(s) the projection is ${grown.projected_usd:.4f} "
            f"(${grown_rate:.4f}/h for {grown.remaining_s:.0f} s) > budget ${budget:.4f}",
            grown.projected_usd,
        )
    return decide(
        BudgetAction.ALLOW,
        f"growth by {growth.added_nodes} node(s) fits: projection ${grown.projected_usd:.4f} <= budget ${budget:.4f}",
        grown.projected_usd,
    )


def _grown_throughput(job: BudgetJob, growth: Growth) -> float | None:
    if growth.added_samples_per_second is not None:
        return job.samples_per_second + growth.added_samples_per_second if job.samples_per_second > 0 else None
    if job.samples_per_second <= 0 or job.nodes <= 0:
        return None
    # Linear scaling is optimistic (communication grows with the world size), so this errs
    # towards allowing growth; the STOP rule still caps the spend.
    return job.samples_per_second * (job.nodes + growth.added_nodes) / job.nodes


@dataclass(frozen=True, kw_only=True)
class GrowthCap:
    """The most nodes the budget lets a running job grow to."""

    max_nodes: int
    """At least the job's current node count (the cap never shrinks a job)."""
    refused: bool
    """True when the budget keeps the job below the `max_nodes` it asked for."""
    reason: str


def plan_growth_cap(
    now: float, job: BudgetJob, ledger: Ledger, *, tick_s: float, max_nodes: int,
    added_usd_per_hour: Sequence[float], teardown_s: float = 0.0,
) -> GrowthCap:
    """How far `job` (with `job.nodes` nodes now) may grow towards `max_nodes`: one node at a
    time, as long as `plan_budget` allows the growth. `added_usd_per_hour[i]` is the price of
    the (i+1)-th added node (cheapest first); a shorter list repeats its last price, an empty
    one repeats the current nodes' mean price. A job with no nodes is not capped (starting is
    not growth; the STOP rule caps its spend).
    """
    if job.budget_usd <= 0 or job.nodes <= 0 or job.nodes >= max_nodes:
        return GrowthCap(max_nodes=max(max_nodes, job.nodes), refused=False,
                         reason="no budget set" if job.budget_usd <= 0 else "nothing to cap")
    fallback = ledger.rate_usd_per_hour / len(ledger.billing) if ledger.billing else 0.0
    prices = list(added_usd_per_hour) or [fallback]
    added_usd = 0.0
    last = ""
    for k in range(1, max_nodes - job.nodes + 1):
        added_usd += prices[min(k, len(prices)) - 1]
        decision = plan_budget(now, job, ledger, tick_s=tick_s, teardown_s=teardown_s,
                               growth=Growth(added_nodes=k, added_usd_per_hour=added_usd))
        if decision.action is not BudgetAction.ALLOW:
            cap = job.nodes + k - 1
            return GrowthCap(max_nodes=cap, refused=True,
                             reason=f"growth beyond {cap} node(s) refused: {decision.reason}")
        last = decision.reason
    return GrowthCap(max_nodes=max_nodes, refused=False, reason=last)


def _within(spent: float, budget: float, projected: float | None) -> str:
    if projected is None:
        return f"spent ${spent:.4f} of ${budget:.4f}; nothing to project from yet"
    verdict = "within" if projected <= budget else "OVER (growth will be refused)"
    return f"spent ${spent:.4f} of ${budget:.4f}; projection ${projected:.4f} {verdict}"


@dataclass(frozen=True, kw_only=True)
class CostSummary:
    """What `spotwise cost JOB` prints (the fields of the proto's CostReport)."""

    spent_usd: float
    rate_usd_per_hour: float
    projected_usd: float | None
    """Total at completion at the current rate and throughput; None if throughput is unknown."""
    budget_usd: float
    on_demand_equivalent_usd: float
    """The same node-seconds at on-demand prices."""
    savings_usd: float


def cost_summary(now: float, job: BudgetJob, ledger: Ledger) -> CostSummary:
    """Spend, rate, projection and the saving against on-demand, as of `now`."""
    elapsed_h = max(0.0, now - ledger.last_tick) / SECONDS_PER_HOUR
    spent = ledger.spent_at(now)
    on_demand = ledger.on_demand_equivalent_usd + elapsed_h * sum(
        p.on_demand_usd_per_hour if p.on_demand_usd_per_hour is not None else p.usd_per_hour
        for p in ledger.billing.values())
    projection = project_cost(spent_usd=spent, rate_usd_per_hour=ledger.rate_usd_per_hour,
                              samples_per_second=job.samples_per_second, remaining_samples=job.remaining_samples)
    return CostSummary(spent_usd=spent, rate_usd_per_hour=ledger.rate_usd_per_hour,
                       projected_usd=projection.projected_usd, budget_usd=job.budget_usd,
                       on_demand_equivalent_usd=on_demand, savings_usd=on_demand - spent)


@dataclass(frozen=True, kw_only=True)
class InstanceOption:
    """A candidate instance type with its price and (if measured) its throughput."""

    instance_type: str
    usd_per_hour: float
    """Its current price in the job's market."""
    samples_per_second: float | None = None
    """Measured throughput of one node of this type for this job; None if never measured."""


@dataclass(frozen=True, kw_only=True)
class InstanceChoice:
    ranked: tuple[str, ...]
    """Instance types, best first."""
    reason: str


def choose_instance_types(options: Sequence[InstanceOption]) -> InstanceChoice:
    """Rank instance types by price per unit of measured throughput (USD per million samples).

    Measured types come first, cheapest per sample first. Unmeasured types follow, cheapest
    per hour first: one of them gets tried only when no measured type is available, and its
    first measurement then places it.
    """
    if not options:
        raise ValueError("no instance types to choose from")
    measured = [o for o in options if o.samples_per_second and o.samples_per_second > 0]
    unmeasured = [o for o in options if not (o.samples_per_second and o.samples_per_second > 0)]

    def usd_per_million(o: InstanceOption) -> float:
        assert o.samples_per_second
        return o.usd_per_hour / SECONDS_PER_HOUR / o.samples_per_second * 1e6

    measured.sort(key=lambda o: (usd_per_million(o), o.instance_type))
    unmeasured.sort(key=lambda o: (o.usd_per_hour, o.instance_type))
    ranked = tuple(o.instance_type for o in measured + unmeasured)
    parts = [f"{o.instance_type} ${usd_per_million(o):.4f}/M samples" for o in measured]
    parts += [f"{o.instance_type} unmeasured ${o.usd_per_hour:.4f}/h" for o in unmeasured]
    return InstanceChoice(ranked=ranked, reason=f"{ranked[0]} first by price per throughput: " + ", ".join(parts))


@dataclass(frozen=True, kw_only=True)
class BudgetStop:
    """Stop the job: final checkpoint, then BUDGET_EXHAUSTED."""

    job_id: str
    reason: str


def plan_budget_stop(now: float, job: BudgetJob, ledger: Ledger, *, tick_s: float,
                     teardown_s: float = 0.0) -> BudgetStop | None:
    """The budget stop rule, at an accounting tick (right after `ledger.tick`): stop when one
    more tick and one teardown at the current rate would take the spend past the budget
    (plan_budget's STOP)."""
    decision = plan_budget(now, job, ledger, tick_s=tick_s, teardown_s=teardown_s)
    if decision.action is BudgetAction.STOP:
        return BudgetStop(job_id=job.job_id, reason=decision.reason)
    return None
