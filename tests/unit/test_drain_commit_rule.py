"""A drain (or a growth) waits for the commit its ranks saved on the request (they hold at that
step), not just any commit recorded after the request: an asynchronous periodic checkpoint
begun before the notice can commit after it, and restoring that older step would replay the
steps in between, even one the daemon has not heard of yet."""

from __future__ import annotations

from spotwise.daemon.controller import (
    ClusterState,
    JobState,
    JobView,
    NodeState,
    NodeView,
    Policy,
    RequestCheckpoint,
    StartGeneration,
    plan,
)

POLICY = Policy(drain_margin_s=0.5, grow_checkpoint_timeout_s=20.0)
T = 1000.0


def _node(node_id: str, state: NodeState, **kw: object) -> NodeView:
    return NodeView(id=node_id, state=state, joined_at=0.0, last_seen=T, job_id="j1",
                    reported_job_id="j1", reported_generation=1, **kw)  # type: ignore[arg-type]


def _job(**kw: object) -> JobView:
    base: dict[str, object] = {"members": ("a", "b")}
    base.update(kw)
    return JobView(id="j1", state=JobState.RUNNING, created_at=0.0, min_nodes=1, max_nodes=2,
                   generation=1, **base)  # type: ignore[arg-type]


def _cluster(job: JobView, nodes: list[NodeView]) -> ClusterState:
    return ClusterState(jobs=(job,), nodes={n.id: n for n in nodes})


def _b_draining() -> list[NodeView]:
    """a stays; b got its notice 2 s ago, with a minute to go."""
    return [_node("a", NodeState.ASSIGNED),
            _node("b", NodeState.DRAINING, drain_since=T - 2, drain_deadline=T + 60)]


def test_a_periodic_commit_behind_the_progress_does_not_end_a_drain() -> None:
    nodes = _b_draining()
    # Step 40's periodic checkpoint committed after the notice, but the job is at step 43.
    behind = _job(step=43, last_checkpoint_step=40, last_checkpoint_at=T - 1)
    assert plan(T, _cluster(behind, nodes), POLICY) == []
    # The drain checkpoint at step 44 commits: b leaves, nothing is replayed.
    caught_up = _job(step=44, last_checkpoint_step=44, last_checkpoint_at=T - 0.5,
                     requested_commit_at=T - 0.5)
    (start,) = plan(T, _cluster(caught_up, nodes), POLICY)
    assert isinstance(start, StartGeneration)
    assert start.members == ("a",) and start.restore_step == 44


def test_a_periodic_commit_behind_the_progress_does_not_start_a_growth() -> None:
    nodes = [_node("a", NodeState.ASSIGNED),
             NodeView(id="new", state=NodeState.READY, joined_at=T - 10, last_seen=T)]
    one = dict(members=("a",), checkpoint_requested_at=T - 2)
    behind = _job(step=43, last_checkpoint_step=40, last_checkpoint_at=T - 1, **one)
    assert not [d for d in plan(T, _cluster(behind, nodes), POLICY)
                if isinstance(d, (StartGeneration, RequestCheckpoint))]
    caught_up = _job(step=44, last_checkpoint_step=44, last_checkpoint_at=T - 0.5,
                     requested_commit_at=T - 0.5, **one)
    starts = [d for d in plan(T, _cluster(caught_up, nodes), POLICY)
              if isinstance(d, StartGeneration)]
    assert [s.members for s in starts] == [("a", "new")] and starts[0].restore_step == 44


def test_a_periodic_commit_at_the_reported_step_does_not_end_a_drain() -> None:
    """The race the progress check alone left open: the ranks reported step 44, step 44's
    periodic save commits after the notice, and meanwhile they took step 45 (not reported
    yet). Only the save made on the request, after which they hold, ends the drain."""
    nodes = _b_draining()
    periodic = _job(step=44, last_checkpoint_step=44, last_checkpoint_at=T - 1)
    assert plan(T, _cluster(periodic, nodes), POLICY) == []
    # A requested commit of an earlier request (before this drain began) does not count either.
    earlier = _job(step=44, last_checkpoint_step=44, last_checkpoint_at=T - 1,
                   requested_commit_at=T - 30)
    assert plan(T, _cluster(earlier, nodes), POLICY) == []
    held = _job(step=45, last_checkpoint_step=45, last_checkpoint_at=T - 0.5,
                requested_commit_at=T - 0.5)
    (start,) = plan(T, _cluster(held, nodes), POLICY)
    assert isinstance(start, StartGeneration) and start.restore_step == 45
