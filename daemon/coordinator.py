"""The coordinator: the daemon's state and the one control loop's tick, behind one object.

    coordinator.submit(spec, owner="alice")     # users' requests (staged)
    coordinator.agents.register(req, now)        # agents' calls record facts (daemon.agents)
    coordinator.tick(now)                        # plan, carry out, commit, publish

Where things happen, one module each: `state` (records and views), `controller` (the pure
plan), `executor` (decisions carried out), `billing` (money), `agents` (the agent protocol),
`outbox` (a tick's writes and what is published after they commit), `wire` (messages), and
`loop` (the async control loop that runs `plan_tick`, writes the batch in a thread, and
publishes it). Everything runs on the daemon's event loop thread, except the batch write.

`autocommit=True` (tests, tools) commits each request and tick inline; the daemon passes
False and lets the control loop commit.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from spotwise.cloud.provider import ProviderNode
from spotwise.daemon import controller
from spotwise.daemon.agents import AgentProtocol, NodeCredentialError
from spotwise.daemon.billing import Billing, Unpriced
from spotwise.daemon.events import EventBus
from spotwise.daemon.executor import Executor
from spotwise.daemon.model import Decision, JobState, JobView, NodeView, Policy
from spotwise.daemon.outbox import Batch, Outbox, fail, publish
from spotwise.daemon.prices import NodePricer
from spotwise.daemon.state import JobRecord, NodeRecord, State, UnknownJob
from spotwise.daemon.store import JobRow, Store
from spotwise.daemon.wire import AssignmentCache, compute_assignments, event_proto, job_proto
from spotwise.proto.v1 import agent_pb2, jobs_pb2

if TYPE_CHECKING:
    from spotwise.daemon.metrics import Metrics

log = logging.getLogger(__name__)

STOPPED_EXIT_CODE = 143
"""A training process stopped on request (SIGTERM) exits with this."""

__all__ = ["Coordinator", "JobRecord", "NodeCredentialError", "NodeRecord", "UnknownJob",
           "Unpriced"]


class Coordinator:
    """Jobs and nodes, the agent protocol, and the carrying out of the controller's decisions."""

    def __init__(
        self,
        store: Store,
        *,
        policy: Policy,
        heartbeat_interval_s: float,
        restart_grace_s: float = 15.0,
        accounting_interval_s: float = 5.0,
        progress_interval_s: float = 5.0,
        max_progress_events: int = 4000,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        pricer: NodePricer | None = None,
        default_instance_types: tuple[str, ...] = (),
        agent_prices: bool = False,
        provider_price: Callable[[str], float | None] | None = None,
        provider_prices_all: bool = False,
        teardown_s: float = 0.0,
        autocommit: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`pricer` quotes each node's price (default: the offline table). `agent_prices`:
        charge what agents say their node costs (only for fleets whose agents the operator
        controls). `progress_interval_s`: how often progress is stored; `max_progress_events`:
        a job's stored progress points are thinned to half past this. `provider_prices_all`:
        the provider prices every node it launches; `teardown_s`: what a stopped job still
        costs, in seconds of its nodes (the budget stop's margin)."""
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.clock = clock
        self.autocommit = autocommit
        self.accounting_interval_s = accounting_interval_s
        self.progress_interval_s = progress_interval_s
        self.max_progress_events = max_progress_events
        self.events = events or EventBus(store)
        self.outbox = Outbox()
        self.state = State(store, policy=policy, restart_grace_s=restart_grace_s, clock=clock)
        self.billing = Billing(self.state, self.outbox, pricer=pricer or NodePricer(clock=clock),
                               accounting_interval_s=accounting_interval_s,
                               default_instance_types=tuple(default_instance_types),
                               metrics=metrics, clock=clock, provider_price=provider_price,
                               provider_prices_all=provider_prices_all, teardown_s=teardown_s)
        self.executor = Executor(self.state, self.outbox, billing=self.billing, metrics=metrics,
                                 max_progress_events=max_progress_events)
        self.assignments = AssignmentCache()
        self.wake: Callable[[], None] = lambda: None
        """Wakes the control loop (set by daemon.loop.ControlLoop)."""
        self.agents = AgentProtocol(self.state, self.outbox, self.executor, self.assignments,
                                    heartbeat_interval_s=heartbeat_interval_s,
                                    lease_s=policy.lease_s, agent_prices=agent_prices,
                                    metrics=metrics, wake=lambda: self.wake())
        self._next_accounting = 0.0
        self._next_progress = 0.0
        self.load()

    # ---- state ------------------------------------------------------------------------

    @property
    def jobs(self) -> dict[str, JobRecord]:
        return self.state.jobs

    @property
    def nodes(self) -> dict[str, NodeRecord]:
        return self.state.nodes

    @property
    def pricer(self) -> NodePricer:
        return self.billing.pricer

    @property
    def ledgers(self):  # noqa: ANN201 - dict[str, Ledger]
        return self.billing.ledgers

    def load(self) -> None:
        """(Re)load the state from the store and serve the stored assignments."""
        self.outbox.clear()
        self.state.load()
        if self.metrics is not None:
            for job in self.state.jobs.values():
                if not job.state.terminal:
                    self.metrics.set_job_generation(job.row.id, job.row.generation)
                    if job.row.last_checkpoint_at:
                        self.metrics.set_job_last_checkpoint(job.row.id, job.row.last_checkpoint_at)
        self.assignments.install(compute_assignments(
            self.state.jobs, self.state.nodes, self.state.member_views,
            {j for j, rec in self.state.jobs.items() if not rec.state.terminal},
            set(self.state.nodes)))

    def job(self, job_id: str) -> JobRecord:
        return self.state.job(job_id)

    @staticmethod
    def job_view(rec: JobRecord) -> JobView:
        return rec.view()

    @staticmethod
    def node_view(rec: NodeRecord) -> NodeView:
        return rec.view

    def snapshot(self) -> controller.ClusterState:
        return self.state.snapshot()

    def job_proto(self, job: JobRecord) -> jobs_pb2.Job:
        return job_proto(job, self.state.nodes)

    @staticmethod
    def event_proto(row) -> jobs_pb2.JobEvent:  # noqa: ANN001 - EventRow
        return event_proto(row)

    def assignment_for(self, node_id: str) -> agent_pb2.Assignment:
        """What the node runs now, as committed (an empty assignment: run nothing)."""
        return self.assignments.get(node_id)[1]

    def cost_report(self, job: JobRecord, now: float | None = None) -> jobs_pb2.CostReport:
        return self.billing.cost_report(job, now)

    def instance_types_for(self, job: JobRecord) -> tuple[str, ...]:
        return self.billing.instance_types_for(job)

    def budget_job(self, job: JobRecord):  # noqa: ANN201 - BudgetJob
        return self.billing.budget_job(job)

    # ---- the tick ---------------------------------------------------------------------

    def plan_tick(self, now: float | None = None, *, lag_s: float = 0.0) -> list[Decision]:
        """Plan over the current facts and carry the decisions out in memory (staged).
        `lag_s`: how late the event loop runs (leases are extended by it)."""
        now = self.clock() if now is None else now
        self.billing.cap_growth(now)
        decisions = controller.plan(now, self.state.snapshot(lag_s), self.policy)
        for decision in decisions:
            self.executor.apply(decision, now)
        if now >= self._next_accounting:
            self._account(now)
        if now >= self._next_progress:
            self._next_progress = now + self.progress_interval_s
            self._store_progress(now)
        self._check_checkpoints(now)
        if self.metrics is not None:
            self.metrics.set_jobs_by_state(Counter(j.state.value for j in self.state.jobs.values()))
        return decisions

    def _account(self, now: float) -> None:
        self._next_accounting = now + self.accounting_interval_s
        for stop in self.billing.account(now, self.executor.event):
            self.executor.apply(stop, now)

    def account(self, now: float) -> None:
        """An accounting tick on its own (charge, budget stops, caps), committed inline."""
        self._account(now)
        self.commit()

    def take(self) -> Batch:
        """The staged changes (values copied now) and the assignments they imply."""
        return self.outbox.take(lambda jobs, nodes: compute_assignments(
            self.state.jobs, self.state.nodes, self.state.member_views, jobs, nodes))

    def committed(self, batch: Batch) -> None:
        """The batch is stored: publish it."""
        publish(batch, self.events, self.assignments.install)

    def write_failed(self, batch: Batch, error: BaseException) -> None:
        """The batch could not be stored: what it held did not happen. Memory is reloaded
        from the store and nothing of it is published."""
        log.error("a store write failed (%s): reloading the state from %s", error,
                  self.store.path)
        fail(batch, error)
        self.load()

    def commit(self) -> None:
        """Write what is staged now, inline (autocommit and tools; the daemon's loop writes
        in a thread). Raises the store's error after reloading."""
        batch = self.take()
        if batch.empty:
            return
        try:
            self.store.write_batch(batch.stored)
        except BaseException as exc:
            self.write_failed(batch, exc)
            raise
        self.committed(batch)

    def tick(self, now: float | None = None) -> list[Decision]:
        """Plan, carry out and commit, inline."""
        decisions = self.plan_tick(now)
        self.commit()
        return decisions

    def _autocommit(self) -> None:
        if self.autocommit:
            self.commit()

    def _store_progress(self, now: float) -> None:
        """Progress is soft state: each job's row and one progress point every few seconds."""
        for job in self.state.jobs.values():
            self.executor.store_progress(job, now)

    def _check_checkpoints(self, now: float) -> None:
        """Flag a running job that cannot commit (controller.checkpoint_alarm)."""
        for job in self.state.jobs.values():
            if job.state is not JobState.RUNNING or job.checkpoint_flagged:
                continue
            alarm = controller.checkpoint_alarm(
                now, failures=job.row.checkpoint_failures,
                last_commit_at=max(job.row.last_checkpoint_at, job.generation_started_at),
                every_steps=job.spec.checkpoint.every_steps, policy=self.policy)
            if alarm is None:
                continue
            job.checkpoint_flagged = True
            job.row.message = alarm
            job.row.updated_at = now
            self.outbox.stage(job.row)
            self.executor.event(job, now, "checkpoint_failed", alarm)
            log.warning("job=%s generation=%d: %s", job.row.id, job.row.generation, alarm)

    # ---- users' requests ----------------------------------------------------------------

    def submit(self, spec: jobs_pb2.JobSpec, now: float | None = None, *, owner: str = ""
               ) -> JobRecord:
        """Store a validated spec as a PENDING job owned by `owner` (staged; committed at
        once with autocommit). Raises Unpriced for a budget on machines nobody prices."""
        why = self.billing.unpriced(spec)
        if why:
            raise Unpriced(why)
        now = self.clock() if now is None else now
        job_id = f"job-{uuid.uuid4().hex[:10]}"
        row = JobRow(id=job_id, spec=spec.SerializeToString(), name=spec.name,
                     state=JobState.PENDING.value, created_at=now, updated_at=now,
                     message="waiting for nodes", owner=owner)
        job = JobRecord(row=row, spec=spec)
        self.state.jobs[job_id] = job
        self.outbox.stage(row)
        self.executor.event(job, now, "state",
                            f"PENDING: submitted, wants {spec.nodes.min}-{spec.nodes.max} node(s) "
                            f"x {spec.nproc_per_node} process(es)")
        log.info("job=%s: submitted by %s (%s)", job_id, owner or "-", spec.name or "unnamed")
        self.wake()
        self._autocommit()
        return job

    def provider_seen(self, machines: Collection[ProviderNode], now: float | None = None) -> None:
        """The provider lists these live machines now (the fleet loop): a machine is charged
        from its first listing to the first that no longer shows it."""
        self.billing.provider_seen(machines, self.clock() if now is None else now)
        self.wake()
        self._autocommit()

    def cancel(self, job_id: str, now: float | None = None, *, by: str = "") -> JobRecord:
        """Cancel a job; its nodes are told to stop once the change commits.

        Raises UnknownJob, or ValueError if the job already ended.
        """
        now = self.clock() if now is None else now
        job = self.job(job_id)
        decision = controller.plan_cancel(now, job.view())
        log.info("job=%s: cancelled by %s", job_id, by or "-")
        self.executor.apply(decision, now)
        self.wake()
        self._autocommit()
        return job

    # ---- agents' calls (synchronous forms: tests and tools) ------------------------------

    def register(self, req: agent_pb2.RegisterRequest, now: float | None = None
                 ) -> agent_pb2.RegisterResponse:
        resp = self.agents.register(req, self.clock() if now is None else now)
        self._autocommit()
        return resp

    def heartbeat(self, req: agent_pb2.HeartbeatRequest, now: float | None = None
                  ) -> agent_pb2.HeartbeatResponse:
        """A unary heartbeat. Raises NodeCredentialError for a known node without its
        credential; an unknown node is told to register again."""
        rec = self.state.nodes.get(req.node_id)
        if rec is not None:
            rec = self.agents.authenticate(req.node_id, req.node_secret)
        return self.agents.beat(rec, req, self.clock() if now is None else now)

    def report(self, req: agent_pb2.ReportEventRequest, now: float | None = None
               ) -> agent_pb2.ReportEventResponse:
        """An agent's report. Raises NodeCredentialError without the node's credential."""
        rec = self.agents.authenticate(req.node_id, req.node_secret)
        return self.agents.report(rec, req, self.clock() if now is None else now)

    def cloud_notice(self, instance_id: str, action: str, deadline: float,
                     now: float | None = None) -> bool:
        return self.agents.cloud_notice(instance_id, action, deadline,
                                        self.clock() if now is None else now)
