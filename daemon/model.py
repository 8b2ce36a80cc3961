"""What the daemon's decisions are made of: states, their transitions, views and decisions.

The controller (`controller.plan`) reads a `ClusterState` of `JobView`s and `NodeView`s and
returns `Decision`s; the executor carries them out. Everything here is plain data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RESCALING = "RESCALING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"

    @property
    def terminal(self) -> bool:
        return not JOB_TRANSITIONS[self]


_ENDS = (
    JobState.SUCCEEDED,
    JobState.FAILED,
    JobState.CANCELLED,
    JobState.BUDGET_EXHAUSTED,
)

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    # Waiting for nodes -> the first generation starts.
    JobState.PENDING: frozenset({JobState.RUNNING, *_ENDS} - {JobState.SUCCEEDED}),
    # Membership change -> RESCALING; below nodes.min -> back to PENDING.
    JobState.RUNNING: frozenset({JobState.RESCALING, JobState.PENDING, *_ENDS}),
    # Every member runs the new generation -> RUNNING; another change -> stays RESCALING.
    JobState.RESCALING: frozenset({JobState.RUNNING, JobState.PENDING, *_ENDS}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.BUDGET_EXHAUSTED: frozenset(),
}
"""The allowed job state changes; a generation change inside RESCALING keeps its state."""


def can_transition(src: JobState, dst: JobState) -> bool:
    return dst in JOB_TRANSITIONS[src]


class NodeState(str, Enum):
    JOINING = "JOINING"
    READY = "READY"
    ASSIGNED = "ASSIGNED"
    DRAINING = "DRAINING"
    LOST = "LOST"


NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    # Registered, inside the settle window; a re-register after a daemon restart that matches
    # the stored assignment goes straight back to ASSIGNED.
    NodeState.JOINING: frozenset({NodeState.READY, NodeState.ASSIGNED, NodeState.DRAINING,
                                  NodeState.LOST}),
    NodeState.READY: frozenset({NodeState.ASSIGNED, NodeState.DRAINING, NodeState.LOST,
                                NodeState.JOINING}),
    NodeState.ASSIGNED: frozenset({NodeState.READY, NodeState.DRAINING, NodeState.LOST,
                                   NodeState.JOINING}),
    # Under an interruption notice: never assigned again; it goes away.
    NodeState.DRAINING: frozenset({NodeState.LOST}),
    # Declared dead; an agent that comes back registers as a new join.
    NodeState.LOST: frozenset({NodeState.JOINING}),
}
"""The allowed node state changes."""


# ---- the snapshot plan() reads ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class JobView:
    """What the controller needs to know about a job."""

    id: str
    state: JobState
    created_at: float
    min_nodes: int = 1
    max_nodes: int = 1
    nproc_per_node: int = 1
    max_failures: int = 3
    generation: int = 0
    """The current generation (0: never started)."""
    members: tuple[str, ...] = ()
    """Node ids of the current generation, in node-rank order."""
    generation_started_at: float = 0.0
    last_checkpoint_step: int = -1
    """Step of the newest committed checkpoint; -1 if none."""
    last_checkpoint_at: float = 0.0
    """When the daemon recorded that commit (its clock)."""
    step: int = 0
    """The newest step the current generation reported (its progress)."""
    failures: int = 0
    """Failed generations in a row (reset by a checkpoint commit)."""
    exit_codes: Mapping[int, int] = field(default_factory=dict)
    """Global rank -> exit code, for the current generation's exited processes."""
    failed_at: float | None = None
    """When a rank of the current generation first exited non-zero."""
    checkpoint_requested_at: float | None = None
    """When the controller asked the members to checkpoint before growing (None: not asked)."""
    requested_commit_at: float | None = None
    """When the daemon recorded the last commit its ranks saved on a checkpoint request (they
    hold at that step); None: none in this daemon's life."""
    budget_max_nodes: int | None = None
    """Most nodes the budget lets the job grow to (None: no cap); it never shrinks a job."""
    starting: bool = False
    """The current generation's processes have not reported anything yet (no restore, no
    step): restarting it loses nothing."""

    @property
    def world_size(self) -> int:
        return len(self.members) * self.nproc_per_node

    @property
    def grow_to(self) -> int:
        """The node count growth aims at: nodes.max, or less when the budget caps it."""
        if self.budget_max_nodes is None:
            return self.max_nodes
        return max(min(self.max_nodes, self.budget_max_nodes), len(self.members))


