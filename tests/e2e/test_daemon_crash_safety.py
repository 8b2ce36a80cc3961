"""Crash safety of the daemon (issue #5, DESIGN flow 9): a real `spotwise daemon` process is
SIGKILLed at 10 random moments of a running job (seeded; the seed is printed on failure; set
SPOTWISE_CRASH_SEED to replay one) and restarted on the same address and state directory.

While it is down, training goes on (the step advances between the kill and the restart). After
each restart: every job the daemon acknowledged is still there, no generation was started twice
or skipped (one row each, strictly increasing), the agents re-registered into the generation
they run and kept it (nothing changed, so nothing restarts), and SQLite's integrity_check is ok.
In the end the job SUCCEEDS and its exactly-once ledger holds.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.client import Client, state_name
from spotwise.cloud.local import LocalProvider, scan_marked
from spotwise.cloud.provider import NodeRequest
from spotwise.worker.runtime.ledger import verify_ledger
from tests.support.wait import until as _until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATASET_SIZE = 96
GLOBAL_BATCH = 16
KILLS = 10
LEASE_S = 2.0  # the daemon's default lease: an outage longer than this makes agents re-register


class DaemonProc:
    """`spotwise daemon` as a user starts it, on `listen` with `state_dir`."""

    def __init__(self, state_dir: Path, log_dir: Path, listen: str, log_path: Path,
                 env: dict[str, str]) -> None:
        self.log_path = log_path
        # Every life appends to the same log; this one's lines start here.
        self._offset = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", listen,
                 "--state-dir", str(state_dir), "--provider", "none", "--log-dir", str(log_dir)],
                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
                cwd=REPO)
        try:
            self.address = str(_until(self._served, 60, "the daemon to serve"))
        except BaseException:
            self.kill()
            raise

    def _served(self) -> str | None:
        assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            text = f.read().decode(errors="replace")
        m = re.search(r"daemon serving on (\S+)", text)
        return m.group(1) if m else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _last_step(loss_log: Path) -> int:
    """The last step rank 0 logged ('step loss generation' lines), -1 before any."""
    try:
        lines = loss_log.read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [int(line.split()[0]) for line in lines if len(line.split()) == 3]
    return max(steps, default=-1)


def _registrations(agent_log: Path) -> list[tuple[str, str, str]]:
    """(node, job, generation) of each "registered as node" line of an agent's log."""
    return re.findall(r"registered as node (\S+) \(job (\S+) g(\S+)\)", agent_log.read_text())


