"""Spot notices end to end: a real daemon (`spotwise daemon`), real agents launched by the trace
replayer (spotwise.cloud.replay) each polling its own fake IMDSv2 (spotwise.cloud.fake_imds),
the tiny workload on the real runtime, and real SIGKILLs at the notice's deadline.

One job lives through both cases of flow 6, driven event by event:

(a) a notice whose lead (8 s) exceeds the checkpoint time: the daemon drains the node, the job
    moves to the next generation from the drain checkpoint before the node vanishes, and no step
    is lost (the daemon's lost_steps stays 0);
(b) a notice with too little lead (0.3 s, less than one IMDS poll): the node vanishes first and
    the job falls back to its last commit, with nothing torn.

The exactly-once ledger of the samples read must hold at the end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.client import Client, state_name
from spotwise.cloud.local import LocalProvider, scan_marked, stop_process_group
from spotwise.cloud.provider import NodeRequest
from spotwise.cloud.replay import TraceReplayer
from spotwise.cloud.trace import ReplayEvent, ReplaySchedule
from spotwise.worker.runtime.ledger import verify_ledger
from tests.support.wait import until as _until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DATASET_SIZE = 100
GLOBAL_BATCH = 24
LONG_LEAD_S = 8.0
SHORT_LEAD_S = 0.3


def _start_daemon(state_dir: Path, log_dir: Path, log_path: Path,
                  env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
         "--state-dir", str(state_dir), "--provider", "none", "--log-dir", str(log_dir)],
        stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"), env=env,
        start_new_session=True, cwd=REPO)

    def address() -> str | None:
        assert daemon.poll() is None, log_path.read_text()
        m = re.search(r"daemon serving on (\S+)", log_path.read_text())
        return m.group(1) if m else None

    try:
        return daemon, _until(address, 60, "the daemon to serve")  # type: ignore[return-value]
    except BaseException:
        stop_process_group(daemon)
        raise


def _schedule() -> ReplaySchedule:
    """Two nodes; a drop with a long notice; a rise; a drop whose notice comes too late."""
    events = (
        ReplayEvent(t=0.0, kind="add", count=2),
        ReplayEvent(t=10.0, kind="notice", count=1),
        ReplayEvent(t=10.0 + LONG_LEAD_S, kind="remove", count=1),
        ReplayEvent(t=30.0, kind="add", count=1),
        ReplayEvent(t=40.0, kind="notice", count=1),
        ReplayEvent(t=40.0 + SHORT_LEAD_S, kind="remove", count=1),
    )
    levels = (2,) * 18 + (1,) * 12 + (2,) * 10 + (1,) * 10
    return ReplaySchedule(events=events, levels=levels, step_s=1.0, duration_s=50.0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Client, TraceReplayer, LocalProvider]]:
    state_dir, log_dir = tmp_path / "state", tmp_path / "logs"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir),
               # Compressed notices: leave a draining node 0.5 s before its deadline, not 10 s.
               SPOTWISE_DAEMON_DRAIN_MARGIN_S="0.5",
               SPOTWISE_AGENT_IMDS_POLL_S="1")
    daemon, address = _start_daemon(state_dir, log_dir, tmp_path / "daemon.log", env)
    provider = LocalProvider(log_dir=log_dir, cluster=f"notice-{uuid.uuid4().hex[:8]}",
                             grace_s=5.0, env=env, cwd=str(REPO))
    replayer = TraceReplayer(provider, _schedule(),
                             NodeRequest(job_id="", daemon_address=address, slots=1))
    client = Client(address, timeout=10)
    try:
        yield client, replayer, provider
    finally:
        client.close()
        replayer.stop()
        provider.shutdown()
        stop_process_group(daemon)
        assert scan_marked(provider.cluster + "/") == {}


def _records(ledger: Path) -> list[dict]:
    return [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]


def _restored(ledger: Path) -> dict[int, int]:
    return {r["generation"]: r["step"] for r in _records(ledger) if r["kind"] == "restored"}


def _submit(client: Client, tmp: Path, *, steps: int) -> tuple[str, Path]:
    ledger = tmp / "ledger.jsonl"
    spec = {
        "name": "notices",
        "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", str(steps),
                       "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2",
                       "--dataset-size", str(DATASET_SIZE), "--step-sleep", "0.1",
                       "--ledger", str(ledger)],
        "working_dir": str(REPO),
        "nodes": {"min": 1, "max": 2},
        "nproc_per_node": 1,
        # keep 5: drain and grow checkpoints come on top of the periodic ones.
        "checkpoint": {"uri": str(tmp / "ck"), "every_steps": 10, "keep": 5},
        "global_batch_size": GLOBAL_BATCH,
        "max_failures": 5,
    }
    return client.submit(spec), ledger


def test_notices_drain_without_loss_and_late_ones_fall_back(
        cluster: tuple[Client, TraceReplayer, LocalProvider], tmp_path: Path) -> None:
    client, replayer, _provider = cluster
    replayer.begin()
    job_id, ledger = _submit(client, tmp_path, steps=170)
    job = _until(lambda: (j := client.get(job_id)).world_size == 2 and
                 j.last_checkpoint_step >= 10 and j, 90, "world 2 with a commit")
    gen_a = job.generation

    # (a) A notice with 8 s of lead: drained, and the job moves on before the node vanishes.
    commits_before_notice = {r["step"] for r in _records(ledger) if r["kind"] == "committed"}
    t_notice = time.monotonic()
    (notice,) = replayer.advance(10.0)
    assert notice.kind == "notice" and len(notice.handles) == 1
    job = _until(lambda: (j := client.get(job_id)).generation > gen_a and j, LONG_LEAD_S,
                 "the drain to start the next generation within the notice's lead")
    drained_in = time.monotonic() - t_notice
    assert job.world_size == 1
    assert job.lost_steps == 0, job
    assert replayer.stats.removed_with_notice == 0  # the node was still there
    gen_drained = job.generation
    # It restored from a checkpoint committed after the notice: the drain checkpoint.
    restored_at = _until(lambda: _restored(ledger).get(gen_drained), 30,
                         "the drained generation to restore")
    assert restored_at > max(commits_before_notice)
    # The deadline comes; the noticed node is SIGKILLed, exactly as AWS would.
    _until(lambda: time.monotonic() - t_notice >= LONG_LEAD_S, LONG_LEAD_S + 1, "the deadline")
    (removal,) = replayer.advance(10.0 + LONG_LEAD_S)
    assert removal.handles == notice.handles
    assert replayer.stats.removed_with_notice == 1
    job = client.get(job_id)
    assert job.generation == gen_drained and job.lost_steps == 0, job

    # Capacity comes back: the job grows to 2 again.
    (add,) = replayer.advance(30.0)
    assert len(add.handles) == 1, add
    job = _until(lambda: (j := client.get(job_id)).world_size == 2 and
                 j.generation > gen_drained and j.step > j.last_checkpoint_step and
                 state_name(j.state) == "RUNNING" and j, 60, "world 2 again")
    gen_b, lost_before = job.generation, job.lost_steps
    commits_before = {r["step"] for r in _records(ledger) if r["kind"] == "committed"}

    # (b) A notice with 0.3 s of lead: less than one IMDS poll, so the node vanishes first.
    (late_notice,) = replayer.advance(40.0)
    t0 = time.monotonic()
    _until(lambda: time.monotonic() - t0 >= SHORT_LEAD_S, 2, "the short lead")
    (late_removal,) = replayer.advance(40.0 + SHORT_LEAD_S)
    assert late_removal.handles == late_notice.handles
    job = _until(lambda: (j := client.get(job_id)).generation > gen_b and
                 j.world_size == 1 and state_name(j.state) == "RUNNING" and j, 60,
                 "the job to go on at world 1")
    fallback = _until(lambda: _restored(ledger).get(job.generation), 30,
                      "the fallback generation to restore")
    committed = {r["step"] for r in _records(ledger) if r["kind"] == "committed"}
    # The fallback restored a commit (one made before the kill, or a drain checkpoint that
    # made it in time), never a torn one.
    assert fallback in committed
    assert fallback >= max(commits_before)

    final = _until(lambda: (j := client.get(job_id)) and
                   state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 120,
                   "the job to end")
    assert state_name(final.state) == "SUCCEEDED", final
    assert final.step == 170
    report = verify_ledger(str(ledger), dataset_size=DATASET_SIZE, global_batch_size=GLOBAL_BATCH)
    assert report.final_step == 170
    # The daemon's count of lost steps follows where each generation really restored (its
    # Restored reports): never more than the steps the ledger shows were run and thrown away.
    assert final.lost_steps <= report.replayed_steps, (final.lost_steps, report.replayed_steps)
    print(f"drain took {drained_in:.1f}s of {LONG_LEAD_S}s lead; lost steps: drain 0, "
          f"late notice {final.lost_steps - lost_before}; generations {report.generations}; "
          f"replayed {report.replayed_steps}")
