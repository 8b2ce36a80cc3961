"""The pure parts of the checkpoint and recovery benchmarks: figures over repeated runs, and the
phases of a recovery read from event and log timelines."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

# bench/ is a folder of scripts that import each other as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from cpu_meter import CpuWindow, cpu_seconds, threads  # noqa: E402
from recovery_phases import (  # noqa: E402
    PHASES,
    daemon_marks,
    glog_time,
    out_of_order,
    phases,
    runtime_marks,
    torchrun_marks,
    workload_marks,
)
from repeats import interleaved, judged, meets, summarize_runs, summary  # noqa: E402

KILL = 1_800_000_000.0


# ---- repeats ----------------------------------------------------------------------------------

def test_summary_is_the_median_with_its_spread() -> None:
    s = summary([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["spread"], s["n"]) == (2.5, 1.0, 10.0, 9.0, 4)
    assert s["relative_spread"] == pytest.approx(9.0 / 2.5)


def test_summary_leaves_out_missing_values_and_counts_them() -> None:
    s = summary([None, 2.0, float("nan"), 4.0])
    assert (s["median"], s["n"], s["missing"]) == (3.0, 2, 2)
    assert summary([None])["median"] is None


def test_summarize_runs_takes_every_numeric_figure_of_any_run() -> None:
    runs = [{"a": 1.0, "b": 5, "note": "x", "ok": True}, {"a": 3.0}]
    out = summarize_runs(runs)
    assert set(out) == {"a", "b"}  # strings and booleans are no figures
    assert out["a"]["median"] == 2.0
    assert (out["b"]["n"], out["b"]["missing"]) == (1, 1)


def test_a_target_is_judged_on_the_median() -> None:
    medians = summarize_runs([{"slow": 1.1}, {"slow": 1.3}, {"slow": 1.12}])
    assert judged(medians, {"slow": ("<=", 1.15), "absent": (">=", 1.0)}) == {"slow": True, "absent": None}
    assert meets(0.7, ">=", 0.7) and not meets(0.69, ">=", 0.7)
    with pytest.raises(ValueError, match="operator"):
        meets(1.0, "<", 2.0)


def test_interleaved_rotates_the_systems_each_round() -> None:
    assert interleaved(["a", "b", "c"], 4) == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                               ["a", "b", "c"]]


# ---- recovery phases --------------------------------------------------------------------------

def test_daemon_marks_take_the_first_node_event_and_the_next_generation_after_the_kill() -> None:
    events = [
        {"time": KILL - 5, "kind": "node", "generation": 2, "message": "an old loss"},
        {"time": KILL - 1, "kind": "generation", "generation": 2, "message": "g2"},
        {"time": KILL + 0.4, "kind": "checkpoint", "generation": 2, "message": ""},
        {"time": KILL + 1.6, "kind": "node", "generation": 2, "message": "silent for 2.0s"},
        {"time": KILL + 1.7, "kind": "node", "generation": 2, "message": "rank 0 exited 1"},
        {"time": KILL + 1.6, "kind": "generation", "generation": 3, "message": "g3"},
    ]
    assert daemon_marks(KILL, events, generation_at_kill=2) == {"detected": KILL + 1.6,
                                                                "rendezvous": KILL + 1.6}
    assert daemon_marks(KILL, events[:3], 2) == {"detected": None, "rendezvous": None}


def _glog(t: float, text: str) -> str:
    lt = time.localtime(t)
    return f"I{lt.tm_mon:02d}{lt.tm_mday:02d} {time.strftime('%H:%M:%S', lt)}.{int((t % 1) * 1e6):06d} 17152 torch/x.py:1] {text}"


def test_glog_time_reads_the_lines_own_local_time() -> None:
    t = KILL + 12.25
    assert glog_time(_glog(t, "hi"), near=t + 3) == pytest.approx(t, abs=1e-3)
    assert glog_time("a worker's own print", near=t) is None


def test_torchrun_marks_come_from_the_agents_restart_and_the_rendezvous_after_it() -> None:
    lines = [
        (KILL - 30, _glog(KILL - 30.5, "[default] Rendezvous complete for workers. Result:")),
        (KILL + 0.5, "RuntimeError: Connection closed by peer"),  # the worker's own traceback
        (KILL + 0.7, _glog(KILL + 0.6, "[default] Worker group FAILED. 10/10 attempts left; will restart worker group")),
        (KILL + 0.8, _glog(KILL + 0.75, "[default] Stopping worker group")),
        (KILL + 31.2, _glog(KILL + 31.1, "[default] Rendezvous complete for workers. Result:")),
    ]
    marks = torchrun_marks(KILL, lines)
    assert marks["detected"] == pytest.approx(KILL + 0.6, abs=1e-3)  # glog's time, not arrival
    assert marks["rendezvous"] == pytest.approx(KILL + 31.1, abs=1e-3)
    assert torchrun_marks(KILL, lines[:2]) == {"detected": None, "rendezvous": None}


def test_torchrun_marks_fall_back_to_the_arrival_time_of_an_unprefixed_line() -> None:
    lines = [(KILL + 2.0, "[default] Worker group FAILED. 3/3 attempts left; will restart worker group")]
    assert torchrun_marks(KILL, lines)["detected"] == KILL + 2.0


def test_workload_marks_follow_the_process_that_made_the_first_step_at_the_new_size() -> None:
    timeline = [
        {"event": "imported", "time": KILL - 20, "pid": 10, "python_started": KILL - 22},
        {"event": "first_step", "time": KILL - 15, "pid": 10, "world_size": 2},
        # A restart attempt that never stepped, then the one that did.
        {"event": "imported", "time": KILL + 3, "pid": 11, "python_started": KILL + 1},
        {"event": "imported", "time": KILL + 8, "pid": 12, "python_started": KILL + 6},
        {"event": "first_step", "time": KILL + 11, "pid": 12, "world_size": 1},
    ]
    assert workload_marks(KILL, timeline, 1) == {"imported": KILL + 8, "python_started": KILL + 6,
                                                 "first_step": KILL + 11}
    assert workload_marks(KILL, timeline, 3)["first_step"] is None


def test_runtime_marks_take_the_restore_at_the_new_size_and_the_ready_before_it() -> None:
    events = [
        {"event": "ready", "time": KILL - 20, "rank": 0},
        {"event": "restored", "time": KILL - 19, "world_size": 2},
        {"event": "ready", "time": KILL + 9, "rank": 0},
        {"event": "restored", "time": KILL + 12, "world_size": 1},
        {"event": "ready", "time": KILL + 40, "rank": 0},  # a later generation's
    ]
    assert runtime_marks(KILL, events, 1) == {"process_group": KILL + 9, "restored": KILL + 12}


def test_phases_are_seconds_after_the_kill_in_order_with_extras_last() -> None:
    marks = {"first_step": KILL + 12.9334, "detected": KILL + 1.6, "python_started": KILL + 2,
             "rendezvous": None}
    p = phases(KILL, marks)
    assert list(p)[: len(PHASES)] == list(PHASES) and list(p)[-1] == "python_started"
    assert (p["detected"], p["first_step"], p["rendezvous"], p["old_stopped"]) == (1.6, 12.933, None, None)


def test_out_of_order_names_a_phase_seen_before_its_predecessor() -> None:
    assert out_of_order({"detected": 1.0, "rendezvous": 2.0, "restored": 5.0, "first_step": 6.0}) == []
    assert out_of_order({"detected": 3.0, "rendezvous": 2.0, "old_stopped": 0.5}) == ["detected<rendezvous"]


# ---- cpu meter --------------------------------------------------------------------------------

def test_cpu_meter_reads_this_process_and_counts_a_busy_window() -> None:
    assert cpu_seconds(os.getpid()) > 0
    assert any(t["tid"] == os.getpid() for t in threads(os.getpid()))
    window = CpuWindow({"me": lambda: [os.getpid()]}, cores=1)
    window.start()
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of CPU
        pass
    out = window.stop()
    assert out["me_cpu_s"] >= 0.15
    # /proc counts CPU in clock ticks (10 ms) and the window's wall time is read apart from
    # them, so a window that was all CPU can read a tick or so above 1.
    assert 0 < out["me_share"] <= 1.1
    assert cpu_seconds(2**22 + 12345) is None  # no such pid