def _db_check(db: Path, job_id: str) -> list[int]:
    """integrity_check is ok; the job's generations are one row each, 1..n, started in order.
    Returns them."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute(
            "SELECT generation, started_at FROM generations WHERE job_id = ? "
            "ORDER BY started_at, generation", (job_id,)).fetchall()
        gen_events = [g for (g,) in conn.execute(
            "SELECT generation FROM events WHERE job_id = ? AND kind = 'generation' ORDER BY id",
            (job_id,))]
    finally:
        conn.close()
    gens = [g for g, _ in rows]
    assert gens == list(range(1, len(gens) + 1)), f"generations not 1..n in start order: {rows}"
    assert gen_events == gens, f"generation events {gen_events} vs rows {gens}"
    return gens


@pytest.fixture
def seed() -> Iterator[int]:
    value = int(os.environ.get("SPOTWISE_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash-safety seed {value} (SPOTWISE_CRASH_SEED={value} replays it)")
    yield value


def test_sigkilled_daemon_loses_nothing(tmp_path: Path, seed: int) -> None:
    state_dir, log_dir = tmp_path / "state", tmp_path / "logs"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir), HOME=str(tmp_path / "home"))
    env.pop("SPOTWISE_TOKEN", None)
    daemon_log = tmp_path / "daemon.log"
    daemons = [DaemonProc(state_dir, log_dir, "127.0.0.1:0", daemon_log, env)]
    provider = LocalProvider(log_dir=log_dir, cluster=f"crash-{uuid.uuid4().hex[:8]}",
                             grace_s=5.0, env=env, cwd=str(REPO))
    client = Client(daemons[0].address, timeout=10)
    try:
        _run(random.Random(seed), tmp_path, env, daemons, provider, client)
    except BaseException:
        print(f"crash-safety seed {seed} failed; daemon log tail:\n"
              f"{daemon_log.read_text()[-6000:]}")
        raise
    finally:
        client.close()
        provider.shutdown()
        for d in daemons:
            d.kill(signal.SIGTERM)
        assert scan_marked(provider.cluster + "/") == {}


def _run(rng: random.Random, tmp: Path, env: dict[str, str], daemons: list[DaemonProc],
         provider: LocalProvider, client: Client) -> None:
    state_dir, log_dir, daemon_log = tmp / "state", tmp / "logs", tmp / "daemon.log"
    db = state_dir / "spotwise.db"
    daemon = daemons[0]
    address = daemon.address
    handles = [n.handle for n in provider.launch(
        NodeRequest(job_id="", daemon_address=address, slots=1), 2)]
    ledger = tmp / "ledger.jsonl"
    loss_log = tmp / "ledger.loss"
    steps = 340  # 10 kills take about 290 steps here; the tail after them is what is left
    spec = {
        "name": "crash-safety",
        "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", str(steps),
                       "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2",
                       "--dataset-size", str(DATASET_SIZE), "--step-sleep", "0.15",
                       "--ledger", str(ledger), "--loss-log", str(loss_log)],
        "working_dir": str(REPO),
        "nodes": {"min": 2, "max": 2},
        "nproc_per_node": 1,
        "checkpoint": {"uri": str(tmp / "ckpt"), "every_steps": 10, "keep": 3},
        "global_batch_size": GLOBAL_BATCH,
        "max_failures": 3,
    }
    job_id = client.submit(spec)
    # Jobs that can never run (more nodes than exist): they must simply survive every crash.
    waiting = dict(spec, name="waiting", nodes={"min": 5, "max": 5})
    acknowledged = {job_id}

    job = _until(lambda: (j := client.get(job_id)).world_size == 2 and j.step >= 3 and j, 90,
                 "the job to run on both nodes")
    gen = job.generation
    agent_logs = [log_dir / "agents" / f"{h}.log" for h in handles]

    for kill in range(KILLS):
        # A random moment: right after a restart, mid-heartbeat, mid-commit, after a submit...
        if rng.random() < 0.5:
            acknowledged.add(client.submit(waiting))
        time.sleep(rng.uniform(0.0, 0.8))
        before = client.get(job_id)
        assert before.generation == gen and state_name(before.state) == "RUNNING", before
        assert before.step < steps - 10, f"kill {kill}: the job is nearly done (raise steps)"
        regs_before = [len(_registrations(p)) for p in agent_logs]
        daemon.kill(signal.SIGKILL)
        killed_at_step = _last_step(loss_log)
        down_s = rng.uniform(LEASE_S + 0.3, LEASE_S + 0.8)
        t0 = time.monotonic()
        # Training does not need the daemon: the step advances while it is down.
        _until(lambda k=killed_at_step: _last_step(loss_log) > k, 30,
               f"kill {kill}: a step while the daemon is down")
        _until(lambda t=t0, d=down_s: time.monotonic() - t >= d, down_s + 1, "the outage")
        assert _last_step(loss_log) > killed_at_step
        daemon = DaemonProc(state_dir, log_dir, address, daemon_log, env)
        daemons.append(daemon)
        assert daemon.address == address

        # Reconciled: each agent registered again, with the generation it runs, which the
        # daemon kept (no new generation, no restart of the processes).
        _until(lambda r=regs_before: all(len(_registrations(p)) > n
                                         for p, n in zip(agent_logs, r, strict=True)),
               30, f"kill {kill}: the agents to register again")
        for p, n in zip(agent_logs, regs_before, strict=True):
            for _node, reg_job, reg_gen in _registrations(p)[n:]:
                assert (reg_job, reg_gen) == (job_id, str(gen)), (kill, p.read_text()[-3000:])
        after = client.get(job_id)
        assert after.generation == gen, (kill, after)
        assert state_name(after.state) in ("RUNNING", "SUCCEEDED"), (kill, after)
        listed = {j.id for j in client.list()}
        assert acknowledged <= listed, f"kill {kill}: lost {acknowledged - listed}"
        assert _db_check(db, job_id) == list(range(1, gen + 1))
        print(f"kill {kill}: at step {killed_at_step}, down {down_s:.1f}s, "
              f"step now {_last_step(loss_log)}")

    final = _until(lambda: (j := client.get(job_id)) and
                   state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 120,
                   "the job to end")
    assert state_name(final.state) == "SUCCEEDED", final
    assert final.step == steps and final.generation == gen, final
    report = verify_ledger(str(ledger), dataset_size=DATASET_SIZE, global_batch_size=GLOBAL_BATCH)
    assert report.final_step == steps
    assert _db_check(db, job_id) == list(range(1, gen + 1))
    assert {j.id for j in client.list()} >= acknowledged
    # No agent was ever told to switch generations after the first assignment.
    for p in agent_logs:
        switches = re.findall(r"assignment (\S+ g\d+|nothing) -> (\S+ g\d+|nothing)", p.read_text())
        assert switches[:1] == [("nothing", f"{job_id} g{gen}")], switches
        assert all(new in ("nothing", f"{job_id} g{gen}") for _, new in switches), switches
    records = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]
    assert {r["generation"] for r in records} == {gen}
