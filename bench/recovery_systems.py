"""One kill of one system for bench/recovery.py: start it, train at world 2, SIGKILL the node
running rank 1, wait for the first step at world 1, and gather the signals of every phase.

Both systems run tests/workloads/tiny_train.py on two "nodes" of one process each, with a
checkpoint every `--every` steps, and each returns a `KillResult` with the absolute time of
each phase's signal (see recovery_phases for what each one is).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from recovery_phases import daemon_marks, runtime_marks, torchrun_marks, workload_marks
from step_watch import GLOBAL_BATCH, StepWatch, killpg_quiet, until
from torchrun_elastic import DEFAULT, TUNED, start_store, torchrun_argv

from spotwise.cloud.local import MARKER_ENV, kill_with_env, processes_with_env

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = REPO / "tests" / "workloads" / "tiny_train.py"
MARKER = "SPOTWISE_BENCH_NODE"


@dataclass
class KillResult:
    """What one kill showed."""

    kill: float
    """Unix time just before the SIGKILL."""
    marks: dict[str, float | None]
    """phase -> Unix time of its signal (None: not seen)."""
    lost_steps: int
    """Steps completed before the kill and done again after it (since the restored commit)."""
    notes: dict = field(default_factory=dict)


def workload_args(args: argparse.Namespace, work: Path) -> list[str]:
    return [str(WORKLOAD), "--steps", str(args.steps), "--global-batch-size", str(GLOBAL_BATCH),
            "--micro-batch-size", "2", "--dataset-size", "100000", "--step-sleep",
            str(args.step_sleep), "--ledger", str(work / "ledger.jsonl"),
            "--loss-log", str(work / "loss.log"), "--timeline", str(work / "timeline.jsonl")]


def read_jsonl(paths) -> list[dict]:
    out = []
    for path in paths:
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            continue
        out.extend(json.loads(line) for line in lines if line.strip())
    return out


def rank_of(pid: int) -> str:
    """The RANK in a process's environment ("" for one without: an agent, a store)."""
    try:
        for var in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if var.startswith(b"RANK="):
                return var[5:].decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return ""


def alive(pid: int) -> bool:
    """Whether a pid is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class GoneWatch:
    """Records when every one of some pids has exited (polled every 10 ms)."""

    def __init__(self, pids: list[int], timeout_s: float) -> None:
        self.pids, self.timeout_s = pids, timeout_s
        self.gone_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="gone-watch")

    def start(self) -> GoneWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if not any(alive(p) for p in self.pids):
                self.gone_at = time.time()
                return
            time.sleep(0.01)

    def result(self, timeout_s: float) -> float | None:
        self._thread.join(timeout=timeout_s)
        return self.gone_at


def kill_and_wait(watch: StepWatch, kill, survivor_workers, args) -> tuple[float, GoneWatch, int]:
    """Wait for world 2 with a commit and warm steps, kill, wait for the first step at world 1.
    Returns (kill time, the watch on the survivor's old workers, lost steps)."""
    until(lambda: watch.world_now() == 2 and bool(watch.committed_in)
          and (watch.last() or (0, 0, 0))[1] >= args.warm_steps, args.timeout_s, "training at world 2")
    old = survivor_workers()
    if not old:
        raise RuntimeError("no worker process found on the surviving node")
    t_mono, t_kill = time.monotonic(), time.time()
    gone = GoneWatch(old, args.timeout_s).start()
    kill()
    rec = until(lambda: watch.first_at_world_after(t_mono, 1), args.timeout_s,
                "the first step at world 1 after the kill")
    before = [s for t, s, _g in watch.completed if t <= t_mono + 0.001]
    restored = watch.restored.get(rec[2], rec[1] - 1)
    return t_kill, gone, max(0, (max(before) if before else 0) - restored)


# ---- spotwise -------------------------------------------------------------------------------

def run_spotwise(work: Path, args: argparse.Namespace) -> KillResult:
    from spotwise.client import Client
    from spotwise.cloud.local import LocalProvider
    from spotwise.cloud.provider import NodeRequest

    work.mkdir(parents=True)
    state = work / "state"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state))
    daemon_log = work / "daemon.log"
    with open(daemon_log, "wb") as log_out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
             "--state-dir", str(state), "--provider", "none", "--log-dir", str(work / "logs")],
            stdout=subprocess.DEVNULL, stderr=log_out, env=env, start_new_session=True, cwd=REPO)
    provider = LocalProvider(log_dir=work / "logs", cluster=f"bench-{uuid.uuid4().hex[:8]}",
                             env=env, cwd=str(REPO))
    client = None
    watch = StepWatch(work / "loss.log", work / "ledger.jsonl")
    try:
        address = until(lambda: (m := re.search(r"daemon serving on (\S+)",
                                                 daemon_log.read_text())) and m.group(1),
                        60, "the daemon")
        client = Client(address, timeout=10)
        provider.launch(NodeRequest(job_id="", daemon_address=address, slots=1), 2)
        job_id = client.submit({
            "name": "bench-recovery",
            "entrypoint": ["python", *workload_args(args, work)],
            "working_dir": str(REPO),
            "nodes": {"min": 1, "max": 2},
            "nproc_per_node": 1,
            "checkpoint": {"uri": str(work / "ck"), "every_steps": args.every, "keep": 3},
            "global_batch_size": GLOBAL_BATCH,
            "max_failures": 5,
        })
        watch.start()
        at_kill: dict = {}

        def survivor_workers() -> list[int]:
            job = client.get(job_id)
            at_kill["generation"] = job.generation
            at_kill["nodes"] = list(job.provider_nodes)
            marker = provider.marker(job.provider_nodes[0])  # node rank 0 runs global rank 0
            return [p for p in processes_with_env(MARKER_ENV, marker) if rank_of(p)]

        def kill() -> None:
            provider.kill(at_kill["nodes"][1])

        t_kill, gone, lost = kill_and_wait(watch, kill, survivor_workers, args)
        events = [{"time": e.time, "kind": e.kind, "generation": e.generation,
                   "message": e.message} for e in client.history(job_id, quiet_s=1.0, timeout=30)]
        marks = daemon_marks(t_kill, events, at_kill["generation"])
        marks["old_stopped"] = gone.result(timeout_s=5)
        runtime = read_jsonl(sorted((work / "logs" / job_id).glob("g*/rank*.events.jsonl")))
        marks.update(runtime_marks(t_kill, runtime, 1))
        marks.update(workload_marks(t_kill, read_jsonl([work / "timeline.jsonl"]), 1))
        client.cancel(job_id)
        after = [e for e in events if e["time"] > t_kill - 1][:12]
        return KillResult(kill=t_kill, marks=marks, lost_steps=lost,
                          notes={"daemon_events_after_kill": after})
    finally:
        watch.stop()
        if client is not None:
            client.close()
        provider.shutdown()
        killpg_quiet(daemon.pid)
        daemon.wait(timeout=10)


