"""`spotwise demo`: one elastic training run on this machine, replaying a real spot trace.

It starts a daemon (a `spotwise daemon` subprocess with a fresh state directory, SQLite, and
checkpoints on local disk, no provider of its own) and submits the example language model
(examples/train_lm.py) with `nodes: {min: 1, max: N}`. The nodes come and go as a real AWS spot
trace says (../shared/traces; by default a slice of the 4-node p3.2xlarge preemption trace
scaled to 3 nodes, with a drop, a rise and a drop): the trace replayer
(spotwise.cloud.replay) launches node agents, gives each its own fake instance metadata
service, announces some removals there (spot/instance-action, a few seconds ahead) and
SIGKILLs the nodes when the trace drops. The replay starts once the job trains on every node
and has committed a checkpoint. A noticed node is drained (checkpoint, then the next
generation without it: no step lost); a node lost without notice costs the steps since the
last commit; a new node is taken in after a checkpoint. All of it shows live, then a summary
(final loss, steps, generations, lost steps, drain and recovery times, wall time). Exit 0 when
the job SUCCEEDED.

The sizes are chosen to finish in well under three minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from spotwise.client import Client, SpotwiseError, is_terminal, state_name
from spotwise.cloud.local import stop_process_group
from spotwise.live import LiveView, checkpoint_text, number

EXIT_OK, EXIT_FAILED = 0, 1

DEFAULT_TRACE = "aws-2023-08-03-us-east-1f-p3.2xlarge-4node-preemption.json"
"""The trace the demo replays by default, in the traces directory next to the repository."""
DEFAULT_SLICE = (126, 15)
DEMO_INSTANCE_TYPE = "p3.2xlarge"
"""The type the demo's local nodes report: the default trace's machines, priced by the offline
table (spot and on-demand), so the cost panel and `spotwise cost` show a real saving (a "local"
node has no price, and is charged the unpriced upper bound)."""
"""(start, length) of the default slice: 4,4,3,3,3,3,4,...,4,3,3 of 4 nodes, which scaled to 3
nodes is a drop to 2, a rise back to 3 and another drop (samples 126-140, 75 trace minutes)."""


def traces_dir() -> Path:
    """../shared/traces relative to the repository this package runs from."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "traces"


DEFAULT_SLICE_DATA = (4, 4, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 3, 3)
"""Samples 126-140 of DEFAULT_TRACE (gap 300 s), kept here so that `make demo` replays the same
real data on a machine without ../shared/traces."""


