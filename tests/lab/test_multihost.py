"""The tiny job across three hosts of the lab, with the daemon and S3 on a fourth (the head),
through every fault kind in turn: it keeps training, comes back to three hosts, and its
committed history reads every sample exactly once.

Each agent advertises its own host's address; the hosts share nothing but the lab's bridge,
so the job stepping at world size 3 means rendezvous and gloo crossed hosts, and its
checkpoints crossed to the head's S3 through the fault proxy.
"""

from __future__ import annotations

import time
from pathlib import Path

import boto3
import pytest

from spotwise.client import state_name
from spotwise.cloud.labfleet import BUCKET, CREDENTIALS, REPO, LabFleet
from spotwise.cloud.netlab import Lab, kill9
from spotwise.cloud.s3_faults import set_rates
from spotwise.worker.runtime.ledger import verify_ledger

pytestmark = pytest.mark.slow

DATASET, BATCH = 100, 24
OUTAGE_S = 5.0
"""How long each network fault lasts: past the 2 s lease with room for the daemon's lag, so the
host is lost, and short enough that the lab stays within its test budget."""


def _spec(ledger: Path) -> dict:
    return {
        "name": "lab",
        "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", "100000",
                       "--global-batch-size", str(BATCH), "--micro-batch-size", "2",
                       "--dataset-size", str(DATASET), "--step-sleep", "0.05",
                       "--ledger", str(ledger)],
        "working_dir": str(REPO),
        "nodes": {"min": 1, "max": 3},
        "nproc_per_node": 1,
        "checkpoint": {"uri": f"s3://{BUCKET}/ck", "every_steps": 5, "keep": 5},
        "global_batch_size": BATCH,
        "max_failures": 20,
    }


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


@pytest.fixture
def fleet(tmp_path: Path):
    with Lab(["head", "w1", "w2", "w3"]) as lab:
        yield LabFleet(lab, workdir=tmp_path).start()


def test_tiny_job_trains_across_hosts_through_every_fault(fleet: LabFleet, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.jsonl"
    job_id = fleet.submit(_spec(ledger))
    w1, w2, w3 = fleet.workers
    faults: list[str] = []

    def running_on_three(min_step: int = 0, timeout_s: float = 150) -> int:
        job = fleet.wait_job(job_id, lambda j: state_name(j.state) == "RUNNING"
                             and j.world_size == 3 and j.step >= min_step, timeout_s,
                             f"3 hosts stepping past {min_step} (after {faults})")
        return job.step

    def steps_on(min_step: int, timeout_s: float = 150) -> int:
        """Training goes on (at any world size) past `min_step`."""
        return fleet.wait_job(job_id, lambda j: j.step >= min_step, timeout_s,
                              f"a step past {min_step} (after {faults})").step

    step = running_on_three(5)
    # Across hosts for real: each rank is bound to its own host's interface and address.
    for host in fleet.workers:
        (pid,) = fleet.rank_pids(host)
        env = _environ(pid)
        assert env["GLOO_SOCKET_IFNAME"] == "eth0", env.get("GLOO_SOCKET_IFNAME")
    s3 = boto3.client("s3", endpoint_url=fleet.s3_url, region_name="us-east-1",
                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def manifests() -> list[str]:
        keys = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"ck/{job_id}/manifests/").get("Contents", [])
        return [k["Key"] for k in keys]

    fleet.wait_job(job_id, lambda j: j.last_checkpoint_step > 0, 60, "a commit")
    assert manifests(), "no checkpoint reached the head's S3"

    def outage(name: str, apply, undo, seconds: float) -> None:
        nonlocal step
        faults.append(name)
        apply()
        t0 = time.monotonic()
        fleet.wait_job(job_id, lambda _j: time.monotonic() - t0 >= seconds, seconds + 30, name)
        undo()
        step = running_on_three(step + 3)

    # kill -9 of one rank.
    faults.append("kill rank")
    assert kill9(fleet.rank_pids(w2)[0])
    step = running_on_three(step + 3)
    # A whole host frozen past its lease, then thawed.
    faults.append("pause host")
    w3.pause(6.0)
    step = steps_on(step + 3)
    step = running_on_three(step + 3)
    # Cut off from everything.
    outage("link down", w1.link_down, w1.link_up, OUTAGE_S)
    # Cut off from the head only: its peers still reach it.
    outage("cut from head", lambda: w2.cut_from(fleet.head), w2.heal, OUTAGE_S)
    # Two workers cut off from each other.
    outage("workers cut", lambda: (w1.cut_from(w3), w3.cut_from(w1)),
           lambda: (w1.heal(), w3.heal()), OUTAGE_S)
    # A slow link to S3 from one host, across a few checkpoints.
    outage("slow S3 link", lambda: w1.limit_bandwidth(fleet.head, fleet.s3_port, "2mbit"),
           w1.heal, OUTAGE_S)
    # S3 throttling and timeouts at a rate.
    outage("S3 503/timeouts",
           lambda: set_rates(fleet.s3_url, error_rate=0.2, timeout_rate=0.05, timeout_s=2.0),
           lambda: set_rates(fleet.s3_url, error_rate=0.0, timeout_rate=0.0), OUTAGE_S)
    # kill -9 of an agent (its node is lost), then a new agent on the host.
    faults.append("kill agent")
    fleet.kill_agent(w3)
    steps_on(step + 3)
    fleet.start_agent(w3)
    step = running_on_three(step + 3)
    # kill -9 of the daemon: training goes on without it; then it comes back.
    faults.append("kill daemon")
    fleet.kill_daemon()
    fleet.start_daemon()
    step = running_on_three(step + 5)

    with fleet.client() as c:
        c.cancel(job_id)
    fleet.wait_job(job_id, lambda j: state_name(j.state) == "CANCELLED", 60, "the cancel")
    final = fleet.wait_job(job_id, lambda _j: True, 10, "the job")
    # Each kill, partition and rejoin above started a new generation (shrink, then grow).
    assert final.generation >= 7, final
    # The committed history crosses generations and reads each sample once per epoch.
    report = verify_ledger(str(ledger), dataset_size=DATASET, global_batch_size=BATCH)
    assert report.final_step >= step - 10 and len(report.generations) >= 3, report
    assert all(".json" in k and "-g" in k for k in manifests())
