"""Goodput under spot churn and failures: spotwise against torchrun (defaults and tuned) with DCP.

    python bench/goodput.py                       # every scenario, 3 interleaved rounds
    python bench/goodput.py --scenario failure_every_15s --rounds 1     # a quick check
    python bench/goodput.py --trace OTHER.json    # the trace scenarios on a held-back trace
    python bench/goodput.py --scenario-file S.json   # a held-back scenario (goodput_scenarios)
    python bench/goodput.py --plan                # what would run, and about how long

Scenarios (bench/goodput_scenarios.py): `real_trace` (the 16-node p3.2xlarge availability trace,
60x compressed, scaled to 3 nodes, every removal noticed), `no_notice` (the same window, no
notices), `failure_every_60s` and `failure_every_15s` (a seeded SIGKILL of one node without
notice, a replacement 5 s later), `mass_preemption` (every node noticed and removed at once,
back after a gap). Systems (bench/goodput_systems.py): spotwise, torchrun with its defaults,
torchrun tuned, and on the real trace the generous restart model. Every system of a scenario
gets the same schedule, workload (tests/workloads/tiny_train.py with a simulated compute of
0.3 s per global batch divided among the ranks), checkpoint interval and ledger.

Rounds: each round measures every scenario once per system, the systems in rotated order
(A B C, B C A, C A B); the uninterrupted reference rates (world 1..3) are measured before the
first round and after each, and a round's denominator is the mean of the two that bracket it.
Goodput = committed samples in the window (goodput_ledger: commit to commit, cut at the
window's end) / the samples an uninterrupted run makes at the scenario's node count through
the window. Lost steps come from the ledger for every system. Each scenario reports every
round and the median, min, max and IQR of each figure; a target holds only if its median meets
it. Writes bench/results/goodput.json after every round and prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import replace as dc_replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench modules beside this one

TINY = ROOT / "tests" / "workloads" / "tiny_train.py"
TRACE = ROOT.parent / "shared" / "traces" / "aws-2023-08-27-us-east-2b-p3.2xlarge-16node-availability.json"
RESULTS = ROOT / "bench" / "results" / "goodput.json"
TRACE_LENGTH = 18
"""Trace samples of the trace scenarios' window (see real_trace's why_window)."""
STARTUP_ESTIMATE_S = 15.0
"""Seconds a run spends before and after its window on a quiet 2-core machine (daemon or
store, agents, torch imports, first commit, teardown), for --plan's estimate."""
REFERENCE_ESTIMATE_S = 75.0
"""Seconds one measurement of the reference rates takes, for --plan's estimate."""


