"""`spotwise demo`'s trace settings: the default slice of the real trace, and clear errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from spotwise import demo
from spotwise.cloud.trace import replay_schedule


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_default_slice_drops_rises_and_drops_again_with_one_notice() -> None:
    if not demo.traces_dir().is_dir():
        pytest.skip(f"no traces directory at {demo.traces_dir()}")
    trace, config = demo._replay_config(_args())
    schedule = replay_schedule(trace, config)
    assert schedule.levels[0] == 3
    kinds = [e.kind for e in schedule.events]
    assert kinds == ["add", "notice", "remove", "add", "remove"]
    assert schedule.duration_s <= 60  # the demo's budget is three minutes in all


def test_an_unseen_trace_replays_its_first_slice_with_a_loss_and_a_comeback(
        tmp_path: Path) -> None:
    # Idle at first (as the 16-node trace is), then 8 of 8, a drop to 4, back to 8.
    data = [0] * 40 + [8] * 5 + [4] * 3 + [8] * 30
    path = tmp_path / "aws-2025-01-01-xx-8node-availability.json"
    path.write_text(json.dumps({"metadata": {"gap_seconds": 600}, "data": data}))
    trace, config = demo._replay_config(_args("--trace", str(path)))
    assert config.start == 40 and config.length == 15
    schedule = replay_schedule(trace, config)
    assert schedule.levels[0] == 3
    assert [e.kind for e in schedule.events] == ["add", "notice", "remove", "add"]
    # An explicit --trace-start wins.
    assert demo._replay_config(_args("--trace", str(path), "--trace-start", "42"))[1].start == 42


def test_a_missing_trace_or_a_bad_flag_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        demo._replay_config(_args("--trace", str(tmp_path / "nope.json")))
    with pytest.raises(ValueError, match="--nodes"):
        demo._replay_config(_args("--nodes", "4"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"metadata": {}, "data": [1]}')
    with pytest.raises(ValueError, match="gap_seconds"):
        demo._replay_config(_args("--trace", str(bad)))


def test_the_traces_directory_is_found_next_to_the_repository() -> None:
    repo = Path(demo.__file__).resolve().parents[1]
    assert demo.traces_dir() == repo.parent / "shared" / "traces"


def test_without_the_traces_directory_the_default_run_replays_the_embedded_slice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo.traces_dir() / demo.DEFAULT_TRACE
    monkeypatch.setattr(demo, "traces_dir", lambda: tmp_path / "shared" / "traces")
    trace, config = demo._replay_config(_args())
    assert trace.source_nodes == 4 and (config.start, config.length) == (0, 15)
    assert trace.data == demo.DEFAULT_SLICE_DATA
    if real.is_file():  # the embedded copy is the same real data
        start, length = demo.DEFAULT_SLICE
        assert tuple(json.loads(real.read_text())["data"][start : start + length]) == trace.data
