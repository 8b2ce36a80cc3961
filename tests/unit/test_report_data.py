"""spotwise.report.extract: a job's events -> the data behind each panel of its report."""

from __future__ import annotations

import pytest

from spotwise.proto.v1 import jobs_pb2
from spotwise.report import (
    CAUSE_BUDGET,
    CAUSE_CAPACITY,
    CAUSE_FAILURE,
    CAUSE_LOSS,
    CAUSE_NOTICE,
    CAUSE_OTHER,
    CAUSE_START,
    classify,
    extract,
)

RUNNING, SUCCEEDED = jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_SUCCEEDED
COMMITTED_AT = {10: 3.0, 14: 5.0, 25: 12.0}
"""When the story's commits landed (seconds), by step: every later event's last_checkpoint_at."""


def ev(t: float, kind: str, message: str = "", *, generation: int = 1, world: int = 2,
       step: int = 0, loss: float = 0.0, sps: float = 0.0, cost: float = 0.0,
       on_demand: float = 0.0, lost: int = 0, ckpt: int = 0,
       state: int = RUNNING) -> jobs_pb2.JobEvent:
    return jobs_pb2.JobEvent(
        job_id="job-1", time=1000.0 + t, kind=kind, generation=generation, message=message,
        job=jobs_pb2.Job(id="job-1", state=state, generation=generation, world_size=world,
                         step=step, loss=loss, samples_per_second=sps, cost_usd=cost,
                         on_demand_usd=on_demand, lost_steps=lost, last_checkpoint_step=ckpt,
                         last_checkpoint_at=1000.0 + COMMITTED_AT[ckpt] if ckpt else 0.0))


@pytest.mark.parametrize(("reason", "noticed", "cause"), [
    ("start on 2 node(s): n1, n2", set(), CAUSE_START),
    ("lost n2: 1 node(s)", set(), CAUSE_LOSS),
    ("lost n2, adding n3: 2 node(s)", {"n2"}, CAUSE_NOTICE),
    ("lost n2: 1 node(s)", {"n9"}, CAUSE_LOSS),
    ("drained n1: 1 node(s)", {"n1"}, CAUSE_NOTICE),
    ("drained n1: 1 node(s)", set(), CAUSE_NOTICE),
    ("grow from 1 to 2 node(s) after the checkpoint at step 20: joined n3", set(), CAUSE_CAPACITY),
    ("grow from 1 to 2 node(s): joined n3 (no checkpoint within 5s)", set(), CAUSE_CAPACITY),
    ("generation 2 failed (rank 1 exited 1), every node alive: restart (failure 1 of 3 "
     "tolerated)", set(), CAUSE_FAILURE),
    ("budget: shrink to 1 node(s)", set(), CAUSE_BUDGET),
    ("something new", set(), CAUSE_OTHER),
])
def test_classify_reads_the_controllers_reasons(reason: str, noticed: set[str],
                                                cause: str) -> None:
    assert classify(reason, noticed) == cause


def story() -> list[jobs_pb2.JobEvent]:
    """Start on 2, a notice then a drain to 1, capacity back to 2, a loss without notice."""
    return [
        ev(0, "state", "PENDING: submitted", generation=0, world=0),
        ev(1, "generation", "generation 1 (world size 2, from scratch): start on 2 node(s): "
           "n1, n2"),
        ev(2, "progress", step=5, loss=2.0, sps=40, cost=0.01, on_demand=0.03),
        ev(3, "checkpoint", "checkpoint at step 10 committed (100 bytes): /ck/10", step=10,
           ckpt=10, cost=0.02, on_demand=0.06),
        ev(4, "notice", "node n2: interruption notice terminate, gone in 3s: draining "
           "(checkpoint now)", step=12, ckpt=10, cost=0.03, on_demand=0.09),
        ev(5, "checkpoint", "checkpoint at step 14 committed (100 bytes): /ck/14", step=14,
           ckpt=14, cost=0.04, on_demand=0.12),
        ev(6, "generation", "generation 2 (world size 1, from step 14): drained n2: 1 node(s)",
           generation=2, world=1, step=14, ckpt=14, cost=0.05, on_demand=0.15),
        ev(7, "restored", "generation 2 restored step 14 at world size 1", generation=2,
           world=1, step=14, ckpt=14, cost=0.05, on_demand=0.15),
        ev(8, "progress", generation=2, world=1, step=18, loss=1.5, sps=20, cost=0.06,
           on_demand=0.18, ckpt=14),
        ev(9, "checkpoint_failed", "checkpoint save failed: disk full", generation=2, world=1,
           step=20, ckpt=14, cost=0.07, on_demand=0.2),
        ev(10, "generation", "generation 3 (world size 2, from step 14): grow from 1 to 2 "
           "node(s): joined n3 (no checkpoint within 5s)", generation=3, world=2, step=14,
           ckpt=14, lost=6, cost=0.08, on_demand=0.22),
        ev(11, "progress", generation=3, world=2, step=24, loss=1.2, sps=40, ckpt=14, lost=6,
           cost=0.09, on_demand=0.25),
        # An older snapshot's cost (events race the ledger tick): the line must not dip.
        ev(12, "checkpoint", "checkpoint at step 25 committed (100 bytes): /ck/25",
           generation=3, step=25, ckpt=25, lost=6, cost=0.085, on_demand=0.25),
        ev(13, "generation", "generation 4 (world size 1, from step 25): lost n3: 1 node(s)",
           generation=4, world=1, step=25, ckpt=25, lost=9, cost=0.1, on_demand=0.3),
        ev(14, "restored", "generation 4 restored step 25 at world size 1", generation=4,
           world=1, step=25, ckpt=25, lost=8, cost=0.1, on_demand=0.3),
        ev(15, "state", "SUCCEEDED: all 1 processes of generation 4 exited 0", generation=4,
           world=1, step=30, ckpt=25, lost=8, cost=0.11, on_demand=0.33, state=SUCCEEDED),
    ]


