"""The goodput benchmark's systems: one function runs any of them under a scenario's schedule.

`run_system(setup, system, schedule, log)` takes the same inputs for every system: the same
workload (`worker_argv`), checkpoint interval, ledger, schedule and replayer seed. What differs
is only what the system is:

- **spotwise**: a `spotwise daemon` (no provider: the replayer owns the nodes) and one spotwise
  agent per node, each polling its node's fake IMDSv2; spotwise's drain margin and metadata
  poll are scaled by the notice model's compression (goodput_scenarios.NoticeModel).
- **torchrun** / **torchrun_tuned**: one `torchrun --nnodes=1:N` agent per node
  (bench/torchrun_elastic.py) with torchrun's defaults or the tuned settings, on a standalone
  rendezvous store no preemption takes down. Notices are not read. The workers run the same
  workload on the spotwise runtime (DCP checkpoints every `checkpoint_every_steps`, restore of
  the newest commit on each start) but end at once on SIGTERM, as a script without a SIGTERM
  handler does (`worker --sigterm exit`): a restart resumes from the last periodic checkpoint.
- **restart**: spotwise's daemon and agents with the restart-from-checkpoint policy: no notices,
  no checkpoint before a grow (a generation's SIGTERM checkpoint is fenced, so it never counts).
  It keeps spotwise's fast detection and rendezvous: far more generous than torchrun.

The window starts once the job trains at the schedule's first node count and has committed
in that generation (so every system starts from the same state); it ends `window_s` later,
when the harness notes the ledger's length and kills every node (goodput_ledger counts what
the ledger held at that moment and nothing after).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from goodput_ledger import count_window, ledger_length, training_state, unsaved_at
from goodput_scenarios import NoticeModel
from step_watch import until
from torchrun_elastic import DEFAULT, TUNED, TorchrunNodes, start_store

from spotwise.client import Client
from spotwise.cloud.local import LocalProvider, processes_with_env, scan_marked, stop_process_group
from spotwise.cloud.provider import NodeRequest
from spotwise.cloud.replay import ReplayAction, TraceReplayer
from spotwise.cloud.trace import ReplaySchedule
from spotwise.worker.runtime.ledger import LedgerError, verify_ledger

ROOT = Path(__file__).resolve().parents[1]
DATASET_SIZE = 960
GLOBAL_BATCH = 24
START_TIMEOUT_S = 240.0
"""Longest a system may take from its first nodes to training at full size with a commit
(default torchrun waits its 30 s last call first; a loaded machine starts torch slowly)."""


@dataclass(frozen=True, kw_only=True)
class BenchSetup:
    """What every system of every scenario gets."""

    notice: NoticeModel = field(default_factory=NoticeModel)
    """The one notice model (lead time, spotwise's scaled settings)."""
    nodes: int = 3
    """Most nodes a scenario offers (the job's max; min is 1)."""
    checkpoint_every_steps: int = 10
    """Periodic checkpoint interval of every system (see the JSON's setup for why)."""
    checkpoint_keep: int = 5
    """Commits kept."""
    compute_s: float = 0.3
    """Simulated compute of one global batch, split over the ranks: each step sleeps
    compute_s / world size, the GPU work data parallelism divides (2 shared cores cannot show
    it: here more ranks are slower, not faster)."""
    reference_s: float = 10.0
    """Wall seconds each uninterrupted rate is measured over."""
    price_per_hour: float = 0.0
    """USD per node-hour charged by spotwise's daemon."""


@dataclass
class RunResult:
    """One system's run of one scenario's window."""

    system: str
    wall_s: float
    """Seconds of the window (the clock from start to the ledger's cut)."""
    committed_steps: int
    committed_samples: int
    lost_steps: int | None
    """From the ledger (goodput_ledger): the same count for every system."""
    restores: list[tuple[int, int, int]]
    generations: int | None
    start_commit: int
    end_commit: int
    exactly_once: str
    """"ok", or the ledger check's complaint about the whole run."""
    cost_usd: float | None
    """What spotwise's daemon charged up to the window's end (None without a daemon)."""
    startup_s: float
    """From the first launch to the window's start."""
    run_wall_s: float = 0.0
    """Everything: start, window, teardown."""
    unsaved_at_outage: int | None = None
    """Steps past the newest commit when a removal left no node (what it loses, whenever the
    restore comes; goodput_ledger.unsaved_at); None when no removal did."""
    nodes_added: int = 0
    removed_with_notice: int = 0
    removed_without_notice: int = 0
    actions: list[str] = field(default_factory=list)
    goodput: float | None = None
    """Filled in by the caller, which knows the round's reference rates."""
    expected_samples: float | None = None
    error: str = ""
    """Why the run has no figures (it never reached its window); empty when it has them."""

    @classmethod
    def failed(cls, system: str, error: str) -> RunResult:
        return cls(system=system, wall_s=0.0, committed_steps=0, committed_samples=0,
                   lost_steps=None, restores=[], generations=None, start_commit=0,
                   end_commit=0, exactly_once="not checked", cost_usd=None, startup_s=0.0,
                   error=error)


def worker_argv(setup: BenchSetup, ledger: Path, *, sigterm: str = "checkpoint") -> list[str]:
    """The workload of every system: goodput.py's `worker` mode (relative to the repository).
    sigterm "exit": the process ends at once on SIGTERM (no checkpoint)."""
    return ["bench/goodput.py", "worker", "--sigterm", sigterm, str(setup.compute_s),
            "--steps", "1000000", "--global-batch-size", str(GLOBAL_BATCH),
            "--micro-batch-size", "2", "--dataset-size", str(DATASET_SIZE), "--ledger", str(ledger)]


class SpotwiseHarness:
    """A `spotwise daemon` subprocess and a local provider of spotwise agents, in a temporary
    directory. `daemon_env`: settings for the daemon and agents (SPOTWISE_* variables)."""

    def __init__(self, name: str, setup: BenchSetup, *, daemon_env: dict[str, str]) -> None:
        self.setup = setup
        self.tmp = Path(tempfile.mkdtemp(prefix=f"spotwise-goodput-{name}-"))
        self.ledger = self.tmp / "ledger.jsonl"
        self.env = dict(os.environ, SPOTWISE_STATE_DIR=str(self.tmp / "state"),
                        OMP_NUM_THREADS="1", **daemon_env)
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

        self.address: str = until(address, 60, "the daemon")  # type: ignore[assignment]
        self.provider = LocalProvider(log_dir=self.tmp / "logs",
                                      cluster=f"goodput-{uuid.uuid4().hex[:8]}", grace_s=5.0,
                                      env=self.env, cwd=str(ROOT), instance_type="p3.2xlarge",
                                      price_per_hour=setup.price_per_hour)
        self.request = NodeRequest(job_id="", daemon_address=self.address, slots=1)
        self.client = Client(self.address, timeout=10)
        self.job_id = ""

    def submit(self, *, nodes: tuple[int, int], budget_usd: float = 0.0,
               ledger: Path | None = None) -> str:
        spec = {
            "name": "goodput",
            "entrypoint": ["python", *worker_argv(self.setup, ledger or self.ledger)],
            "working_dir": str(ROOT),
            "nodes": {"min": nodes[0], "max": nodes[1]},
            "nproc_per_node": 1,
            "checkpoint": {"uri": str(self.tmp / f"ck-{uuid.uuid4().hex[:6]}"),
                           "every_steps": self.setup.checkpoint_every_steps,
                           "keep": self.setup.checkpoint_keep},
            "global_batch_size": GLOBAL_BATCH,
            "max_failures": 100,
            "budget_usd": budget_usd,
        }
        self.job_id = self.client.submit(spec)
        return self.job_id

    def cost_usd(self) -> float | None:
        return self.client.cost(self.job_id).spent_usd if self.job_id else None

    def close(self, *, remove: bool = True) -> None:
        """Kill every node and the daemon; then remove the directory unless `remove` is
        False (a failed run's logs are kept for a look)."""
        self.client.close()
        self.provider.shutdown()  # SIGKILL of every node: nothing after the window counts
        stop_process_group(self.daemon)
        leftover = scan_marked(self.provider.cluster + "/")
        if leftover:
            raise RuntimeError(f"processes outlived the harness: {sorted(leftover)}")
        if remove:
            shutil.rmtree(self.tmp, ignore_errors=True)


class TorchrunHarness:
    """torchrun elastic nodes (bench/torchrun_elastic.py) on a standalone rendezvous store, in
    a temporary directory: the same workload, checkpoint interval and ledger as a spotwise job."""

    def __init__(self, setup: BenchSetup, *, tuned: bool) -> None:
        self.setup = setup
        self.tmp = Path(tempfile.mkdtemp(prefix="spotwise-goodput-torchrun-"))
        self.ledger = self.tmp / "ledger.jsonl"
        self.store, port = start_store()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
                   SPOTWISE_CHECKPOINT_URI=str(self.tmp / "ck"),
                   SPOTWISE_CHECKPOINT_EVERY=str(setup.checkpoint_every_steps),
                   SPOTWISE_CHECKPOINT_KEEP=str(setup.checkpoint_keep))
        self.provider = TorchrunNodes(
            rdzv_id=f"goodput-{uuid.uuid4().hex[:8]}", nnodes=f"1:{setup.nodes}",
            workload=worker_argv(setup, self.ledger, sigterm="exit"),
            settings=TUNED if tuned else DEFAULT, log_dir=self.tmp / "logs",
            cluster=f"goodput-torchrun-{uuid.uuid4().hex[:8]}", env=env, cwd=str(ROOT),
            instance_type="p3.2xlarge", price_per_hour=setup.price_per_hour)
        self.request = NodeRequest(job_id="", daemon_address=f"127.0.0.1:{port}", slots=1)

    def cost_usd(self) -> float | None:
        return None  # no daemon bills torchrun

    def close(self, *, remove: bool = True) -> None:
        """Kill every node and the store; then remove the directory unless `remove` is False."""
        self.provider.shutdown()
        try:
            os.killpg(self.store.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.store.wait(timeout=10)
        leftover = scan_marked(self.provider.cluster + "/")
        if leftover:
            raise RuntimeError(f"processes outlived the harness: {sorted(leftover)}")
        if remove:
            shutil.rmtree(self.tmp, ignore_errors=True)


def make_harness(setup: BenchSetup, system: str) -> SpotwiseHarness | TorchrunHarness:
    """The system's harness, its job submitted where it has one."""
    if system in ("torchrun", "torchrun_tuned"):
        return TorchrunHarness(setup, tuned=system == "torchrun_tuned")
    if system == "spotwise":
        h = SpotwiseHarness(system, setup, daemon_env=setup.notice.spotwise_env())
    elif system == "restart":
        # No checkpoint before a grow: a rescale restarts from the last periodic commit.
        h = SpotwiseHarness(system, setup, daemon_env={"SPOTWISE_DAEMON_GROW_CHECKPOINT_TIMEOUT_S": "0"})
    else:
        raise ValueError(f"unknown system {system!r}")
    h.submit(nodes=(1, setup.nodes))
    return h


def run_system(setup: BenchSetup, system: str, schedule: ReplaySchedule,
               log: Callable[[str], None], *, seed: int) -> RunResult:
    """One system under one schedule (see the module docstring); `seed` drives the replayer's
    picks of which nodes go, so the same seed removes the same nodes for every system."""
    t_run = time.monotonic()
    h = make_harness(setup, system)
    outages: list[int] = []  # ledger lengths when a removal left no node

    def on_action(a: ReplayAction) -> None:
        if a.kind == "remove" and schedule.level_at(a.t + schedule.step_s / 2) == 0:
            outages.append(ledger_length(h.ledger))
        log(f"  {system} t={a.t:5.1f}s {a.reason}")

    replayer = TraceReplayer(h.provider, schedule, h.request, seed=seed,
                             notices=system == "spotwise", on_action=on_action)
    closed = False
    try:
        replayer.begin()
        first = schedule.levels[0]

        def ready() -> bool:
            _gen, ranks, step, committed = training_state(h.ledger)
            return ranks == first and step >= 1 and committed

        until(ready, START_TIMEOUT_S, f"{system}: the job to train on {first} node(s) and commit")
        start = ledger_length(h.ledger)
        replayer.start()
        t0 = time.monotonic()
        startup = t0 - t_run
        until(lambda: time.monotonic() - t0 >= schedule.duration_s or replayer.error,
               schedule.duration_s + 10, "the window", poll_s=0.05)
        end = ledger_length(h.ledger)
        wall = time.monotonic() - t0
        cost = h.cost_usd()
        if replayer.error is not None:
            raise RuntimeError(f"the replay failed: {replayer.error}")
        replayer.stop()
        closed = True
        h.close(remove=False)  # the ledger is read below; nothing writes to it any more
        count = count_window(h.ledger, start, end, dataset_size=DATASET_SIZE,
                             global_batch=GLOBAL_BATCH)
        unsaved = [unsaved_at(h.ledger, offset, dataset_size=DATASET_SIZE,
                              global_batch=GLOBAL_BATCH) for offset in outages]
        try:
            verify_ledger(str(h.ledger), dataset_size=DATASET_SIZE, global_batch_size=GLOBAL_BATCH)
            exactly_once = "ok"
        except LedgerError as e:
            exactly_once = str(e)
        shutil.rmtree(h.tmp, ignore_errors=True)
        stats = replayer.stats
        return RunResult(
            system=system, wall_s=round(wall, 2), committed_steps=count.committed_steps,
            committed_samples=count.committed_steps * GLOBAL_BATCH, lost_steps=count.lost_steps,
            restores=count.restores, generations=count.generations,
            unsaved_at_outage=sum(unsaved) if outages else None,
            start_commit=count.start_commit, end_commit=count.end_commit,
            exactly_once=exactly_once, cost_usd=cost, startup_s=round(startup, 1),
            run_wall_s=round(time.monotonic() - t_run, 1), nodes_added=stats.added,
            removed_with_notice=stats.removed_with_notice,
            removed_without_notice=stats.removed_without_notice,
            actions=[f"t={a.t:.1f}s {a.reason}" for a in stats.actions])
    finally:
        replayer.stop()
        if not closed:
            log(f"  {system}: the run failed; its logs stay in {h.tmp}")
            h.close(remove=False)


def measure_reference(setup: BenchSetup, log: Callable[[str], None]) -> dict[int, float]:
    """Samples per second of an uninterrupted spotwise job at world sizes nodes..1 (same
    workload and checkpoint interval as every system)."""
    h = SpotwiseHarness("reference", setup, daemon_env={})
    rates: dict[int, float] = {}
    try:
        h.provider.launch(h.request, setup.nodes)
        for world in range(setup.nodes, 0, -1):
            job_id = h.submit(nodes=(world, world), ledger=h.tmp / f"ledger-{world}.jsonl")
            until(lambda j_id=job_id, w=world: (j := h.client.get(j_id)).world_size == w
                   and j.step >= 20, 120, f"the reference job at world {world}")
            s0, t0 = h.client.get(job_id).step, time.monotonic()
            time.sleep(setup.reference_s)  # the measurement itself, not a wait for a condition
            s1, t1 = h.client.get(job_id).step, time.monotonic()
            rates[world] = (s1 - s0) * GLOBAL_BATCH / (t1 - t0)
            log(f"reference world {world}: {rates[world]:.1f} samples/s")
            h.client.cancel(job_id)
            until(lambda j_id=job_id: not processes_with_env("SPOTWISE_JOB_ID", j_id), 60,
                   f"the reference job at world {world} to stop")
    finally:
        h.close()
    return rates
