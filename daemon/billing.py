"""Where a node is billed: each job's ledger, charged at every accounting tick and membership
change, the budget's stop and growth cap, instance-type ranking, and GetCost (flow 8).

A machine costs money until it is gone, not until the daemon stops wanting it: a node is
charged to the job it serves, then to the job whose processes it is still stopping, and a
provider's machine to the job it last served (or was launched for) until the provider no
longer lists it (`provider_seen`). So the final checkpoint, the agents' stop and the
provider's termination are paid for and count against the budget, which stops a job early
enough to pay for them (`teardown_s`, raised to the longest teardown measured).

The rules are pure and live in `daemon.budget` (ledger, projection, stop, growth cap, ranking)
and `daemon.prices` (one node's quote); this module gathers their inputs from the state and
stages what they change.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from spotwise.cloud.provider import ProviderNode
from spotwise.daemon.budget import (
    BudgetJob,
    InstanceOption,
    Ledger,
    NodePrice,
    choose_instance_types,
    cost_summary,
    plan_budget_stop,
    plan_growth_cap,
)
from spotwise.daemon.charging import ProviderView, charged_to, unregistered
from spotwise.daemon.model import JobState, NodeState, SetJobState
from spotwise.daemon.outbox import Outbox
from spotwise.daemon.prices import (
    OVERRIDE_SOURCE,
    PROVIDER_SOURCE,
    NodePricer,
    Quote,
    combined_source,
)
from spotwise.daemon.state import JobRecord, NodeRecord, State
from spotwise.daemon.store import NodeRow
from spotwise.proto.v1 import jobs_pb2

if TYPE_CHECKING:
    from spotwise.daemon.metrics import Metrics

log = logging.getLogger("spotwise.daemon.coordinator")


class Unpriced(ValueError):
    """A budgeted job on machines no price source knows (Billing.unpriced says which)."""


class Billing:
    """The ledgers of every job and the decisions money takes."""

    def __init__(self, state: State, outbox: Outbox, *, pricer: NodePricer,
                 accounting_interval_s: float, default_instance_types: tuple[str, ...],
                 metrics: Metrics | None, clock: Callable[[], float],
                 provider_price: Callable[[str], float | None] | None = None,
                 provider_prices_all: bool = False, teardown_s: float = 0.0) -> None:
        """`provider_price(handle)`: what the provider that launched a node says it costs
        (its own config), before the price book; `provider_prices_all`: it prices every node
        it launches. `teardown_s`: what a stopped job still costs, in seconds of its nodes
        (the budget stop leaves that margin)."""
        self.state = state
        self.outbox = outbox
        self.pricer = pricer
        self.accounting_interval_s = accounting_interval_s
        self.default_instance_types = default_instance_types
        self.metrics = metrics
        self.clock = clock
        self.provider_price = provider_price
        self.provider_prices_all = provider_prices_all
        self.configured_teardown_s = teardown_s
        self.teardowns: deque[float] = deque(maxlen=32)
        """The last teardowns measured: a job's end to its last machine gone (seconds)."""
        self.ledgers: dict[str, Ledger] = {}
        self.view = ProviderView()
        """What the provider lists (fed by the fleet loop through provider_seen)."""

    @property
    def teardown_s(self) -> float:
        """The margin a budget stop leaves: the configured teardown, or the longest measured."""
        return max(self.configured_teardown_s, *self.teardowns, 0.0)

    # ---- which job a machine is charged to (daemon.charging) -------------------------------

    def _charged(self) -> dict[str, dict[str, NodeRecord | ProviderNode]]:
        """Every job with machines charged to it: {job id: {node id or handle: the node, or
        the provider's machine not registered yet}}. A machine registered twice is charged
        once, as its newest registration."""
        out: dict[str, dict[str, NodeRecord | ProviderNode]] = {}
        charged: set[str] = set()
        jobs = self.state.jobs
        for node in sorted(self.state.nodes.values(),
                           key=lambda n: (-n.row.registered_at, n.row.id)):
            handle = self.view.handle_of(node)
            if handle and handle in charged:
                continue
            job_id = charged_to(node, self.view, jobs)
            if job_id:
                charged.add(handle)
                out.setdefault(job_id, {})[node.row.id] = node
        for machine in unregistered(self.view, self.state.nodes.values()):
            if machine.job_id in jobs:
                out.setdefault(machine.job_id, {})[machine.handle] = machine
        return out

    def _quotes(self, machines: dict[str, NodeRecord | ProviderNode]) -> dict[str, Quote]:
        # Machines alike are priced alike: a generation of 4,000 nodes of one type is quoted
        # once, not 4,000 times.
        memo: dict[tuple[str, str, str, float, str], Quote] = {}
        return {key: self.machine_quote(m) if isinstance(m, ProviderNode)
                else self.quote(m.row, memo) for key, m in machines.items()}

    def charges(self) -> dict[str, dict[str, Quote]]:
        """Every job with machines charged to it: {job id: {node id or handle: its quote}}."""
        return {job_id: self._quotes(machines) for job_id, machines in self._charged().items()}

    def provider_seen(self, machines: Collection[ProviderNode], now: float) -> None:
        """The provider lists these live machines now. Jobs whose charged machines changed
        (one booted, one is gone) are charged up to now at what they had, then at what they
        have: a machine no longer listed is charged no further."""
        before = self._charged()  # only which machines: quoted for the jobs that changed
        self.view.seen(machines)
        after = self._charged()
        for job_id in before.keys() | after.keys():
            job = self.state.jobs.get(job_id)
            if job is not None and before.get(job_id, {}).keys() != after.get(job_id, {}).keys():
                self.bill(job, now, quotes=self._quotes(after.get(job_id, {})))
                self.outbox.stage(job.row)

    def bill(self, job: JobRecord, now: float, *, quotes: dict[str, Quote] | None = None
             ) -> Ledger:
        """Charge the job's machines up to now, and bill `quotes` (default: the machines
        charged to it now) from now on."""
        if quotes is None:
            quotes = self._quotes(self._charged().get(job.row.id, {}))
        if quotes:
            job.price_source = combined_source({q.source for q in quotes.values()})
        prices: dict[str, NodePrice] = {n: q.price for n, q in quotes.items()}
        ledger = self.ledgers.get(job.row.id)
        if ledger is None:
            # The first charge since this daemon started. After a restart the spend so far
            # comes from the store, and the time the daemon was down is charged at the prices
            # of the nodes the job holds now: they ran (and cost money) while nobody watched.
            # A node that died meanwhile is charged to now, so the spend errs high, never low.
            ledger = Ledger(last_tick=job.row.cost_at or now, spent_usd=job.row.cost_usd,
                            on_demand_equivalent_usd=job.row.on_demand_usd or job.row.cost_usd,
                            billing=prices if job.row.cost_at and job.members else {})
        was_billing = bool(ledger.billing)
        ledger = ledger.tick(now, prices)
        self.ledgers[job.row.id] = ledger
        if job.state.terminal and was_billing and not prices:
            self._torn_down(job, now, ledger)
        job.row.cost_usd, job.row.cost_at = ledger.spent_usd, ledger.last_tick
        job.row.on_demand_usd = ledger.on_demand_equivalent_usd
        if self.metrics is not None:
            self.metrics.set_cost_total(job.row.id, ledger.spent_usd)
        return ledger

    def _torn_down(self, job: JobRecord, now: float, ledger: Ledger) -> None:
        """The ended job's last machine is gone: its spend is final; time the teardown."""
        if job.ended_at is not None:
            took = max(0.0, now - job.ended_at)
            self.teardowns.append(took)
            if self.metrics is not None:
                self.metrics.observe_teardown(took)
            log.info("job=%s: its last machine is gone %.1fs after it ended; spent $%.4f "
                     "(budget $%.4f; teardown margin now %.0fs)", job.row.id, took,
                     ledger.spent_usd, job.spec.budget_usd, self.teardown_s)

    def unpriced(self, spec: jobs_pb2.JobSpec) -> str:
        """Why a budgeted job cannot be priced ("": it can): it names instance types (or the
        provider launches types) that no price source knows, and its provider does not price
        its nodes itself. A budget cannot hold on machines charged at a guess."""
        if spec.budget_usd <= 0 or self.provider_prices_all:
            return ""
        types = list(spec.instance_types) or list(self.default_instance_types)
        market = spec.market or "spot"
        unknown = [t for t in types if self.pricer.type_price(t, market) is None]
        if not unknown:
            return ""
        return (f"budget_usd is set but no price source knows {', '.join(unknown)} "
                f"({market}): a budget cannot hold on machines nobody priced; name priced "
                "instance_types, or drop the budget")

    def machine_quote(self, machine: ProviderNode) -> Quote:
        """An unregistered machine's price: its provider's, else the price book's."""
        override = (self.provider_price(machine.handle) or 0.0) if self.provider_price else 0.0
        return self.pricer.quote(instance_type=machine.instance_type, zone=machine.zone,
                                 lifecycle=machine.lifecycle, override_usd_per_hour=override,
                                 override_source=PROVIDER_SOURCE)

    def quote(self, row: NodeRow,
              memo: dict[tuple[str, str, str, float, str], Quote] | None = None) -> Quote:
        """The node's price: its agent's (stored only when agent prices are trusted), else its
        provider's, else the price book's. `memo`: quotes already made at this instant, by
        what decides them."""
        override, source = row.price_per_hour, OVERRIDE_SOURCE
        if not override and self.provider_price is not None and row.provider_node:
            override, source = self.provider_price(row.provider_node) or 0.0, PROVIDER_SOURCE
        key = (row.instance_type, row.zone, row.lifecycle, override, source)
        if memo is not None and key in memo:
            return memo[key]
        quote = self.pricer.quote(instance_type=row.instance_type, zone=row.zone,
                                  lifecycle=row.lifecycle, override_usd_per_hour=override,
                                  override_source=source)
        if memo is not None:
            memo[key] = quote
        return quote

    def budget_job(self, job: JobRecord) -> BudgetJob:
        """What the budget policy knows of a job: its remaining samples come from the spec's
        total_steps (None when unknown) and the last reported step."""
        spec = job.spec
        remaining = None
        if spec.total_steps:
            remaining = max(0, spec.total_steps - job.row.step) * spec.global_batch_size
        # Throughput measured at another world size (a rescale just happened) says little
        # about this one: unknown until the new generation reports.
        measured = job.progress_world_size in (0, len(job.members) * spec.nproc_per_node)
        return BudgetJob(job_id=job.row.id, budget_usd=spec.budget_usd,
                         remaining_samples=remaining,
                         samples_per_second=job.row.samples_per_second if measured else 0.0,
                         nodes=len(job.members))

    def _added_node_prices(self, job: JobRecord) -> list[float]:
        """Hourly prices of the nodes a growth would add, in the order the controller would
        take them: free READY nodes that fit, then new nodes of the best-ranked type."""
        room = max(0, job.spec.nodes.max - len(job.members))
        if room == 0:
            return []
        free = sorted(
            (n for n in self.state.nodes.values()
             if n.state in (NodeState.READY, NodeState.JOINING) and not n.row.job_id
             and (n.row.slots == 0 or n.row.slots >= job.spec.nproc_per_node)),
            key=lambda n: (n.launched_for != job.row.id, n.row.joined_at, n.row.id))
        prices = [self.quote(n.row).price.usd_per_hour for n in free[:room]]
        types = self.instance_types_for(job)
        new = self.pricer.type_price(types[0], job.spec.market or "spot") if types else None
        if new is not None:
            prices += [new] * (room - len(prices))
        return prices

    def cap_growth(self, now: float) -> None:
        """Before each plan: the most nodes each running job's budget lets it grow to
        (budget.plan_growth_cap, priced with the nodes it would get), so the controller never
        takes a node the projection cannot carry, even one that just became free."""
        for job in self.state.jobs.values():
            ledger = self.ledgers.get(job.row.id)
            if job.state.terminal or not job.members or ledger is None or not job.spec.budget_usd:
                job.budget_cap = job.announced_cap = None  # nothing to cap
                continue
            cap = plan_growth_cap(now, self.budget_job(job), ledger,
                                  tick_s=self.accounting_interval_s, max_nodes=job.spec.nodes.max,
                                  added_usd_per_hour=self._added_node_prices(job),
                                  teardown_s=self.teardown_s)
            job.budget_cap = cap.max_nodes if cap.refused else None
            job.budget_cap_reason = cap.reason

    def account(self, now: float, event: Callable[[JobRecord, float, str, str], None]
                ) -> list[SetJobState]:
        """An accounting tick: charge every live job, and every ended job whose machines are
        not gone yet, and stage its row; return the stops of those the budget cannot carry
        for one more tick and a teardown (BUDGET_EXHAUSTED; their agents' SIGTERM takes the
        final checkpoint); announce growth caps that changed."""
        stops = []
        charges = self.charges()
        for job in self.state.jobs.values():
            if job.state.terminal:
                ledger = self.ledgers.get(job.row.id)
                if job.row.id in charges or (ledger is not None and ledger.billing):
                    self.bill(job, now, quotes=charges.get(job.row.id, {}))
                    self.outbox.stage(job.row)
                continue
            ledger = self.bill(job, now, quotes=charges.get(job.row.id, {}))
            self.outbox.stage(job.row)
            stop = plan_budget_stop(now, self.budget_job(job), ledger,
                                    tick_s=self.accounting_interval_s, teardown_s=self.teardown_s)
            if stop is not None:
                stops.append(SetJobState(job_id=job.row.id, state=JobState.BUDGET_EXHAUSTED,
                                         release=True, reason=stop.reason))
                continue
            if job.budget_cap != job.announced_cap:
                # Announced at accounting ticks only, so a projection hovering at the
                # budget does not flood the job's events.
                job.announced_cap = job.budget_cap
                message = (f"budget: {job.budget_cap_reason}" if job.budget_cap is not None
                           else f"budget: growth allowed again ({job.budget_cap_reason})")
                job.row.message = message
                job.row.updated_at = now
                log.log(logging.WARNING if job.budget_cap is not None else logging.INFO,
                        "job=%s generation=%d: %s", job.row.id, job.row.generation, message)
                event(job, now, "cost", message)
        return stops

    def instance_types_for(self, job: JobRecord) -> tuple[str, ...]:
        """The job's allowed instance types, best first by price per unit of measured
        throughput (budget.choose_instance_types); types no price source knows go last, in
        the spec's order. A spec that names none gets the provider's defaults ranked (empty
        if it has none)."""
        types = list(job.spec.instance_types) or list(self.default_instance_types)
        if len(types) < 2:
            return tuple(types)
        market = job.spec.market or "spot"
        options, unpriced = [], []
        for itype in types:
            usd = self.pricer.type_price(itype, market)
            if usd is None:
                unpriced.append(itype)
            else:
                options.append(InstanceOption(
                    instance_type=itype, usd_per_hour=usd,
                    samples_per_second=job.type_samples_per_second.get(itype)))
        if not options:
            return tuple(types)
        choice = choose_instance_types(options)
        ranked = choice.ranked + tuple(unpriced)
        if ranked != job.instance_order:
            job.instance_order = ranked
            log.info("job=%s: instance types %s: %s", job.row.id, ", ".join(ranked),
                     choice.reason)
        return ranked

    def cost_report(self, job: JobRecord, now: float | None = None) -> jobs_pb2.CostReport:
        """GetCost: spend and rate as of `now` (the running interval included), the projection
        to completion (0 when unknown: no total_steps or no throughput yet; the final spend once
        the job ended), and the saving against the same node-seconds on demand."""
        now = self.clock() if now is None else now
        ledger = self.ledgers.get(job.row.id)
        if ledger is not None and not job.state.terminal:
            summary = cost_summary(now, self.budget_job(job), ledger)
            spent, rate = summary.spent_usd, summary.rate_usd_per_hour
            projected = summary.projected_usd or 0.0
            on_demand = summary.on_demand_equivalent_usd
        else:
            spent, rate = job.row.cost_usd, 0.0
            projected = spent if job.state.terminal else 0.0
            on_demand = ledger.on_demand_equivalent_usd if ledger is not None else spent
        return jobs_pb2.CostReport(
            job_id=job.row.id,
            spent_usd=spent,
            rate_usd_per_hour=rate,
            projected_usd=projected,
            budget_usd=job.spec.budget_usd,
            on_demand_equivalent_usd=max(on_demand, spent),
            savings_usd=max(0.0, on_demand - spent),
            price_source=job.price_source or "no node billed since the daemon started",
        )
