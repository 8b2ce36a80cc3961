"""The daemon's live state: jobs and nodes in memory, backed by the store.

The coordinator is where agents' reports and users' requests land and where the controller's
decisions are carried out. It loads its state from SQLite on start (flow 9), builds the
controller's snapshot, applies each decision in one store transaction together with the event
that describes it, publishes the event after the commit, and logs the decision's reason.

It is synchronous and runs on the daemon's event loop thread only: every method is atomic with
respect to the others, which is what keeps a heartbeat from seeing half a rescale.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spotwise.daemon import controller
from spotwise.daemon.budget import (
    BudgetAction,
    BudgetJob,
    InstanceOption,
    Ledger,
    NodePrice,
    choose_instance_types,
    cost_summary,
    plan_budget,
    plan_growth_cap,
)
from spotwise.daemon.controller import (
    ClusterState,
    Decision,
    JobState,
    JobView,
    NodeLost,
    NodesReady,
    NodeState,
    NodeView,
    Policy,
    RequestCheckpoint,
    SetJobState,
    StartGeneration,
)
from spotwise.daemon.events import EventBus
from spotwise.daemon.prices import NodePricer, Quote, combined_source
from spotwise.daemon.store import CheckpointRow, EventRow, GenerationRow, JobRow, NodeRow, Store
from spotwise.proto.v1 import agent_pb2, jobs_pb2

if TYPE_CHECKING:
    from spotwise.daemon.metrics import Metrics

log = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 143
"""A training process stopped on request (SIGTERM) exits with this."""


class UnknownJob(KeyError):
    """No job has this id."""


@dataclass(kw_only=True)
class JobRecord:
    row: JobRow
    spec: jobs_pb2.JobSpec
    members: list[str] = field(default_factory=list)
    generation_started_at: float = 0.0
    restore_step: int = -1
    step_before: int = 0
    """The job's step when the current generation started (0 after a daemon restart)."""
    lost_this_generation: int = 0
    """Steps of step_before that the current generation replays: counted from restore_step
    when it starts, from where it really restored once it says (its Restored report)."""
    restored_seen: bool = False
    """Whether the current generation's processes said where they restored."""
    generation_reason: str = ""
    # Soft state of the current generation, rebuilt from heartbeats after a restart.
    exit_codes: dict[int, int] = field(default_factory=dict)
    failed_at: float | None = None
    checkpoint_requested_at: float | None = None
    # Money (soft state, rebuilt after a restart by the next accounting tick and progress).
    budget_cap: int | None = None
    """Most nodes the budget lets the job grow to; None: not capped."""
    budget_cap_reason: str = ""
    announced_cap: int | None = None
    """The cap the job's message and events last told about."""
    price_source: str = ""
    """Where the prices of the nodes last billed came from."""
    type_samples_per_second: dict[str, float] = field(default_factory=dict)
    """Instance type -> measured samples/s of one node, from progress with one type only."""
    instance_order: tuple[str, ...] = ()
    """The last instance-type ranking (logged when it changes)."""
    progress_world_size: int = 0
    """World size of the last progress report (0: none since the daemon started)."""

    @property
    def state(self) -> JobState:
        return JobState(self.row.state)


@dataclass(kw_only=True)
class NodeRecord:
    row: NodeRow
    last_seen: float
    reported_job_id: str = ""
    reported_generation: int = 0
    reported_running: bool = False
    """The agent's last heartbeat listed a running training process."""
    launched_for: str = ""

    @property
    def state(self) -> NodeState:
        return NodeState(self.row.state)


def _set_node_state(rec: NodeRecord, state: NodeState) -> None:
    """Change a node's state along controller.NODE_TRANSITIONS (a programmer error otherwise)."""
    if rec.state is not state:
        assert state in controller.NODE_TRANSITIONS[rec.state], f"{rec.state} -> {state}"
        rec.row.state = state.value


def job_state_proto(state: JobState) -> int:
    return jobs_pb2.JobState.Value(f"JOB_STATE_{state.value}")


def job_state_from_proto(value: int) -> JobState:
    return JobState(jobs_pb2.JobState.Name(value).removeprefix("JOB_STATE_"))


