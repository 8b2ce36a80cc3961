"""Goodput under a real spot availability trace: spotwise against torchrun with DCP.

    python bench/goodput.py [--window-s 150] [--reference-s 10] [--trace FILE] [--start N]

The 16-node p3.2xlarge availability trace (../shared/traces) is compressed (60: a 5-minute
sample lasts 5 s) and scaled to this machine (16 -> 3 nodes), and one window of it is replayed
for a fixed wall-clock time by the trace replayer (spotwise.cloud.replay): nodes appear when
the trace rises and are SIGKILLed when it falls, each removal announced on the node's own fake
IMDSv2 `notice_lead_s` ahead (AWS announces capacity reclaims two minutes ahead). The window is
the trace's first that starts with 2 nodes and changes level at least 4 times (sample 10 of the
16-node trace; `--start` picks another, and a trace the benchmark has not seen gets its own
first such window). The same window runs once per system, on the same workload and checkpoint
interval. The workload is tests/workloads/tiny_train.py with a simulated compute of 0.3 s per
global batch divided among the ranks (a sleep of 0.3 s / world size per step): on 2 shared
cores real compute does not scale with the world size, GPUs doing data parallelism do.

- **spotwise**: a `spotwise daemon`; each node a spotwise agent polling its IMDS. A noticed
  node is drained (checkpoint at the next step, then the next generation without it); a new
  node is taken in after a checkpoint.
- **torchrun** (the baseline, `baseline_goodput` and `ratio`): what torchrun with DCP does.
  Each node is a `torchrun --nnodes=1:3` elastic agent (bench/torchrun_elastic.py: c10d
  rendezvous on a standalone store that no preemption takes down, torchrun's defaults
  otherwise) running the same workload on the spotwise runtime, which checkpoints with DCP
  every `checkpoint_every_steps` and restores the newest commit on each start. Notices are
  ignored (torchrun reads no metadata service); every membership change restarts all workers
  from the last periodic checkpoint, after torchrun's rendezvous (which waits its 30 s last
  call for more nodes whenever it forms below the maximum size).
- **restart** (`restart_baseline_goodput`, `ratio_vs_restart_baseline`): the same
  restart-from-checkpoint policy on spotwise's own daemon and agents (no notices; a new node
  triggers a restart without a checkpoint first). It keeps spotwise's 1 s failure detection and
  its rendezvous, so it isolates what notices and checkpoint-before-grow are worth; it is far
  more generous than torchrun.

Goodput = committed useful samples / (samples per second of an uninterrupted run at the same
world size x wall time). Committed useful samples: at the window's end the job is stopped with
SIGTERM (checkpoint at the next step boundary, like any preemptible trainer's exit path) and
the exactly-once ledger's committed history is counted from where the window began. The
uninterrupted rate is measured at world sizes 1, 2 and 3 before and again after the windows
(this machine is shared, so the two are averaged and their spread reported). On 2 cores the
rate is not linear in the world size (more ranks are slower here), so the denominator
integrates the reference rate over the trace's node count through the window; the rate at the
time-weighted average node count (the literal formula) is reported as well.

Money (spotwise): nodes are charged at the p3.2xlarge spot price from the offline table, per wall second
(so usd_per_million_samples prices this machine's throughput, not a V100's). A last, short
run gives a job a budget below its cost and measures what it spent past the budget
(budget_overspend_usd; the target is at most one accounting tick's cost).

Writes bench/results/goodput.json and prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from torchrun_elastic import TorchrunNodes, start_store  # noqa: E402  (bench/, beside this)

from spotwise.client import Client, state_name  # noqa: E402
from spotwise.cloud.local import (  # noqa: E402
    LocalProvider,
    processes_with_env,
    scan_marked,
    stop_process_group,
)
from spotwise.cloud.provider import NodeRequest  # noqa: E402
from spotwise.cloud.replay import TraceReplayer  # noqa: E402
from spotwise.cloud.trace import (  # noqa: E402
    ReplayConfig,
    Trace,
    busy_window,
    load_trace,
    replay_schedule,
)
from spotwise.worker.runtime.ledger import verify_ledger  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "aws-2023-08-27-us-east-2b-p3.2xlarge-16node-availability.json"
RESULTS = ROOT / "bench" / "results" / "goodput.json"
TINY = ROOT / "tests" / "workloads" / "tiny_train.py"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "BUDGET_EXHAUSTED")
SYSTEMS = ("spotwise", "torchrun", "restart")
STOP_TIMEOUT_S = 60.0
"""How long a system may take to stop at the window's end (its final checkpoint included)."""
DATASET_SIZE = 960
GLOBAL_BATCH = 24


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What the benchmark replays and how."""

    trace: Path = TRACE
    """The availability trace."""
    start: int | None = None
    """First trace sample of the window; None: `busy_window`, the earliest window of the trace
    that starts with at least 2 nodes and changes level at least 4 times once scaled (sample
    10 of the 16-node trace; for a trace the benchmark has not seen, its first such window)."""
    compression: float = 60.0
    """Trace seconds per wall second."""
    nodes: int = 3
    """Node count the trace's 16 maps to."""
    window_s: float = 150.0
    """Wall seconds each system is measured for."""
    notice_fraction: float = 1.0
    """Capacity reclaims of spot instances always come with the two-minute notice."""
    notice_lead_s: float = 4.0
    """Wall seconds of notice: longer than a drain checkpoint here (~1 s), as 120 s is
    longer than one on real hardware; not compressed (120 s / 60 would be 2 s, less than one
    IMDS poll plus a heartbeat plus a checkpoint on this loaded machine)."""
    checkpoint_every_steps: int = 50
    """Periodic checkpoint interval of both systems (about 10 s of wall clock at world 2 here,
    10 minutes of trace time: a usual interval for torchrun+DCP jobs)."""
    compute_s: float = 0.3
    """Simulated compute of one global batch, split over the ranks: each step of the tiny
    workload sleeps compute_s / world size, standing in for the GPU work that data parallelism
    divides (2 shared cores cannot show it: here more ranks are slower, not faster)."""
    reference_s: float = 10.0
    """Wall seconds each uninterrupted reference rate is measured over."""
    price_per_hour: float = 0.0
    """USD per node-hour (default: p3.2xlarge spot from the offline price table)."""
    budget_run_s: float = 45.0
    """Longest the budget run may take."""
    seed: int = 0
    """Seed of the replay's draws."""


