"""What the daemon decides: membership, generations and job states, as one pure function.

`plan(now, state)` looks at a snapshot of jobs and nodes and returns decisions, each with the
reason the daemon logs and shows the user. It takes the clock as an argument and does no I/O;
the coordinator gathers the snapshot, carries the decisions out and stores them.

The rules, in the order `plan` applies them:

1. A node not heard from for `lease_s` is LOST; a member of a generation with a failed rank
   that has not been heard from since the failure, after `failure_lease_s` (both extended by
   the daemon's own lag, `ClusterState.lag_s`).
   A node that holds no job and has not beaten since it registered has `first_beat_s`.
2. Joins are batched: JOINING nodes that have beaten become READY together once no node has
   joined for `settle_s` (or the oldest has waited `settle_max_s`).
3. For each live job, oldest first:
   - every rank of the current generation exited 0 -> SUCCEEDED;
   - a member was lost -> generation g+1 at once with the survivors (plus free nodes up to
     nodes.max), or back to PENDING if fewer than nodes.min remain;
   - a rank failed (non-zero exit) -> wait until every member has been heard from after the
     failure (alive: the program failed; count it, FAILED after max_failures in a row, else
     restart) or until a member's failure lease says it died (rule 1, then a loss, not
     counted);
   - a DRAINING member leaves once a checkpoint committed after its notice, or its deadline
     (less a margin) comes; until then every member is asked to checkpoint now;
   - RESCALING -> RUNNING once every member reports running the current generation;
   - RUNNING below nodes.max with READY nodes free -> ask the members to checkpoint, then
     grow (generation g+1) once it commits or `grow_checkpoint_timeout_s` passes; a budget
     cap (`JobView.budget_max_nodes`, from the budget's projection) stops growth below max;
   - PENDING with at least nodes.min READY nodes free -> start.
   Every generation restores from the last committed checkpoint step (-1: start fresh).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from spotwise.daemon.model import (
    JOB_TRANSITIONS,
    NODE_TRANSITIONS,
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
    can_transition,
)

__all__ = [
    "JOB_TRANSITIONS", "NODE_TRANSITIONS", "ClusterState", "Decision", "JobState", "JobView",
    "NodeLost", "NodesReady", "NodeState", "NodeView", "Policy", "RequestCheckpoint",
    "SetJobState", "StartGeneration", "can_transition", "checkpoint_now", "plan", "plan_cancel",
]


# ---- the plan -------------------------------------------------------------------------------

LISTED = 8
"""Names a reason lists before it counts the rest: a reason travels in every member's
assignment, so naming all 4,000 nodes of a generation would cost O(N^2) to send."""


def _listed(names: Sequence[str]) -> str:
    if len(names) <= LISTED:
        return ", ".join(names)
    return f"{', '.join(names[:LISTED])} and {len(names) - LISTED} more"


def plan(now: float, state: ClusterState, policy: Policy | None = None) -> list[Decision]:
    """The decisions for this moment. Pure: same inputs, same decisions."""
    policy = policy or Policy()
    decisions: list[Decision] = []
    nodes = dict(state.nodes)

    # 1. Leases. A member of a generation that reported a failed rank, and that has not been
    # heard from since, gets the shorter failure lease: the failure already says something
    # broke, the silence says where.
    failed_at = {
        m: j.failed_at for j in state.jobs if j.failed_at is not None for m in j.members
    }
    # Only the lost are sorted (for a stable order). A node whose last beat is within the lease
    # cannot have expired: the suspects are found in one pass over the beats (a tick runs ten
    # times a second over thousands of nodes), and only they are looked at.
    expired = []
    last_seen = state.last_seen
    limit = policy.lease_s + state.lag_s
    suspects = {node_id for node_id, seen in state.heard.items() if now - seen > limit}
    suspects.update(nodes.keys() - state.heard.keys(), failed_at)
    for node_id in suspects:
        node = nodes.get(node_id)
        if node is None or node.state is NodeState.LOST:
            continue
        if now - last_seen(node) > limit or node_id in failed_at:
            expired.append(node)
    for node in sorted(expired, key=lambda n: n.id):
        seen = last_seen(node)
        silent = now - seen
        since_failure = failed_at.get(node.id)
        if since_failure is not None and seen <= since_failure:
            lease, what = min(policy.failure_lease_s, policy.lease_s), "failure lease"
        elif not node.beaten and not node.job_id:
            lease, what = max(policy.first_beat_s, policy.lease_s), "first-beat allowance"
        else:
            lease, what = policy.lease_s, "lease"
        if silent > lease + state.lag_s:
            lag = f" + the daemon's lag {state.lag_s:.2f}s" if state.lag_s else ""
            decisions.append(
                NodeLost(
                    node_id=node.id,
                    reason=f"node {node.id} silent for {silent:.1f}s > {what} {lease:g}s{lag}",
                )
            )
            nodes[node.id] = _with(node, state=NodeState.LOST)

    # 2. Join batching (the same pass finds the free nodes, for rule 3).
    joining: list[NodeView] = []
    free: list[NodeView] = []
    for n in nodes.values():
        if n.state is NodeState.READY:
            if not n.job_id:
                free.append(n)
        elif n.state is NodeState.JOINING and n.beaten:
            joining.append(n)
    if joining:
        newest = max(n.joined_at for n in joining)
        oldest = min(n.joined_at for n in joining)
        if now - newest >= policy.settle_s or now - oldest >= policy.settle_max_s:
            ids = tuple(sorted(n.id for n in joining))
            decisions.append(
                NodesReady(
                    node_ids=ids,
                    reason=f"join batch closed after {now - oldest:.1f}s: {_listed(ids)}",
                )
            )
            for node_id in ids:
                nodes[node_id] = ready = _with(nodes[node_id], state=NodeState.READY)
                if not ready.job_id:
                    free.append(ready)
    free.sort(key=lambda n: (n.joined_at, n.id))

    # 3. Jobs, oldest first.
    for job in state.jobs:
        if job.state.terminal:
            continue
        decision = _plan_job(now, job, nodes, free, policy, last_seen)
        if decision is None:
            continue
        decisions.append(decision)
        if isinstance(decision, StartGeneration):
            taken = set(decision.members)
            free[:] = [n for n in free if n.id not in taken]
            # Nodes the job let go are free for the jobs after it.
            for node_id in job.members:
                node = nodes.get(node_id)
                if node_id not in taken and node is not None and node.state is NodeState.ASSIGNED:
                    free.append(_with(node, state=NodeState.READY, job_id=""))
        elif isinstance(decision, SetJobState) and decision.release:
            for node_id in job.members:
                node = nodes.get(node_id)
                if node is not None and node.state is NodeState.ASSIGNED:
                    free.append(_with(node, state=NodeState.READY, job_id=""))
    return decisions


def plan_cancel(now: float, job: JobView) -> SetJobState:
    """The decision for a user's CancelJob. Raises ValueError if the job already ended."""
    if not can_transition(job.state, JobState.CANCELLED):
        raise ValueError(f"job {job.id} already ended ({job.state.value})")
    return SetJobState(
        job_id=job.id, state=JobState.CANCELLED, release=True, reason="cancelled by the user"
    )


