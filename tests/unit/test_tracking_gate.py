"""The pure parts of experiment tracking: the commit gate and the agent's job-facts file."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotwise.proto.v1 import agent_pb2
from spotwise.worker.runtime.job_facts import (
    JobFact,
    JobFactsTail,
    append_fact,
    fact_from_assignment,
)
from spotwise.worker.runtime.tracking import CommitGate, log_calls


def steps(released: list[tuple[int, dict[str, float], float]]) -> list[int]:
    return [s for s, _, _ in released]


def test_steps_wait_for_a_commit_and_come_out_in_order() -> None:
    gate = CommitGate()
    for s in range(1, 8):
        gate.record(s, {"loss": 10.0 - s})
    assert steps(gate.commit(4)) == [1, 2, 3, 4]
    assert gate.held == 3 and gate.logged_through == 4
    assert gate.commit(4) == []
    released = gate.commit(7)
    assert steps(released) == [5, 6, 7] and released[-1][1] == {"loss": 3.0}


def test_a_replay_after_a_loss_logs_each_step_once_with_its_committed_value() -> None:
    # Generation 1 commits step 4, runs to 6 and dies: 5 and 6 never leave the gate.
    first = CommitGate()
    for s in range(1, 7):
        first.record(s, {"loss": float(s)})
    logged = first.commit(4)
    # Generation 2 starts from the run's committed step and replays 5..8 with new values.
    second = CommitGate(logged_through=first.logged_through)
    for s in range(3, 9):  # a restore from an older commit replays 3 and 4 too: ignored
        second.record(s, {"loss": 100.0 + s})
    logged += second.commit(8)
    assert steps(logged) == list(range(1, 9))
    assert [v["loss"] for _, v, _ in logged] == [1, 2, 3, 4, 105, 106, 107, 108]


def test_metrics_of_one_step_merge_and_a_late_key_of_the_committed_step_goes_at_once() -> None:
    gate = CommitGate()
    gate.record(1, {"loss": 2.0})
    gate.record(1, {"lr": 0.1})
    gate.record(2, {"loss": 1.5})
    released = gate.commit(2)  # a blocking save of step 2 inside its own end_step
    assert released[0][1] == {"loss": 2.0, "lr": 0.1}
    assert gate.record(2, {"lr": 0.09, "loss": 9.9}) == [(2, {"lr": 0.09}, 0.0)]
    assert gate.record(2, {"lr": 0.5}) == []  # once
    assert gate.record(1, {"grad": 1.0}) == []  # older steps are closed


def test_a_new_generation_never_treats_its_start_step_as_late() -> None:
    gate = CommitGate(logged_through=10)
    assert gate.record(10, {"loss": 1.0}) == []


def test_what_a_failed_write_released_goes_with_the_next_commit() -> None:
    gate = CommitGate()
    for s in range(1, 5):
        gate.record(s, {"loss": float(s)})
    failed = gate.commit(2)
    gate.requeue(failed)  # the tracking server was down
    gate.record(5, {"loss": 5.0})
    released = gate.commit(4)
    assert steps(released) == [1, 2, 3, 4] and released[0][1] == {"loss": 1.0}
    assert gate.held == 1
    gate.requeue([])
    assert steps(gate.commit(5)) == [5]


def test_steps_committed_but_never_logged_are_named_and_given_up() -> None:
    # The run was logged through step 5; the storage's newest commit is step 10 (its process
    # died between the commit and its write): 6-10 never run again.
    gate = CommitGate(logged_through=5)
    assert gate.skip_to(10) == (6, 10) and gate.logged_through == 10
    assert gate.record(8, {"loss": 1.0}) == [] and gate.held == 0
    assert gate.skip_to(10) is None and CommitGate(logged_through=5).skip_to(3) is None


def test_log_calls_keep_steps_whole_and_room_for_the_commit_at_the_end() -> None:
    released = [(s, {"loss": 1.0, "lr": 0.1, "grad": 2.0}, 0.0) for s in range(1, 6)]
    calls = log_calls(released, reserve=2, limit=7)
    assert [([p[0] for p in points], done) for points, done in calls] == [
        ([1, 1, 1, 2, 2, 2], 2), ([3, 3, 3, 4, 4, 4], 4), ([5, 5, 5], 5)]
    # No room for 4 more after step 5's 3 points in a call of 6: the reserve gets its own.
    calls = log_calls(released, reserve=4, limit=6)
    assert [done for _, done in calls] == [2, 4, 5, 5] and calls[-1][0] == []
    # One step with more metrics than a call takes goes in pieces; nothing is complete before.
    big = [(1, {f"m{i}": float(i) for i in range(5)}, 0.0)]
    assert [(len(points), done) for points, done in log_calls(big, limit=2)] == [
        (2, 0), (2, 0), (1, 1)]
    assert log_calls([]) == [([], 0)]


def test_out_of_order_and_bounds() -> None:
    gate = CommitGate(max_steps=2)
    gate.record(5, {"loss": 1.0})
    with pytest.raises(ValueError, match="step 4 recorded after step 5"):
        gate.record(4, {"loss": 1.0})
    gate.record(6, {"loss": 1.0})
    gate.record(7, {"loss": 1.0})
    assert gate.held == 2 and gate.dropped == 1
    with pytest.raises(ValueError, match="max_steps"):
        CommitGate(max_steps=0)


def test_facts_tail_reads_complete_new_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "facts.jsonl"
    tail = JobFactsTail(path)
    assert tail.read() == []  # no file yet
    a = JobFact(time=1.0, kind="generation", generation=1, world_size=2, message="start")
    append_fact(path, a)
    with open(path, "a") as f:
        f.write("not json\n")
        f.write('{"time": 2.0, "kind": "cost", "generation"')  # being written
    assert tail.read() == [a]
    with open(path, "a") as f:
        f.write(': 1, "cost_usd": 0.5}\n')
    assert tail.read() == [JobFact(time=2.0, kind="cost", generation=1, cost_usd=0.5)]
    assert tail.read() == []
    assert JobFactsTail(None).read() == []


def test_a_fact_round_trips_and_bad_ones_are_refused() -> None:
    fact = JobFact(time=3.5, kind="generation", generation=2, world_size=1, step=40,
                   lost_steps=6, cost_usd=0.25, message="lost n2: 1 node(s)")
    assert JobFact.parse(fact.to_line()) == fact
    for bad in ("[]", '{"kind": "x"}', '{"time": "soon", "kind": "x", "generation": 1}'):
        with pytest.raises(ValueError):
            JobFact.parse(bad)


def test_the_agent_writes_a_generations_fact_from_its_assignment() -> None:
    a = agent_pb2.Assignment(job_id="j", generation=3, world_size=2, restore_step=40,
                             lost_steps=6, cost_usd=0.5, reason="lost n2: 1 node(s)")
    assert fact_from_assignment(a, 12.5) == JobFact(
        time=12.5, kind="generation", generation=3, world_size=2, step=40, lost_steps=6,
        cost_usd=0.5, message="lost n2: 1 node(s)")
    fresh = agent_pb2.Assignment(job_id="j", generation=1, world_size=1, restore_step=-1)
    assert fact_from_assignment(fresh, 1.0).step == 0
