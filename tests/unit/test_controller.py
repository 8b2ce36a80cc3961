"""The controller's rules, one test each, with the clock passed in."""

from __future__ import annotations

from dataclasses import replace

import pytest

from spotwise.daemon.controller import (
    JOB_TRANSITIONS,
    NODE_TRANSITIONS,
    ClusterState,
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
    checkpoint_now,
    plan,
    plan_cancel,
)

POLICY = Policy(lease_s=2.0, failure_lease_s=1.25, settle_s=1.0, settle_max_s=3.0, drain_timeout_s=60.0,
                drain_margin_s=10.0, grow_checkpoint_timeout_s=20.0)
T = 1000.0


def node(node_id: str, state: NodeState = NodeState.READY, *, seen: float = T, joined: float = 0.0,
         job: str = "", gen: int = 0, **kw: object) -> NodeView:
    reported = {"reported_job_id": job, "reported_generation": gen} if job else {}
    return NodeView(id=node_id, state=state, joined_at=joined, last_seen=seen, job_id=job,
                    **{**reported, **kw})  # type: ignore[arg-type]


def job(state: JobState = JobState.PENDING, **kw: object) -> JobView:
    base: dict[str, object] = {"id": "j1", "state": state, "created_at": 0.0, "min_nodes": 1,
                               "max_nodes": 3, "nproc_per_node": 2}
    base.update(kw)
    return JobView(**base)  # type: ignore[arg-type]


def running(members: tuple[str, ...], *, gen: int = 1, **kw: object) -> JobView:
    return job(JobState.RUNNING, generation=gen, members=members, **kw)


def cluster(jobs: list[JobView], nodes: list[NodeView]) -> ClusterState:
    return ClusterState(jobs=tuple(jobs), nodes={n.id: n for n in nodes})


def only(decisions: list, kind: type) -> object:
    found = [d for d in decisions if isinstance(d, kind)]
    assert len(found) == 1, decisions
    return found[0]


# ---- state machines --------------------------------------------------------------------------


def test_transition_table_walks_every_path_and_terminals_are_final() -> None:
    # From PENDING every state is reachable through allowed transitions ...
    seen, frontier = {JobState.PENDING}, [JobState.PENDING]
    while frontier:
        for nxt in JOB_TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(JobState)
    # ... the four ends go nowhere, and a job cannot succeed before it ran.
    for end in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
                JobState.BUDGET_EXHAUSTED):
        assert end.terminal and not JOB_TRANSITIONS[end]
    assert not can_transition(JobState.PENDING, JobState.SUCCEEDED)
    assert can_transition(JobState.RUNNING, JobState.RESCALING)
    assert can_transition(JobState.RESCALING, JobState.PENDING)
    # A LOST node only comes back by registering again; a draining one never gets work.
    assert NODE_TRANSITIONS[NodeState.LOST] == {NodeState.JOINING}
    assert NODE_TRANSITIONS[NodeState.DRAINING] == {NodeState.LOST}


# ---- rule 1: leases ----------------------------------------------------------------------------


def test_a_node_silent_past_its_lease_is_lost_and_not_before() -> None:
    nodes = [node("a", seen=T - 2.0), node("b", seen=T - 2.01), node("c", NodeState.LOST, seen=0)]
    decisions = plan(T, cluster([], nodes), POLICY)
    lost = [d for d in decisions if isinstance(d, NodeLost)]
    assert [d.node_id for d in lost] == ["b"]
    assert "lease" in lost[0].reason


# ---- rule 2: join batching ---------------------------------------------------------------------


def test_joins_are_batched_until_the_settle_window_is_quiet() -> None:
    nodes = [node("a", NodeState.JOINING, joined=T - 0.9), node("b", NodeState.JOINING, joined=T - 0.2)]
    assert not plan(T, cluster([], nodes), POLICY)
    # One second after the newest join, both become READY in one decision.
    ready = only(plan(T + 0.8, cluster([], nodes), POLICY), NodesReady)
    assert ready.node_ids == ("a", "b")


def test_a_steady_trickle_of_joins_still_closes_the_batch_at_settle_max() -> None:
    nodes = [node("a", NodeState.JOINING, joined=T - 3.0), node("b", NodeState.JOINING, joined=T - 0.1)]
    ready = only(plan(T, cluster([], nodes), POLICY), NodesReady)
    assert ready.node_ids == ("a", "b")


