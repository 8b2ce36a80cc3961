"""Where a heartbeat is answered: the agent protocol's handlers (flows 3, 5, 6, 7).

Handlers record facts and wake the control loop; they never run the planner and never wait
for the disk (Register alone answers after its write commits, which its servicer awaits).

- `register`: checks the node's credential (`admission.check_credential`), applies
  `admission.plan_register`, issues a credential to a new node, stages the row.
- `beat`: renews the lease, records what runs and the exits of the node's own ranks, and
  answers in O(1) from the committed assignment (`wire.AssignmentCache`).
- `report`: `admission.report_verdict` decides whether a report counts; a commit, a notice, a
  failed checkpoint or a restore is recorded and staged; progress is soft state.
- `cloud_notice`: a notice read from the cloud's queue, matched to a node by instance id.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from spotwise.common.uri import job_uri
from spotwise.daemon import admission
from spotwise.daemon.admission import RegisterAction, ReportFacts, Route
from spotwise.daemon.executor import Executor
from spotwise.daemon.model import NodeState
from spotwise.daemon.outbox import Outbox
from spotwise.daemon.state import JobRecord, NodeRecord, State, set_node_state
from spotwise.daemon.store import CheckpointRow, NodeRow
from spotwise.daemon.wire import AssignmentCache
from spotwise.proto.v1 import agent_pb2

if TYPE_CHECKING:
    from spotwise.daemon.metrics import Metrics

log = logging.getLogger("spotwise.daemon.coordinator")


class NodeCredentialError(PermissionError):
    """A call named a node id without that node's credential."""


class MachineClaimed(Exception):
    """A Register named the cloud instance or provider node of another live node. Retryable:
    the machine's old node (an agent restarted without its credential) is lost at its lease's
    end, and then a node on that machine may register."""


class HeartbeatConnection(Protocol):
    """A node's open heartbeat connection, on either transport."""

    def retire(self) -> None:
        """A newer connection of the same node replaced this one: stop serving it (now, or
        at its next beat)."""


_REREGISTER = agent_pb2.HeartbeatResponse(reregister=True)


