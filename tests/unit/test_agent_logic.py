"""The node agent's pure pieces: event mapping, event-file tailing, backoff, assignments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotwise.proto.v1 import agent_pb2, jobs_pb2
from spotwise.worker.agent import Backoff, event_report, launch_spec
from spotwise.worker.runtime.events import EventsTail


def test_restores_progress_and_commits_of_rank0_become_reports() -> None:
    p = event_report({"event": "progress", "time": 5.0, "generation": 2, "step": 7,
                      "loss": 1.5, "samples_per_second": 30.0, "world_size": 3}, rank=0)
    assert p.WhichOneof("event") == "progress" and p.time == 5.0
    assert (p.progress.step, p.progress.loss, p.progress.samples_per_second,
            p.progress.world_size) == (7, 1.5, 30.0, 3)
    c = event_report({"event": "checkpoint_committed", "time": 6.0, "generation": 2,
                      "step": 10, "path": "/ck/10", "bytes": 99, "cursor": 240}, rank=0)
    assert (c.checkpoint_committed.step, c.checkpoint_committed.path,
            c.checkpoint_committed.bytes, c.checkpoint_committed.cursor) == (10, "/ck/10", 99, 240)
    assert not c.checkpoint_committed.requested  # a periodic save
    held = event_report({"event": "checkpoint_committed", "time": 6.0, "generation": 2,
                         "step": 11, "path": "/ck/11", "requested": True}, rank=0)
    assert held.checkpoint_committed.requested


    r = event_report({"event": "restored", "time": 4.0, "generation": 2, "step": 10,
                      "world_size": 3}, rank=0)
    assert (r.WhichOneof("event"), r.restored.step, r.restored.world_size) == ("restored", 10, 3)


@pytest.mark.parametrize("event", ["finished", "fenced", "unknown"])
def test_other_events_are_not_reported(event: str) -> None:
    assert event_report({"event": event, "time": 1.0, "step": 3}, rank=0) is None
    assert event_report({"event": "restored", "time": 1.0, "step": 3}, rank=1) is None


def test_only_rank0_reports_progress() -> None:
    assert event_report({"event": "progress", "step": 1, "loss": 1.0}, rank=1) is None


def test_bad_event_raises_for_the_caller_to_log() -> None:
    with pytest.raises(KeyError):
        event_report({"event": "progress", "loss": 1.0}, rank=0)


def test_events_tail_returns_complete_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    tail = EventsTail(path)
    assert tail.read() == []  # no file yet
    path.write_text(json.dumps({"event": "a"}) + "\n" + '{"event": "b"')
    assert tail.read() == [{"event": "a"}]
    with open(path, "a") as f:
        f.write(', "x": 1}\nnot json\n\n' + json.dumps({"event": "c"}) + "\n")
    assert tail.read() == [{"event": "b", "x": 1}, {"event": "c"}]
    assert tail.read() == []


def test_backoff_doubles_up_to_its_bound_and_resets() -> None:
    b = Backoff(initial_s=0.1, max_s=0.5)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next() == 0.1


def test_launch_spec_from_an_assignment() -> None:
    spec = jobs_pb2.JobSpec(entrypoint=["python", "t.py"], env={"A": "1"}, working_dir="/w",
                            nproc_per_node=2, global_batch_size=48,
                            checkpoint=jobs_pb2.CheckpointSpec(uri="s3://b/p", every_steps=5,
                                                               keep=2))
    a = agent_pb2.Assignment(job_id="j", generation=4, spec=spec, world_size=6, node_rank=1,
                             num_nodes=3, rank_start=2, nproc=2, master_addr="10.0.0.1",
                             master_port=1234, restore_step=-1)
    ls = launch_spec(a)
    assert (ls.job_id, ls.generation, ls.entrypoint, ls.working_dir, dict(ls.spec_env)) == (
        "j", 4, ("python", "t.py"), "/w", {"A": "1"})
    assert (ls.world_size, ls.node_rank, ls.num_nodes, ls.rank_start, ls.nproc) == (6, 1, 3, 2, 2)
    assert (ls.master_addr, ls.master_port, ls.restore_step) == ("10.0.0.1", 1234, -1)
    assert (ls.checkpoint_uri, ls.checkpoint_every, ls.checkpoint_keep,
            ls.global_batch_size) == ("s3://b/p/j", 5, 2, 48)  # checkpoints live under <uri>/<job_id>
    a.rank_start = 5  # ranks 5..6 do not fit a world of 6
    with pytest.raises(ValueError):
        launch_spec(a)
