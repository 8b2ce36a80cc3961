"""The agent protocol's pure rules, one test each: credentials, re-registration, which reports
count, the lost-step count after a restore; and the budget stop and checkpoint alarm rules."""

from __future__ import annotations

import pytest

from spotwise.daemon import admission
from spotwise.daemon.admission import RegisterAction, ReportFacts, Route
from spotwise.daemon.budget import BudgetJob, Ledger, NodePrice, plan_budget_stop
from spotwise.daemon.controller import checkpoint_alarm
from spotwise.daemon.model import NodeState, Policy


def test_a_credential_matches_only_its_own_hash_and_an_empty_one_never() -> None:
    secret, digest = admission.new_secret()
    assert len(secret) >= 43 and digest != secret and len(digest) == 64
    assert admission.check_credential(digest, secret)
    assert not admission.check_credential(digest, secret + "x")
    assert not admission.check_credential(digest, "")
    assert not admission.check_credential("", secret)  # a node stored without one
    other, _ = admission.new_secret()
    assert other != secret


@pytest.mark.parametrize(("known", "state", "member", "running", "action", "was_member"), [
    (False, None, False, "", RegisterAction.NEW, False),
    (True, NodeState.ASSIGNED, True, "j1", RegisterAction.KEEP, True),
    (True, NodeState.DRAINING, True, "j1", RegisterAction.KEEP, True),
    (True, NodeState.DRAINING, True, "", RegisterAction.STAY_OUT, True),
    (True, NodeState.ASSIGNED, True, "", RegisterAction.REJOIN, True),
    (True, NodeState.ASSIGNED, True, "other", RegisterAction.REJOIN, True),
    (True, NodeState.READY, False, "", RegisterAction.REJOIN, False),
    (True, NodeState.LOST, False, "j1", RegisterAction.REJOIN, False),
])
def test_re_registration_keeps_a_member_that_still_runs_its_job(
        known: bool, state: NodeState | None, member: bool, running: str,
        action: RegisterAction, was_member: bool) -> None:
    d = admission.plan_register(known=known, state=state, assigned_job="j1" if member else "",
                                is_member=member, running_job=running, running_generation=3)
    assert (d.action, d.was_member) == (action, was_member)
    assert d.reason


def facts(**kw: object) -> ReportFacts:
    base: dict[str, object] = dict(node_state=NodeState.ASSIGNED, node_job="j1", job_generation=4,
                                   job_members=("a", "b"), generation_members=("a", "b"),
                                   job_terminal=False, nproc_per_node=2,
                                   checkpoint_root="s3://bkt/ck/j1")
    base.update(kw)
    return ReportFacts(**base)  # type: ignore[arg-type]


def test_a_commit_counts_only_from_a_member_for_a_path_of_the_job() -> None:
    ok = admission.report_verdict("a", "checkpoint_committed", "j1", 4, facts(),
                                  path="s3://bkt/ck/j1/data/step-0000000010-g4")
    assert ok.route is Route.COMMIT
    stranger = admission.report_verdict("z", "checkpoint_committed", "j1", 4, facts(),
                                        path="s3://bkt/ck/j1/data/step-0000000010-g4")
    assert stranger.route is Route.REFUSE and "no member" in stranger.reason
    foreign = admission.report_verdict("a", "checkpoint_committed", "j1", 4, facts(),
                                       path="s3://bkt/ck/j2/data/step-0000000999-g4")
    assert foreign.route is Route.REFUSE and "outside" in foreign.reason
    sneaky = admission.report_verdict("a", "checkpoint_committed", "j1", 4, facts(),
                                      path="s3://bkt/ck/j1/../j2/data")
    assert sneaky.route is Route.REFUSE
    # After the job fell back to PENDING (members released), its last generation's commits
    # still count, from the nodes that generation started with.
    pending = facts(job_members=(), node_job="")
    assert admission.report_verdict("b", "checkpoint_committed", "j1", 4, pending).route \
        is Route.COMMIT
    assert admission.report_verdict("a", "checkpoint_committed", "j1", 3, facts()).route \
        is Route.REFUSE  # an older generation's commit is stale