def worker(argv: list[str]) -> int:
    """`goodput.py worker --sigterm {checkpoint,exit} COMPUTE_S ARGS...`: the tiny workload,
    each step sleeping COMPUTE_S / WORLD_SIZE (the rank's share of a global batch's simulated
    compute). With `--sigterm exit` the training process ends at once on SIGTERM, as a
    torchrun script without a SIGTERM handler does (the spotwise runtime would checkpoint):
    it runs as a child in its own session, and this parent answers SIGTERM with SIGKILL."""
    if argv[:1] != ["--sigterm"] or argv[1:2] not in (["checkpoint"], ["exit"]):
        print("goodput worker: --sigterm checkpoint|exit COMPUTE_S ARGS...", file=sys.stderr)
        return 2
    mode, compute_s, rest = argv[1], float(argv[2]), argv[3:]
    if mode == "exit":
        child = subprocess.Popen([sys.executable, __file__, "worker", "--sigterm", "checkpoint",
                                  str(compute_s), *rest], start_new_session=True,
                                 preexec_fn=_die_with_parent)

        def kill_child(*_: object) -> None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGTERM, kill_child)
        code = child.wait()
        return 143 if code == -signal.SIGKILL else (128 - code if code < 0 else code)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sys.argv = [str(TINY), *rest, "--step-sleep", f"{compute_s / world:.6f}"]
    runpy.run_path(str(TINY), run_name="__main__")
    return 0


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies (a SIGKILLed torchrun node leaves no orphan
    training, even before the provider's marker scan finds it)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _setup_json(setup, scenarios, rounds: int) -> dict:
    from goodput_systems import GLOBAL_BATCH
    from torchrun_elastic import DEFAULT, TUNED

    from spotwise.config import AgentConfig
    from spotwise.worker.agent.notices import imds_client

    n = setup.notice
    env = n.spotwise_env()
    poll = float(env["SPOTWISE_AGENT_IMDS_POLL_S"])
    effective = imds_client(AgentConfig(imds_endpoint="http://127.0.0.1:1", imds_poll_s=poll)
                            ).config.poll_interval_s
    return {
        "rounds": rounds,
        "order": "systems rotated by the round: A B C, B C A, C A B, ...",
        "nodes": setup.nodes,
        "compression": n.compression,
        "notice": {
            "lead_s": round(n.lead_s, 3),
            "why": f"AWS's {n.aws_lead_s:.0f} s notice / the compression {n.compression:.0f}",
            "fraction_with_notice": {s.name: s.generator.notice_fraction for s in scenarios},
            "read_by": "spotwise only (torchrun reads no metadata service; the restart model "
                       "is given none)"},
        "spotwise_overrides": {
            "SPOTWISE_DAEMON_DRAIN_MARGIN_S": {
                "default": n.spotwise_drain_margin_s,
                "value": float(env["SPOTWISE_DAEMON_DRAIN_MARGIN_S"]), "why": "scaled by the compression"},
            "SPOTWISE_AGENT_IMDS_POLL_S": {
                "default": n.spotwise_imds_poll_s, "value": poll, "effective": effective,
                "why": "scaled by the compression; the agent polls no faster than every "
                       f"{effective} s (AWS's guidance), so it reacts slower than the scaled "
                       "model: a handicap for spotwise, not a help"}},
        "every_system_env": {"OMP_NUM_THREADS": "1",
                             "why": "one intra-op thread per process on 2 shared cores"},
        "spotwise_job": {"max_failures": 100,
                         "why": "the spec's default gives up after a few failures in a row; "
                                "a failure scenario makes more (torchrun gets --max-restarts=100)"},
        "restart_overrides": {"SPOTWISE_DAEMON_GROW_CHECKPOINT_TIMEOUT_S": 0,
                              "notices": "none (no metadata service)"},
        "torchrun": {**DEFAULT.describe(), "max_restarts": 100},
        "torchrun_tuned": {**TUNED.describe(), "max_restarts": 100},
        "torchrun_common": (
            "one `torchrun --nnodes=1:N --nproc-per-node=1 --rdzv-backend=c10d` per node, "
            "rendezvous on a standalone TCPStore no preemption takes down (is_host=false); "
            "--max-restarts=100 (default 0 ends an elastic job at its first restart); the "
            "workers end at once on SIGTERM (no checkpoint), so every restart resumes from the "
            "last periodic DCP checkpoint"),
        "checkpoint_every_steps": setup.checkpoint_every_steps,
        "checkpoint_why": (
            "the same for every system: about 2 s of wall clock at world 2 (2 trace minutes at "
            "60x), as a user of asynchronous checkpoints picks it: a save blocks training for "
            "tens of ms, so even this often it costs about 1%, and Young's interval "
            "sqrt(2 x cost x MTBF) with a ~0.1 s cost is 1.7 s for a failure every 15 s and "
            "3.5 s for one every 60 s"),
        "workload": {"script": "tests/workloads/tiny_train.py", "global_batch": GLOBAL_BATCH,
                     "simulated_compute_s_per_global_batch": setup.compute_s},
        "reference": (f"an uninterrupted spotwise job at each world size, {setup.reference_s:.0f} s "
                      "each, before the first round and after every round; a round uses the mean "
                      "of the two around it"),
        "numerator": "committed steps at the window's end past the commit at its start, from "
                     "the ledger cut at the window's end (goodput_ledger)",
        "lost_steps": "per restore inside the window, the steps between where the job was and "
                      "the step restored (the daemon's rule), from the ledger, every system",
        "unsaved_at_outage": "steps run past the newest commit when a removal left no node, "
                             "from the ledger cut at that moment: what the outage loses even "
                             "when the restore comes after the window",
        "price_per_hour": setup.price_per_hour,
    }


def _plan_s(scenarios, rounds: int, setup) -> dict[str, float]:
    """About how long each scenario's rounds take (default torchrun waits its 30 s last call
    before its first step when a scenario starts below full size)."""
    out = {}
    for s in scenarios:
        below = s.generator.schedule(0).levels[0] < setup.nodes
        per_round = sum(s.window_s + STARTUP_ESTIMATE_S + (30.0 if sys_ == "torchrun" and below else 0)
                        for sys_ in s.systems)
        out[s.name] = round(per_round * rounds)
    out["references"] = REFERENCE_ESTIMATE_S * (rounds + 1)
    return out


def p3_spot_price() -> float:
    """p3.2xlarge spot USD/hour from the shipped offline table (its usd_per_million_samples
    prices this machine's throughput at a V100's price, per wall second)."""
    from spotwise.cloud.pricing import load_offline_table

    price = load_offline_table().spot_price("p3.2xlarge")
    assert price is not None
    return round(price, 4)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    from goodput_figures import round_order
    from goodput_scenarios import BUILTIN, SYSTEMS, NoticeModel, builtin_scenarios, load_scenario
    from goodput_systems import BenchSetup, measure_reference

    from spotwise.cloud.trace import busy_window, load_trace

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--scenario", action="append", choices=BUILTIN,
                        help="run only this scenario (repeatable; default: all)")
    parser.add_argument("--scenario-file", action="append", type=Path, default=[],
                        help="also run the scenario this JSON file describes (repeatable)")
    parser.add_argument("--trace", type=Path, default=TRACE, help="the trace scenarios' trace")
    parser.add_argument("--start", type=int, default=None,
                        help="first trace sample (default: the trace's first window of "
                             f"{TRACE_LENGTH} samples that starts with 2 nodes and changes "
                             "level 4 times)")
    parser.add_argument("--checkpoint-every", type=int, default=BenchSetup.checkpoint_every_steps,
                        help="periodic checkpoint interval of every system, in steps")
    parser.add_argument("--reference-s", type=float, default=BenchSetup.reference_s,
                        help="wall seconds each uninterrupted rate is measured over")
    parser.add_argument("--seed", type=int, default=0, help="round r uses seed + r")
    parser.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS,
                        help="run only these systems of each scenario (default: all of them)")
    parser.add_argument("--plan", action="store_true", help="print what would run and exit")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.checkpoint_every < 1 or args.reference_s <= 0:
        parser.error("--rounds and --checkpoint-every must be >= 1, --reference-s > 0")
    if not args.trace.is_file():
        parser.error(f"trace {args.trace} not found (expected ../shared/traces next to the "
                     "repository; pass --trace)")
    try:
        trace = load_trace(args.trace)
        notice = NoticeModel()
        start = args.start if args.start is not None else busy_window(trace, nodes=3,
                                                                      length=TRACE_LENGTH)
        scenarios = [s for s in builtin_scenarios(trace=str(args.trace), trace_start=start,
                                                  notice=notice, length=TRACE_LENGTH)
                     if args.scenario is None and not args.scenario_file
                     or s.name in (args.scenario or [])]
        scenarios += [load_scenario(p, notice=notice) for p in args.scenario_file]
        for s in scenarios:
            s.generator.schedule(args.seed)  # a bad window or file fails here, before any run
    except ValueError as e:
        parser.error(str(e))
    if len({s.name for s in scenarios}) != len(scenarios):
        parser.error("two scenarios have the same name")
    if args.systems is not None:
        scenarios = [dc_replace(s, systems=tuple(x for x in s.systems if x in args.systems))
                     for s in scenarios]
        scenarios = [s for s in scenarios if s.systems]
        if not scenarios:
            parser.error(f"no scenario runs any of {args.systems}")
    setup = BenchSetup(notice=notice, checkpoint_every_steps=args.checkpoint_every,
                       reference_s=args.reference_s, price_per_hour=p3_spot_price())
    plan = _plan_s(scenarios, args.rounds, setup)
    if args.plan:
        for s in scenarios:
            where = f" (samples {s.generator.start}..)" if s.generator.kind == "trace" else ""
            print(f"{s.name}: window {s.window_s:.0f} s{where}, systems {' '.join(s.systems)}; "
                  f"about {plan[s.name] / 60:.1f} min for {args.rounds} round(s)")
        print(f"references: about {plan['references'] / 60:.1f} min")
        print(f"total: about {sum(plan.values()) / 60:.0f} min")
        return 0
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every harness stops its nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(text: str) -> None:
        print(f"# {text}", flush=True)

    t_all = time.monotonic()
    result: dict = {"command": ["bench/goodput.py", *argv],
                    "setup": _setup_json(setup, scenarios, args.rounds),
                    "plan_estimate_s": plan, "targets": [], "references": [],
                    "scenarios": {s.name: {**s.describe(), "rounds": [], "summary": {}}
                                  for s in scenarios}}
    references = [measure_reference(setup, log)]
    result["references"].append({"before_round": 0, "rates": _rates_json(references[0])})
    for r in range(args.rounds):
        seed = args.seed + r
        pending = []
        for s in scenarios:
            schedule = s.generator.schedule(seed)
            order = round_order(s.systems, r)
            log(f"round {r + 1}/{args.rounds} {s.name} (seed {seed}): {' '.join(order)}")
            runs = {system: _run(setup, system, schedule, log, seed=seed) for system in order}
            pending.append((s, schedule, order, runs))
        references.append(measure_reference(setup, log))
        result["references"].append({"after_round": r, "rates": _rates_json(references[-1])})
        _record_round(result, pending, references, r, seed)
        result["bench_wall_s"] = round(time.monotonic() - t_all, 1)
        _write(args.out, result)
    result["bench_wall_s"] = round(time.monotonic() - t_all, 1)
    _write(args.out, result)
    _print(result)
    return 0