def _until(cond: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.2) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _wait_quietly(cond: Callable[[], object], timeout_s: float) -> bool:
    """`_until` that answers False instead of raising."""
    try:
        _until(cond, timeout_s, "")
    except TimeoutError:
        return False
    return True


def p3_spot_price() -> float:
    """p3.2xlarge spot USD/hour from the offline table (on-demand x the p3 spot fraction)."""
    table = json.loads((ROOT / "cloud" / "offline_prices.json").read_text())
    return round(table["on_demand_usd_per_hour"]["p3.2xlarge"] * table["spot_fraction"]["p3"], 4)


class Harness:
    """A `spotwise daemon` subprocess (no provider: the replayer or the harness owns the
    nodes) and a local provider, in a temporary directory."""

    def __init__(self, name: str, cfg: BenchConfig, *, daemon_env: dict[str, str]) -> None:
        self.cfg = cfg
        self.tmp = Path(tempfile.mkdtemp(prefix=f"spotwise-goodput-{name}-"))
        self.env = dict(os.environ, SPOTWISE_STATE_DIR=str(self.tmp / "state"),
                        SPOTWISE_AGENT_IMDS_POLL_S="1", OMP_NUM_THREADS="1",
                        SPOTWISE_DAEMON_DRAIN_MARGIN_S="0.5", **daemon_env)
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env["PATH"]])
        log = self.tmp / "daemon.log"
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
             "--state-dir", str(self.tmp / "state"), "--provider", "none",
             "--log-dir", str(self.tmp / "logs")],
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=self.env, cwd=ROOT,
            start_new_session=True)

        def address() -> str | None:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited: {log.read_text()[-2000:]}")
            m = re.search(r"daemon serving on (\S+)", log.read_text())
            return m.group(1) if m else None

        self.address: str = _until(address, 60, "the daemon")  # type: ignore[assignment]
        self.provider = LocalProvider(log_dir=self.tmp / "logs",
                                      cluster=f"goodput-{uuid.uuid4().hex[:8]}", grace_s=5.0,
                                      env=self.env, cwd=str(ROOT), instance_type="p3.2xlarge",
                                      price_per_hour=cfg.price_per_hour)
        self.request = NodeRequest(job_id="", daemon_address=self.address, slots=1)
        self.client = Client(self.address, timeout=10)

    def submit(self, *, nodes: tuple[int, int], budget_usd: float = 0.0) -> tuple[str, Path]:
        ledger = self.tmp / f"ledger-{uuid.uuid4().hex[:6]}.jsonl"
        spec = {
            "name": "goodput",
            "entrypoint": ["python", *worker_argv(self.cfg, ledger)],
            "working_dir": str(ROOT),
            "nodes": {"min": nodes[0], "max": nodes[1]},
            "nproc_per_node": 1,
            "checkpoint": {"uri": str(self.tmp / "ck"),
                           "every_steps": self.cfg.checkpoint_every_steps, "keep": 5},
            "global_batch_size": GLOBAL_BATCH,
            "max_failures": 100,
            "budget_usd": budget_usd,
        }
        return self.client.submit(spec), ledger

    def stop_job(self, job_id: str) -> bool:
        """Cancel: agents SIGTERM the ranks, which checkpoint at the next step and exit. True
        if they all exited within STOP_TIMEOUT_S (else the harness kills them, uncommitted)."""
        self.client.cancel(job_id)
        return _wait_quietly(lambda: not _job_pids(job_id), STOP_TIMEOUT_S)

    def close(self) -> None:
        self.client.close()
        self.provider.shutdown()
        stop_process_group(self.daemon)
        leftover = scan_marked(self.provider.cluster + "/")
        if leftover:
            raise RuntimeError(f"processes outlived the harness: {sorted(leftover)}")