def test_events_of_another_assignment_are_stale_and_exits_only_for_own_ranks() -> None:
    assert admission.report_verdict("a", "progress", "j1", 4, facts()).route is Route.ASSIGNED
    stale = admission.report_verdict("a", "progress", "j1", 3, facts())
    assert stale.route is Route.REFUSE and stale.reason.startswith("stale")
    lost = admission.report_verdict("a", "progress", "j1", 4, facts(node_state=NodeState.LOST))
    assert lost.route is Route.REFUSE and "LOST" in lost.reason
    # b runs ranks 2 and 3 (two per node): rank 0's exit is not b's to report.
    assert admission.report_verdict("b", "process_exited", "j1", 4, facts(), rank=3).route \
        is Route.ASSIGNED
    other = admission.report_verdict("b", "process_exited", "j1", 4, facts(), rank=0)
    assert other.route is Route.REFUSE and "2..3" in other.reason
    # A notice of a node with no assignment counts (it drains); progress does not.
    idle = facts(node_job="", job_generation=0, job_members=(), generation_members=())
    assert admission.report_verdict("c", "interruption_notice", "", 0, idle).route \
        is Route.ASSIGNED
    assert admission.report_verdict("c", "progress", "", 0, idle).route is Route.REFUSE


@pytest.mark.parametrize(("restored", "total", "this"), [
    (10, 4, 4), (12, 2, 2), (14, 0, 0), (8, 6, 6)])
def test_lost_steps_follow_where_a_generation_restored(restored: int, total: int,
                                                      this: int) -> None:
    # The job was at step 14; the daemon named the commit at step 10 (4 lost).
    assert admission.replayed_after_restore(step_before=14, restored_step=restored,
                                            lost_total=4, lost_this_generation=4) == (total, this)
    # After a daemon restart nothing is known of the step before: nothing is counted.
    assert admission.replayed_after_restore(step_before=0, restored_step=restored,
                                            lost_total=7, lost_this_generation=0) == (7, 0)


def test_the_budget_stop_comes_one_tick_before_the_budget_would_be_passed() -> None:
    ledger = Ledger(last_tick=0.0, spent_usd=2.0,
                    billing={"n": NodePrice(usd_per_hour=3600.0)}).tick(0.0,
                                                                      {"n": NodePrice(usd_per_hour=3600.0)})
    job = BudgetJob(job_id="j", budget_usd=3.0, remaining_samples=None, nodes=1)
    assert plan_budget_stop(0.0, job, ledger, tick_s=0.5) is None  # 2.0 + 0.5 <= 3
    stop = plan_budget_stop(0.0, job, ledger, tick_s=1.5)  # 2.0 + 1.5 > 3
    assert stop is not None and stop.job_id == "j" and "exceed the budget" in stop.reason
    unbudgeted = BudgetJob(job_id="j", budget_usd=0.0, remaining_samples=None, nodes=1)
    assert plan_budget_stop(0.0, unbudgeted, ledger, tick_s=1e9) is None


def test_a_job_that_cannot_commit_is_flagged() -> None:
    policy = Policy(checkpoint_failures_alarm=3, commit_silence_alarm_s=600.0)
    assert checkpoint_alarm(100.0, failures=2, last_commit_at=0.0, every_steps=10,
                            policy=policy) is None
    assert "3 saves in a row" in checkpoint_alarm(100.0, failures=3, last_commit_at=0.0,
                                                  every_steps=10, policy=policy)
    silent = checkpoint_alarm(1000.0, failures=0, last_commit_at=300.0, every_steps=10,
                              policy=policy)
    assert silent is not None and "700s" in silent
    # A job that checkpoints only on request is not expected to commit on its own.
    assert checkpoint_alarm(1e6, failures=0, last_commit_at=0.0, every_steps=0,
                            policy=policy) is None