def _record_round(result: dict, pending: list, references: list[dict[int, float]], r: int,
                  seed: int) -> None:
    """Round r's figures into `result`: each run's denominator from the references that
    bracket the round, then every scenario's summary and the targets, all from every round
    so far."""
    from goodput_figures import TARGETS, expected_samples, mean_rates, rates_drift, summarize

    rates = mean_rates(references[r], references[r + 1])
    for s, schedule, order, runs in pending:
        for run in runs.values():
            if run.error:
                continue
            run.expected_samples = round(expected_samples(schedule.levels, schedule.step_s,
                                                          run.wall_s, rates), 1)
            run.goodput = (round(run.committed_samples / run.expected_samples, 4)
                           if run.expected_samples else None)
        entry = result["scenarios"][s.name]
        entry["rounds"].append({"round": r, "seed": seed, "order": order,
                                "reference_rates": _rates_json(rates),
                                "reference_drift": round(rates_drift(references[r],
                                                                     references[r + 1]), 3),
                                "runs": {k: asdict(v) for k, v in runs.items()}})
        entry["summary"] = summarize(entry["rounds"], s.systems)
        spotwise_runs = [x["runs"]["spotwise"] for x in entry["rounds"] if "spotwise" in x["runs"]]
        entry["summary"]["usd_per_million_samples"] = {"spotwise": _usd_per_million(spotwise_runs)}
    result["targets"] = [t.evaluate(result["scenarios"][t.scenario]["summary"])
                         for t in TARGETS if t.scenario in result["scenarios"]]
    for name, entry in result["scenarios"].items():
        entry["targets"] = [t for t in result["targets"] if t["scenario"] == name]


