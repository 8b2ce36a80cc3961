"""End to end through the CLI: a real daemon (`spotwise daemon`), real agents (the local
provider's `spotwise agent` subprocesses), the tiny workload on the real runtime, and real
kills (SIGKILL, SIGSTOP/SIGCONT) of whole nodes.

Each test asserts on what a user or an auditor can see: the job's state and world size from
the daemon, the process ids on the machine, and the exactly-once ledger of the samples read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from spotwise.client import Client, state_name
from spotwise.cloud.local import LocalProvider, processes_with_env, scan_marked
from spotwise.cloud.provider import NodeRequest
from spotwise.worker.runtime.ledger import verify_ledger
from tests.support.wait import until as _until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATASET_SIZE = 100
GLOBAL_BATCH = 24


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _job_pids(job_id: str) -> set[int]:
    """Live processes whose environment says they train `job_id`."""
    return set(processes_with_env("SPOTWISE_JOB_ID", job_id))


@dataclass
class Cluster:
    address: str
    state_dir: Path
    log_dir: Path
    provider: LocalProvider
    client: Client
    tmp: Path
    daemon: subprocess.Popen[bytes]
    env: dict[str, str]

    def restart_daemon(self, down_s: float) -> None:
        """SIGKILL the daemon, keep it down for `down_s`, start it again on the same port
        with the same state directory."""
        _stop_daemon(self.daemon, signal.SIGKILL)
        t0 = time.monotonic()
        _until(lambda: time.monotonic() - t0 >= down_s, down_s + 5, "the outage")
        self.daemon, addr = _start_daemon(self.state_dir, self.log_dir, self.address,
                                          self.tmp / "daemon2.log", self.env)
        assert addr == self.address

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spotwise.cli", "--address", self.address,
                               *args], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO)

    def add_nodes(self, count: int) -> list[str]:
        nodes = self.provider.launch(
            NodeRequest(job_id="", daemon_address=self.address, slots=1), count)
        return [n.handle for n in nodes]

    def submit(self, *, steps: int, step_sleep: float, every: int = 5,
               extra: tuple[str, ...] = ()) -> tuple[str, Path]:
        """Submit the tiny workload; returns the job id and its ledger (its loss log is the
        ledger path with the suffix .loss)."""
        ledger = self.tmp / f"ledger-{uuid.uuid4().hex[:6]}.jsonl"
        extra = (*extra, "--loss-log", str(ledger.with_suffix(".loss")))
        spec = {
            "name": "e2e",
            "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", str(steps),
                           "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2",
                           "--dataset-size", str(DATASET_SIZE), "--step-sleep", str(step_sleep),
                           "--ledger", str(ledger), *extra],
            "working_dir": str(REPO),
            "nodes": {"min": 1, "max": 3},
            "nproc_per_node": 1,
            # keep 5: a drain before a grow makes the old generation commit one to three more
            # checkpoints before the fence stops it, and with a small keep they can prune the
            # step the daemon chose to restore (a known daemon/runtime race).
            "checkpoint": {"uri": str(self.tmp / f"ck-{ledger.stem}"), "every_steps": every,
                           "keep": 5},
            "global_batch_size": GLOBAL_BATCH,
            "max_failures": 5,
        }
        path = self.tmp / f"{ledger.stem}.yaml"
        path.write_text(yaml.safe_dump(spec))
        out = self.cli("submit", str(path))
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.strip().splitlines()[-1]
        return job_id, ledger

    def job(self, job_id: str):
        return self.client.get(job_id)

    def members(self, job_id: str) -> list[str]:
        """Provider handles of the job's member nodes, in node-rank order."""
        job = self.job(job_id)
        assert len(job.provider_nodes) == len(job.node_ids) and all(job.provider_nodes), job
        return list(job.provider_nodes)


