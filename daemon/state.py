"""The daemon's live state: jobs and nodes in memory, loaded from the store (flow 9).

A record holds a stored row (what survives a restart) and soft facts that agents report again
after one (heartbeat times, what runs, progress). The controller's views are kept, not rebuilt:
`State.snapshot()` refreshes only the views of records marked `changed` since the last one, so
a tick costs what changed, not the size of the fleet.

Everything here runs on the daemon's event loop thread.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from spotwise.daemon.model import (
    NODE_TRANSITIONS,
    ClusterState,
    JobState,
    JobView,
    NodeState,
    NodeView,
    Policy,
)
from spotwise.daemon.store import JobRow, NodeRow, Store
from spotwise.proto.v1 import jobs_pb2

log = logging.getLogger(__name__)


class UnknownJob(KeyError):
    """No job has this id."""


@dataclass(kw_only=True)
class JobRecord:
    row: JobRow
    spec: jobs_pb2.JobSpec
    members: list[str] = field(default_factory=list)
    generation_members: list[str] = field(default_factory=list)
    """Members of the newest generation, kept after it ended (its commits still count)."""
    generation_started_at: float = 0.0
    restore_step: int = -1
    step_before: int = 0
    """The job's step when the current generation started (0 after a daemon restart)."""
    lost_this_generation: int = 0
    """Steps of step_before that the current generation replays: counted from restore_step
    when it starts, from where it really restored once it says (its Restored report)."""
    restored_seen: bool = False
    """Whether the current generation's processes said where they restored."""
    starting: bool = False
    """The current generation was started in this daemon's life and none of its processes has
    said anything yet (restored, progress, a commit): it has taken no step. False after a
    restart, when the daemon cannot know."""
    generation_reason: str = ""
    # Soft state of the current generation, rebuilt from heartbeats after a restart.
    exit_codes: dict[int, int] = field(default_factory=dict)
    failed_at: float | None = None
    checkpoint_requested_at: float | None = None
    requested_commit_at: float | None = None
    """When a commit saved on a checkpoint request was recorded (JobView.requested_commit_at)."""
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
    last_progress_loss: float = math.nan
    """The loss of the last progress report (NaN when it diverged, or none yet)."""
    progress_dirty: bool = False
    """Progress arrived since the row was last staged (it is written every few seconds)."""
    progress_events: int = 0
    """Progress events stored for the job (thinned when it passes the bound)."""
    checkpoint_flagged: bool = False
    """The job's message says it cannot commit (cleared by the next commit)."""
    ended_at: float | None = None
    """When it reached a final state in this daemon's life (its teardown is timed from it)."""
    _rank_of: dict[str, int] = field(default_factory=dict, repr=False)
    _ranked: list[str] | None = field(default=None, repr=False)
    """The `members` list `_rank_of` indexes (members is replaced, never changed in place)."""

    def node_rank(self, node_id: str) -> int | None:
        """The node's rank among the current generation's members (None: no member); O(1),
        as a beat of each of 4,000 members asks."""
        if self._ranked is not self.members:
            self._rank_of = {n: i for i, n in enumerate(self.members)}
            self._ranked = self.members
        return self._rank_of.get(node_id)

    @property
    def state(self) -> JobState:
        return JobState(self.row.state)

    def view(self) -> JobView:
        spec = self.spec
        return JobView(
            id=self.row.id,
            state=self.state,
            created_at=self.row.created_at,
            min_nodes=spec.nodes.min,
            max_nodes=spec.nodes.max,
            nproc_per_node=spec.nproc_per_node,
            max_failures=spec.max_failures,
            generation=self.row.generation,
            members=tuple(self.members),
            generation_started_at=self.generation_started_at,
            last_checkpoint_step=self.row.last_checkpoint_step,
            last_checkpoint_at=self.row.last_checkpoint_at,
            step=self.row.step,
            failures=self.row.failures,
            exit_codes=dict(self.exit_codes),
            failed_at=self.failed_at,
            checkpoint_requested_at=self.checkpoint_requested_at,
            requested_commit_at=self.requested_commit_at,
            budget_max_nodes=self.budget_cap,
            starting=self.starting,
        )


@dataclass(kw_only=True)
class NodeRecord:
    row: NodeRow
    last_seen: float
    reported_job_id: str = ""
    reported_generation: int = 0
    reported_running: bool = False
    """The agent's last heartbeat listed a running training process."""
    launched_for: str = ""
    beaten: bool = True
    """It has beaten since it last registered (NodeView.beaten)."""
    last_job: str = ""
    """The job it last served: a provider's machine is charged to it until it is gone."""
    _view: NodeView | None = None

    @property
    def state(self) -> NodeState:
        return NodeState(self.row.state)

    @property
    def view(self) -> NodeView:
        """The controller's view of this node, rebuilt only after `changed()`."""
        if self._view is None:
            self._view = NodeView(
                id=self.row.id,
                state=self.state,
                joined_at=self.row.joined_at,
                last_seen=self.last_seen,
                slots=self.row.slots,
                job_id=self.row.job_id,
                reported_job_id=self.reported_job_id,
                reported_generation=self.reported_generation,
                drain_since=self.row.drain_since,
                drain_deadline=self.row.drain_deadline,
                launched_for=self.launched_for,
                beaten=self.beaten,
            )
        return self._view