def test_a_batch_of_joins_starts_a_pending_job_in_one_generation() -> None:
    nodes = [node(n, NodeState.JOINING, joined=T - 1.5) for n in ("a", "b", "c")]
    decisions = plan(T, cluster([job()], nodes), POLICY)
    start = only(decisions, StartGeneration)
    assert start.members == ("a", "b", "c") and start.generation == 1


# ---- starting and assignment -------------------------------------------------------------------


def test_a_pending_job_starts_between_min_and_max_with_world_size_nodes_times_nproc() -> None:
    nodes = [node(n, joined=i) for i, n in enumerate("abcd")]
    start = only(plan(T, cluster([job(max_nodes=3)], nodes), POLICY), StartGeneration)
    assert start.members == ("a", "b", "c")  # at most max, longest waiting first
    assert start.world_size == 6 and start.state is JobState.RUNNING
    assert start.restore_step == -1 and "scratch" in start.reason


def test_a_job_never_starts_below_min() -> None:
    nodes = [node("a"), node("b")]
    assert not plan(T, cluster([job(min_nodes=3)], nodes), POLICY)
    start = only(plan(T, cluster([job(min_nodes=3)], [*nodes, node("c")]), POLICY), StartGeneration)
    assert len(start.members) == 3


def test_nodes_without_enough_slots_are_not_assigned() -> None:
    nodes = [node("small", slots=1), node("big", slots=2, joined=5)]
    start = only(plan(T, cluster([job(nproc_per_node=2)], nodes), POLICY), StartGeneration)
    assert start.members == ("big",)


def test_older_jobs_get_free_nodes_first_and_launched_for_nodes_go_to_their_job() -> None:
    old = job(id="old", created_at=1.0, max_nodes=1)
    new = job(id="new", created_at=2.0, max_nodes=1)
    nodes = [node("a", joined=1, launched_for="new"), node("b", joined=2, launched_for="old")]
    starts = [d for d in plan(T, cluster([old, new], nodes), POLICY) if isinstance(d, StartGeneration)]
    assert {(s.job_id, s.members) for s in starts} == {("old", ("b",)), ("new", ("a",))}


# ---- rule: losses act at once -------------------------------------------------------------------


def test_a_lost_member_starts_generation_g_plus_1_at_once_from_the_last_commit() -> None:
    members = ("a", "b", "c")
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=4), node("b", NodeState.ASSIGNED, job="j1",
             gen=4, seen=T - 5), node("c", NodeState.ASSIGNED, job="j1", gen=4)]
    j = running(members, gen=4, last_checkpoint_step=120)
    decisions = plan(T, cluster([j], nodes), POLICY)
    assert isinstance(decisions[0], NodeLost) and decisions[0].node_id == "b"
    start = only(decisions, StartGeneration)
    assert start.generation == 5 and start.members == ("a", "c")  # survivors keep their order
    assert start.restore_step == 120 and start.state is JobState.RESCALING
    assert not start.count_failure and "lost b" in start.reason


def test_a_loss_takes_free_nodes_to_stay_near_max() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1), node("b", NodeState.LOST, job="j1"),
             node("spare")]
    start = only(plan(T, cluster([running(("a", "b"), max_nodes=2)], nodes), POLICY),
                 StartGeneration)
    assert start.members == ("a", "spare")


def test_a_loss_below_min_sends_the_job_back_to_pending_and_frees_the_rest() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1), node("b", NodeState.LOST, job="j1")]
    d = only(plan(T, cluster([running(("a", "b"), min_nodes=2)], nodes), POLICY), SetJobState)
    assert d.state is JobState.PENDING and d.release and "nodes.min 2" in d.reason


# ---- rule: success and failures --------------------------------------------------------------------


def test_all_processes_exited_zero_means_succeeded() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1), node("b", NodeState.ASSIGNED, job="j1", gen=1)]
    partial = running(("a", "b"), exit_codes={0: 0, 1: 0, 2: 0})
    assert not plan(T, cluster([partial], nodes), POLICY)
    done = replace(partial, exit_codes={0: 0, 1: 0, 2: 0, 3: 0})
    d = only(plan(T, cluster([done], nodes), POLICY), SetJobState)
    assert d.state is JobState.SUCCEEDED and d.release