def _run(setup, system: str, schedule, log: Callable[[str], None], *, seed: int):
    """run_system's result; a run without figures (the system did not train within the start
    timeout, its harness failed, or its ledger broke exactly-once) is recorded with the error,
    and the next system runs: one bad run does not cost the other 47."""
    from goodput_systems import RunResult, run_system

    from spotwise.worker.runtime.ledger import LedgerError

    try:
        return run_system(setup, system, schedule, log, seed=seed)
    except (TimeoutError, RuntimeError, LedgerError) as e:
        log(f"  {system}: no result: {e}")
        return RunResult.failed(system, str(e))


def _rates_json(rates: dict[int, float]) -> dict[str, float]:
    return {str(k): round(v, 2) for k, v in sorted(rates.items())}


def _usd_per_million(runs: list[dict]) -> dict:
    from goodput_figures import spread

    return spread([r["cost_usd"] / r["committed_samples"] * 1e6
                   if r["cost_usd"] is not None and r["committed_samples"] else None for r in runs])


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _print(result: dict, out: Callable[[str], None] = print) -> None:
    for name, entry in result["scenarios"].items():
        summary = entry["summary"]
        for group in ("goodput", "lost_steps", "unsaved_at_outage", "ratio", "ceiling"):
            for key, s in summary.get(group, {}).items():
                if s["n"] == 0:
                    continue
                out(f"{name}.{group}.{key}: {s['median']} (min {s['min']}, max {s['max']}, "
                    f"n {s['n']})")
    for t in result["targets"]:
        out(f"target {t['scenario']} {t['figure']} {t['target']}: median {t['median']} -> "
            f"{'holds' if t['holds'] else 'NOT met' if t['holds'] is False else 'not run'}")
    out(f"bench_wall_s: {result['bench_wall_s']}")


if __name__ == "__main__":
    sys.exit(main())
