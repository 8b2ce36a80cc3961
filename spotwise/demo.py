"""`spotwise demo`: one elastic training run on this machine, losing and regaining a node.

It starts a daemon (a `spotwise daemon` subprocess with a fresh state directory, SQLite, and
checkpoints on local disk), a local fleet of three agents, and submits the example language
model (examples/train_lm.py) with `nodes: {min: 1, max: 3}`. Once the job trains on all three
nodes and has committed a checkpoint, it SIGKILLs one node (its agent and its training
processes, as a spot machine lost without notice), lets the job go on at the smaller world
size from the last commit, later adds a node back, and shows all of it live. It ends with a
summary (final loss, steps, generations, replayed steps, recovery time, wall time) and exits
0 when the job SUCCEEDED.

The sizes are chosen to finish in well under three minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from spotwise.client import Client, SpotwiseError, is_terminal, state_name
from spotwise.live import LiveView, checkpoint_text, number

EXIT_OK, EXIT_FAILED = 0, 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotwise demo`."""
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the demo keeps its daemon state, logs and checkpoints "
                             "(default: a new temporary directory, kept for inspection)")
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps (default 240)")
    parser.add_argument("--seq-len", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--nodes", type=int, default=3, help="agents to start with (default 3)")
    parser.add_argument("--kill-at", type=float, default=0.3,
                        help="kill a node when this fraction of the steps is done (default 0.3)")
    parser.add_argument("--add-at", type=float, default=0.6,
                        help="add a node back at this fraction of the steps (default 0.6)")
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="give up (and clean up) after this long (default 600)")
    parser.add_argument("--plain", action="store_true",
                        help="print one line per event instead of the live view")
    parser.add_argument("--script", type=Path, default=None,
                        help="the training script (default: examples/train_lm.py of this repo)")


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
                  timeout_s: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """A `spotwise daemon` on a free loopback port; returns it and its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
         "--state-dir", str(state_dir), "--provider", "none",
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
    _stop_daemon(proc)
    raise RuntimeError(f"the daemon did not start within {timeout_s:.0f}s; see {log_path}")


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


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
        "nodes": {"min": 1, "max": 3},
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


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the job SUCCEEDED after losing and regaining a node."""
    from spotwise.cloud.local import LocalProvider
    from spotwise.cloud.provider import NodeRequest

    console = Console()
    if not 0 < args.kill_at < args.add_at < 1:
        console.print("spotwise demo: need 0 < --kill-at < --add-at < 1")
        return 2
    if not 2 <= args.nodes <= 3:
        console.print("spotwise demo: --nodes must be 2 or 3 (the job runs on 1 to 3 nodes)")
        return 2
    try:
        script = _find_script(args.script)
    except ValueError as e:
        console.print(f"spotwise demo: {e}")
        return 2
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="spotwise-demo-"))).absolute()
    if args.state_dir is not None and state_dir.exists():
        shutil.rmtree(state_dir)  # a fresh daemon state each run: one job, one story
    state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir))
    plain = args.plain or not console.is_terminal
    timeline = Timeline(plain=plain, console=console)
    wall0 = time.monotonic()
    console.print(f"spotwise demo: state, logs and checkpoints in {state_dir}")

    daemon, address = _start_daemon(state_dir, state_dir / "daemon.log", env)
    provider = LocalProvider(log_dir=state_dir / "logs", cluster=f"demo-{os.getpid()}",
                             grace_s=5.0, env=env)
    client = Client(address, timeout=10)
    live: Live | None = None
    try:
        timeline.add(f"daemon serving on {address} (SQLite in {state_dir})")
        request = NodeRequest(job_id="", daemon_address=address, slots=1)
        handles = [n.handle for n in provider.launch(request, args.nodes)]
        timeline.add(f"started {len(handles)} agents: {', '.join(handles)}")
        job_id = client.submit(_spec(script, args, state_dir / "checkpoints"))
        timeline.add(f"submitted {script.name} as {job_id}: nodes 1..3, "
                     f"{args.steps} steps")
        view = LiveView(job_id)
        _Watcher(client, job_id, view).start()
        if not plain:
            live = Live(_render(view, timeline, args.steps), console=console,
                        refresh_per_second=4, transient=False)
            live.start()
        result = _drive(client, provider, request, job_id, view, timeline, args, live)
    finally:
        if live is not None:
            live.stop()
        client.close()
        provider.shutdown()
        _stop_daemon(daemon)
    wall = time.monotonic() - wall0
    _summary(console, result, wall)
    ok = result.job is not None and state_name(result.job.state) == "SUCCEEDED"
    return EXIT_OK if ok else EXIT_FAILED