def test_a_rank_failure_waits_for_the_failure_lease_to_confirm_a_dead_node() -> None:
    # Rank 2 (node b) failed at T-0.3; b has not been heard from since: maybe dead, wait.
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1, seen=T),
             node("b", NodeState.ASSIGNED, job="j1", gen=1, seen=T - 0.5)]
    j = running(("a", "b"), exit_codes={0: 1, 2: -9}, failed_at=T - 0.3)
    assert not plan(T, cluster([j], nodes), POLICY)
    # Silent 1.25 s (< the 2 s lease) after a failure: lost, and a loss is not counted as
    # the program's failure.
    alive_a = replace(nodes[0], last_seen=T + 0.7)
    decisions = plan(T + 0.8, cluster([j], [alive_a, nodes[1]]), POLICY)
    lost = only(decisions, NodeLost)
    assert lost.node_id == "b" and "failure lease 1.25s" in lost.reason
    start = only(decisions, StartGeneration)
    assert start.members == ("a",) and not start.count_failure
    # Without a failure report, the same silence is within the lease.
    calm = replace(j, exit_codes={}, failed_at=None)
    assert not plan(T + 0.8, cluster([calm], [alive_a, nodes[1]]), POLICY)


def test_a_rank_failure_with_every_node_alive_restarts_and_counts_a_failure() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=2, seen=T),
             node("b", NodeState.ASSIGNED, job="j1", gen=2, seen=T)]
    j = running(("a", "b"), gen=2, exit_codes={1: 1}, failed_at=T - 0.2, failures=1,
                last_checkpoint_step=40)
    start = only(plan(T, cluster([j], nodes), POLICY), StartGeneration)
    assert start.count_failure and start.members == ("a", "b") and start.generation == 3
    assert start.restore_step == 40 and "rank 1 exited 1" in start.reason


def test_repeated_failures_beyond_max_failures_fail_the_job() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=4, seen=T)]
    j = running(("a",), gen=4, exit_codes={0: 2}, failed_at=T - 0.1, failures=3, max_failures=3)
    d = only(plan(T, cluster([j], nodes), POLICY), SetJobState)
    assert d.state is JobState.FAILED and d.release and "max_failures 3" in d.reason


# ---- rule: draining ------------------------------------------------------------------------------


def _draining_cluster(now: float = T, **node_kw: object) -> tuple[JobView, list[NodeView]]:
    # Every node heartbeats up to `now`; b got its notice at T-5.
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1, seen=now),
             node("b", NodeState.DRAINING, job="j1", gen=1, seen=now, drain_since=T - 5,
                  **node_kw),
             node("spare", seen=now)]
    return running(("a", "b"), max_nodes=2, last_checkpoint_step=10, last_checkpoint_at=T - 20), nodes


def test_a_draining_member_stays_until_its_checkpoint_commits_and_blocks_growth() -> None:
    j, nodes = _draining_cluster(drain_deadline=T + 115)
    assert not plan(T, cluster([j], nodes), POLICY)  # spare is not added meanwhile
    assert checkpoint_now(j, {n.id: n for n in nodes})  # every member is asked to checkpoint
    committed = replace(j, last_checkpoint_step=30, last_checkpoint_at=T - 1,
                        requested_commit_at=T - 1)
    start = only(plan(T, cluster([committed], nodes), POLICY), StartGeneration)
    assert start.members == ("a", "spare") and start.restore_step == 30
    assert "drained b" in start.reason


def test_a_draining_member_leaves_at_its_deadline_less_the_margin_without_a_commit() -> None:
    j, nodes = _draining_cluster(T + 4.9, drain_deadline=T + 15)
    assert not plan(T + 4.9, cluster([j], nodes), POLICY)
    j, nodes = _draining_cluster(T + 5.0, drain_deadline=T + 15)
    start = only(plan(T + 5.0, cluster([j], nodes), POLICY), StartGeneration)
    assert "b" not in start.members and start.restore_step == 10