def _plan_job(
    now: float,
    job: JobView,
    nodes: Mapping[str, NodeView],
    free: list[NodeView],
    policy: Policy,
    last_seen: Callable[[NodeView], float],
) -> Decision | None:
    fitting = [n for n in free if n.slots == 0 or n.slots >= job.nproc_per_node]
    # Nodes a provider launched for this job first, then the longest waiting.
    fitting.sort(key=lambda n: (n.launched_for != job.id, n.joined_at, n.id))

    if job.state is JobState.PENDING:
        if len(fitting) < job.min_nodes:
            return None
        members = tuple(n.id for n in fitting[: job.max_nodes])
        return _start(job, members, JobState.RUNNING, count_failure=False,
                      reason=f"start on {len(members)} node(s): {_listed(members)}")

    # RUNNING or RESCALING from here on.
    if job.members and len(job.exit_codes) >= job.world_size:
        if all(code == 0 for code in job.exit_codes.values()):
            return SetJobState(
                job_id=job.id, state=JobState.SUCCEEDED, release=True,
                reason=f"all {job.world_size} processes of generation {job.generation} exited 0",
            )

    # One pass over the members: those no longer in it, and those draining.
    gone: list[str] = []
    draining_members: list[str] = []
    for m in job.members:
        node = nodes.get(m)
        if node is None or node.job_id != job.id:
            gone.append(m)
        elif node.state is not NodeState.ASSIGNED:
            (draining_members if node.state is NodeState.DRAINING else gone).append(m)
    if gone:
        lost = set(gone)
        survivors = [m for m in job.members if m not in lost]
        why = f"lost {_listed(gone)}"
        return _reshape(job, survivors, fitting, why, count_failure=False)

    if job.failed_at is not None:
        silent = [m for m in job.members if last_seen(nodes[m]) <= job.failed_at]
        if silent:
            return None  # a member may be dead: its lease decides (rule 1)
        failures = job.failures + 1
        bad = sorted((r, c) for r, c in job.exit_codes.items() if c != 0)
        detail = _listed([f"rank {r} exited {c}" for r, c in bad])
        if failures > job.max_failures:
            return SetJobState(
                job_id=job.id, state=JobState.FAILED, release=True,
                reason=f"generation {job.generation} failed ({detail}); {failures} failures in a "
                f"row > max_failures {job.max_failures}",
            )
        return _reshape(
            job, list(job.members), fitting,
            f"generation {job.generation} failed ({detail}), every node alive: restart "
            f"(failure {failures} of {job.max_failures} tolerated)",
            count_failure=True,
        )

    leaving = [m for m in draining_members if _drain_done(now, job, nodes[m], policy)]
    if leaving:
        left = set(leaving)
        survivors = [m for m in job.members if m not in left]
        return _reshape(job, survivors, fitting, f"drained {_listed(leaving)}",
                        count_failure=False)
    draining = bool(draining_members)

    if job.state is JobState.RESCALING:
        if all(
            nodes[m].reported_job_id == job.id and nodes[m].reported_generation == job.generation
            for m in job.members
        ):
            return SetJobState(
                job_id=job.id, state=JobState.RUNNING, release=False,
                reason=f"every node runs generation {job.generation}",
            )
        return None

    if not draining and len(job.members) < job.grow_to and fitting:
        extra = fitting[: job.grow_to - len(job.members)]
        members = (*job.members, *(n.id for n in extra))
        grow = f"grow from {len(job.members)} to {len(members)} node(s)"
        joined = f"joined {_listed([n.id for n in extra])}"
        timeout = policy.grow_checkpoint_timeout_s
        asked = job.checkpoint_requested_at
        if timeout <= 0:
            return _start(job, members, JobState.RESCALING, count_failure=False,
                          reason=f"{grow}: {joined}")
        if job.starting and asked is None:
            # Its processes are still starting (nothing restored, no step): a checkpoint would
            # wait for them to start, restore and step once, only to restart them.
            return _start(job, members, JobState.RESCALING, count_failure=False,
                          reason=f"{grow} at once, generation {job.generation} had not started "
                          f"training: {joined}")
        # A rescale restarts from the last commit: checkpoint first so that growing loses
        # (almost) nothing, but do not wait forever for a program that never commits.
        if asked is None:
            return RequestCheckpoint(job_id=job.id, on=True,
                                     reason=f"checkpoint now, then {grow} ({joined})")
        if _committed_since(job, asked):
            return _start(job, members, JobState.RESCALING, count_failure=False,
                          reason=f"{grow} after the checkpoint at step "
                          f"{job.last_checkpoint_step}: {joined}")
        if now >= asked + timeout:
            return _start(job, members, JobState.RESCALING, count_failure=False,
                          reason=f"{grow}: {joined} (no checkpoint within {timeout:.0f}s)")
        return None
    if job.checkpoint_requested_at is not None:
        return RequestCheckpoint(job_id=job.id, on=False,
                                 reason="growth no longer possible: checkpoint request withdrawn")
    return None