def set_node_state(rec: NodeRecord, state: NodeState) -> None:
    """Change a node's state along model.NODE_TRANSITIONS (a programmer error otherwise)."""
    if rec.state is not state:
        assert state in NODE_TRANSITIONS[rec.state], f"{rec.state} -> {state}"
        rec.row.state = state.value


class State:
    """Every job and node, and the controller's views of them."""

    def __init__(self, store: Store, *, policy: Policy, restart_grace_s: float,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.policy = policy
        self.restart_grace_s = restart_grace_s
        self.clock = clock
        self.jobs: dict[str, JobRecord] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self._node_views: dict[str, NodeView] = {}
        self._stale: set[str] = set()
        self.heard: dict[str, float] = {}
        """Node id -> its last beat (ClusterState.heard): a beat renews the lease here."""
        self.by_instance: dict[str, str] = {}
        """Cloud instance id -> node id (the newest registration), for queue-borne notices."""
        self.by_provider_node: dict[str, str] = {}
        """Provider node id -> node id (the newest registration)."""

    def load(self) -> None:
        """(Re)load jobs and nodes from the store.

        Every known node gets `restart_grace_s` to call again: its agent has been retrying with
        backoff while the daemon was away, and declaring it LOST on the first tick would
        throw away a generation that is still training.
        """
        now = self.clock()
        self.jobs = {}
        progress = self.store.progress_counts()
        for row in self.store.jobs():
            spec = jobs_pb2.JobSpec.FromString(row.spec)
            record = JobRecord(row=row, spec=spec, progress_events=progress.get(row.id, 0))
            if row.generation > 0 and not JobState(row.state).terminal:
                gens = [g for g in self.store.generations(row.id) if g.generation == row.generation]
                if gens:
                    record.generation_members = list(gens[0].members)
                if gens and gens[0].ended_at is None:
                    record.members = list(gens[0].members)
                    record.generation_started_at = gens[0].started_at
                    record.restore_step = gens[0].restore_step
                    record.generation_reason = gens[0].reason
            self.jobs[row.id] = record
        seen = now - self.policy.lease_s + self.restart_grace_s
        self.nodes = {row.id: NodeRecord(row=row, last_seen=seen) for row in self.store.nodes()}
        self._node_views = {}
        self._stale = set(self.nodes)
        self.heard = {}
        self.by_instance = {}
        self.by_provider_node = {}
        for rec in sorted(self.nodes.values(), key=lambda r: r.row.registered_at):
            self._index_machine(rec)
        log.info("loaded %d job(s) and %d node(s) from %s", len(self.jobs), len(self.nodes),
                 self.store.path)

    def job(self, job_id: str) -> JobRecord:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    def add_node(self, rec: NodeRecord) -> None:
        self.nodes[rec.row.id] = rec
        self.changed(rec)

    def changed(self, rec: NodeRecord) -> None:
        """The node's row or soft facts changed: its view is rebuilt at the next snapshot."""
        rec._view = None
        self._stale.add(rec.row.id)
        self._index_machine(rec)

    def _index_machine(self, rec: NodeRecord) -> None:
        if rec.row.instance_id:
            self.by_instance[rec.row.instance_id] = rec.row.id
        if rec.row.provider_node:
            self.by_provider_node[rec.row.provider_node] = rec.row.id

    def machine_holder(self, instance_id: str, provider_node: str = "", *, other_than: str = ""
                       ) -> tuple[NodeRecord, str] | None:
        """A live node other than `other_than` that holds this cloud instance or provider node,
        with the handle it holds (one machine runs one node: the fleet terminates, bills and
        drains machines through these handles)."""
        for handle, index, column in ((instance_id, self.by_instance, "instance_id"),
                                      (provider_node, self.by_provider_node, "provider_node")):
            holder = self.nodes.get(index.get(handle, "")) if handle else None
            if (holder is not None and holder.row.id != other_than
                    and holder.state is not NodeState.LOST
                    and getattr(holder.row, column) == handle):
                return holder, handle
        return None

    def heard_from(self, rec: NodeRecord, now: float) -> None:
        """A beat of the node: its lease is renewed, its view stays as it is."""
        rec.last_seen = now
        self.heard[rec.row.id] = now

    def next_lease_end(self, now: float, lag_s: float = 0.0) -> float | None:
        """When the next lease still running ends, from the beats heard (None: no lease runs).
        The control loop wakes then rather than up to a tick later; a node given longer (a
        first beat's allowance) only costs a tick that finds nothing."""
        limit = self.policy.lease_s + lag_s
        return min((seen + limit for seen in self.heard.values() if seen + limit > now),
                   default=None)

    def snapshot(self, lag_s: float = 0.0) -> ClusterState:
        """The controller's view of every live job (oldest first) and every node (their
        beats since in `heard`, which the snapshot shares rather than copies)."""
        for node_id in self._stale:
            rec = self.nodes.get(node_id)
            if rec is None:
                self._node_views.pop(node_id, None)
            else:
                self._node_views[node_id] = rec.view
        self._stale.clear()
        jobs = sorted((rec.view() for rec in self.jobs.values() if not rec.state.terminal),
                      key=lambda j: (j.created_at, j.id))
        return ClusterState(jobs=tuple(jobs), nodes=self._node_views, lag_s=lag_s,
                            heard=self.heard)

    def member_views(self, job: JobRecord) -> dict[str, NodeView]:
        """The views of the job's members (what checkpoint_now reads)."""
        return {n: self.nodes[n].view for n in job.members if n in self.nodes}