def test_a_drain_without_a_deadline_ends_after_the_drain_timeout() -> None:
    j, nodes = _draining_cluster(T + 54)
    assert not plan(T + 54, cluster([j], nodes), POLICY)
    j, nodes = _draining_cluster(T + 55)
    assert only(plan(T + 55, cluster([j], nodes), POLICY), StartGeneration)


# ---- rescaling and growth --------------------------------------------------------------------------


def test_rescaling_becomes_running_once_every_member_reports_the_generation() -> None:
    j = job(JobState.RESCALING, generation=3, members=("a", "b"))
    behind = [node("a", NodeState.ASSIGNED, job="j1", gen=3),
              node("b", NodeState.ASSIGNED, job="j1", reported_job_id="j1", reported_generation=2)]
    behind[1] = replace(behind[1], reported_generation=2)
    assert not plan(T, cluster([j], behind), POLICY)
    caught_up = [behind[0], replace(behind[1], reported_generation=3)]
    d = only(plan(T, cluster([j], caught_up), POLICY), SetJobState)
    assert d.state is JobState.RUNNING and not d.release


def _growable(now: float = T, **job_kw: object) -> tuple[JobView, list[NodeView]]:
    # Every node heartbeats up to `now`.
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=2, seen=now), node("x", joined=1, seen=now),
             node("y", joined=2, seen=now), node("z", joined=3, seen=now)]
    return running(("a",), gen=2, max_nodes=3, last_checkpoint_step=7, last_checkpoint_at=T - 30,
                   **job_kw), nodes


def test_a_running_job_grows_up_to_max_right_after_a_checkpoint() -> None:
    j, nodes = _growable()
    # First the members are asked to checkpoint (the rescale restarts from the last commit).
    ask = only(plan(T, cluster([j], nodes), POLICY), RequestCheckpoint)
    assert ask.on and "then grow from 1 to 3" in ask.reason
    asked = replace(j, checkpoint_requested_at=T)
    assert checkpoint_now(asked, {n.id: n for n in nodes})  # the members are asked
    assert not plan(T, cluster([asked], nodes), POLICY)  # the old commit does not count
    committed = replace(asked, last_checkpoint_step=9, last_checkpoint_at=T, requested_commit_at=T)
    start = only(plan(T, cluster([committed], nodes), POLICY), StartGeneration)
    assert start.members == ("a", "x", "y") and start.generation == 3
    assert start.world_size == 6 and start.restore_step == 9
    assert "after the checkpoint at step 9" in start.reason


def test_growth_goes_ahead_without_a_checkpoint_after_the_timeout_or_at_once_if_disabled() -> None:
    j, nodes = _growable(T + 19.9, checkpoint_requested_at=T)
    assert not plan(T + 19.9, cluster([j], nodes), POLICY)
    j, nodes = _growable(T + 20, checkpoint_requested_at=T)
    start = only(plan(T + 20, cluster([j], nodes), POLICY), StartGeneration)
    assert start.restore_step == 7 and "no checkpoint within 20s" in start.reason
    eager = replace(POLICY, grow_checkpoint_timeout_s=0)
    j, nodes = _growable()
    assert only(plan(T, cluster([j], nodes), eager), StartGeneration).members == ("a", "x", "y")


def test_a_generation_still_starting_grows_at_once_without_a_checkpoint() -> None:
    # Its processes have said nothing yet (no restore, no step): nothing to lose, and a
    # checkpoint would only wait for them to start and step once before restarting them.
    j, nodes = _growable(starting=True)
    start = only(plan(T, cluster([j], nodes), POLICY), StartGeneration)
    assert start.members == ("a", "x", "y") and start.restore_step == 7
    assert "at once, generation 2 had not started training" in start.reason
    # Once it has spoken, growth asks for a checkpoint first; a request made stays in force.
    assert only(plan(T, cluster([replace(j, starting=False)], nodes), POLICY), RequestCheckpoint).on
    asked = replace(j, checkpoint_requested_at=T)
    assert not plan(T, cluster([asked], nodes), POLICY)


def test_a_checkpoint_request_is_withdrawn_when_the_free_nodes_are_gone() -> None:
    j, nodes = _growable(checkpoint_requested_at=T)
    gone = [nodes[0]]
    withdraw = only(plan(T, cluster([j], gone), POLICY), RequestCheckpoint)
    assert not withdraw.on