def _start_daemon(state_dir: Path, log_dir: Path, listen: str, log_path: Path,
                  env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """`spotwise daemon` as a user starts it; returns it and the address it serves on."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", listen,
         "--state-dir", str(state_dir), "--provider", "none", "--log-dir", str(log_dir)],
        stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=env,
        start_new_session=True, cwd=REPO)

    def address() -> str | None:
        m = re.search(r"daemon serving on (\S+)", log_path.read_text())
        assert daemon.poll() is None, log_path.read_text()
        return m.group(1) if m else None

    try:
        return daemon, _until(address, 60, "the daemon to serve")
    except BaseException:
        _stop_daemon(daemon)
        raise


def _stop_daemon(daemon: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(daemon.pid, sig)
        daemon.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state_dir, log_dir = tmp_path / "state", tmp_path / "logs"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir))
    daemon, addr = _start_daemon(state_dir, log_dir, "127.0.0.1:0", tmp_path / "daemon.log", env)
    provider = LocalProvider(log_dir=log_dir, cluster=f"e2e-{uuid.uuid4().hex[:8]}",
                             grace_s=5.0, env=env, cwd=str(REPO))
    client = Client(addr, timeout=10)
    c = Cluster(address=addr, state_dir=state_dir, log_dir=log_dir, provider=provider,
                client=client, tmp=tmp_path, daemon=daemon, env=env)
    try:
        yield c
    finally:
        client.close()
        provider.shutdown()
        _stop_daemon(c.daemon)
        assert scan_marked(provider.cluster + "/") == {}


def _ledger_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_kill_shrink_grow_succeed_exactly_once(cluster: Cluster) -> None:
    cluster.add_nodes(2)
    job_id, ledger = cluster.submit(steps=60, step_sleep=0.15)

    # Running on both nodes, with a commit behind it.
    job = _until(lambda: (j := cluster.job(job_id)).world_size == 2 and
                 j.last_checkpoint_step >= 5 and j.step > j.last_checkpoint_step and j, 120,
                 "world 2 with a commit")
    gen_before = job.generation
    # Kill node rank 0: its agent hosts the rendezvous store of the generation.
    victim = cluster.members(job_id)[0]
    victim_pids = cluster.provider.node_pids(victim)
    job_pids_before = _job_pids(job_id)
    killed = cluster.provider.kill(victim)
    t_kill = time.monotonic()
    assert set(victim_pids) <= set(killed)
    assert not [p for p in victim_pids if _alive(p)]

    # The job goes on at world 1 from the last commit.
    job = _until(lambda: (j := cluster.job(job_id)).generation > gen_before and
                 j.world_size == 1 and j.step > j.last_checkpoint_step and
                 state_name(j.state) == "RUNNING" and j, 60, "world 1")
    shrunk_gen = job.generation
    recovery_s = time.monotonic() - t_kill
    records = _ledger_records(ledger)
    restored = {r["generation"]: r["step"] for r in records if r["kind"] == "restored"}
    commits_before = [r["step"] for r in records
                      if r["kind"] == "committed" and r["generation"] <= gen_before]
    assert restored[shrunk_gen] == max(commits_before)
    assert not (job_pids_before & set(victim_pids)) - set(killed)

    # A node joins; the job grows back to 2.
    cluster.add_nodes(1)
    _until(lambda: (j := cluster.job(job_id)).generation > shrunk_gen and j.world_size == 2,
           60, "world 2 again")

    final = _until(lambda: (j := cluster.job(job_id)) and
                   state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 240,
                   "the job to end")
    status = cluster.cli("status", job_id, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "JOB_STATE_SUCCEEDED", final
    assert final.step == 60
    report = verify_ledger(str(ledger), dataset_size=DATASET_SIZE,
                           global_batch_size=GLOBAL_BATCH)
    assert report.final_step == 60
    assert len(report.generations) >= 2  # the shrunk one may have committed nothing
    # Nothing of the job is left running.
    _until(lambda: not _job_pids(job_id), 30, "the job's processes to exit")

    # The same run without failures (world 2 throughout) ends at the same loss: the restores
    # were exact and the global batch stayed fixed; only the reduction order differs.
    ref_id, ref_ledger = cluster.submit(steps=60, step_sleep=0.0)
    ref = _until(lambda: (j := cluster.job(ref_id)) and
                 state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 240,
                 "the reference job to end")
    assert state_name(ref.state) == "SUCCEEDED" and ref.generation == 1, ref
    elastic_loss, ref_loss = _final_loss(ledger), _final_loss(ref_ledger)
    print(f"recovery after kill: {recovery_s:.1f}s; generations {report.generations}; "
          f"replayed {report.replayed_steps}; final loss {elastic_loss!r} vs {ref_loss!r}")
    assert abs(elastic_loss - ref_loss) <= 1e-4 * abs(ref_loss)


def _final_loss(ledger: Path) -> float:
    """The loss rank 0 logged for the last step (of the generation that completed it)."""
    last: dict[int, float] = {}
    for line in ledger.with_suffix(".loss").read_text().splitlines():
        step, loss, _gen = line.split()
        last[int(step)] = float(loss)
    return last[max(last)]


def test_cancel_leaves_no_process_behind(cluster: Cluster) -> None:
    cluster.add_nodes(2)
    job_id, _ = cluster.submit(steps=10_000, step_sleep=0.2)
    _until(lambda: cluster.job(job_id).world_size == 2 and len(_job_pids(job_id)) >= 2, 120,
           "world 2")
    pids = _job_pids(job_id)
    out = cluster.cli("cancel", job_id)
    assert out.returncode == 0, out.stderr
    _until(lambda: not any(_alive(p) for p in pids), 30, "every process of the job to die")
    assert _job_pids(job_id) == set()
    assert state_name(cluster.job(job_id).state) == "CANCELLED"
    # The agents themselves live on, idle.
    assert len(cluster.provider.list_nodes()) == 2


def test_frozen_node_comes_back_fenced(cluster: Cluster) -> None:
    """SIGSTOP a whole node (agent and training processes, like a paused VM); the job moves on
    without it; SIGCONT: its old generation neither commits a checkpoint nor keeps its ranks."""
    cluster.add_nodes(2)
    job_id, ledger = cluster.submit(steps=70, step_sleep=0.15, every=3)
    job = _until(lambda: (j := cluster.job(job_id)).world_size == 2 and
                 j.last_checkpoint_step >= 3 and j, 120, "world 2 with a commit")
    frozen_gen = job.generation
    handles = cluster.members(job_id)
    victim = handles[1]
    pids = cluster.provider.node_pids(victim)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        moved = _until(lambda: (j := cluster.job(job_id)).generation > frozen_gen and
                       j.world_size == 1 and j.step > j.last_checkpoint_step + 2 and j, 90,
                       "the job to move on without the frozen node")
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    # The revived node's old-generation processes are stopped by its agent.
    frozen_trainers = [p for p in pids if p in _job_pids(job_id)]
    _until(lambda: not any(_alive(p) for p in frozen_trainers), 30,
           "the frozen generation's processes to go")
    # Back, the agent is told to drop its old ranks and registers again; it may only join a
    # newer generation. Which it hears first depends on timing: the empty assignment the
    # daemon pushed when it declared the node lost waits on the beat channel, and the first
    # beat after the thaw is answered "register again".
    agent_log = cluster.log_dir / "agents" / f"{victim}.log"
    text = _until(lambda: (t := agent_log.read_text()) and "registering again" in t and
                  re.search(rf"assignment \S+ g{frozen_gen} -> nothing", t) and t, 30,
                  "the revived agent to drop its old assignment")
    after = text.split("registering again", 1)[1]
    taken = [int(g) for g in re.findall(r"assignment (?:\S+ g\d+|nothing) -> \S+ g(\d+)", after)]
    assert all(g > moved.generation for g in taken), (taken, moved.generation)
    final = _until(lambda: (j := cluster.job(job_id)) and
                   state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 240,
                   "the job to end")
    assert state_name(final.state) == "SUCCEEDED", final
    records = _ledger_records(ledger)
    restored = {r["generation"]: r["step"] for r in records if r["kind"] == "restored"}
    # No commit by the frozen generation beyond where its successor restored from.
    late = [r for r in records if r["kind"] == "committed" and r["generation"] == frozen_gen
            and r["step"] > restored[moved.generation]]
    assert late == []
    # It never ran steps again in its old generation after coming back... except the ones it
    # was in the middle of, which the ledger shows as replayed, not committed.
    verify_ledger(str(ledger), dataset_size=DATASET_SIZE, global_batch_size=GLOBAL_BATCH)
    # Later generations may take the node back, but only as a newer generation's member.
    assert final.generation > moved.generation or final.world_size == 1


def test_daemon_restart_does_not_stop_training(cluster: Cluster) -> None:
    """Flow 9: the daemon dies (SIGKILL) and comes back from SQLite; training keeps stepping
    meanwhile, the agents re-register with their generation, and the job goes on in it."""
    cluster.add_nodes(2)
    job_id, ledger = cluster.submit(steps=80, step_sleep=0.1)
    # After the first commit: the first save of a generation starts DCP's writer process
    # (seconds of imports on a loaded machine, during which the next save waits), which would
    # stall training whether or not the daemon is there.
    job = _until(lambda: (j := cluster.job(job_id)).world_size == 2 and
                 j.last_checkpoint_step >= 5 and j, 120, "world 2 and a first commit")
    gen = job.generation
    loss_log = ledger.with_suffix(".loss")
    before = len(loss_log.read_text().splitlines())
    cluster.restart_daemon(down_s=4.0)  # twice the lease
    during = len(loss_log.read_text().splitlines())
    assert during > before + 5, (before, during)  # steps went on while it was down
    final = _until(lambda: (j := cluster.job(job_id)) and
                   state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 240,
                   "the job to end")
    assert state_name(final.state) == "SUCCEEDED", final
    assert final.generation == gen  # reconciled, not restarted
    assert final.step == 80
    verify_ledger(str(ledger), dataset_size=DATASET_SIZE, global_batch_size=GLOBAL_BATCH)
    for handle in [n.handle for n in cluster.provider.list_nodes()]:
        text = (cluster.log_dir / "agents" / f"{handle}.log").read_text()
        assert re.search(rf"registered as node \S+ \(job {job_id} g{gen}\)", text), handle
