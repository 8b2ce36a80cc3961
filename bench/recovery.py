"""Recovery after losing a node: spotwise vs torchrun elastic, same workload, same machine.

Both systems run tests/workloads/tiny_train.py on two "nodes" of one process each:

- torchrun: two `torchrun --nnodes=1:2 --nproc-per-node=1 --rdzv-backend=c10d` agents whose
  rendezvous store is a standalone TCPStore process (`--rdzv-conf=is_host=false`), so losing a
  node does not take the store with it; other settings are torchrun's defaults. Restarts
  resume from the newest committed checkpoint (the spotwise runtime runs under torchrun too).
- spotwise: a `spotwise daemon` and two local agents (the local provider), default settings
  (heartbeat 0.5 s, lease 2 s).

For each, once the job trains at world size 2 with a committed checkpoint, the node running
global rank 1 is killed with SIGKILL (its agent and its workers), and the time from the kill
to the first completed step at world size 1 is measured. Step completions come from the
workload's --loss-log (rank 0 appends a line right after each step's all-reduce), polled
every 10 ms; the world size of a generation from its --ledger records (each rank's ids per
step: 24 at world 1, 12 at world 2).

Writes bench/results/recovery.json with spotwise_recovery_s, torchrun_recovery_s, ratio
(spotwise / torchrun), detection_s (spotwise: kill to the daemon starting the smaller
generation) and lost_steps (spotwise: steps done before the kill and replayed after), and
prints `name: value` lines.

    python bench/recovery.py            # both, ~2-3 minutes
    python bench/recovery.py --skip-torchrun
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from torchrun_elastic import start_store, torchrun_argv  # bench/, beside this script

from spotwise.cloud.local import kill_with_env, processes_with_env

REPO = Path(__file__).resolve().parents[1]
WORKLOAD = REPO / "tests" / "workloads" / "tiny_train.py"
GLOBAL_BATCH = 24
MARKER = "SPOTWISE_BENCH_NODE"


def workload_args(steps: int, step_sleep: float, ledger: Path, loss_log: Path) -> list[str]:
    return [str(WORKLOAD), "--steps", str(steps), "--global-batch-size", str(GLOBAL_BATCH),
            "--micro-batch-size", "2", "--dataset-size", "100000", "--step-sleep",
            str(step_sleep), "--ledger", str(ledger), "--loss-log", str(loss_log)]


@dataclass
class StepWatch:
    """Polls the loss log and the ledger: when each step completed, at which world size."""

    loss_log: Path
    ledger: Path
    completed: list[tuple[float, int, int]] = field(default_factory=list)
    """(monotonic arrival time, step, generation), in arrival order."""
    world_of: dict[int, int] = field(default_factory=dict)
    """generation -> world size."""
    restored: dict[int, int] = field(default_factory=dict)
    """generation -> step it restored from."""
    commits: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _offsets: dict[Path, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True, name="step-watch").start()

    def stop(self) -> None:
        self._stop.set()

    def _lines(self, path: Path) -> list[str]:
        try:
            with open(path) as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind("\n") + 1]
        self._offsets[path] = self._offsets.get(path, 0) + len(complete.encode())
        return complete.splitlines()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                for line in self._lines(self.loss_log):
                    step, _loss, gen = line.split()
                    self.completed.append((now, int(step), int(gen)))
                for line in self._lines(self.ledger):
                    r = json.loads(line)
                    if r["kind"] == "step" and r["generation"] not in self.world_of:
                        self.world_of[r["generation"]] = GLOBAL_BATCH // len(r["ids"])
                    elif r["kind"] == "restored":
                        self.restored[r["generation"]] = r["step"]
                    elif r["kind"] == "committed":
                        self.commits += 1
            time.sleep(0.01)

    def last(self) -> tuple[float, int, int] | None:
        with self._lock:
            return self.completed[-1] if self.completed else None

    def world_now(self) -> int:
        last = self.last()
        return self.world_of.get(last[2], 0) if last else 0

    def first_at_world_after(self, t: float, world: int) -> tuple[float, int, int] | None:
        with self._lock:
            for rec in self.completed:
                if rec[0] > t and self.world_of.get(rec[2]) == world:
                    return rec
        return None


def until(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def killpg_quiet(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Measurement:
    recovery_s: float
    lost_steps: int
    detection_s: float | None = None


def measure(watch: StepWatch, kill, *, warm_steps: int, timeout_s: float,
            on_poll=None) -> Measurement:
    """Wait for world 2 + a commit + warm_steps, kill, wait for the first step at world 1."""
    until(lambda: watch.world_now() == 2 and watch.commits > 0
          and (watch.last() or (0, 0, 0))[1] >= warm_steps, timeout_s, "training at world 2")
    last_before = watch.last()
    t_kill = time.monotonic()
    kill()
    detection = None
    deadline = time.monotonic() + timeout_s
    rec = None
    while time.monotonic() < deadline:
        rec = watch.first_at_world_after(t_kill, 1)
        if rec is not None:
            break
        if on_poll is not None and detection is None and on_poll():
            detection = time.monotonic() - t_kill
        time.sleep(0.01)
    if rec is None:
        raise TimeoutError(f"no step at world 1 within {timeout_s:.0f}s of the kill")
    last_step = max(s for t, s, g in watch.completed if t <= t_kill + 0.001) \
        if last_before else 0
    restored = watch.restored.get(rec[2], rec[1] - 1)
    return Measurement(recovery_s=rec[0] - t_kill, lost_steps=max(0, last_step - restored),
                       detection_s=detection)


# ---- spotwise -------------------------------------------------------------------------------

def bench_spotwise(work: Path, args: argparse.Namespace) -> Measurement:
    sys.path.insert(0, str(REPO))
    from spotwise.client import Client
    from spotwise.cloud.local import LocalProvider
    from spotwise.cloud.provider import NodeRequest

    work.mkdir(parents=True)
    state = work / "state"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state))
    daemon_log = work / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
         "--state-dir", str(state), "--provider", "none", "--log-dir", str(work / "logs")],
        stdout=subprocess.DEVNULL, stderr=open(daemon_log, "wb"), env=env,
        start_new_session=True, cwd=REPO)
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
            "entrypoint": ["python", *workload_args(args.steps, args.step_sleep,
                                                    watch.ledger, watch.loss_log)],
            "working_dir": str(REPO),
            "nodes": {"min": 1, "max": 2},
            "nproc_per_node": 1,
            "checkpoint": {"uri": str(work / "ck"), "every_steps": args.every, "keep": 3},
            "global_batch_size": GLOBAL_BATCH,
            "max_failures": 5,
        })
        watch.start()
        gen_at_kill: list[int] = []

        def kill() -> None:
            job = client.get(job_id)
            gen_at_kill.append(job.generation)
            handle = job.provider_nodes[1]  # node rank 1 runs global rank 1
            provider.kill(handle)

        def detected() -> bool:
            job = client.get(job_id)
            return bool(gen_at_kill) and job.generation > gen_at_kill[0] and job.world_size == 1

        result = measure(watch, kill, warm_steps=args.warm_steps, timeout_s=args.timeout_s,
                         on_poll=detected)
        client.cancel(job_id)
        return result
    finally:
        watch.stop()
        if client is not None:
            client.close()
        provider.shutdown()
        killpg_quiet(daemon.pid)
        daemon.wait(timeout=10)


# ---- torchrun -------------------------------------------------------------------------------

def marked(value: str) -> list[int]:
    """Pids whose environment carries MARKER=value (a torchrun node and all it started)."""
    return list(processes_with_env(MARKER, value))


def rank_of(pid: int) -> str:
    try:
        for var in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if var.startswith(b"RANK="):
                return var[5:].decode()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return ""


def kill_node(value: str) -> None:
    kill_with_env(MARKER, value)


def bench_torchrun(work: Path, args: argparse.Namespace) -> Measurement:
    work.mkdir(parents=True)
    store, port = start_store()
    nodes: list[subprocess.Popen] = []
    tag = uuid.uuid4().hex[:8]
    watch = StepWatch(work / "loss.log", work / "ledger.jsonl")
    try:
        for i in range(2):
            env = dict(os.environ, **{MARKER: f"{tag}-{i}"},
                       SPOTWISE_CHECKPOINT_URI=str(work / "ck"),
                       SPOTWISE_CHECKPOINT_EVERY=str(args.every),
                       SPOTWISE_CHECKPOINT_KEEP="3", OMP_NUM_THREADS="1",
                       PYTHONPATH=str(REPO))
            nodes.append(subprocess.Popen(
                torchrun_argv(endpoint=f"127.0.0.1:{port}", rdzv_id=f"bench-{tag}",
                              nnodes="1:2", max_restarts=10,
                              workload=workload_args(args.steps, args.step_sleep, watch.ledger,
                                                     watch.loss_log)),
                stdout=open(work / f"node{i}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd=REPO))
        watch.start()

        def kill() -> None:
            for i in range(2):
                if any(rank_of(p) == "1" for p in marked(f"{tag}-{i}")):
                    kill_node(f"{tag}-{i}")
                    return
            raise RuntimeError("no torchrun node runs rank 1")

        return measure(watch, kill, warm_steps=args.warm_steps, timeout_s=args.timeout_s)
    finally:
        watch.stop()
        for i, node in enumerate(nodes):
            kill_node(f"{tag}-{i}")
            killpg_quiet(node.pid)
            node.wait(timeout=10)
        killpg_quiet(store.pid)
        store.wait(timeout=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100_000, help="workload steps (never reached)")
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--warm-steps", type=int, default=15, help="steps at world 2 before the kill")
    p.add_argument("--timeout-s", type=float, default=240.0)
    p.add_argument("--skip-torchrun", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "recovery.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="spotwise-bench-recovery-") as tmp:
        sw = bench_spotwise(Path(tmp) / "spotwise", args)
        tr = None if args.skip_torchrun else bench_torchrun(Path(tmp) / "torchrun", args)
    result = {
        "spotwise_recovery_s": round(sw.recovery_s, 3),
        "torchrun_recovery_s": round(tr.recovery_s, 3) if tr else None,
        "ratio": round(sw.recovery_s / tr.recovery_s, 4) if tr else None,
        "detection_s": round(sw.detection_s, 3) if sw.detection_s is not None else None,
        "lost_steps": sw.lost_steps,
        "torchrun_lost_steps": tr.lost_steps if tr else None,
        "setup": {"nodes": 2, "nproc_per_node": 1, "step_sleep_s": args.step_sleep,
                  "checkpoint_every": args.every, "killed": "the node running rank 1",
                  "torchrun": "--nnodes=1:2 c10d rendezvous on a standalone TCPStore"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if key != "setup":
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