class Coordinator:
    """Jobs and nodes, their reports, and the carrying out of the controller's decisions."""

    def __init__(
        self,
        store: Store,
        *,
        policy: Policy,
        heartbeat_interval_s: float,
        restart_grace_s: float = 15.0,
        accounting_interval_s: float = 5.0,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        pricer: NodePricer | None = None,
        default_instance_types: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`pricer` quotes each node's price (default: the offline table, and agents'
        price_per_hour where they set it). `default_instance_types`: what the provider
        launches for a job whose spec names no types (ranked like the spec's)."""
        self.store = store
        self.pricer = pricer or NodePricer(clock=clock)
        self.default_instance_types = tuple(default_instance_types)
        self.metrics = metrics
        self.policy = policy
        self.heartbeat_interval_s = heartbeat_interval_s
        self.restart_grace_s = restart_grace_s
        self.accounting_interval_s = accounting_interval_s
        self.ledgers: dict[str, Ledger] = {}
        self._next_accounting = 0.0
        self.events = events or EventBus(store)
        self.clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self._pending: list[tuple[EventRow, bool]] = []
        self.load()

    # ---- state ------------------------------------------------------------------------

    def load(self) -> None:
        """(Re)load jobs and nodes from the store.

        Every known node gets `restart_grace_s` to call again: its agent has been retrying with
        backoff while the daemon was away, and declaring it LOST on the first tick would
        throw away a generation that is still training.
        """
        now = self.clock()
        self.jobs = {}
        for row in self.store.jobs():
            spec = jobs_pb2.JobSpec.FromString(row.spec)
            record = JobRecord(row=row, spec=spec)
            if row.generation > 0 and not JobState(row.state).terminal:
                gens = [g for g in self.store.generations(row.id) if g.generation == row.generation]
                if gens and gens[0].ended_at is None:
                    record.members = list(gens[0].members)
                    record.generation_started_at = gens[0].started_at
                    record.restore_step = gens[0].restore_step
                    record.generation_reason = gens[0].reason
            self.jobs[row.id] = record
        seen = now - self.policy.lease_s + self.restart_grace_s
        self.nodes = {row.id: NodeRecord(row=row, last_seen=seen) for row in self.store.nodes()}
        log.info("loaded %d job(s) and %d node(s) from %s", len(self.jobs), len(self.nodes),
                 self.store.path)

    def snapshot(self) -> ClusterState:
        """The controller's view of every job (oldest first) and node."""
        jobs = sorted((self.job_view(rec) for rec in self.jobs.values()),
                      key=lambda j: (j.created_at, j.id))
        nodes = {rec.row.id: self.node_view(rec) for rec in self.nodes.values()}
        return ClusterState(jobs=tuple(jobs), nodes=nodes)

    @staticmethod
    def job_view(rec: JobRecord) -> JobView:
        spec = rec.spec
        return JobView(
            id=rec.row.id,
            state=rec.state,
            created_at=rec.row.created_at,
            min_nodes=spec.nodes.min,
            max_nodes=spec.nodes.max,
            nproc_per_node=spec.nproc_per_node,
            max_failures=spec.max_failures,
            generation=rec.row.generation,
            members=tuple(rec.members),
            generation_started_at=rec.generation_started_at,
            last_checkpoint_step=rec.row.last_checkpoint_step,
            last_checkpoint_at=rec.row.last_checkpoint_at,
            step=rec.row.step,
            failures=rec.row.failures,
            exit_codes=dict(rec.exit_codes),
            failed_at=rec.failed_at,
            checkpoint_requested_at=rec.checkpoint_requested_at,
            budget_max_nodes=rec.budget_cap,
        )

    @staticmethod
    def node_view(rec: NodeRecord) -> NodeView:
        return NodeView(
            id=rec.row.id,
            state=rec.state,
            joined_at=rec.row.joined_at,
            last_seen=rec.last_seen,
            slots=rec.row.slots,
            job_id=rec.row.job_id,
            reported_job_id=rec.reported_job_id,
            reported_generation=rec.reported_generation,
            drain_since=rec.row.drain_since,
            drain_deadline=rec.row.drain_deadline,
            launched_for=rec.launched_for,
        )

    def job(self, job_id: str) -> JobRecord:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A store transaction; if it fails, memory is reloaded from the store, so that a
        change that was not stored did not happen (and its events are not published)."""
        try:
            with self.store.transaction() as conn:
                yield conn
        except BaseException:
            self._pending.clear()
            log.exception("a store transaction failed: reloading the state from %s",
                          self.store.path)
            self.load()
            raise

    # ---- the control loop ----------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[Decision]:
        """Run the controller once and carry out its decisions."""
        now = self.clock() if now is None else now
        self._cap_growth(now)
        decisions = controller.plan(now, self.snapshot(), self.policy)
        for decision in decisions:
            self.apply(decision, now)
        if now >= self._next_accounting:
            self._next_accounting = now + self.accounting_interval_s
            self.account(now)
        if self.metrics is not None:
            self.metrics.set_jobs_by_state(Counter(j.state.value for j in self.jobs.values()))
        return decisions

    def apply(self, decision: Decision, now: float) -> None:
        with self._transaction() as conn:
            if isinstance(decision, NodeLost):
                self._node_lost(decision, now, conn)
            elif isinstance(decision, NodesReady):
                for node_id in decision.node_ids:
                    rec = self.nodes[node_id]
                    _set_node_state(rec, NodeState.READY)
                    self.store.put_node(rec.row, conn)
                log.info("nodes=%s: READY: %s", ",".join(decision.node_ids), decision.reason)
            elif isinstance(decision, StartGeneration):
                self._start_generation(decision, now, conn)
            elif isinstance(decision, RequestCheckpoint):
                job = self.jobs[decision.job_id]
                job.checkpoint_requested_at = now if decision.on else None
                log.info("job=%s generation=%d: %s", job.row.id, job.row.generation,
                         decision.reason)
            elif isinstance(decision, SetJobState):
                self._set_job_state(decision, now, conn)
            else:  # pragma: no cover - the Decision union is closed
                raise AssertionError(f"unknown decision {decision!r}")
        self._flush()

    def _node_lost(self, d: NodeLost, now: float, conn: sqlite3.Connection) -> None:
        rec = self.nodes[d.node_id]
        _set_node_state(rec, NodeState.LOST)
        self.store.put_node(rec.row, conn)
        log.warning("node=%s job=%s: LOST: %s", d.node_id, rec.row.job_id or "-", d.reason)
        job = self.jobs.get(rec.row.job_id)
        if job is not None and d.node_id in job.members:
            self._event(conn, job, now, "node", d.reason)
            if self.metrics is not None:
                self.metrics.inc_preemptions(job.row.id)

    def _start_generation(self, d: StartGeneration, now: float, conn: sqlite3.Connection) -> None:
        job = self.jobs[d.job_id]
        old_state = job.state
        assert d.state is old_state or controller.can_transition(old_state, d.state), (
            f"{old_state} -> {d.state}"
        )
        self._end_generation(job, now, conn)
        job.step_before, job.restored_seen = job.row.step, False
        job.lost_this_generation = max(0, job.row.step - max(d.restore_step, 0))
        job.row.lost_steps += job.lost_this_generation
        job.row.step = max(d.restore_step, 0)
        for node_id in job.members:
            if node_id not in d.members:
                self._release(node_id, conn)
        for rank, node_id in enumerate(d.members):
            node = self.nodes[node_id]
            if node.state is not NodeState.DRAINING:
                _set_node_state(node, NodeState.ASSIGNED)
            node.row.job_id = job.row.id
            node.row.node_rank = rank
            self.store.put_node(node.row, conn)
        job.members = list(d.members)
        job.generation_started_at = now
        job.restore_step = d.restore_step
        job.generation_reason = d.reason
        job.exit_codes = {}
        job.failed_at = None
        job.checkpoint_requested_at = None
        job.row.generation = d.generation
        job.row.world_size = d.world_size
        job.row.state = d.state.value
        job.row.message = d.reason
        job.row.updated_at = now
        if d.count_failure:
            job.row.failures += 1
        self._bill(job, now)
        self.store.put_job(job.row, conn)
        self.store.put_generation(
            GenerationRow(
                job_id=job.row.id,
                generation=d.generation,
                started_at=now,
                members=list(d.members),
                nproc_per_node=job.spec.nproc_per_node,
                world_size=d.world_size,
                restore_step=d.restore_step,
                reason=d.reason,
            ),
            conn,
        )
        log.info("job=%s generation=%d nodes=%s: %s", job.row.id, d.generation,
                 ",".join(d.members), d.reason)
        if self.metrics is not None:
            self.metrics.set_job_world_size(job.row.id, d.world_size)
        self._event(conn, job, now, "generation", d.reason)

    def _set_job_state(self, d: SetJobState, now: float, conn: sqlite3.Connection) -> None:
        job = self.jobs[d.job_id]
        assert controller.can_transition(job.state, d.state), f"{job.state} -> {d.state}"
        if d.release:
            self._end_generation(job, now, conn)
            for node_id in job.members:
                self._release(node_id, conn)
            job.members = []
            job.checkpoint_requested_at = None
            job.row.world_size = 0
            self._bill(job, now, ending=d.state.terminal)
        job.row.state = d.state.value
        job.row.message = d.reason
        job.row.updated_at = now
        self.store.put_job(job.row, conn)
        log.info("job=%s generation=%d: %s: %s", job.row.id, job.row.generation, d.state.value,
                 d.reason)
        if self.metrics is not None:
            if d.state.terminal:
                self.metrics.forget_job(job.row.id)
            elif d.release:
                self.metrics.set_job_world_size(job.row.id, 0)
        self._event(conn, job, now, "state", f"{d.state.value}: {d.reason}",
                    final=d.state.terminal)

    def _end_generation(self, job: JobRecord, now: float, conn: sqlite3.Connection) -> None:
        if job.row.generation == 0 or not job.members:
            return
        self.store.put_generation(
            GenerationRow(
                job_id=job.row.id,
                generation=job.row.generation,
                started_at=job.generation_started_at,
                members=list(job.members),
                nproc_per_node=job.spec.nproc_per_node,
                world_size=job.row.world_size,
                restore_step=job.restore_step,
                reason=job.generation_reason,
                ended_at=now,
            ),
            conn,
        )

    def _release(self, node_id: str, conn: sqlite3.Connection) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        if node.state is NodeState.ASSIGNED:
            _set_node_state(node, NodeState.READY)
        node.row.job_id = ""
        node.row.node_rank = 0
        self.store.put_node(node.row, conn)

    def _event(self, conn: sqlite3.Connection, job: JobRecord, now: float, kind: str,
               message: str, *, final: bool = False) -> None:
        row = EventRow(
            job_id=job.row.id,
            time=now,
            kind=kind,
            generation=job.row.generation,
            message=message,
            job=self.job_proto(job).SerializeToString(),
        )
        self.store.add_event(row, conn)
        self._pending.append((row, final))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for row, final in pending:
            self.events.publish(row, final=final)

    # ---- money (flow 8) -----------------------------------------------------------------

    def _billed_nodes(self, job: JobRecord) -> list[NodeRecord]:
        """The nodes the job pays for: its live members, and idle nodes a provider launched
        for it (they cost money while they wait to join it)."""
        members = [self.nodes[n] for n in job.members
                   if n in self.nodes and self.nodes[n].state is not NodeState.LOST]
        idle = [n for n in self.nodes.values()
                if n.launched_for == job.row.id and not n.row.job_id and n.row.id not in job.members
                and n.state in (NodeState.JOINING, NodeState.READY)]
        return members + sorted(idle, key=lambda n: n.row.id)

    def _bill(self, job: JobRecord, now: float, *, ending: bool = False) -> Ledger:
        """Charge the job's nodes up to now, and bill its nodes (none if `ending`) from now on."""
        quotes = {} if ending else {n.row.id: self._quote(n.row) for n in self._billed_nodes(job)}
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
        ledger = ledger.tick(now, prices)
        self.ledgers[job.row.id] = ledger
        job.row.cost_usd, job.row.cost_at = ledger.spent_usd, ledger.last_tick
        job.row.on_demand_usd = ledger.on_demand_equivalent_usd
        if self.metrics is not None:
            self.metrics.set_cost_total(job.row.id, ledger.spent_usd)
        return ledger

    def _quote(self, row: NodeRow) -> Quote:
        return self.pricer.quote(instance_type=row.instance_type, zone=row.zone,
                                 lifecycle=row.lifecycle, override_usd_per_hour=row.price_per_hour)

    @staticmethod
    def budget_job(job: JobRecord) -> BudgetJob:
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
        free = sorted(
            (n for n in self.nodes.values()
             if n.state in (NodeState.READY, NodeState.JOINING) and not n.row.job_id
             and (n.row.slots == 0 or n.row.slots >= job.spec.nproc_per_node)),
            key=lambda n: (n.launched_for != job.row.id, n.row.joined_at, n.row.id))
        prices = [self._quote(n.row).price.usd_per_hour for n in free[:room]]
        types = self.instance_types_for(job)
        new = self.pricer.type_price(types[0], job.spec.market or "spot") if types else None
        if new is not None:
            prices += [new] * (room - len(prices))
        return prices

    def _cap_growth(self, now: float) -> None:
        """Before each plan: the most nodes each running job's budget lets it grow to
        (budget.plan_growth_cap, priced with the nodes it would get), so the controller never
        takes a node the projection cannot carry, even one that just became free."""
        for job in self.jobs.values():
            ledger = self.ledgers.get(job.row.id)
            if job.state.terminal or not job.members or ledger is None:
                job.budget_cap = job.announced_cap = None  # nothing running, nothing to grow
                continue
            cap = plan_growth_cap(now, self.budget_job(job), ledger,
                                  tick_s=self.accounting_interval_s, max_nodes=job.spec.nodes.max,
                                  added_usd_per_hour=self._added_node_prices(job))
            job.budget_cap = cap.max_nodes if cap.refused else None
            job.budget_cap_reason = cap.reason

    def account(self, now: float) -> None:
        """An accounting tick: charge every live job; stop those the budget cannot carry for
        one more tick (BUDGET_EXHAUSTED; their agents' SIGTERM takes the final checkpoint);
        cap the growth of those whose projection to completion the budget cannot carry."""
        stops = []
        with self._transaction() as conn:
            for job in self.jobs.values():
                if job.state.terminal:
                    continue
                ledger = self._bill(job, now)
                decision = plan_budget(now, self.budget_job(job), ledger,
                                       tick_s=self.accounting_interval_s)
                if decision.action is BudgetAction.STOP:
                    self.store.put_job(job.row, conn)
                    stops.append(controller.SetJobState(
                        job_id=job.row.id, state=JobState.BUDGET_EXHAUSTED, release=True,
                        reason=decision.reason))
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
                    self._event(conn, job, now, "cost", message)
                self.store.put_job(job.row, conn)
        self._flush()
        for stop in stops:
            self.apply(stop, now)

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

    # ---- users' requests ----------------------------------------------------------------

    def submit(self, spec: jobs_pb2.JobSpec, now: float | None = None) -> JobRecord:
        """Store a validated spec as a PENDING job."""
        now = self.clock() if now is None else now
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        row = JobRow(
            id=job_id,
            spec=spec.SerializeToString(),
            name=spec.name,
            state=JobState.PENDING.value,
            created_at=now,
            updated_at=now,
            message="waiting for nodes",
        )
        job = JobRecord(row=row, spec=spec)
        with self._transaction() as conn:
            self.store.put_job(row, conn)
            self._event(conn, job, now, "state",
                        f"PENDING: submitted, wants {spec.nodes.min}-{spec.nodes.max} node(s) "
                        f"x {spec.nproc_per_node} process(es)")
        self.jobs[job_id] = job
        self._flush()
        log.info("job=%s: submitted (%s)", job_id, spec.name or "unnamed")
        return job

    def cancel(self, job_id: str, now: float | None = None) -> JobRecord:
        """Cancel a job; its nodes are told to stop at their next heartbeat.

        Raises UnknownJob, or ValueError if the job already ended.
        """
        now = self.clock() if now is None else now
        job = self.job(job_id)
        self.apply(controller.plan_cancel(now, self.job_view(job)), now)
        return job

    # ---- agents' calls ---------------------------------------------------------------------

    def register(self, req: agent_pb2.RegisterRequest, now: float | None = None
                 ) -> agent_pb2.RegisterResponse:
        """A node (re)joins. A re-register that matches the node's stored assignment keeps it
        (the daemon restarted under a running job); otherwise the node joins afresh, and if it
        was a member its job sees the loss."""
        now = self.clock() if now is None else now
        node_id = req.node_id or f"node-{uuid.uuid4().hex[:8]}"
        rec = self.nodes.get(node_id)
        fields = dict(
            instance_id=req.instance_id,
            instance_type=req.instance_type,
            zone=req.zone,
            lifecycle=req.lifecycle or "spot",
            gpus=req.gpus,
            slots=req.slots,
            address=req.address,
            store_port=req.store_port,
            price_per_hour=req.price_per_hour,
            log_dir=req.log_dir,
            provider_node=req.provider_node,
        )
        reason: str
        if rec is None:
            rec = NodeRecord(
                row=NodeRow(id=node_id, state=NodeState.JOINING.value, joined_at=now,
                            registered_at=now, **fields),
                last_seen=now,
            )
            self.nodes[node_id] = rec
            reason = "joined"
        else:
            for key, value in fields.items():
                setattr(rec.row, key, value)
            job = self.jobs.get(rec.row.job_id)
            member = (
                job is not None
                and node_id in job.members
                and rec.state in (NodeState.ASSIGNED, NodeState.DRAINING)
            )
            if member and req.current_job_id == rec.row.job_id:
                reason = (f"re-registered running generation {req.current_generation} of "
                          f"{req.current_job_id}: kept")
            elif rec.state is NodeState.DRAINING:
                # Under notice it never gets work again; if it was a member, its job sees a loss.
                reason = "re-registered while draining: stays out"
                rec.row.job_id = ""
            else:
                if member:
                    reason = (f"re-registered without its processes (runs "
                              f"{req.current_job_id or 'nothing'}): rejoins, its job sees a loss")
                else:
                    reason = "re-registered: joins again"
                _set_node_state(rec, NodeState.JOINING)
                rec.row.job_id = ""
                rec.row.joined_at = now
            rec.last_seen = now
        rec.reported_job_id = req.current_job_id
        rec.reported_generation = req.current_generation
        with self._transaction() as conn:
            self.store.put_node(rec.row, conn)
        log.info("node=%s job=%s generation=%d address=%s:%d: %s", node_id,
                 req.current_job_id or "-", req.current_generation, req.address, req.store_port,
                 reason)
        return agent_pb2.RegisterResponse(
            node_id=node_id,
            heartbeat_interval_s=self.heartbeat_interval_s,
            lease_s=self.policy.lease_s,
        )

    def heartbeat(self, req: agent_pb2.HeartbeatRequest, now: float | None = None
                  ) -> agent_pb2.HeartbeatResponse:
        """Renew the node's lease, take in its processes' exits, answer its assignment."""
        now = self.clock() if now is None else now
        rec = self.nodes.get(req.node_id)
        if rec is None or rec.state is NodeState.LOST:
            return agent_pb2.HeartbeatResponse(reregister=True)
        rec.last_seen = now
        rec.reported_job_id = req.job_id
        rec.reported_generation = req.generation
        rec.reported_running = any(p.running for p in req.processes)
        job = self.jobs.get(rec.row.job_id)
        if (
            job is not None
            and req.job_id == job.row.id
            and req.generation == job.row.generation
            and req.node_id in job.members
        ):
            exited = [(p.rank, p.exit_code) for p in req.processes if not p.running]
            if self._record_exits(job, req.node_id, exited, now):
                self.tick(now)
        return agent_pb2.HeartbeatResponse(assignment=self.assignment_for(req.node_id))

    def _record_exits(self, job: JobRecord, node_id: str, exited: Iterable[tuple[int, int]],
                      now: float) -> bool:
        """Note exits of the current generation's ranks; True if one is a new failure."""
        failed = False
        new = []
        for rank, code in exited:
            if rank in job.exit_codes:
                continue
            job.exit_codes[rank] = code
            new.append((rank, code))
            if code != 0:
                failed = True
                if job.failed_at is None:
                    job.failed_at = now
        if new:
            detail = ", ".join(f"rank {r} exited {c}" for r, c in new)
            log.log(logging.WARNING if failed else logging.INFO,
                    "job=%s generation=%d node=%s: %s", job.row.id, job.row.generation, node_id,
                    detail)
            if failed:
                with self._transaction() as conn:
                    self._event(conn, job, now, "node", f"{node_id}: {detail}")
                self._flush()
        return failed

    def report(self, req: agent_pb2.ReportEventRequest, now: float | None = None
               ) -> agent_pb2.ReportEventResponse:
        """Take in an agent's event. The fencing: an event whose (job, generation) is not the
        node's current assignment is refused and changes nothing; a checkpoint commit only
        needs its generation to be the job's newest (see below)."""
        now = self.clock() if now is None else now
        rec = self.nodes.get(req.node_id)
        if rec is None:
            return agent_pb2.ReportEventResponse(accepted=False,
                                                 reason=f"unknown node {req.node_id!r}")
        latest = self.jobs.get(req.job_id)
        if (
            req.WhichOneof("event") == "checkpoint_committed"
            and latest is not None
            and 0 < req.generation == latest.row.generation
        ):
            # A commit is fenced by its generation alone, as in storage (a manifest is valid
            # while no newer generation exists): when a job fell back to PENDING, the
            # processes of its last generation may still commit, and that commit is the
            # right place for the next generation to restore from.
            self._checkpoint(latest, req, now)
            self.tick(now)
            return agent_pb2.ReportEventResponse(accepted=True)
        if rec.state is NodeState.LOST:
            return agent_pb2.ReportEventResponse(accepted=False,
                                                 reason=f"node {req.node_id} was declared LOST")
        job = self.jobs.get(rec.row.job_id) if rec.row.job_id else None
        if job is not None and (req.node_id not in job.members or job.state.terminal):
            job = None
        expected = (job.row.id, job.row.generation) if job is not None else ("", 0)
        if (req.job_id, req.generation) != expected:
            current = (f"generation {expected[1]} of {expected[0]}" if expected[0]
                       else "no assignment")
            reason = (f"stale: event of generation {req.generation} of "
                      f"{req.job_id or 'no job'}, node {req.node_id} has {current}")
            log.warning("node=%s job=%s generation=%d: refused %s: %s", req.node_id,
                        req.job_id or "-", req.generation, req.WhichOneof("event"), reason)
            return agent_pb2.ReportEventResponse(accepted=False, reason=reason)

        kind = req.WhichOneof("event")
        if kind == "interruption_notice":
            self._notice(rec, job, req.interruption_notice, now)
        elif job is None:
            return agent_pb2.ReportEventResponse(accepted=False,
                                                 reason=f"{kind} needs an assigned job")
        elif kind == "process_exited":
            e = req.process_exited
            if self._record_exits(job, req.node_id, [(e.rank, e.exit_code)], now):
                self.tick(now)
        elif kind == "checkpoint_committed":
            self._checkpoint(job, req, now)
            self.tick(now)
        elif kind == "progress":
            self._progress(job, req.progress, now)
        elif kind == "restored":
            self._restored(job, req.restored, now)
        else:
            return agent_pb2.ReportEventResponse(accepted=False, reason="no event in the report")
        return agent_pb2.ReportEventResponse(accepted=True)

    def cloud_notice(self, instance_id: str, action: str, deadline: float,
                     now: float | None = None) -> bool:
        """A notice the cloud sent about an instance (read from a queue, not from its agent).
        Drains the node running on it; False if no live node has this instance id."""
        now = self.clock() if now is None else now
        rec = next((r for r in self.nodes.values()
                    if instance_id and r.row.instance_id == instance_id
                    and r.state is not NodeState.LOST), None)
        if rec is None:
            log.info("instance=%s: interruption notice %s for no known node", instance_id, action)
            return False
        job = self.jobs.get(rec.row.job_id) if rec.row.job_id else None
        if job is not None and (rec.row.id not in job.members or job.state.terminal):
            job = None
        self._notice(rec, job, agent_pb2.InterruptionNotice(action=action, deadline=deadline), now)
        return True

    def _notice(self, rec: NodeRecord, job: JobRecord | None,
                notice: agent_pb2.InterruptionNotice, now: float) -> None:
        message = (f"node {rec.row.id}: interruption notice {notice.action or '?'}"
                   + (f", gone in {notice.deadline - now:.0f}s" if notice.deadline else ""))
        with self._transaction() as conn:
            if rec.state is not NodeState.DRAINING:
                _set_node_state(rec, NodeState.DRAINING)
                rec.row.drain_since = now
                rec.row.drain_deadline = notice.deadline or None
                self.store.put_node(rec.row, conn)
            if job is not None:
                self._event(conn, job, now, "notice", message + ": draining (checkpoint now)")
        self._flush()
        log.warning("node=%s job=%s: %s", rec.row.id, job.row.id if job else "-", message)
        if self.metrics is not None and job is not None:
            self.metrics.inc_preemptions(job.row.id)
        self.tick(now)

    def _checkpoint(self, job: JobRecord, req: agent_pb2.ReportEventRequest, now: float) -> None:
        c = req.checkpoint_committed
        with self._transaction() as conn:
            self.store.add_checkpoint(
                CheckpointRow(job_id=job.row.id, generation=req.generation, step=c.step,
                              path=c.path, bytes=c.bytes, cursor=c.cursor, committed_at=now),
                conn,
            )
            if c.step >= job.row.last_checkpoint_step:  # reports may arrive out of order
                job.row.last_checkpoint_step = c.step
                job.row.last_checkpoint_path = c.path
            job.row.last_checkpoint_at = now
            job.row.failures = 0
            job.row.step = max(job.row.step, c.step)
            job.row.updated_at = now
            self.store.put_job(job.row, conn)
            self._event(conn, job, now, "checkpoint",
                        f"checkpoint at step {c.step} committed ({c.bytes} bytes): {c.path}")
        self._flush()
        log.info("job=%s generation=%d: checkpoint step %d committed: %s", job.row.id,
                 job.row.generation, c.step, c.path)

    def _restored(self, job: JobRecord, r: agent_pb2.Restored, now: float) -> None:
        """The generation restored step r.step. The daemon counted the steps between
        restore_step and where the job was as lost; a newer restore (a commit whose report
        died with its node) lost fewer, an older one (the chosen commit was torn) more."""
        lost = max(0, job.step_before - r.step) if job.step_before else 0
        with self._transaction() as conn:
            job.row.lost_steps = max(0, job.row.lost_steps + lost - job.lost_this_generation)
            job.lost_this_generation = lost
            if not job.restored_seen:
                job.row.step, job.restored_seen = r.step, True
            job.row.updated_at = now
            self.store.put_job(job.row, conn)
            chosen = max(job.restore_step, 0)
            note = f" (not step {chosen}: {lost} steps replayed)" if r.step != chosen else ""
            self._event(conn, job, now, "restored",
                        f"generation {job.row.generation} restored step {r.step} at world "
                        f"size {r.world_size}{note}")
        self._flush()

    def _progress(self, job: JobRecord, p: agent_pb2.Progress, now: float) -> None:
        with self._transaction() as conn:
            job.row.step = p.step
            # SQLite stores NaN as NULL (the column is NOT NULL): a diverged loss shows in the
            # event text and leaves the row's last finite loss.
            if math.isfinite(p.loss):
                job.row.loss = p.loss
            job.row.samples_per_second = p.samples_per_second
            job.progress_world_size = p.world_size
            job.row.updated_at = now
            types = {self.nodes[m].row.instance_type for m in job.members if m in self.nodes}
            if len(types) == 1 and job.members and p.samples_per_second > 0:
                itype = types.pop()
                if itype:  # per-node throughput of a one-type membership, for the ranking
                    job.type_samples_per_second[itype] = p.samples_per_second / len(job.members)
            self.store.put_job(job.row, conn)
            if self.metrics is not None and job.spec.global_batch_size:
                self.metrics.set_job_steps_per_second(
                    job.row.id, p.samples_per_second / job.spec.global_batch_size)
            self._event(conn, job, now, "progress",
                        f"step {p.step} loss {p.loss:.4f} {p.samples_per_second:.1f} samples/s "
                        f"world {p.world_size}")
        self._flush()

    # ---- views ------------------------------------------------------------------------------

    def assignment_for(self, node_id: str) -> agent_pb2.Assignment:
        """What the node must run now; an empty assignment means: run nothing."""
        rec = self.nodes.get(node_id)
        job = self.jobs.get(rec.row.job_id) if rec is not None and rec.row.job_id else None
        if rec is None or job is None or job.state.terminal or node_id not in job.members:
            return agent_pb2.Assignment()
        nproc = job.spec.nproc_per_node
        rank = job.members.index(node_id)
        master = self.nodes[job.members[0]].row
        members = {n: self.node_view(self.nodes[n]) for n in job.members if n in self.nodes}
        drain = controller.checkpoint_now(self.job_view(job), members)
        return agent_pb2.Assignment(
            job_id=job.row.id,
            generation=job.row.generation,
            spec=job.spec,
            world_size=len(job.members) * nproc,
            node_rank=rank,
            num_nodes=len(job.members),
            rank_start=rank * nproc,
            nproc=nproc,
            master_addr=master.address,
            master_port=master.store_port,
            restore_step=job.restore_step,
            checkpoint_now=drain,
        )

    def job_proto(self, job: JobRecord) -> jobs_pb2.Job:
        r = job.row
        return jobs_pb2.Job(
            id=r.id,
            spec=job.spec,
            state=job_state_proto(job.state),
            generation=r.generation,
            world_size=r.world_size,
            step=r.step,
            last_checkpoint_step=max(r.last_checkpoint_step, 0),
            last_checkpoint_path=r.last_checkpoint_path,
            samples_per_second=r.samples_per_second,
            loss=r.loss,
            cost_usd=r.cost_usd,
            message=r.message,
            created_at=r.created_at,
            updated_at=r.updated_at,
            node_ids=list(job.members),
            lost_steps=r.lost_steps,
            provider_nodes=[self.nodes[m].row.provider_node if m in self.nodes else ""
                            for m in job.members],
        )

    def event_proto(self, row: EventRow) -> jobs_pb2.JobEvent:
        job = jobs_pb2.Job.FromString(row.job) if row.job else jobs_pb2.Job(id=row.job_id)
        return jobs_pb2.JobEvent(job_id=row.job_id, time=row.time, kind=row.kind,
                                 generation=row.generation, message=row.message, job=job)