def test_extract_builds_every_panel() -> None:
    data = extract(story(), budget_usd=0.5)
    assert data.ended and data.state == "SUCCEEDED" and data.step == 30
    assert "ended" in data.title and "4 generation(s)" in data.title
    # World size panel: one point per event with figures, the generation starts and causes.
    assert [w for _, w in data.world] == [0, 2, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1]
    assert [(g.generation, g.time_s, g.world_size, g.cause) for g in data.generations] == [
        (1, 1.0, 2, CAUSE_START), (2, 6.0, 1, CAUSE_NOTICE), (3, 10.0, 2, CAUSE_CAPACITY),
        (4, 13.0, 1, CAUSE_LOSS)]
    # Steps panel.
    assert data.progress == [(5, 40.0, 2.0), (18, 20.0, 1.5), (24, 40.0, 1.2)]
    assert [(c.step, c.ok) for c in data.checkpoints] == [
        (10, True), (14, True), (20, False), (25, True)]
    # Cost panel: never decreasing, on demand above spot.
    spent = [c for _, c, _ in data.cost]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(0.11)
    assert all(od >= c for _, c, od in data.cost)
    assert data.budget_usd == 0.5
    # Age of the last commit: none before the first commit, then a sawtooth that climbs with
    # the clock to each commit (through the failed save at 9 s) and drops to 0 there.
    assert data.commit_age == [
        (3, 0), (4, 1), (5, 2), (5, 0), (6, 1), (7, 2), (8, 3), (9, 4), (10, 5), (11, 6),
        (12, 7), (12, 0), (13, 1), (14, 2), (15, 3)]
    # Lost steps panel: generation 3's restart lost 6, generation 4's 2 (9 counted at its
    # start, corrected to 8 in all by its restore).
    assert data.lost_steps_by_generation() == {1: 0, 2: 0, 3: 6, 4: 2}
    assert data.lost_steps == 8
    assert data.end is not None and (data.end.time_s, data.end.state) == (15.0, "SUCCEEDED")


def test_a_job_the_budget_stopped_ends_with_the_budget_as_its_cause() -> None:
    events = story()[:-1] + [
        ev(15, "state", "BUDGET_EXHAUSTED: spent $0.4900 + one tick (10 s) at $1.2/h = $0.5033 "
           "would exceed the budget $0.5000: final checkpoint, then BUDGET_EXHAUSTED",
           generation=4, world=1, step=30, ckpt=25, lost=8, cost=0.49, on_demand=1.4,
           state=jobs_pb2.JOB_STATE_BUDGET_EXHAUSTED)]
    data = extract(events, budget_usd=0.5)
    assert data.ended and data.end is not None and data.end.cause == CAUSE_BUDGET
    assert "would exceed the budget" in data.end.reason


def test_a_running_job_says_so() -> None:
    events = story()[:9]
    data = extract(events)
    assert not data.ended and data.state == "RUNNING" and data.end is None
    assert "still running" in data.title and "2 generation(s)" in data.title


def test_the_job_now_overrides_the_last_event() -> None:
    job = jobs_pb2.Job(id="job-1", state=SUCCEEDED, step=31, lost_steps=8,
                       spec=jobs_pb2.JobSpec(name="lm"))
    data = extract(story()[:9], job=job)
    assert data.ended and data.step == 31 and data.name == "lm"
    assert data.title.startswith("spotwise job lm (job-1): SUCCEEDED, ended")


def test_nothing_to_report_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to report"):
        extract([])


def test_render_writes_png_and_html_with_the_same_image() -> None:
    import base64

    from spotwise.report_figure import render_html, render_png

    data = extract(story(), budget_usd=0.5)
    png = render_png(data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = render_html(data, png)
    assert base64.b64encode(png).decode() in page
    assert page.count("<tr><td>") == 4 and "loss without notice" in page
    assert "<p>Ended SUCCEEDED at 15.0 s: SUCCEEDED: all 1 processes" in page


def test_the_budget_line_and_every_generation_are_in_view() -> None:
    from spotwise.report_figure import figure

    data = extract(story(), budget_usd=0.5)
    world_ax, age_ax, cost_ax, _steps_ax, lost_ax = figure(data).axes[:5]
    assert cost_ax.get_ylim()[1] > 0.5  # the budget is above the spend: the axis reaches it
    assert "budget" in [t.get_text() for t in cost_ax.get_legend().get_texts()]
    assert [t.get_text() for t in lost_ax.get_xticklabels()] == [
        "g1\nstart", "g2\nnotice", "g3\ncapacity back", "g4\nloss without notice"]
    assert lost_ax.get_ylim()[0] == 0
    labels = [t.get_text() for t in world_ax.texts]
    assert labels == ["g1: start", "g2: notice", "g3: capacity back", "g4: loss without notice",
                      "end: SUCCEEDED"]
    assert age_ax.get_title().startswith("Age of the last commit")


def test_a_replay_is_drawn_over_the_steps_it_repeats_not_as_a_line_back() -> None:
    from spotwise.report_figure import _runs

    xs, ys = _runs([5, 10, 15, 12, 20], [3.0, 2.0, 1.5, 1.6, 1.0])
    assert xs[:3] == [5, 10, 15] and xs[3] != xs[3] and xs[4:] == [12, 20]
    assert ys[3] != ys[3] and len(ys) == 6