def worker_argv(cfg: BenchConfig, ledger: Path) -> list[str]:
    """The workload of every system: this script's `worker` mode (relative to the repository)."""
    return ["bench/goodput.py", "worker", str(cfg.compute_s), "--steps", "1000000",
            "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2",
            "--dataset-size", str(DATASET_SIZE), "--ledger", str(ledger)]


def _job_pids(job_id: str) -> set[int]:
    return set(processes_with_env("SPOTWISE_JOB_ID", job_id))


def _committed_steps(ledger: Path) -> int:
    """The newest step of the committed history, checked exactly-once."""
    return verify_ledger(str(ledger), dataset_size=DATASET_SIZE,
                         global_batch_size=GLOBAL_BATCH).final_step


# ---- the uninterrupted reference ------------------------------------------------------------


def measure_reference(cfg: BenchConfig, log: Callable[[str], None]) -> dict[int, float]:
    """Samples per second of an uninterrupted run at world sizes 1..nodes."""
    h = Harness("reference", cfg, daemon_env={})
    rates: dict[int, float] = {}
    try:
        h.provider.launch(h.request, cfg.nodes)
        for world in range(cfg.nodes, 0, -1):
            job_id, _ = h.submit(nodes=(world, world))
            _until(lambda j_id=job_id, w=world: (j := h.client.get(j_id)).world_size == w
                   and j.step >= 20, 90, f"the reference job at world {world}")
            s0, t0 = h.client.get(job_id).step, time.monotonic()
            time.sleep(cfg.reference_s)
            s1, t1 = h.client.get(job_id).step, time.monotonic()
            rates[world] = (s1 - s0) * GLOBAL_BATCH / (t1 - t0)
            log(f"reference world {world}: {rates[world]:.1f} samples/s")
            if not h.stop_job(job_id):
                raise RuntimeError(f"the reference job at world {world} did not stop")
    finally:
        h.close()
    return rates


