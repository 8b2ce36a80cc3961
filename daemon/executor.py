"""Carrying out the controller's decisions: records changed in memory, staged in the outbox.

Each `apply` changes the records a decision names, stages the changed rows, the event that
describes it and the new assignments of the nodes it touches (`outbox.Outbox`), and logs the
decision's reason. Nothing here waits for the disk: the control loop writes the tick's outbox
in one transaction and publishes it after the commit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from spotwise.daemon import controller
from spotwise.daemon.model import (
    Decision,
    NodeLost,
    NodesReady,
    NodeState,
    RequestCheckpoint,
    SetJobState,
    StartGeneration,
)
from spotwise.daemon.outbox import Outbox
from spotwise.daemon.state import JobRecord, State, set_node_state
from spotwise.daemon.store import EventRow, GenerationRow
from spotwise.daemon.wire import job_proto

if TYPE_CHECKING:
    from spotwise.daemon.billing import Billing
    from spotwise.daemon.metrics import Metrics

log = logging.getLogger("spotwise.daemon.coordinator")


class Executor:
    """Applies decisions to the state; every change goes through the outbox."""

    def __init__(self, state: State, outbox: Outbox, *, billing: Billing,
                 metrics: Metrics | None, max_progress_events: int = 4000) -> None:
        self.state = state
        self.max_progress_events = max_progress_events
        self.outbox = outbox
        self.billing = billing
        self.metrics = metrics

    def event(self, job: JobRecord, now: float, kind: str, message: str, *,
              final: bool = False) -> None:
        """Store an event with the job's figures as they are now (published after commit)."""
        row = EventRow(job_id=job.row.id, time=now, kind=kind, generation=job.row.generation,
                       message=message,
                       job=job_proto(job, self.state.nodes, with_spec=False).SerializeToString())
        self.outbox.event(row, final=final)

    def store_progress(self, job: JobRecord, now: float) -> None:
        """Stage the job's progress since it was last stored (its row and one progress point),
        thinning the stored points by half past the bound. Called every few seconds, and
        before a generation ends, so that the last steps of every generation are kept."""
        if not job.progress_dirty:
            return
        job.progress_dirty = False
        job.row.updated_at = now
        self.outbox.stage(job.row)
        r = job.row
        self.event(job, now, "progress",
                   f"step {r.step} loss {job.last_progress_loss:.4f} "
                   f"{r.samples_per_second:.1f} samples/s world {job.progress_world_size}")
        job.progress_events += 1
        if job.progress_events > self.max_progress_events:
            self.outbox.thin_progress(job.row.id)
            job.progress_events //= 2

    def apply(self, decision: Decision, now: float) -> None:
        if isinstance(decision, NodeLost):
            self._node_lost(decision, now)
        elif isinstance(decision, NodesReady):
            for node_id in decision.node_ids:
                rec = self.state.nodes[node_id]
                set_node_state(rec, NodeState.READY)
                self.state.changed(rec)
                self.outbox.stage(rec.row)
            log.info("nodes=%s: READY: %s", ",".join(decision.node_ids), decision.reason)
        elif isinstance(decision, StartGeneration):
            self._start_generation(decision, now)
        elif isinstance(decision, RequestCheckpoint):
            job = self.state.jobs[decision.job_id]
            job.checkpoint_requested_at = now if decision.on else None
            self.outbox.reassign(job_id=job.row.id)
            log.info("job=%s generation=%d: %s", job.row.id, job.row.generation, decision.reason)
        elif isinstance(decision, SetJobState):
            self._set_job_state(decision, now)
        else:  # pragma: no cover - the Decision union is closed
            raise AssertionError(f"unknown decision {decision!r}")

    def _node_lost(self, d: NodeLost, now: float) -> None:
        rec = self.state.nodes[d.node_id]
        set_node_state(rec, NodeState.LOST)
        self.state.changed(rec)
        self.outbox.stage(rec.row)
        self.outbox.reassign(node_id=d.node_id)
        log.warning("node=%s job=%s: LOST: %s", d.node_id, rec.row.job_id or "-", d.reason)
        job = self.state.jobs.get(rec.row.job_id)
        if job is not None and job.node_rank(d.node_id) is not None:
            self.event(job, now, "node", d.reason)
            if self.metrics is not None:
                self.metrics.inc_preemptions(job.row.id)

    def _start_generation(self, d: StartGeneration, now: float) -> None:
        job = self.state.jobs[d.job_id]
        old_state = job.state
        assert d.state is old_state or controller.can_transition(old_state, d.state), (
            f"{old_state} -> {d.state}"
        )
        self._end_generation(job, now)
        job.step_before, job.restored_seen, job.starting = job.row.step, False, True
        job.lost_this_generation = max(0, job.row.step - max(d.restore_step, 0))
        job.row.lost_steps += job.lost_this_generation
        job.row.step = max(d.restore_step, 0)
        staying = set(d.members)  # not a scan of 4,000 members for each of 4,000 members
        for node_id in job.members:
            if node_id not in staying:
                self._release(node_id)
        for rank, node_id in enumerate(d.members):
            node = self.state.nodes[node_id]
            if node.state is not NodeState.DRAINING:
                set_node_state(node, NodeState.ASSIGNED)
            node.row.job_id = job.row.id
            node.row.node_rank = rank
            self.state.changed(node)
            self.outbox.stage(node.row)
        job.members = list(d.members)
        job.generation_members = list(d.members)
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
        self.billing.bill(job, now)
        self.outbox.stage(job.row)
        self.outbox.stage(GenerationRow(
            job_id=job.row.id, generation=d.generation, started_at=now, members=list(d.members),
            nproc_per_node=job.spec.nproc_per_node, world_size=d.world_size,
            restore_step=d.restore_step, reason=d.reason))
        self.outbox.reassign(job_id=job.row.id)
        log.info("job=%s generation=%d nodes=%s: %s", job.row.id, d.generation,
                 ",".join(d.members) if len(d.members) <= 16 else f"{len(d.members)} nodes",
                 d.reason if len(d.reason) <= 400 else d.reason[:400] + "...")
        if self.metrics is not None:
            self.metrics.set_job_world_size(job.row.id, d.world_size)
            self.metrics.set_job_generation(job.row.id, d.generation)
        self.event(job, now, "generation", d.reason)

    def _set_job_state(self, d: SetJobState, now: float) -> None:
        job = self.state.jobs[d.job_id]
        assert controller.can_transition(job.state, d.state), f"{job.state} -> {d.state}"
        if d.release:
            self._end_generation(job, now)
            for node_id in job.members:
                self._release(node_id)
            job.members = []
            job.checkpoint_requested_at = None
            job.row.world_size = 0
        job.row.state = d.state.value
        if d.state.terminal:
            job.ended_at = now
        if d.release or d.state.terminal:
            # Its machines are charged until they are gone (Billing.charged_to).
            self.billing.bill(job, now)
        job.row.message = d.reason
        job.row.updated_at = now
        self.outbox.stage(job.row)
        log.info("job=%s generation=%d: %s: %s", job.row.id, job.row.generation, d.state.value,
                 d.reason)
        if self.metrics is not None:
            if d.state.terminal:
                self.metrics.forget_job(job.row.id)
            elif d.release:
                self.metrics.set_job_world_size(job.row.id, 0)
        self.event(job, now, "state", f"{d.state.value}: {d.reason}", final=d.state.terminal)

    def _end_generation(self, job: JobRecord, now: float) -> None:
        self.store_progress(job, now)
        if job.row.generation == 0 or not job.members:
            return
        self.outbox.stage(GenerationRow(
            job_id=job.row.id, generation=job.row.generation,
            started_at=job.generation_started_at, members=list(job.members),
            nproc_per_node=job.spec.nproc_per_node, world_size=job.row.world_size,
            restore_step=job.restore_step, reason=job.generation_reason, ended_at=now))

    def _release(self, node_id: str) -> None:
        node = self.state.nodes.get(node_id)
        if node is None:
            return
        if node.state is NodeState.ASSIGNED:
            set_node_state(node, NodeState.READY)
        node.last_job = node.row.job_id or node.last_job
        node.row.job_id = ""
        node.row.node_rank = 0
        self.state.changed(node)
        self.outbox.stage(node.row)
        self.outbox.reassign(node_id=node_id)