# ---- torchrun -------------------------------------------------------------------------------

class StampedLog:
    """Reads a process's output line by line, stamping each with the time it arrived (torchrun's
    own log lines carry none) and copying it, stamped, to a file."""

    def __init__(self, stream, path: Path) -> None:
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(stream, path), daemon=True,
                                        name=f"stamp-{path.name}")
        self._thread.start()

    def _run(self, stream, path: Path) -> None:
        with open(path, "w") as out:
            for raw in iter(stream.readline, b""):
                t = time.time()
                line = raw.decode(errors="replace").rstrip("\n")
                with self._lock:
                    self.lines.append((t, line))
                out.write(f"{t:.3f} {line}\n")
                out.flush()

    def snapshot(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self.lines)


def run_torchrun(work: Path, args: argparse.Namespace, *, tuned: bool) -> KillResult:
    work.mkdir(parents=True)
    store, port = start_store()
    nodes: list[subprocess.Popen] = []
    logs: list[StampedLog] = []
    tag = uuid.uuid4().hex[:8]
    watch = StepWatch(work / "loss.log", work / "ledger.jsonl")
    try:
        for i in range(2):
            env = dict(os.environ, **{MARKER: f"{tag}-{i}"},
                       SPOTWISE_CHECKPOINT_URI=str(work / "ck"),
                       SPOTWISE_CHECKPOINT_EVERY=str(args.every),
                       SPOTWISE_CHECKPOINT_KEEP="3", OMP_NUM_THREADS="1",
                       SPOTWISE_EVENTS_FILE=str(work / f"node{i}.events.jsonl"),
                       PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
                       # torchrun's agent logs its restarts and rendezvous at INFO only.
                       LOGLEVEL="INFO")
            argv = torchrun_argv(endpoint=f"127.0.0.1:{port}", rdzv_id=f"bench-{tag}",
                                 nnodes="1:2", max_restarts=10, workload=workload_args(args, work),
                                 settings=TUNED if tuned else DEFAULT)
            node = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True, cwd=REPO)
            nodes.append(node)
            logs.append(StampedLog(node.stdout, work / f"node{i}.log"))
        watch.start()
        roles: dict[str, int] = {}

        def survivor_workers() -> list[int]:
            for i in range(2):
                pids = list(processes_with_env(MARKER, f"{tag}-{i}"))
                if any(rank_of(p) == "1" for p in pids):
                    roles["victim"], roles["survivor"] = i, 1 - i
            if "victim" not in roles:
                raise RuntimeError("no torchrun node runs rank 1")
            return [p for p in processes_with_env(MARKER, f"{tag}-{roles['survivor']}") if rank_of(p)]

        def kill() -> None:
            kill_with_env(MARKER, f"{tag}-{roles['victim']}")

        t_kill, gone, lost = kill_and_wait(watch, kill, survivor_workers, args)
        survivor = roles["survivor"]
        lines = logs[survivor].snapshot()
        marks = torchrun_marks(t_kill, lines)
        marks["old_stopped"] = gone.result(timeout_s=5)
        runtime = read_jsonl([work / f"node{survivor}.events.jsonl"])
        marks.update(runtime_marks(t_kill, runtime, 1))
        marks.update(workload_marks(t_kill, read_jsonl([work / "timeline.jsonl"]), 1))
        agent_lines = [f"{t - t_kill:+.3f} {line}" for t, line in lines
                       if t > t_kill and ("] " in line and ("Worker group" in line or "Rendezvous" in line
                                                             or "worker group" in line))][:12]
        return KillResult(kill=t_kill, marks=marks, lost_steps=lost,
                          notes={"agent_lines_after_kill": agent_lines})
    finally:
        watch.stop()
        for i, node in enumerate(nodes):
            kill_with_env(MARKER, f"{tag}-{i}")
            killpg_quiet(node.pid)
            node.wait(timeout=10)
        killpg_quiet(store.pid)
        store.wait(timeout=10)


SYSTEMS = {
    "spotwise": run_spotwise,
    "torchrun": lambda work, args: run_torchrun(work, args, tuned=False),
    "torchrun_tuned": lambda work, args: run_torchrun(work, args, tuned=True),
}
"""Each system's one-kill run, by the name the JSON reports it under."""