def rate_at(rates: dict[int, float], world: float) -> float:
    """The reference rate at a (fractional) world size: linear between measured sizes, 0 at 0."""
    points = sorted({0: 0.0, **rates}.items())
    for (w0, r0), (w1, r1) in zip(points, points[1:], strict=False):
        if w0 <= world <= w1:
            return r0 + (r1 - r0) * (world - w0) / (w1 - w0)
    return points[-1][1]


# ---- one system under the trace --------------------------------------------------------------


@dataclass
class RunResult:
    system: str
    wall_s: float
    committed_steps: int
    """Steps of the committed history made inside the window."""
    committed_samples: int
    lost_steps: int
    """Steps the daemon counted as run and then thrown away (replayed from an older commit);
    for torchrun, which has no daemon, the ledger's replayed steps."""
    generations: int
    cost_usd: float | None
    """What the daemon charged (None for torchrun, which has no daemon to bill it)."""
    avg_nodes: float
    """Time-weighted mean of the trace's node count over the window."""
    levels: list[int]
    """The trace's node count at each sample of the window."""
    step_s: float
    """Wall seconds per trace sample."""
    nodes_added: int
    removed_with_notice: int
    removed_without_notice: int
    replayed_steps: int
    """Steps executed but not in the committed history (the ledger's count, window tail included)."""
    clean_stop: bool = True
    """Whether it stopped by itself at the window's end (else it was killed: no final commit)."""
    actions: list[str] = field(default_factory=list)


