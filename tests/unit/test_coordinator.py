"""The coordinator on a real SQLite store with a fake clock: decisions carried out and stored."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from spotwise.daemon.controller import JobState, NodeState, Policy
from spotwise.daemon.coordinator import Coordinator
from spotwise.daemon.store import Store
from spotwise.proto.v1 import agent_pb2, jobs_pb2
from spotwise.spec import JobSpec
from tests.support import agents

SECRETS: dict[str, str] = {}
"""Node id -> the credential its Register issued."""


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock) -> Coordinator:
    policy = Policy(lease_s=2.0, settle_s=0.5, settle_max_s=1.5, grow_checkpoint_timeout_s=0)
    return Coordinator(Store(tmp_path / "db"), policy=policy, heartbeat_interval_s=0.5,
                       clock=clock)


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = {"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                               "global_batch_size": 4, "nodes": {"min": 1, "max": 2}}
    base.update(kw)
    return JobSpec.model_validate(base)


def join(coord: Coordinator, address: str) -> str:
    resp = agents.join(coord, address=address)
    SECRETS[resp.node_id] = resp.node_secret
    return resp.node_id


def test_lost_steps_count_the_work_replayed_from_the_last_commit(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec().to_proto())
    a, b = join(coord, "10.0.0.1"), join(coord, "10.0.0.2")
    clock.now += 1
    coord.tick()
    assert job.row.generation == 1 and sorted(job.members) == sorted([a, b])
    report = agent_pb2.ReportEventRequest(node_id=a, node_secret=SECRETS[a], job_id=job.row.id, generation=1)
    report.checkpoint_committed.step = 10
    assert coord.report(report).accepted
    report = agent_pb2.ReportEventRequest(node_id=a, node_secret=SECRETS[a], job_id=job.row.id, generation=1)
    report.progress.step = 14
    assert coord.report(report).accepted
    # b goes silent; a keeps heartbeating.
    clock.now += 2.5
    coord.heartbeat(agent_pb2.HeartbeatRequest(node_id=a, node_secret=SECRETS[a], job_id=job.row.id, generation=1))
    coord.tick()
    assert coord.nodes[b].state is NodeState.LOST
    assert job.row.generation == 2 and job.members == [a]
    assert job.row.lost_steps == 4 and job.row.step == 10
    # What was decided is what is stored.
    again = make(tmp_path, clock)
    stored = again.jobs[job.row.id]
    assert stored.members == [a] and stored.row.lost_steps == 4
    assert stored.state is JobState.RESCALING and again.nodes[b].state is NodeState.LOST


def _report(coord: Coordinator, node: str, job_id: str, generation: int, kind: str,
            **fields: int) -> bool:
    req = agent_pb2.ReportEventRequest(node_id=node, node_secret=SECRETS[node], job_id=job_id, generation=generation)
    getattr(req, kind).SetInParent()
    for name, value in fields.items():
        setattr(getattr(req, kind), name, value)
    return coord.report(req).accepted


@pytest.mark.parametrize(("restored", "lost", "step"), [
    (10, 4, 10),  # restored where the daemon said: the 4 steps past the commit are lost
    (12, 2, 12),  # a newer commit (its report died with b): only 2 are lost
    (14, 0, 14),  # the newest step was committed: nothing is lost
    (8, 6, 8),    # the chosen commit was torn, an older one restored: 6 are lost
])
def test_lost_steps_follow_where_the_generation_really_restored(
        tmp_path: Path, restored: int, lost: int, step: int) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec().to_proto())
    a, _ = join(coord, "10.0.0.1"), join(coord, "10.0.0.2")  # the second goes silent
    clock.now += 1
    coord.tick()
    assert _report(coord, a, job.row.id, 1, "checkpoint_committed", step=10)
    assert _report(coord, a, job.row.id, 1, "progress", step=14)
    clock.now += 2.5
    coord.heartbeat(agent_pb2.HeartbeatRequest(node_id=a, node_secret=SECRETS[a], job_id=job.row.id, generation=1))
    coord.tick()
    assert job.row.generation == 2 and job.row.lost_steps == 4 and job.restore_step == 10
    assert _report(coord, a, job.row.id, 2, "restored", step=restored, world_size=1)
    assert (job.row.lost_steps, job.row.step) == (lost, step)
    # A repeated report changes nothing more; a stale generation's is refused.
    assert _report(coord, a, job.row.id, 2, "restored", step=restored, world_size=1)
    assert job.row.lost_steps == lost
    assert not _report(coord, a, job.row.id, 1, "restored", step=14, world_size=1)
    coord.tick()  # reports are stored with the next tick
    assert make(tmp_path, clock).jobs[job.row.id].row.lost_steps == lost


def test_a_failed_store_write_leaves_memory_as_stored(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec().to_proto())
    join(coord, "10.0.0.1")
    clock.now += 1

    def disk_full(*args: object, **kwargs: object) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(coord.store, "add_event", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        coord.tick()  # starting generation 1 stores an event, which fails
    job = coord.jobs[job.row.id]
    assert job.state is JobState.PENDING and job.row.generation == 0 and not job.members
    monkeypatch.undo()
    coord.tick()  # the disk has room again: the same decision goes through
    assert coord.jobs[job.row.id].row.generation == 1


def test_a_nan_loss_is_reported_without_breaking_the_store(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    job = coord.submit(spec(nodes={"min": 1, "max": 1}).to_proto())
    a = join(coord, "10.0.0.1")
    clock.now += 1
    coord.tick()
    for step, loss in ((3, 2.5), (4, float("nan"))):
        report = agent_pb2.ReportEventRequest(node_id=a, node_secret=SECRETS[a], job_id=job.row.id, generation=job.row.generation)
        report.progress.step, report.progress.loss = step, loss
        assert coord.report(report).accepted
    assert (job.row.step, job.row.loss) == (4, 2.5)
    clock.now += 5  # progress is soft state, stored every few seconds
    coord.tick()
    reloaded = Coordinator(Store(tmp_path / "db"), policy=Policy(), heartbeat_interval_s=0.5, clock=clock)
    assert reloaded.jobs[job.row.id].row.step == 4


def test_a_decision_is_served_to_nodes_only_once_it_is_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    coord = Coordinator(Store(tmp_path / "db"), heartbeat_interval_s=0.5, clock=clock,
                        policy=Policy(lease_s=2.0, settle_s=0.5, settle_max_s=1.5),
                        autocommit=False)
    job = coord.submit(spec().to_proto())
    a = coord.agents.register(agent_pb2.RegisterRequest(address="10.0.0.1", store_port=7000,
                                                        slots=1), clock.now)
    coord.commit()
    beat = agent_pb2.HeartbeatRequest(node_id=a.node_id, node_secret=a.node_secret)
    coord.heartbeat(beat)  # its first beat: it may be made READY
    clock.now += 1
    coord.plan_tick()
    assert job.row.generation == 1 and job.members == [a.node_id]  # decided, in memory
    assert not coord.heartbeat(beat).assignment.job_id  # ... but not served: not stored yet
    batch = coord.take()

    def disk_full(*args: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(coord.store, "write_batch", disk_full)
    with pytest.raises(sqlite3.OperationalError):
        coord.store.write_batch(batch.stored)
    coord.write_failed(batch, sqlite3.OperationalError("database or disk is full"))
    # The write failed: the generation did not happen, and no node was told of it.
    assert coord.jobs[job.row.id].row.generation == 0
    assert not coord.heartbeat(beat).assignment.job_id
    monkeypatch.undo()
    clock.now += 1
    coord.tick()
    answer = coord.heartbeat(beat)
    assert answer.assignment.job_id == job.row.id and answer.assignment.generation == 1
    # Holding that version, the next answer carries no assignment (nothing changed).
    beat.assignment_version = answer.assignment_version
    assert not coord.heartbeat(beat).HasField("assignment")


def test_progress_points_are_thinned_to_a_bound(tmp_path: Path) -> None:
    clock = Clock()
    coord = Coordinator(Store(tmp_path / "db"), heartbeat_interval_s=0.5, clock=clock,
                        policy=Policy(lease_s=1e9, settle_s=0.5, settle_max_s=1.5),
                        progress_interval_s=1.0, max_progress_events=20)
    job = coord.submit(spec(nodes={"min": 1, "max": 1}).to_proto())
    a = join(coord, "10.0.0.1")
    clock.now += 1
    coord.tick()
    for step in range(1, 101):
        report = agent_pb2.ReportEventRequest(node_id=a, node_secret=SECRETS[a],
                                              job_id=job.row.id, generation=1)
        report.progress.step, report.progress.loss = step, 1.0 / step
        assert coord.report(report).accepted
        clock.now += 1
        coord.tick()
    progress = [e for e in coord.store.events(job.row.id) if e.kind == "progress"]
    assert 10 <= len(progress) <= 20  # 100 points stored, thinned by halves past 20
    steps = [int(e.message.split()[1]) for e in progress]
    assert steps == sorted(steps) and steps[-1] == 100 and steps[0] <= 10  # the whole history
    figures = [jobs_pb2.Job.FromString(e.job) for e in progress]
    assert all(not j.HasField("spec") and j.id == job.row.id for j in figures)
    assert figures[-1].step == 100
    assert coord.store.job(job.row.id).step == 100


def test_a_beat_with_nothing_new_renews_the_lease_without_rebuilding_the_nodes_view(
        tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock)
    n = join(coord, "10.0.0.1")  # registers and beats once
    coord.tick()
    view = coord.state.nodes[n].view
    clock.now += 1.5
    coord.heartbeat(agent_pb2.HeartbeatRequest(node_id=n, node_secret=SECRETS[n]))
    assert coord.state.nodes[n].view is view  # the same view ...
    assert coord.state.snapshot().last_seen(view) == clock.now  # ... and the lease renewed
    clock.now += 1.5  # 3 s after the view's last_seen, 1.5 s after the beat: not lost
    coord.tick()
    assert coord.nodes[n].state is not NodeState.LOST


def test_the_control_loop_wakes_when_a_lease_ends_rather_than_a_tick_later(
        tmp_path: Path) -> None:
    from spotwise.daemon.loop import ControlLoop

    clock = Clock()
    coord = make(tmp_path, clock)  # lease 2 s
    loop = ControlLoop(coord, tick_s=5.0, clock=clock)
    assert loop._timeout() == 5.0  # no node: nothing ends before the tick
    node = join(coord, "10.0.0.1:1")  # beaten at 1000.0
    clock.now = 1001.5
    assert loop._timeout() == pytest.approx(0.5 + loop.LEASE_END_MARGIN_S)
    clock.now = 1002.0 + loop.LEASE_END_MARGIN_S
    coord.tick()
    assert coord.nodes[node].row.state == NodeState.LOST.value
    assert loop._timeout() == 5.0  # the one lease has ended: back to the tick