@dataclass(frozen=True, kw_only=True)
class NodeView:
    """What the controller needs to know about a node."""

    id: str
    state: NodeState
    joined_at: float
    last_seen: float
    """When the daemon last heard from the agent (register or heartbeat)."""
    slots: int = 0
    """Processes it can run; 0 = not said (taken as enough)."""
    job_id: str = ""
    """The job whose current generation it is a member of."""
    reported_job_id: str = ""
    reported_generation: int = 0
    """What the agent last said it runs."""
    drain_since: float | None = None
    drain_deadline: float | None = None
    """Unix seconds the instance goes away (None or 0: unknown)."""
    launched_for: str = ""
    """The job a provider launched it for, preferred when assigning."""
    beaten: bool = True
    """The agent has beaten since it last registered: its heartbeat path works. A node that has
    not is not made READY, and, holding no job, has `Policy.first_beat_s` rather than the lease
    (its first beat waits for a connection to a daemon that may be busy registering others)."""


@dataclass(frozen=True, kw_only=True)
class ClusterState:
    jobs: Sequence[JobView] = ()
    """Every job, oldest first (that order is also the priority for free nodes)."""
    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    lag_s: float = 0.0
    """How late the daemon's event loop runs (seconds): beats it has not read yet may be that
    old, so leases are extended by it rather than a busy daemon declaring live nodes lost."""
    heard: Mapping[str, float] = field(default_factory=dict)
    """Node id -> when it last beat, where newer than its view's `last_seen`: a beat renews a
    lease here without rebuilding the node's view."""

    def last_seen(self, node: NodeView) -> float:
        """When the daemon last heard from `node`."""
        heard = self.heard.get(node.id)
        return node.last_seen if heard is None or heard < node.last_seen else heard


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The controller's timing knobs (from DaemonConfig)."""

    lease_s: float = 2.0
    """A node silent this long is LOST."""
    first_beat_s: float = 10.0
    """A registered node that holds no job and has not beaten since it registered is LOST after
    this long (it is not READY before its first beat, so nothing waits for it)."""
    failure_lease_s: float = 1.25
    """A member silent this long since its generation reported a failed rank is LOST."""
    settle_s: float = 1.0
    """Quiet period that closes a batch of joins."""
    settle_max_s: float = 3.0
    """Longest a joining node waits for the batch to close."""
    drain_timeout_s: float = 90.0
    """Longest wait for a drain checkpoint when the notice gives no deadline."""
    drain_margin_s: float = 10.0
    """Leave a draining node this long before its deadline."""
    grow_checkpoint_timeout_s: float = 20.0
    """Before growing, ask for a checkpoint and wait this long for it (0: grow at once)."""
    checkpoint_failures_alarm: int = 3
    """Failed checkpoint saves in a row that flag a job (its message says so)."""
    commit_silence_alarm_s: float = 900.0
    """A running job that checkpoints periodically and committed nothing for this long is
    flagged (0: never)."""


# ---- decisions ------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NodeLost:
    node_id: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class NodesReady:
    node_ids: tuple[str, ...]
    reason: str


@dataclass(frozen=True, kw_only=True)
class StartGeneration:
    """Members (node-rank order) run generation `generation`; nodes no longer members are freed."""

    job_id: str
    generation: int
    members: tuple[str, ...]
    world_size: int
    restore_step: int
    state: JobState
    count_failure: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class RequestCheckpoint:
    """Ask (`on`) or stop asking the job's members to checkpoint now (before a growth)."""

    job_id: str
    on: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class SetJobState:
    """Change a job's state; with release, its members are freed and its generation ends."""

    job_id: str
    state: JobState
    release: bool
    reason: str


Decision = NodeLost | NodesReady | StartGeneration | RequestCheckpoint | SetJobState