@dataclass
class _Result:
    job: object | None = None
    recovery_s: float | None = None
    regrow_s: float | None = None
    killed: str = ""
    note: str = ""


def _drive(client: Client, provider, request, job_id: str, view: LiveView,
           timeline: Timeline, args: argparse.Namespace, live: Live | None) -> _Result:
    """Poll the job and act on it: kill a node, add one back; until the job ends."""
    result = _Result()
    deadline = time.monotonic() + args.timeout_s
    kill_step = int(args.steps * args.kill_at)
    add_step = int(args.steps * args.add_at)
    phase = "warmup"
    t_kill = t_add = 0.0
    gen_at_kill = gen_at_add = 0
    last_gen = 0
    while time.monotonic() < deadline:
        try:
            job = client.get(job_id)
        except SpotwiseError as e:
            timeline.add(f"daemon call failed: {e}")
            time.sleep(0.5)
            continue
        if view.job is None or job.updated_at >= view.job.updated_at:
            view.set_job(job)
        if job.generation != last_gen:
            last_gen = job.generation
            timeline.add(f"generation {job.generation}: world size {job.world_size}")
        if phase == "warmup" and job.world_size == args.nodes and job.step >= kill_step \
                and job.last_checkpoint_step > 0:
            members = _member_handles(provider, job)
            victim = members[len(members) // 2] if members else ""
            if victim:
                killed = provider.kill(victim)
                t_kill, gen_at_kill, phase = time.monotonic(), job.generation, "shrunk"
                result.killed = victim
                timeline.add(f"SIGKILL {victim} at step {job.step} (agent + trainer, pids "
                             f"{', '.join(map(str, killed))}); last commit step "
                             f"{job.last_checkpoint_step}")
        elif phase == "shrunk" and job.generation > gen_at_kill and \
                job.world_size == args.nodes - 1 and job.step > job.last_checkpoint_step:
            if result.recovery_s is None:
                result.recovery_s = time.monotonic() - t_kill
                timeline.add(f"training again at world {job.world_size} "
                             f"{result.recovery_s:.1f}s after the kill")
            if job.step >= add_step:
                handles = [n.handle for n in provider.launch(request, 1)]
                t_add, gen_at_add, phase = time.monotonic(), job.generation, "grown"
                timeline.add(f"added {', '.join(handles)} at step {job.step}")
        elif phase == "grown" and result.regrow_s is None and job.generation > gen_at_add \
                and job.world_size == args.nodes:
            result.regrow_s = time.monotonic() - t_add
            timeline.add(f"back at world {job.world_size} {result.regrow_s:.1f}s after the add")
        if live is not None:
            live.update(_render(view, timeline, args.steps))
        if is_terminal(job.state):
            result.job = job
            timeline.add(f"job {state_name(job.state)}: {job.message}")
            if live is not None:
                live.update(_render(view, timeline, args.steps))
            return result
        time.sleep(0.25)
    result.note = f"gave up after {args.timeout_s:.0f}s"
    try:
        result.job = client.cancel(job_id)
    except SpotwiseError:
        pass
    return result


def _member_handles(provider, job) -> list[str]:
    """Provider handles of the job's members in node-rank order, from the agents' logs."""
    by_node: dict[str, str] = {}
    for node in provider.list_nodes():
        log = provider.log_dir / "agents" / f"{node.handle}.log"
        try:
            for m in re.finditer(r"registered as node (\S+)", log.read_text(errors="replace")):
                by_node[m.group(1)] = node.handle
        except FileNotFoundError:
            continue
    return [by_node[n] for n in job.node_ids if n in by_node]


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
        table.add_row("node killed", result.killed or "-")
    table.add_row("recovery after the kill",
                  f"{result.recovery_s:.1f}s" if result.recovery_s is not None else "-")
    table.add_row("regrow after the add",
                  f"{result.regrow_s:.1f}s" if result.regrow_s is not None else "-")
    table.add_row("wall time", f"{wall_s:.1f}s")
    if result.note:
        table.add_row("note", result.note)
    console.print(table)