def default_trace():
    """The default trace and its (start, length) slice: from ../shared/traces when it is there,
    else the embedded copy of the same samples."""
    from spotwise.cloud.trace import load_trace, parse_trace

    path = traces_dir() / DEFAULT_TRACE
    if path.is_file():
        return load_trace(path), DEFAULT_SLICE
    doc = {"metadata": {"gap_seconds": 300}, "data": list(DEFAULT_SLICE_DATA)}
    name = f"{DEFAULT_TRACE.removesuffix('.json')}-samples-126-140"
    return parse_trace(doc, name=name), (0, len(DEFAULT_SLICE_DATA))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotwise demo`."""
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the demo keeps its daemon state, logs and checkpoints "
                             "(default: a new temporary directory, kept for inspection)")
    parser.add_argument("--steps", type=int, default=600,
                        help="optimizer steps (default 600: long enough to meet the default slice's unannounced drop)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--trace", type=Path, default=None,
                        help="spot trace to replay, in the ../shared/traces format (default: "
                             f"{DEFAULT_TRACE} from ../shared/traces, samples "
                             f"{DEFAULT_SLICE[0]}-{sum(DEFAULT_SLICE) - 1})")
    parser.add_argument("--trace-start", type=int, default=None,
                        help="first trace sample to replay (default: the demo's slice for the "
                             "default trace, else the first slice that starts with 2 nodes and "
                             "changes twice)")
    parser.add_argument("--trace-length", type=int, default=None,
                        help="samples to replay (default: the demo's slice for the default "
                             "trace, else 15)")
    parser.add_argument("--compression", type=float, default=100.0,
                        help="trace seconds per wall second (default 100: a 5-minute sample "
                             "lasts 3 s)")
    parser.add_argument("--nodes", type=int, default=3,
                        help="node count the trace's full capacity maps to, 1 to 3 (default 3)")
    parser.add_argument("--notice-fraction", type=float, default=0.5,
                        help="fraction of removed nodes that get a spot interruption notice "
                             "first (default 0.5)")
    parser.add_argument("--notice-lead-s", type=float, default=3.0,
                        help="wall seconds between a notice and its removal (default 3)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the notice draw and of which nodes go (default 1: in the "
                             "default slice, the first drop comes with a notice, the second "
                             "without)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="give up (and clean up) after this long (default 600)")
    parser.add_argument("--plain", action="store_true",
                        help="print one line per event instead of the live view")
    parser.add_argument("--script", type=Path, default=None,
                        help="the training script (default: examples/train_lm.py of this repo)")
    parser.add_argument("--provider", choices=("local", "ray"), default="local",
                        help="local: agent subprocesses replaying the trace (default); ray: a "
                             "local Ray cluster the demo starts, with a drain, a raylet kill "
                             "and a new raylet (spotwise.demo_ray)")


@dataclass
class Timeline:
    """What the demo itself did and saw, for the live view and the summary."""

    start: float = field(default_factory=time.monotonic)
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    plain: bool = False
    console: Console | None = None

    def add(self, text: str) -> None:
        line = f"{time.monotonic() - self.start:6.1f}s  {text}"
        self.lines.append(line)
        if self.plain and self.console is not None:
            self.console.print(line, highlight=False)


def _find_script(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise ValueError(f"--script {given}: no such file")
        return given.resolve()
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        candidate = root / "examples" / "train_lm.py"
        if candidate.is_file():
            return candidate
    raise ValueError("examples/train_lm.py not found next to the spotwise package or in the "
                     "current directory; run the demo from the repository or pass --script")


def _start_daemon(state_dir: Path, log_path: Path, env: dict[str, str],
                  timeout_s: float = 60.0, provider_args: tuple[str, ...] = ("--provider", "none")
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """A `spotwise daemon` on a free loopback port; returns it and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
         "--state-dir", str(state_dir), *provider_args,
         "--log-dir", str(state_dir / "logs")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"),
        env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = re.search(r"daemon serving on (\S+)", log_path.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}; see {log_path}")
        time.sleep(0.1)
    stop_process_group(proc)
    raise RuntimeError(f"the daemon did not start within {timeout_s:.0f}s; see {log_path}")


def _spec(script: Path, args: argparse.Namespace, checkpoint_dir: Path) -> dict:
    # 24 = micro 4 x accumulation x world for world sizes 1, 2 and 3.
    return {
        "name": "demo-lm",
        "entrypoint": ["python", str(script), "--steps", str(args.steps),
                       "--global-batch-size", "24", "--micro-batch-size", "4",
                       "--seq-len", str(args.seq_len), "--dim", "64", "--layers", "2",
                       "--lr", "3e-3", "--seed", "0", "--corpus-bytes", "1000000",
                       "--log-every", "20"],
        "env": {"OMP_NUM_THREADS": "1"},
        "working_dir": str(script.parent.parent),
        "nodes": {"min": 1, "max": args.nodes},
        "nproc_per_node": 1,
        "checkpoint": {"uri": str(checkpoint_dir), "every_steps": 10, "keep": 5},
        "global_batch_size": 24,
        "market": "spot",
        "max_failures": 3,
    }


class _Watcher(threading.Thread):
    """Follows the job's event stream into a LiveView (a daemon thread)."""

    def __init__(self, client: Client, job_id: str, view: LiveView) -> None:
        super().__init__(daemon=True, name="demo-watch")
        self.client, self.job_id, self.view = client, job_id, view

    def run(self) -> None:
        replay = True
        while not self.view.finished:
            try:
                for event in self.client.watch(self.job_id, replay=replay):
                    self.view.update(event)
            except SpotwiseError:
                time.sleep(0.5)  # the stream broke; the main loop's GetJob polling goes on
            replay = False


def _render(view: LiveView, timeline: Timeline, total_steps: int) -> Group:
    job = view.job
    bar = Table.grid(padding=(0, 1))
    if job is not None:
        done = min(job.step, total_steps)
        width = 40
        filled = int(width * done / max(total_steps, 1))
        bar.add_row(Text("progress", style="bold"),
                    Text("█" * filled + "░" * (width - filled), style="green"),
                    Text(f"{done}/{total_steps} steps  world {job.world_size}  "
                         f"gen {job.generation}  loss {number(job.loss)}  "
                         f"ckpt {checkpoint_text(job).split(' (')[0]}"))
    demo = Text("\n".join(timeline.lines) or "starting...")
    return Group(bar, view.render(), Panel(demo, title="demo", title_align="left"))


def _replay_config(args: argparse.Namespace):
    """The trace and how to replay it; ValueError naming a bad flag or a missing file."""
    from spotwise.cloud.trace import ReplayConfig, busy_window, load_trace

    if not 1 <= args.nodes <= 3:
        raise ValueError("--nodes must be 1 to 3 (the job's global batch of 24 in micro-batches "
                         "of 4 fits 1 to 3 nodes)")
    if args.trace is None:
        trace, (start, length) = default_trace()
    else:
        if not args.trace.is_file():
            raise ValueError(f"--trace {args.trace}: no such file")
        trace, length = load_trace(args.trace), 15
        # A trace the demo has not seen: its first slice that starts with 2 nodes (once
        # scaled) and changes at least twice, so the story has a loss and a comeback.
        start = busy_window(trace, nodes=args.nodes,
                            length=length if args.trace_length is None else args.trace_length,
                            min_changes=2)
    start = start if args.trace_start is None else args.trace_start
    length = length if args.trace_length is None else args.trace_length
    config = ReplayConfig(compression=args.compression, nodes=args.nodes,
                          notice_fraction=args.notice_fraction, notice_lead_s=args.notice_lead_s,
                          seed=args.seed, start=start, length=length)
    return trace, config


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the job SUCCEEDED while its nodes came and went with the trace."""
    if getattr(args, "provider", "local") == "ray":
        from spotwise.demo_ray import run_ray

        return run_ray(args)
    from spotwise.cloud.local import LocalProvider
    from spotwise.cloud.provider import NodeRequest
    from spotwise.cloud.replay import TraceReplayer
    from spotwise.cloud.trace import replay_schedule

    console = Console()
    try:
        script = _find_script(args.script)
        trace, replay = _replay_config(args)
        schedule = replay_schedule(trace, replay)
    except ValueError as e:
        console.print(f"spotwise demo: {e}", highlight=False)
        return 2
    if schedule.levels[0] < 1:
        console.print(f"spotwise demo: the trace gives no node at sample {replay.start}; pick "
                      "another --trace-start")
        return 2
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="spotwise-demo-"))).absolute()
    if args.state_dir is not None and state_dir.exists():
        shutil.rmtree(state_dir)  # a fresh daemon state each run: one job, one story
    state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir))
    # Compressed time: notices come seconds, not two minutes, ahead. The daemon leaves a
    # draining node half a second (not 10 s) before its deadline; agents poll IMDS every second.
    env.setdefault("SPOTWISE_DAEMON_DRAIN_MARGIN_S", "0.5")
    env.setdefault("SPOTWISE_AGENT_IMDS_POLL_S", "1")
    plain = args.plain or not console.is_terminal
    timeline = Timeline(plain=plain, console=console)
    wall0 = time.monotonic()
    console.print(f"spotwise demo: state, logs and checkpoints in {state_dir}")

    daemon, address = _start_daemon(state_dir, state_dir / "daemon.log", env)
    provider = LocalProvider(log_dir=state_dir / "logs", cluster=f"demo-{os.getpid()}",
                             grace_s=5.0, env=env, instance_type=DEMO_INSTANCE_TYPE)
    request = NodeRequest(job_id="", daemon_address=address, slots=1)
    actions: queue.SimpleQueue = queue.SimpleQueue()
    replayer = TraceReplayer(provider, schedule, request, seed=replay.seed)
    client = Client(address, timeout=10)
    live: Live | None = None
    report = None
    try:
        timeline.add(f"daemon serving on {address} (SQLite in {state_dir})")
        timeline.add(f"trace {trace.name}: samples {replay.start}-"
                     f"{replay.start + len(schedule.levels) - 1} of {trace.source_nodes} nodes "
                     f"-> {replay.nodes}, {schedule.step_s:.0f}s per 5-min sample: "
                     f"{' '.join(map(str, schedule.levels))}")
        timeline.add(f"nodes priced as {DEMO_INSTANCE_TYPE} spot (the offline price table)")
        for action in replayer.begin():
            timeline.add(f"replay: {action.reason}")
        replayer.on_action = actions.put  # from here on, _drive reports each action
        job_id = client.submit(_spec(script, args, state_dir / "checkpoints"))
        timeline.add(f"submitted {script.name} as {job_id}: nodes 1..{args.nodes}, "
                     f"{args.steps} steps")
        view = LiveView(job_id)
        _Watcher(client, job_id, view).start()
        if not plain:
            live = Live(_render(view, timeline, args.steps), console=console,
                        refresh_per_second=4, transient=False)
            live.start()
        result = _drive(client, replayer, actions, job_id, view, timeline, args, live)
        report = _write_report(client, job_id, state_dir)
    finally:
        if live is not None:
            live.stop()
        client.close()
        replayer.stop()
        provider.shutdown()
        stop_process_group(daemon)
    wall = time.monotonic() - wall0
    _summary(console, result, wall)
    if report is not None:
        console.print(f"spotwise demo: report of the job: {report.html} (picture: {report.png})",
                      highlight=False)
    ok = result.job is not None and state_name(result.job.state) == "SUCCEEDED"
    return EXIT_OK if ok else EXIT_FAILED


def _write_report(client: Client, job_id: str, state_dir: Path):
    """The job's report (spotwise.report) in the state directory, while the daemon still
    serves; None (and the reason printed) if it could not be written."""
    from spotwise.report import write_report

    try:
        return write_report(client, job_id, state_dir)
    except (SpotwiseError, OSError) as e:
        print(f"spotwise demo: no report: {e}", file=sys.stderr)
        return None


@dataclass
class _Watch:
    """A replay action whose effect on the job the demo waits to see."""

    action: object
    t: float
    generation: int
    world_size: int


def observe(client: Client, job_id: str, view: LiveView, timeline: Timeline, last_gen: int
            ) -> Any:
    """One poll of the demo's job: the view takes it, a new generation goes on the timeline.
    None (after a short pause) when the daemon did not answer; the demo goes on polling."""
    try:
        job = client.get(job_id)
    except SpotwiseError as e:
        timeline.add(f"daemon call failed: {e}")
        time.sleep(0.5)
        return None
    if view.job is None or job.updated_at >= view.job.updated_at:
        view.set_job(job)
    if job.generation != last_gen:
        timeline.add(f"generation {job.generation}: world size {job.world_size}, "
                     f"lost steps so far {job.lost_steps}")
    return job


@dataclass
class _Result:
    job: object | None = None
    drains: list[str] = field(default_factory=list)
    recoveries: list[str] = field(default_factory=list)
    regrows: list[str] = field(default_factory=list)
    noticed: int = 0
    killed_with_notice: int = 0
    killed_without_notice: int = 0
    added: int = 0
    note: str = ""


def _drive(client: Client, replayer, actions: queue.SimpleQueue, job_id: str, view: LiveView,
           timeline: Timeline, args: argparse.Namespace, live: Live | None) -> _Result:
    """Poll the job; start the replay once it trains everywhere with a commit; report what each
    replay action did to the job; until the job ends."""
    result = _Result()
    deadline = time.monotonic() + args.timeout_s
    started = False
    last_gen = 0
    watches: list[_Watch] = []
    noticed: set[str] = set()
    while time.monotonic() < deadline:
        job = observe(client, job_id, view, timeline, last_gen)
        if job is None:
            continue
        last_gen = job.generation
        if not started and job.world_size == replayer.schedule.levels[0] \
                and job.last_checkpoint_step > 0:
            replayer.start()
            started = True
            timeline.add(f"trains on every node with a commit (step "
                         f"{job.last_checkpoint_step}): the trace starts")
        if replayer.error is not None:
            result.note = f"the replay failed: {replayer.error}"
            break
        while not actions.empty():
            action = actions.get()
            timeline.add(f"replay t={action.t:.0f}s: {action.reason}")
            if action.kind == "notice":
                result.noticed += len(action.handles)
                noticed.update(action.handles)
            elif action.kind == "remove":
                with_notice = [h for h in action.handles if h in noticed]
                result.killed_with_notice += len(with_notice)
                result.killed_without_notice += len(action.handles) - len(with_notice)
                if len(with_notice) == len(action.handles):
                    continue  # drained already (or the drain's outcome is being watched)
            elif action.kind == "add":
                result.added += len(action.handles)
            if action.handles:
                watches.append(_Watch(action, time.monotonic(), job.generation, job.world_size))
        for w in list(watches):
            dt = time.monotonic() - w.t
            kind = w.action.kind  # type: ignore[attr-defined]
            if kind == "notice" and job.generation > w.generation:
                line = (f"drained {', '.join(w.action.handles)} {dt:.1f}s after its notice: "  # type: ignore[attr-defined]
                        f"world {job.world_size} from step {job.last_checkpoint_step}, "
                        f"lost steps {job.lost_steps}")
                result.drains.append(f"{dt:.1f}s")
            elif kind == "remove" and job.generation > w.generation \
                    and job.step > job.last_checkpoint_step:
                line = (f"training again at world {job.world_size} {dt:.1f}s after the kill "
                        f"(from the last commit, lost steps {job.lost_steps})")
                result.recoveries.append(f"{dt:.1f}s")
            elif kind == "add" and job.world_size > w.world_size:
                line = f"back at world {job.world_size} {dt:.1f}s after the new node came"
                result.regrows.append(f"{dt:.1f}s")
            else:
                if is_terminal(job.state):
                    watches.remove(w)
                continue
            watches.remove(w)
            timeline.add(line)
        if live is not None:
            live.update(_render(view, timeline, args.steps))
        if is_terminal(job.state):
            result.job = job
            timeline.add(f"job {state_name(job.state)}: {job.message}")
            if not replayer.done:
                timeline.add("the job finished before the trace slice ended")
            if live is not None:
                live.update(_render(view, timeline, args.steps))
            return result
        time.sleep(0.25)
    if not result.note:
        result.note = f"gave up after {args.timeout_s:.0f}s"
    try:
        result.job = client.cancel(job_id)
    except SpotwiseError:
        pass
    return result


def _summary(console: Console, result: _Result, wall_s: float) -> None:
    job = result.job
    table = Table(title="spotwise demo: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if job is None:
        table.add_row("result", "no job")
    else:
        table.add_row("result", state_name(job.state))
        table.add_row("final loss", number(job.loss))
        table.add_row("steps", str(job.step))
        table.add_row("generations", str(job.generation))
        table.add_row("lost (replayed) steps", str(job.lost_steps))
    table.add_row("nodes added by the trace", str(result.added))
    table.add_row("removed after a notice", str(result.killed_with_notice))
    table.add_row("removed without notice", str(result.killed_without_notice))
    table.add_row("drained after a notice", ", ".join(result.drains) or "-")
    table.add_row("recovery after a kill", ", ".join(result.recoveries) or "-")
    table.add_row("regrow after an add", ", ".join(result.regrows) or "-")
    table.add_row("wall time", f"{wall_s:.1f}s")
    if result.note:
        table.add_row("note", result.note)
    console.print(table)