class AgentProtocol:
    """Register, heartbeats, reports and notices, over the shared state."""

    def __init__(self, state: State, outbox: Outbox, executor: Executor,
                 assignments: AssignmentCache, *, heartbeat_interval_s: float, lease_s: float,
                 agent_prices: bool, metrics: Metrics | None, wake: Callable[[], None]) -> None:
        self.state = state
        self.outbox = outbox
        self.executor = executor
        self.assignments = assignments
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_s = lease_s
        self.beat_port = 0
        """The beat channel's port, told at Register (0: none; set when it listens)."""
        self.agent_prices = agent_prices
        self.metrics = metrics
        self.wake = wake
        self.beating: dict[str, HeartbeatConnection] = {}
        """Node id -> its one heartbeat connection (a gRPC Heartbeats stream or a beat-channel
        connection): a newer one, on either transport, replaces it (`bind`)."""

    # ---- identity -------------------------------------------------------------------------

    def authenticate(self, node_id: str, secret: str) -> NodeRecord:
        """The node `node_id` names, if `secret` is its credential; NodeCredentialError else."""
        rec = self.state.nodes.get(node_id)
        if rec is None or not admission.check_credential(rec.row.secret_hash, secret):
            raise NodeCredentialError(f"node {node_id[:64]!r}: unknown node or wrong credential")
        return rec

    def bind(self, node_id: str, connection: HeartbeatConnection) -> None:
        """Make `connection` the node's one heartbeat connection (the caller authenticated
        it), and retire the one it replaces: a node holds one, whichever transport."""
        old = self.beating.get(node_id)
        self.beating[node_id] = connection
        if old is not None and old is not connection:
            old.retire()

    def unbind(self, node_id: str, connection: HeartbeatConnection) -> None:
        """`connection` closed: forget it, unless a newer one replaced it already."""
        if self.beating.get(node_id) is connection:
            del self.beating[node_id]

    # ---- Register -------------------------------------------------------------------------

    def register(self, req: agent_pb2.RegisterRequest, now: float) -> agent_pb2.RegisterResponse:
        """A node (re)joins (staged; the caller awaits the commit before answering).

        Raises NodeCredentialError when req.node_id is a known node and req.node_secret is not
        its credential: the enrollment token alone cannot take over, redirect or reset a node.
        Raises MachineClaimed when the request names the instance or provider node of another
        live node (nothing changes): the enrollment token cannot steal a machine's notices,
        bill or termination either.
        """
        node_id = req.node_id or f"node-{uuid.uuid4().hex[:10]}"
        rec = self.state.nodes.get(node_id)
        if rec is not None and not admission.check_credential(rec.row.secret_hash,
                                                               req.node_secret):
            raise NodeCredentialError(
                f"node {node_id[:64]!r} exists and this call does not hold its credential; "
                "register without a node id to join as a new node")
        claimed = self.state.machine_holder(req.instance_id, req.provider_node,
                                            other_than=node_id)
        if claimed is not None:
            holder, handle = claimed
            raise MachineClaimed(
                f"machine {handle[:128]!r} runs live node {holder.row.id}; another node can "
                f"register on it once that node is lost (lease {self.lease_s:g}s), or as "
                "that node with its credential")
        if req.price_per_hour and not self.agent_prices:
            log.info("node=%s: ignoring the agent's price_per_hour %.4f (agent_prices is off: "
                     "the price book prices nodes)", node_id, req.price_per_hour)
        fields = dict(
            instance_id=req.instance_id, instance_type=req.instance_type, zone=req.zone,
            lifecycle=req.lifecycle or "spot", gpus=req.gpus, slots=req.slots,
            address=req.address, store_port=req.store_port,
            price_per_hour=req.price_per_hour if self.agent_prices else 0.0,
            log_dir=req.log_dir, provider_node=req.provider_node,
        )
        job = self.state.jobs.get(rec.row.job_id) if rec is not None else None
        decision = admission.plan_register(
            known=rec is not None, state=rec.state if rec is not None else None,
            assigned_job=rec.row.job_id if rec is not None else "",
            is_member=job is not None and job.node_rank(node_id) is not None,
            running_job=req.current_job_id, running_generation=req.current_generation)
        secret = ""
        if decision.action is RegisterAction.NEW:
            secret, digest = admission.new_secret()
            rec = NodeRecord(row=NodeRow(id=node_id, state=NodeState.JOINING.value,
                                         joined_at=now, registered_at=now, secret_hash=digest,
                                         **fields), last_seen=now)
            self.state.add_node(rec)
        else:
            assert rec is not None
            for key, value in fields.items():
                setattr(rec.row, key, value)
            if decision.action in (RegisterAction.STAY_OUT, RegisterAction.REJOIN):
                rec.last_job = rec.row.job_id or rec.last_job
                rec.row.job_id = ""
            if decision.action is RegisterAction.REJOIN:
                set_node_state(rec, NodeState.JOINING)
                rec.row.joined_at = now
            rec.last_seen = now
            if job is not None and decision.action is RegisterAction.KEEP:
                self.outbox.reassign(job_id=job.row.id)  # its address may have changed
        rec.reported_job_id = req.current_job_id
        rec.reported_generation = req.current_generation
        rec.beaten = False  # READY once a beat shows its heartbeat path works
        self.state.changed(rec)
        self.outbox.stage(rec.row)
        self.outbox.reassign(node_id=node_id)
        self.wake()
        log.info("node=%s job=%s generation=%d address=%s:%d: %s", node_id,
                 req.current_job_id or "-", req.current_generation, req.address, req.store_port,
                 decision.reason)
        return agent_pb2.RegisterResponse(node_id=node_id,
                                          heartbeat_interval_s=self.heartbeat_interval_s,
                                          lease_s=self.lease_s, node_secret=secret,
                                          beat_port=self.beat_port)

    # ---- heartbeats -----------------------------------------------------------------------

    def beat(self, rec: NodeRecord | None, req: agent_pb2.HeartbeatRequest, now: float
             ) -> agent_pb2.HeartbeatResponse:
        """Renew the node's lease, take in its processes' exits, answer its assignment. O(1)
        in the fleet's size (the answer was built when the membership changed)."""
        if rec is None or rec.state is NodeState.LOST:
            return _REREGISTER
        self.state.heard_from(rec, now)
        running = False
        for p in req.processes:
            if p.running:
                running = True
                break
        rec.reported_running = running  # not in the node's view
        changed = False  # a beat with nothing new rebuilds no view
        if (rec.reported_job_id, rec.reported_generation) != (req.job_id, req.generation):
            rec.reported_job_id, rec.reported_generation = req.job_id, req.generation
            changed = True
            if rec.row.job_id:
                self.wake()  # a RESCALING job may now run everywhere
        if not rec.beaten:
            rec.beaten = changed = True
            if rec.state is NodeState.JOINING:
                # It joins the batch now that it can be used (join batching counts from here,
                # not from a Register whose first beat was slow to connect).
                rec.row.joined_at = now
                self.outbox.stage(rec.row)
            self.wake()  # it may be made READY
        if changed:
            self.state.changed(rec)
        job = self.state.jobs.get(rec.row.job_id) if rec.row.job_id else None
        if (job is not None and req.job_id == job.row.id
                and req.generation == job.row.generation
                and job.node_rank(rec.row.id) is not None):
            exited = [(p.rank, p.exit_code) for p in req.processes if not p.running]
            if exited:
                self.record_exits(job, rec.row.id, exited, now)
        return self.assignments.answer(rec.row.id, req.assignment_version)

    def record_exits(self, job: JobRecord, node_id: str, exited: Iterable[tuple[int, int]],
                     now: float) -> None:
        """Note exits of the node's own ranks of the current generation; a new failure is an
        event and wakes the loop."""
        rank, nproc = job.node_rank(node_id), job.spec.nproc_per_node
        ranks = range(rank * nproc, (rank + 1) * nproc) if rank is not None else range(0)
        new = [(r, c) for r, c in exited if r in ranks and r not in job.exit_codes]
        if not new:
            return
        failed = False
        for rank, code in new:
            job.exit_codes[rank] = code
            if code != 0:
                failed = True
                if job.failed_at is None:
                    job.failed_at = now
        detail = ", ".join(f"rank {r} exited {c}" for r, c in new)
        log.log(logging.WARNING if failed else logging.INFO,
                "job=%s generation=%d node=%s: %s", job.row.id, job.row.generation, node_id,
                detail)
        if failed:
            self.executor.event(job, now, "node", f"{node_id}: {detail}")
        self.wake()

    # ---- reports --------------------------------------------------------------------------

    def _facts(self, rec: NodeRecord, job: JobRecord | None) -> ReportFacts:
        if job is None:
            return ReportFacts(node_state=rec.state, node_job=rec.row.job_id, job_generation=0,
                               job_members=(), generation_members=(), job_terminal=True,
                               nproc_per_node=1,
                               checkpoint_root="")
        ck = job.spec.checkpoint.uri
        return ReportFacts(node_state=rec.state, node_job=rec.row.job_id,
                           job_generation=job.row.generation, job_members=tuple(job.members),
                           generation_members=tuple(job.generation_members),
                           job_terminal=job.state.terminal,
                           nproc_per_node=job.spec.nproc_per_node,
                           checkpoint_root=job_uri(ck, job.row.id) if ck else "")

    def report(self, rec: NodeRecord, req: agent_pb2.ReportEventRequest, now: float
               ) -> agent_pb2.ReportEventResponse:
        """Take in an agent's event (`rec` is the authenticated reporter)."""
        kind = req.WhichOneof("event")
        if kind is None:
            return agent_pb2.ReportEventResponse(accepted=False, reason="no event in the report")
        node_id = rec.row.id
        # The report's own job for commits (fenced by generation alone), else the node's.
        job = self.state.jobs.get(req.job_id if kind == "checkpoint_committed" else rec.row.job_id)
        facts = self._facts(rec, job)
        verdict = admission.report_verdict(
            node_id, kind, req.job_id, req.generation, facts,
            path=req.checkpoint_committed.path, rank=req.process_exited.rank)
        if verdict.route is Route.REFUSE:
            # A stale progress report is routine during a rescale (the old generation's last
            # words); anything else refused is worth a warning.
            log.log(logging.DEBUG if kind == "progress" else logging.WARNING,
                    "node=%s job=%s generation=%d: refused %s: %s", node_id,
                    req.job_id or "-", req.generation, kind, verdict.reason)
            return agent_pb2.ReportEventResponse(accepted=False, reason=verdict.reason)
        if job is not None and kind != "interruption_notice" and req.generation == job.row.generation:
            job.starting = False  # its processes ran far enough to speak: maybe to step
        if verdict.route is Route.COMMIT:
            assert job is not None
            self._checkpoint(job, req, now)
        elif kind == "interruption_notice":
            self.notice(rec, job if verdict.route is Route.ASSIGNED and req.job_id else None,
                        req.interruption_notice, now)
        else:
            assert job is not None
            if kind == "process_exited":
                e = req.process_exited
                self.record_exits(job, node_id, [(e.rank, e.exit_code)], now)
            elif kind == "checkpoint_committed":
                self._checkpoint(job, req, now)
            elif kind == "progress":
                self._progress(job, req.progress)
            elif kind == "restored":
                self._restored(job, req.restored, now)
            elif kind == "checkpoint_failed":
                self._checkpoint_failed(job, req.checkpoint_failed, now)
        return agent_pb2.ReportEventResponse(accepted=True)

    def cloud_notice(self, instance_id: str, action: str, deadline: float, now: float) -> bool:
        """A notice the cloud sent about an instance (read from a queue, not from its agent).
        Drains the node running on it; False if no live node has this instance id."""
        held = self.state.machine_holder(instance_id)
        if held is None:
            log.info("instance=%s: interruption notice %s for no known node", instance_id, action)
            return False
        rec = held[0]
        job = self.state.jobs.get(rec.row.job_id) if rec.row.job_id else None
        if job is not None and (job.node_rank(rec.row.id) is None or job.state.terminal):
            job = None
        self.notice(rec, job, agent_pb2.InterruptionNotice(action=action, deadline=deadline), now)
        return True

    def notice(self, rec: NodeRecord, job: JobRecord | None,
               notice: agent_pb2.InterruptionNotice, now: float) -> None:
        message = (f"node {rec.row.id}: interruption notice {notice.action or '?'}"
                   + (f", gone in {notice.deadline - now:.0f}s" if notice.deadline else ""))
        if rec.state is not NodeState.DRAINING:
            set_node_state(rec, NodeState.DRAINING)
            rec.row.drain_since = now
            rec.row.drain_deadline = notice.deadline or None
            self.state.changed(rec)
            self.outbox.stage(rec.row)
            if job is not None:
                self.outbox.reassign(job_id=job.row.id)  # every member checkpoints now
        if job is not None:
            self.executor.event(job, now, "notice", message + ": draining (checkpoint now)")
            if self.metrics is not None:
                self.metrics.inc_preemptions(job.row.id)
        log.warning("node=%s job=%s: %s", rec.row.id, job.row.id if job else "-", message)
        self.wake()

    def _checkpoint(self, job: JobRecord, req: agent_pb2.ReportEventRequest, now: float) -> None:
        c = req.checkpoint_committed
        since = job.checkpoint_requested_at or job.row.last_checkpoint_at \
            or job.generation_started_at or now
        self.outbox.checkpoint(CheckpointRow(
            job_id=job.row.id, generation=req.generation, step=c.step, path=c.path,
            bytes=c.bytes, cursor=c.cursor, committed_at=now))
        if c.step >= job.row.last_checkpoint_step:  # reports may arrive out of order
            job.row.last_checkpoint_step = c.step
            job.row.last_checkpoint_path = c.path
        job.row.last_checkpoint_at = now
        if c.requested:
            job.requested_commit_at = now
        job.row.failures = 0
        job.row.checkpoint_failures = 0
        job.row.step = max(job.row.step, c.step)
        job.row.updated_at = now
        job.checkpoint_flagged = False
        self.outbox.stage(job.row)
        self.executor.event(job, now, "checkpoint",
                            f"checkpoint at step {c.step} committed ({c.bytes} bytes): {c.path}")
        if self.metrics is not None:
            self.metrics.observe_checkpoint(job.row.id, max(0.0, now - since), at=now)
        log.info("job=%s generation=%d: checkpoint step %d committed: %s", job.row.id,
                 job.row.generation, c.step, c.path)
        self.wake()

    def _checkpoint_failed(self, job: JobRecord, f: agent_pb2.CheckpointFailed, now: float
                           ) -> None:
        job.row.checkpoint_failures += 1
        job.row.last_checkpoint_error = f.reason[:1000]
        job.row.updated_at = now
        self.outbox.stage(job.row)
        self.executor.event(job, now, "checkpoint_failed",
                            f"checkpoint at step {f.step} failed "
                            f"({job.row.checkpoint_failures} in a row): {f.reason[:500]}")
        if self.metrics is not None:
            self.metrics.inc_checkpoint_failures(job.row.id)
        log.warning("job=%s generation=%d: checkpoint step %d failed: %s", job.row.id,
                    job.row.generation, f.step, f.reason[:500])
        self.wake()

    def _restored(self, job: JobRecord, r: agent_pb2.Restored, now: float) -> None:
        """The generation restored step r.step: the lost steps follow what it replays."""
        job.row.lost_steps, job.lost_this_generation = admission.replayed_after_restore(
            step_before=job.step_before, restored_step=r.step, lost_total=job.row.lost_steps,
            lost_this_generation=job.lost_this_generation)
        if not job.restored_seen:
            job.row.step, job.restored_seen = r.step, True
        job.row.updated_at = now
        self.outbox.stage(job.row)
        chosen = max(job.restore_step, 0)
        note = (f" (not step {chosen}: {job.lost_this_generation} steps replayed)"
                if r.step != chosen else "")
        self.executor.event(job, now, "restored",
                            f"generation {job.row.generation} restored step {r.step} at world "
                            f"size {r.world_size}{note}")

    def _progress(self, job: JobRecord, p: agent_pb2.Progress) -> None:
        """Soft state: kept in memory; the loop stores it every few seconds."""
        job.row.step = p.step
        # SQLite stores NaN as NULL (the column is NOT NULL): a diverged loss shows in the
        # event text and leaves the row's last finite loss.
        if math.isfinite(p.loss):
            job.row.loss = p.loss
        job.last_progress_loss = p.loss
        job.row.samples_per_second = p.samples_per_second
        job.progress_world_size = p.world_size
        job.progress_dirty = True
        nodes = self.state.nodes
        if job.members and p.samples_per_second > 0:
            first = nodes.get(job.members[0])
            itype = first.row.instance_type if first is not None else ""
            # Per-node throughput of a one-type membership, for the instance ranking.
            if itype and all(m in nodes and nodes[m].row.instance_type == itype
                             for m in job.members):
                job.type_samples_per_second[itype] = p.samples_per_second / len(job.members)
        if self.metrics is not None and job.spec.global_batch_size:
            self.metrics.set_job_steps_per_second(
                job.row.id, p.samples_per_second / job.spec.global_batch_size)