def _reshape(
    job: JobView, survivors: list[str], fitting: list[NodeView], why: str, *, count_failure: bool
) -> Decision:
    """Generation g+1 with the survivors plus free nodes up to max (or the budget's cap), or
    PENDING below min."""
    room = max(0, job.grow_to - len(survivors))
    members = (*survivors, *(n.id for n in fitting[:room]))
    if len(members) < job.min_nodes:
        return SetJobState(
            job_id=job.id, state=JobState.PENDING, release=True,
            reason=f"{why}; {len(members)} node(s) left < nodes.min {job.min_nodes}: "
            "waiting for capacity",
        )
    added = members[len(survivors):]
    more = f", adding {_listed(added)}" if added else ""
    return _start(job, members, JobState.RESCALING, count_failure=count_failure,
                  reason=f"{why}{more}: {len(members)} node(s)")


def _start(
    job: JobView, members: tuple[str, ...], state: JobState, *, count_failure: bool, reason: str
) -> StartGeneration:
    generation = job.generation + 1
    world = len(members) * job.nproc_per_node
    restore = job.last_checkpoint_step
    where = f"step {restore}" if restore >= 0 else "scratch"
    return StartGeneration(
        job_id=job.id,
        generation=generation,
        members=members,
        world_size=world,
        restore_step=restore,
        state=state,
        count_failure=count_failure,
        reason=f"generation {generation} (world size {world}, from {where}): {reason}",
    )