def test_joining_nodes_do_not_grow_a_job_until_the_batch_closes() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1), node("x", NodeState.JOINING, joined=T - 0.5)]
    assert not plan(T, cluster([running(("a",))], nodes), POLICY)


def test_cancel_releases_the_nodes_and_refuses_an_ended_job() -> None:
    d = plan_cancel(T, running(("a",)))
    assert d.state is JobState.CANCELLED and d.release
    with pytest.raises(ValueError, match="already ended"):
        plan_cancel(T, job(JobState.SUCCEEDED))


def test_plan_is_pure() -> None:
    nodes = [node("a", NodeState.ASSIGNED, job="j1", gen=1, seen=T - 9), node("b")]
    state = cluster([running(("a",))], nodes)
    assert plan(T, state, POLICY) == plan(T, state, POLICY)
    assert state.nodes["a"].state is NodeState.ASSIGNED  # the snapshot is not modified


def test_a_busy_daemon_extends_leases_by_its_own_lag() -> None:
    n = node("n1", seen=T - 2.5)
    # 2.5 s of silence is past the 2 s lease...
    assert [type(d) for d in plan(T, cluster([], [n]), POLICY)] == [NodeLost]
    # ...but not when the daemon itself reads its agents a second late.
    late = ClusterState(jobs=(), nodes={"n1": n}, lag_s=1.0)
    assert not [d for d in plan(T, late, POLICY) if isinstance(d, NodeLost)]
    later = ClusterState(jobs=(), nodes={"n1": node("n1", seen=T - 3.5)}, lag_s=1.0)
    assert [type(d) for d in plan(T, later, POLICY)] == [NodeLost]


def test_a_node_that_has_not_beaten_yet_is_not_ready_and_has_the_first_beat_allowance() -> None:
    # Registered 5 s ago, no beat since (its beat connection waits on a busy daemon).
    fresh = node("a", NodeState.JOINING, joined=T - 5.0, seen=T - 5.0, beaten=False)
    decisions = plan(T, cluster([job()], [fresh]), POLICY)
    assert decisions == []  # neither LOST (2 s lease) nor READY, so no job is started on it
    # Past first_beat_s it is LOST, and the reason says which allowance ran out.
    lost = only(plan(T + POLICY.first_beat_s, cluster([], [fresh]), POLICY), NodeLost)
    assert lost.node_id == "a" and "first-beat allowance" in lost.reason
    # Once it beats it joins the next batch like any other.
    ready = only(plan(T, cluster([], [replace(fresh, beaten=True, last_seen=T)]), POLICY),
                 NodesReady)
    assert ready.node_ids == ("a",)


def test_a_member_that_has_not_beaten_since_registering_again_keeps_the_plain_lease() -> None:
    # A member re-registered (the daemon restarted): its job waits on it, so no allowance.
    member = node("m", NodeState.ASSIGNED, job="j1", gen=1, seen=T - 2.5, beaten=False)
    lost = only(plan(T, cluster([running(("m",))], [member]), POLICY), NodeLost)
    assert lost.node_id == "m" and "lease 2s" in lost.reason


def test_beats_in_heard_renew_leases_without_a_new_view() -> None:
    stale = node("n1", seen=T - 5.0)  # its view was built 5 s ago
    assert [type(d) for d in plan(T, cluster([], [stale]), POLICY)] == [NodeLost]
    heard = ClusterState(jobs=(), nodes={"n1": stale}, heard={"n1": T - 0.5})
    assert plan(T, heard, POLICY) == []
    # An older entry never hides a newer view.
    older = ClusterState(jobs=(), nodes={"n1": node("n1", seen=T - 0.5)}, heard={"n1": T - 9})
    assert plan(T, older, POLICY) == []


def test_a_reason_names_a_few_nodes_and_counts_the_rest() -> None:
    # A reason travels in every member's assignment: naming 4,000 nodes would be O(N^2).
    nodes = [node(f"n{i:04d}", joined=float(i)) for i in range(100)]
    start = only(plan(T, cluster([job(max_nodes=100)], nodes), POLICY), StartGeneration)
    assert len(start.members) == 100
    assert start.reason.endswith("n0000, n0001, n0002, n0003, n0004, n0005, n0006, n0007 and 92 more")
