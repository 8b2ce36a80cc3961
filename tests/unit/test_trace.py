"""Loading the shared real spot traces and turning them into replay schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotwise.cloud.trace import (
    ReplayConfig,
    Trace,
    busy_window,
    load_trace,
    parse_trace,
    replay_schedule,
    scale_count,
)

TRACES = Path(__file__).resolve().parents[3] / "shared" / "traces"
AVAILABILITY = TRACES / "aws-2023-08-27-us-east-2b-p3.2xlarge-16node-availability.json"
PREEMPTION = TRACES / "aws-2023-08-03-us-east-1f-p3.2xlarge-4node-preemption.json"


@pytest.fixture(params=[AVAILABILITY, PREEMPTION], ids=["16node-availability", "4node-preemption"])
def real_trace(request: pytest.FixtureRequest) -> Trace:
    if not request.param.exists():
        pytest.skip(f"shared traces not beside the repo ({request.param})")
    return load_trace(request.param)


def test_real_traces_load_with_their_shape() -> None:
    if not AVAILABILITY.exists():
        pytest.skip("shared traces not beside the repo")
    avail = load_trace(AVAILABILITY)
    assert avail.gap_seconds == 300 and len(avail.data) == 3247 and avail.source_nodes == 16
    assert avail.data[:8] == (0, 0, 0, 3, 3, 3, 3, 7)
    pre = load_trace(PREEMPTION)
    assert len(pre.data) == 3664 and pre.source_nodes == 4 and max(pre.data) == 4
    assert pre.duration_s == 3664 * 300


def test_scaling_16_to_4_rounds_half_up() -> None:
    assert [scale_count(v, 16, 4) for v in range(17)] == [
        0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    assert scale_count(4, 4, 4) == 4 and scale_count(3, 4, 2) == 2 and scale_count(1, 4, 2) == 1


def _replay_levels(schedule, times):
    """Apply the events in order and read the node count at each time."""
    level, i, out = 0, 0, []
    for t in times:
        while i < len(schedule.events) and schedule.events[i].t <= t:
            e = schedule.events[i]
            level += e.count if e.kind == "add" else -e.count if e.kind == "remove" else 0
            assert 0 <= level, "removed more nodes than exist"
            i += 1
        out.append(level)
    return out


def test_events_reproduce_the_scaled_trace(real_trace: Trace) -> None:
    config = ReplayConfig(compression=300, nodes=4, notice_fraction=0.5, notice_lead_s=0.4, seed=7)
    schedule = replay_schedule(real_trace, config)
    assert schedule.step_s == 1.0
    assert schedule.duration_s == len(real_trace.data)
    expected = [scale_count(v, real_trace.source_nodes, 4) for v in real_trace.data]
    assert list(schedule.levels) == expected
    times = [i * schedule.step_s + 0.5 for i in range(len(expected))]
    assert _replay_levels(schedule, times) == expected
    assert [schedule.level_at(t) for t in times] == expected
    assert [e.t for e in schedule.events] == sorted(e.t for e in schedule.events)


def test_notices_precede_removals_and_never_outnumber_them(real_trace: Trace) -> None:
    config = ReplayConfig(compression=300, nodes=4, notice_fraction=0.5, notice_lead_s=0.4, seed=3)
    events = replay_schedule(real_trace, config).events
    removed = noticed = 0
    level = 0
    for i, e in enumerate(events):
        if e.kind == "notice":
            nxt = next(x for x in events[i + 1:] if x.kind in ("remove", "add"))
            assert nxt.kind == "remove", "a notice must be followed by its removal"
            assert e.count <= nxt.count <= level
            assert 0 < nxt.t - e.t <= 0.4 + 1e-9
            noticed += e.count
        elif e.kind == "remove":
            removed += e.count
            level -= e.count
        else:
            level += e.count
    assert removed > 20
    # About half of the removed nodes come with a notice (a seeded binomial draw).
    assert 0.3 * removed < noticed < 0.7 * removed


def test_notice_fraction_extremes_and_seed_determinism(real_trace: Trace) -> None:
    def kinds(**kw):
        return [e.kind for e in replay_schedule(real_trace, ReplayConfig(nodes=4, **kw)).events]

    assert "notice" not in kinds(notice_fraction=0.0)
    all_noticed = replay_schedule(real_trace, ReplayConfig(nodes=4, notice_fraction=1.0)).events
    assert sum(e.count for e in all_noticed if e.kind == "notice") == sum(
        e.count for e in all_noticed if e.kind == "remove")
    assert kinds(notice_fraction=0.5, seed=1) == kinds(notice_fraction=0.5, seed=1)
    assert kinds(notice_fraction=0.5, seed=1) != kinds(notice_fraction=0.5, seed=2)


def test_long_lead_is_held_back_to_the_previous_change() -> None:
    trace = parse_trace({"metadata": {"gap_seconds": 60}, "data": [0, 4, 2, 1]}, name="x-4node")
    events = replay_schedule(trace, ReplayConfig(compression=60, nodes=4, notice_lead_s=5.0)).events
    assert [(e.t, e.kind, e.count) for e in events] == [
        (1.0, "add", 4),
        (1.0, "notice", 2), (2.0, "remove", 2), (2.0, "notice", 1), (3.0, "remove", 1),
    ]
    zero_lead = replay_schedule(trace, ReplayConfig(compression=60, nodes=4, notice_lead_s=0.0)).events
    assert [(e.t, e.kind) for e in zero_lead][1:3] == [(2.0, "notice"), (2.0, "remove")]


def test_slice_and_compression() -> None:
    trace = parse_trace({"metadata": {"gap_seconds": 300}, "data": [16, 16, 0, 8, 8, 16]}, name="t-16node")
    schedule = replay_schedule(trace, ReplayConfig(compression=600, nodes=4, start=2, length=3, notice_fraction=0))
    assert schedule.levels == (0, 2, 2)
    assert schedule.step_s == 0.5 and schedule.duration_s == 1.5
    assert [(e.t, e.kind, e.count) for e in schedule.events] == [(0.5, "add", 2)]
    with pytest.raises(ValueError):
        replay_schedule(trace, ReplayConfig(start=6))


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"data": [1]},
        {"metadata": {"gap_seconds": 0}, "data": [1]},
        {"metadata": {"gap_seconds": "300"}, "data": [1]},
        {"metadata": {"gap_seconds": 300}, "data": []},
        {"metadata": {"gap_seconds": 300}, "data": [1, -1]},
        {"metadata": {"gap_seconds": 300}, "data": [1, 2.5]},
        {"metadata": {"gap_seconds": 300}, "data": [1, True]},
    ],
)
def test_invalid_traces_are_value_errors(doc: object) -> None:
    with pytest.raises(ValueError):
        parse_trace(doc)


def test_invalid_files_and_configs(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_trace(bad)
    wrong = tmp_path / "x-2node.json"
    wrong.write_text(json.dumps({"metadata": {"gap_seconds": 1}, "data": [3]}))
    with pytest.raises(ValueError, match="2 nodes"):
        load_trace(wrong)
    for kwargs in ({"compression": 0}, {"nodes": 0}, {"notice_fraction": 1.5}, {"notice_lead_s": -1},
                   {"start": -1}, {"length": 0}):
        with pytest.raises(ValueError):
            ReplayConfig(**kwargs)


def test_busy_window_is_the_first_churning_window_that_starts_with_two_nodes() -> None:
    data = [0, 4, 4, 4, 2, 4, 2, 4, 4, 0, 4, 2, 4, 0, 4, 4]
    trace = parse_trace({"metadata": {"gap_seconds": 60}, "data": data}, name="w-4node")
    # Windows of 5 from sample 1: [4,4,4,2,4] has 2 changes; from 3: [4,2,4,2,4] has 4.
    assert busy_window(trace, nodes=4, length=5, min_changes=4) == 3
    assert busy_window(trace, nodes=4, length=5, min_changes=2) == 1
    # None changes 9 times: the earliest of those that change the most (4), starting at >= 2.
    assert busy_window(trace, nodes=4, length=5, min_changes=9) == 3
    # A window starting at sample 9 (no nodes) or 13 is never chosen.
    assert busy_window(trace, nodes=4, length=4, min_changes=3) == 3
    with pytest.raises(ValueError, match="no sample has a node"):
        busy_window(parse_trace({"metadata": {"gap_seconds": 60}, "data": [0, 1, 0]},
                                name="z-16node"), nodes=3, length=2)


def test_busy_window_of_the_real_availability_trace() -> None:
    if not AVAILABILITY.exists():
        pytest.skip(f"shared traces not beside the repo ({AVAILABILITY})")
    trace = load_trace(AVAILABILITY)
    start = busy_window(trace, nodes=3, length=30)
    levels = replay_schedule(trace, ReplayConfig(nodes=3, start=start, length=30)).levels
    assert levels[0] >= 2
    assert sum(a != b for a, b in zip(levels, levels[1:], strict=False)) >= 4
    assert start == 10  # the goodput benchmark's window (bench/goodput.py)