def _committed_since(job: JobView, since: float) -> bool:
    """Whether a checkpoint asked for at `since` is committed: a commit that its ranks saved on
    the request, recorded since then. They hold at its step, so the next generation replays
    nothing. Any other commit may be behind them: an asynchronous periodic save begun before
    the request can commit after it, and after steps the daemon has not heard of yet."""
    return job.requested_commit_at is not None and job.requested_commit_at >= since


def _drain_done(now: float, job: JobView, node: NodeView, policy: Policy) -> bool:
    if node.state is not NodeState.DRAINING or node.drain_since is None:
        return False
    if _committed_since(job, node.drain_since):
        return True  # the drain checkpoint (or a later one) is committed
    if node.drain_deadline:
        return now >= node.drain_deadline - policy.drain_margin_s
    return now >= node.drain_since + policy.drain_timeout_s


def checkpoint_alarm(now: float, *, failures: int, last_commit_at: float, every_steps: int,
                     policy: Policy) -> str | None:
    """Why a running job must be flagged as unable to checkpoint, or None: `failures` saves
    failed in a row, or (a job that checkpoints every N steps) nothing committed since
    `last_commit_at` (its last commit, or its generation's start) for too long."""
    if failures >= policy.checkpoint_failures_alarm > 0:
        return (f"checkpoints failing: {failures} saves in a row failed "
                f"(alarm at {policy.checkpoint_failures_alarm}); the job would restart from "
                "its last commit")
    silent = now - last_commit_at
    if every_steps and policy.commit_silence_alarm_s and silent > policy.commit_silence_alarm_s:
        return (f"no checkpoint committed for {silent:.0f}s (> {policy.commit_silence_alarm_s:.0f}s) "
                "although the job checkpoints every "
                f"{every_steps} steps: a failure would lose all of it")
    return None


def checkpoint_now(job: JobView, nodes: Mapping[str, NodeView]) -> bool:
    """Whether the job's members are asked to checkpoint now: while any member drains, and
    while a growth waits for its checkpoint. Every member is asked, since a checkpoint is
    collective."""
    return job.checkpoint_requested_at is not None or any(
        (node := nodes.get(m)) is not None and node.state is NodeState.DRAINING
        for m in job.members
    )


def _with(node: NodeView, **changes: object) -> NodeView:
    return replace(node, **changes)  # type: ignore[arg-type]