class TorchrunHarness:
    """torchrun elastic nodes (bench/torchrun_elastic.py) on a standalone rendezvous store, in
    a temporary directory: the same workload, checkpoint interval and ledger as a spotwise job,
    started by the same trace replayer."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.tmp = Path(tempfile.mkdtemp(prefix="spotwise-goodput-torchrun-"))
        self.ledger = self.tmp / "ledger.jsonl"
        self.store, port = start_store()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                   SPOTWISE_CHECKPOINT_URI=str(self.tmp / "ck"),
                   SPOTWISE_CHECKPOINT_EVERY=str(cfg.checkpoint_every_steps),
                   SPOTWISE_CHECKPOINT_KEEP="5")
        self.provider = TorchrunNodes(
            rdzv_id=f"goodput-{uuid.uuid4().hex[:8]}", nnodes=f"1:{cfg.nodes}",
            workload=worker_argv(cfg, self.ledger), log_dir=self.tmp / "logs",
            cluster=f"goodput-torchrun-{uuid.uuid4().hex[:8]}", env=env, cwd=str(ROOT),
            instance_type="p3.2xlarge", price_per_hour=cfg.price_per_hour)
        self.request = NodeRequest(job_id="", daemon_address=f"127.0.0.1:{port}", slots=1)

    def stop_job(self) -> bool:
        """SIGTERM every torchrun agent, as a scheduler stops a job: each passes it on to its
        workers, which checkpoint at the next step and exit. True if every process of the
        nodes exited within STOP_TIMEOUT_S (an agent caught in a rendezvous, or a worker in a
        collective with a vanished peer, may not: the harness then kills them, uncommitted)."""
        for node in self.provider.list_nodes():
            try:
                os.kill(int(node.tags["pid"]), signal.SIGTERM)
            except ProcessLookupError:
                pass
        return _wait_quietly(lambda: not scan_marked(self.provider.cluster + "/"),
                             STOP_TIMEOUT_S)

    def close(self) -> None:
        self.provider.shutdown()
        try:
            os.killpg(self.store.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.store.wait(timeout=10)
        leftover = scan_marked(self.provider.cluster + "/")
        if leftover:
            raise RuntimeError(f"processes outlived the harness: {sorted(leftover)}")


def _ledger_steps(ledger: Path) -> tuple[int, int]:
    """(the newest step any rank has finished, how many generations ran steps), from the
    ledger ((0, 0) before the first step)."""
    last, generations = 0, set()
    try:
        with open(ledger) as f:
            for line in f:
                if line.endswith("\n") and '"kind": "step"' in line:
                    record = json.loads(line)
                    last = max(last, record["step"])
                    generations.add(record["generation"])
    except FileNotFoundError:
        pass
    return last, len(generations)


def window_samples(trace: Trace, window_s: float,
                   compression: float = BenchConfig.compression) -> int:
    """Trace samples a window of `window_s` wall seconds covers."""
    return max(1, int(round(window_s * compression / trace.gap_seconds)))


def run_window(cfg: BenchConfig, system: str, log: Callable[[str], None]) -> RunResult:
    """One system under the trace window: "spotwise", "torchrun" (torchrun elastic with DCP),
    or "restart" (the restart-from-checkpoint policy on spotwise's own daemon and agents)."""
    trace = load_trace(cfg.trace)
    replay = ReplayConfig(compression=cfg.compression, nodes=cfg.nodes,
                          notice_fraction=cfg.notice_fraction, notice_lead_s=cfg.notice_lead_s,
                          seed=cfg.seed, start=cfg.start or 0,
                          length=window_samples(trace, cfg.window_s, cfg.compression))
    schedule = replay_schedule(trace, replay)
    spotwise = system == "spotwise"
    h: Harness | TorchrunHarness
    if system == "torchrun":
        h = TorchrunHarness(cfg)
    else:
        # The restart policy: a rescale never checkpoints first (restart from the last
        # periodic commit), and agents have no metadata service to read notices from.
        h = Harness(system, cfg, daemon_env={} if spotwise else
                    {"SPOTWISE_DAEMON_GROW_CHECKPOINT_TIMEOUT_S": "0"})
    replayer = TraceReplayer(h.provider, schedule, h.request, seed=cfg.seed, notices=spotwise,
                             on_action=lambda a: log(f"  {system} t={a.t:5.1f}s {a.reason}"))
    try:
        replayer.begin()
        if isinstance(h, TorchrunHarness):
            ledger, job_id = h.ledger, ""
        else:
            job_id, ledger = h.submit(nodes=(1, cfg.nodes))
        # torchrun's first rendezvous waits out its last call (30 s) below the maximum size.
        _until(lambda: _ledger_steps(ledger)[0] >= 1, 120, f"{system}: the job to train")
        step0 = _ledger_steps(ledger)[0]
        replayer.start()
        t0 = time.monotonic()
        _until(lambda: time.monotonic() - t0 >= cfg.window_s or replayer.error, cfg.window_s + 5,
               "the window", poll_s=0.5)
        if replayer.error is not None:
            raise RuntimeError(f"the replay failed: {replayer.error}")
        wall = time.monotonic() - t0
        replayer.stop()
        if isinstance(h, TorchrunHarness):
            cost, lost, generations = None, None, None
            clean_stop = h.stop_job()
        else:
            job = h.client.get(job_id)
            cost, lost, generations = h.client.cost(job_id).spent_usd, job.lost_steps, job.generation
            clean_stop = h.stop_job(job_id)
        if not clean_stop:
            log(f"  {system}: still running {STOP_TIMEOUT_S:.0f}s after the stop; killed")
        report = verify_ledger(str(ledger), dataset_size=DATASET_SIZE,
                               global_batch_size=GLOBAL_BATCH)
        steps = max(0, report.final_step - step0)
        levels = schedule.levels
        return RunResult(
            system=system, wall_s=wall, committed_steps=steps,
            committed_samples=steps * GLOBAL_BATCH,
            lost_steps=report.replayed_steps if lost is None else lost,
            generations=_ledger_steps(ledger)[1] if generations is None else generations,
            cost_usd=cost, avg_nodes=sum(levels) / len(levels), levels=list(levels),
            step_s=schedule.step_s, nodes_added=replayer.stats.added,
            removed_with_notice=replayer.stats.removed_with_notice,
            removed_without_notice=replayer.stats.removed_without_notice,
            replayed_steps=report.replayed_steps, clean_stop=clean_stop,
            actions=[f"t={a.t:.1f}s {a.reason}" for a in replayer.stats.actions],
        )
    finally:
        replayer.stop()
        h.close()


# ---- the budget governor -------------------------------------------------------------------


def run_budget(cfg: BenchConfig, log: Callable[[str], None]) -> dict[str, float]:
    """A job on `nodes` nodes with a budget of about a third of what `budget_run_s` would cost:
    how far past the budget did it spend?"""
    h = Harness("budget", cfg, daemon_env={})
    try:
        h.provider.launch(h.request, cfg.nodes)
        rate = cfg.nodes * cfg.price_per_hour / 3600.0  # USD per wall second at full size
        budget = round(rate * cfg.budget_run_s / 3, 6)
        job_id, _ = h.submit(nodes=(1, cfg.nodes), budget_usd=budget)
        job = _until(lambda: (j := h.client.get(job_id)) and state_name(j.state) in TERMINAL
                     and j, cfg.budget_run_s + 60, "the budget to stop the job", poll_s=0.5)
        cost = h.client.cost(job_id)
        spent = cost.spent_usd
        # One tick at the job's full size: accounting_interval_s (5 s by default) of all nodes.
        from spotwise.config import DaemonConfig

        tick_s = DaemonConfig.model_fields["accounting_interval_s"].default
        tick_cost = rate * tick_s
        log(f"budget run: {state_name(job.state)}, spent {spent:.6f} of {budget:.6f} USD "
            f"(one tick {tick_cost:.6f})")
        return {"budget_usd": budget, "spent_usd": spent, "state": state_name(job.state),
                "overspend_usd": max(0.0, spent - budget), "tick_cost_usd": tick_cost}
    finally:
        h.close()


def worker(compute_s: float, argv: list[str]) -> None:
    """`goodput.py worker COMPUTE_S ARGS...`: the tiny workload, each step sleeping
    COMPUTE_S / WORLD_SIZE (the rank's share of a global batch's simulated compute)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sys.argv = [str(TINY), *argv, "--step-sleep", f"{compute_s / world:.6f}"]
    runpy.run_path(str(TINY), run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker(float(argv[1]), argv[2:])
        return 0
    # A SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every harness stops its nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window-s", type=float, default=BenchConfig.window_s,
                        help=f"wall seconds per system (default {BenchConfig.window_s:.0f})")
    parser.add_argument("--start", type=int, default=None,
                        help="first trace sample (default: the trace's first window that starts "
                             "with 2 nodes and changes level 4 times)")
    parser.add_argument("--reference-s", type=float, default=BenchConfig.reference_s,
                        help="wall seconds each uninterrupted rate is measured over "
                             f"(default {BenchConfig.reference_s:.0f})")
    parser.add_argument("--trace", type=Path, default=TRACE, help="availability trace file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                        help="which systems to run (default: all three)")
    args = parser.parse_args(argv)
    if not args.trace.is_file():
        print(f"goodput: trace {args.trace} not found (expected ../shared/traces next to the "
              "repository; pass --trace)", file=sys.stderr)
        return 2
    try:
        trace = load_trace(args.trace)
    except ValueError as e:
        print(f"goodput: {e}", file=sys.stderr)
        return 2
    start = args.start if args.start is not None else busy_window(
        trace, nodes=BenchConfig.nodes, length=window_samples(trace, args.window_s))
    cfg = BenchConfig(trace=args.trace, start=start, window_s=args.window_s,
                      reference_s=args.reference_s, price_per_hour=p3_spot_price())

    def log(text: str) -> None:
        print(f"# {text}", flush=True)

    t_all = time.monotonic()
    before = measure_reference(cfg, log)
    runs = {s: run_window(cfg, s, log) for s in args.systems}
    budget = run_budget(cfg, log)
    after = measure_reference(cfg, log)
    rates = {w: (before[w] + after[w]) / 2 for w in before}
    spread = max(abs(before[w] - after[w]) / rates[w] for w in rates)

    def expected(r: RunResult) -> float:
        """Samples an uninterrupted run makes at the trace's world size through the window."""
        per_sample = [rate_at(rates, level) * r.step_s for level in r.levels]
        full = sum(per_sample)
        covered = r.step_s * len(r.levels)
        return full * r.wall_s / covered if covered else 0.0

    def goodput(r: RunResult) -> float:
        e = expected(r)
        return r.committed_samples / e if e else 0.0

    def goodput_avg_world(r: RunResult) -> float:
        e = rate_at(rates, r.avg_nodes) * r.wall_s
        return r.committed_samples / e if e else 0.0

    def ratio_to(name: str) -> float | None:
        if "spotwise" not in runs or name not in runs or not goodput(runs[name]):
            return None
        return round(goodput(runs["spotwise"]) / goodput(runs[name]), 3)

    def of(name: str, fn: Callable[[RunResult], object]) -> object:
        return fn(runs[name]) if name in runs else None

    sw = runs.get("spotwise")
    result = {
        "spotwise_goodput": of("spotwise", lambda r: round(goodput(r), 4)),
        "baseline_goodput": of("torchrun", lambda r: round(goodput(r), 4)),
        "ratio": ratio_to("torchrun"),
        "lost_steps": of("spotwise", lambda r: r.lost_steps),
        "baseline_lost_steps": of("torchrun", lambda r: r.lost_steps),
        "restart_baseline_goodput": of("restart", lambda r: round(goodput(r), 4)),
        "ratio_vs_restart_baseline": ratio_to("restart"),
        "restart_baseline_lost_steps": of("restart", lambda r: r.lost_steps),
        "usd_per_million_samples": round(sw.cost_usd / sw.committed_samples * 1e6, 4)
        if sw and sw.cost_usd is not None and sw.committed_samples else None,
        "budget_overspend_usd": round(budget["overspend_usd"], 6),
        "budget_tick_cost_usd": round(budget["tick_cost_usd"], 6),
        "goodput_at_avg_world": {k: round(goodput_avg_world(v), 4) for k, v in runs.items()},
        "reference_spread": round(spread, 3),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "reference_samples_per_second": {str(k): round(v, 2) for k, v in rates.items()},
        "reference_before": {str(k): round(v, 2) for k, v in before.items()},
        "reference_after": {str(k): round(v, 2) for k, v in after.items()},
        "expected_samples": {k: round(expected(v)) for k, v in runs.items()},
        "runs": {k: asdict(v) for k, v in runs.items()},
        "budget_run": budget,
        "bench_wall_s": round(time.monotonic() - t_all, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key in ("spotwise_goodput", "baseline_goodput", "ratio", "lost_steps",
                "baseline_lost_steps", "restart_baseline_goodput", "ratio_vs_restart_baseline",
                "restart_baseline_lost_steps", "usd_per_million_samples", "budget_overspend_usd",
                "budget_tick_cost_usd", "reference_spread"):
        print(f"{key}: {result[key]}")
    for name, r in runs.items():
        print(f"{name}_committed_samples: {r.committed_samples}")
        print(f"{name}_generations: {r.generations}")
    print(f"avg_nodes: {next(iter(runs.values())).avg_nodes:.2f}")
    print(f"bench_wall_s: {result['bench_wall_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
