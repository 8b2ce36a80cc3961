"""The goodput benchmark's pure parts: run order, schedules, spreads, ledger counts, targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from goodput_figures import (  # noqa: E402
    Target,
    expected_samples,
    round_order,
    spread,
    summarize,
)
from goodput_ledger import count_window, ledger_length, training_state, unsaved_at  # noqa: E402
from goodput_scenarios import (  # noqa: E402
    MassPreemption,
    NoticeModel,
    PeriodicFailures,
    TraceWindow,
    builtin_scenarios,
    load_scenario,
)

from spotwise.worker.runtime.ledger import Ledger  # noqa: E402

BATCH = 2


def test_round_order_rotates_so_every_system_takes_every_place():
    systems = ["a", "b", "c"]
    orders = [round_order(systems, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for place in range(3):
        assert sorted(o[place] for o in orders) == systems
    assert round_order(systems, 3) == orders[0]
    assert round_order(["w", "x", "y", "z"], 1) == ["x", "y", "z", "w"]


def test_periodic_failures_are_seeded_and_each_loss_is_replaced():
    gen = PeriodicFailures(window_s=60.0, period_s=15.0, replacement_delay_s=5.0, nodes=3)
    a, b, other = gen.schedule(1), gen.schedule(1), gen.schedule(2)
    assert a == b
    assert gen.loss_times(1) != gen.loss_times(2) and other != a
    losses = gen.loss_times(1)
    assert len(losses) == 4
    for k, t in enumerate(losses):
        assert abs(t - 15.0 * (k + 0.5)) <= 0.2 * 15.0 + 0.25
    removes = [e for e in a.events if e.kind == "remove"]
    adds = [e for e in a.events if e.kind == "add" and e.t > 0]
    assert [e.t for e in removes] == losses and all(e.count == 1 for e in removes)
    assert [e.t for e in adds] == [t + 5.0 for t in losses if t + 5.0 < 60.0]
    assert not [e for e in a.events if e.kind == "notice"]
    t = losses[0]
    assert a.level_at(t - 0.5) == 3 and a.level_at(t + 0.1) == 2 and a.level_at(t + 5.1) == 3
    assert a.duration_s == 60.0


def test_mass_preemption_notices_every_node_and_empties_the_gap():
    s = MassPreemption(window_s=60.0, at_s=10.0, gap_s=15.0, lead_s=2.0, nodes=3).schedule(0)
    kinds = [(e.t, e.kind, e.count) for e in s.events]
    assert kinds == [(0.0, "add", 3), (8.0, "notice", 3), (10.0, "remove", 3), (25.0, "add", 3)]
    assert s.level_at(9.9) == 3 and s.level_at(10.0) == 0 and s.level_at(24.9) == 0
    assert s.level_at(25.0) == 3
    with pytest.raises(ValueError):
        MassPreemption(window_s=20.0, at_s=10.0, gap_s=15.0)


def test_trace_window_and_builtin_notice_model(tmp_path):
    trace = tmp_path / "t-4node.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 300},
                                 "data": [4, 4, 2, 2, 4, 4, 0, 4]}))
    notice = NoticeModel()
    assert notice.lead_s == pytest.approx(2.0)
    env = notice.spotwise_env()
    assert float(env["SPOTWISE_DAEMON_DRAIN_MARGIN_S"]) == pytest.approx(10 / 60, abs=1e-3)
    assert float(env["SPOTWISE_AGENT_IMDS_POLL_S"]) == pytest.approx(2 / 60, abs=1e-3)
    w = TraceWindow(trace=str(trace), start=0, length=8, nodes=2, notice_fraction=1.0)
    s = w.schedule(0)
    assert w.window_s == 40.0 and s.levels == (2, 2, 1, 1, 2, 2, 0, 2)
    notices = [e for e in s.events if e.kind == "notice"]
    assert [(e.t, e.count) for e in notices] == [(8.0, 1), (28.0, 2)]
    scenarios = {x.name: x for x in builtin_scenarios(trace=str(trace), trace_start=0, notice=notice)}
    assert set(scenarios) == {"real_trace", "no_notice", "failure_every_60s",
                              "failure_every_15s", "mass_preemption"}
    assert "restart" in scenarios["real_trace"].systems
    assert all("restart" not in x.systems for n, x in scenarios.items() if n != "real_trace")
    quiet = scenarios["no_notice"].generator.schedule(0)
    assert not [e for e in quiet.events if e.kind == "notice"]


def test_load_scenario_validates(tmp_path):
    good = tmp_path / "s.json"
    good.write_text(json.dumps({"name": "held", "kind": "periodic_failures", "window_s": 30,
                                "period_s": 10, "replacement_delay_s": 2}))
    s = load_scenario(good, notice=NoticeModel())
    assert s.name == "held" and s.window_s == 30 and len(s.generator.loss_times(0)) == 3
    for doc in ({"kind": "periodic_failures"}, {"name": "x", "kind": "nope"},
                {"name": "x", "kind": "periodic_failures", "window_s": 30, "period_s": 10,
                 "bogus": 1},
                {"name": "x", "kind": "periodic_failures", "window_s": 30},
                {"name": "x", "kind": "mass_preemption", "window_s": 30, "at_s": 10,
                 "gap_s": 10, "systems": ["slurm"]}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        with pytest.raises(ValueError):
            load_scenario(bad, notice=NoticeModel())


def test_spread_is_median_min_max_iqr_of_present_values():
    s = spread([0.9, None, 0.5, 0.7, 0.8])
    assert s == {"median": 0.75, "min": 0.5, "max": 0.9, "iqr": 0.175, "n": 4}
    assert spread([None])["median"] is None and spread([1.0])["iqr"] == 0.0


def test_summarize_ratios_are_per_round_and_targets_hold_on_the_median():
    rounds = [{"runs": {"spotwise": {"goodput": g, "lost_steps": 0, "generations": 3},
                        "torchrun_tuned": {"goodput": t, "lost_steps": 9, "generations": 5}}}
              for g, t in ((0.9, 0.45), (0.6, 0.5), (0.95, 0.4))]
    summary = summarize(rounds, ["spotwise", "torchrun_tuned"])
    assert summary["goodput"]["spotwise"]["median"] == 0.9
    assert summary["ratio"]["spotwise/torchrun_tuned"]["median"] == 2.0
    assert summary["ratio"]["spotwise/torchrun_tuned"]["min"] == 1.2
    assert summary["ceiling"]["1/torchrun_tuned"]["median"] == 2.2222
    ok = Target(scenario="s", figure="ratio.spotwise/torchrun_tuned", op=">=", value=2.0,
                beside="ceiling.1/torchrun_tuned")
    assert ok.evaluate(summary)["holds"] is True
    assert ok.evaluate(summary)["ceiling.1/torchrun_tuned"] == 2.2222
    # One round above the target does not make it hold: the median decides.
    high = Target(scenario="s", figure="goodput.spotwise", op=">=", value=0.92)
    assert high.evaluate(summary)["holds"] is False
    lost = Target(scenario="s", figure="lost_steps.spotwise", op="<=", value=0)
    assert lost.evaluate(summary)["holds"] is True
    missing = Target(scenario="s", figure="goodput.torchrun", op=">=", value=0.1)
    assert missing.evaluate(summary)["holds"] is None


def test_expected_samples_integrates_the_levels():
    rates = {1: 10.0, 2: 16.0, 3: 18.0}
    assert expected_samples([3, 3, 0, 0, 2], 1.0, 5.0, rates) == pytest.approx(52.0)
    assert expected_samples([3, 3, 0, 0, 2], 1.0, 3.5, rates) == pytest.approx(36.0)
    assert expected_samples([1], 1.0, 3.0, rates) == pytest.approx(30.0)  # last level holds


def _steps(led: Ledger, gen: int, first: int, last: int) -> None:
    for s in range(first, last + 1):
        led.step(generation=gen, step=s, rank=0, ids=[BATCH * (s - 1), BATCH * (s - 1) + 1])


def test_window_counts_commit_to_commit_and_lost_steps_from_restores(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(str(path))
    led.restored(generation=0, step=0)
    _steps(led, 0, 1, 12)
    led.committed(generation=0, step=10)
    start = ledger_length(path)  # the window starts: committed 10, the job at 12
    _steps(led, 0, 13, 25)
    led.committed(generation=0, step=20)
    led.restored(generation=1, step=20)  # a loss: 21..25 are replayed
    led.restored(generation=2, step=20)  # a second restart before g1 stepped: no new loss
    _steps(led, 2, 21, 33)
    led.committed(generation=2, step=30)
    end = ledger_length(path)  # the window ends
    led.committed(generation=2, step=33)  # an exit checkpoint after the window
    _steps(led, 2, 34, 40)
    led.close()
    count = count_window(path, start, end, dataset_size=1000, global_batch=BATCH)
    assert (count.start_commit, count.end_commit, count.committed_steps) == (10, 30, 20)
    assert count.lost_steps == 5
    assert count.restores == [(1, 20, 5), (2, 20, 0)]
    assert count.generations == 2 and count.executed_steps == 13 + 13
    assert training_state(path) == (2, 1, 40, True)


def test_window_counts_nothing_before_it_and_ignores_a_cut_record(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(str(path))
    led.restored(generation=0, step=0)
    _steps(led, 0, 1, 8)
    led.committed(generation=0, step=5)
    led.restored(generation=1, step=5)  # before the window: not the window's loss
    _steps(led, 1, 6, 9)
    start = ledger_length(path)
    led.committed(generation=1, step=8)
    led.close()
    end = ledger_length(path) - 3  # the last record was still being written
    count = count_window(path, start, end, dataset_size=1000, global_batch=BATCH)
    assert count.lost_steps == 0 and count.committed_steps == 0 and count.end_commit == 5
    assert count_window(path, start, ledger_length(path), dataset_size=1000,
                        global_batch=BATCH).committed_steps == 3


def test_unsaved_at_an_outage_is_the_work_past_the_newest_commit(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(str(path))
    assert unsaved_at(path, ledger_length(path), dataset_size=1000, global_batch=BATCH) == 0
    led.restored(generation=0, step=0)
    _steps(led, 0, 1, 14)
    led.committed(generation=0, step=10)
    killed = ledger_length(path)  # every node goes: 11..14 are gone
    led.restored(generation=1, step=10)
    _steps(led, 1, 11, 12)
    led.committed(generation=1, step=12)  # a drain checkpoint at the newest step
    drained = ledger_length(path)
    led.close()
    assert unsaved_at(path, killed, dataset_size=1000, global_batch=BATCH) == 4
    assert unsaved_at(path, drained, dataset_size=1000, global_batch=BATCH) == 0
