"""The trace replayer's pure choices: which nodes get a notice, which go, and when a notice's
removal comes."""

from __future__ import annotations

import random

from spotwise.cloud.replay import _removal_times, pick_notice, pick_removal
from spotwise.cloud.trace import ReplayConfig, ReplayEvent, parse_trace, replay_schedule


def test_a_notice_goes_to_nodes_without_one() -> None:
    chosen = pick_notice(["a", "b", "c"], ["b"], 2, random.Random(0))
    assert sorted(chosen) == ["a", "c"]
    assert pick_notice(["a"], ["a"], 1, random.Random(0)) == []


def test_noticed_nodes_go_first_then_random_others() -> None:
    live = ["a", "b", "c", "d"]
    assert pick_removal(live, ["c", "a"], 2, random.Random(0)) == ["c", "a"]
    three = pick_removal(live, ["c"], 3, random.Random(0))
    assert three[0] == "c" and len(set(three)) == 3 and set(three) <= set(live)
    # A noticed node that is already gone is not counted; never more than are alive.
    assert pick_removal(["a"], ["z"], 2, random.Random(0)) == ["a"]


def test_picks_are_reproducible_for_a_seed() -> None:
    live = [f"n{i}" for i in range(8)]
    assert pick_removal(live, [], 3, random.Random(7)) == pick_removal(live, [], 3, random.Random(7))


def test_each_notice_announces_the_next_removal() -> None:
    trace = parse_trace({"metadata": {"gap_seconds": 300}, "data": [3, 3, 1, 1, 3, 2]})
    schedule = replay_schedule(trace, ReplayConfig(compression=100, nodes=3, notice_lead_s=2.0))
    times = _removal_times(schedule.events)
    notices = [i for i, e in enumerate(schedule.events) if e.kind == "notice"]
    assert [schedule.events[i].t for i in notices] == [4.0, 13.0]
    assert [times[i] for i in notices] == [6.0, 15.0]
    assert _removal_times((ReplayEvent(t=1.0, kind="notice", count=1),)) == {0: 1.0}

