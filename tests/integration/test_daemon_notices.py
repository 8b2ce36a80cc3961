"""The daemon drains a node on a notice it reads from a real SQS queue (a moto server on port 0)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import grpc
import pytest
from moto.server import ThreadedMotoServer

from spotwise.config import DaemonConfig
from spotwise.daemon.server import DaemonThread
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec

RPC_TIMEOUT_S = 5.0


@pytest.fixture
def queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint)
        yield endpoint, sqs.create_queue(QueueName="spot-notices")["QueueUrl"]
    finally:
        server.stop()


def spot_warning(instance_id: str) -> str:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return json.dumps({
        "version": "0", "id": f"ev-{instance_id}", "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2", "account": "123456789012", "time": now, "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1a:instance/{instance_id}"],
        "detail": {"instance-id": instance_id, "instance-action": "terminate"},
    })


def test_a_queued_spot_warning_drains_the_node_on_that_instance(tmp_path: Path,
                                                                queue: tuple[str, str]) -> None:
    endpoint, url = queue
    cfg = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state", heartbeat_interval_s=0.1,
                       lease_s=2.0, settle_s=0.1, tick_s=0.05, notice_queue_url=url,
                       notice_queue_endpoint_url=endpoint, notice_queue_wait_s=1)
    with DaemonThread(cfg) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        spec = JobSpec.model_validate({"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                                       "global_batch_size": 4, "nodes": {"min": 1, "max": 1}})
        job_id = jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec.to_proto()),
                                timeout=RPC_TIMEOUT_S).job_id
        registered = agents.Register(agent_pb2.RegisterRequest(
            address="10.0.0.1", store_port=5001, slots=1, instance_id="i-0abc123"),
            timeout=RPC_TIMEOUT_S)
        node_id = registered.node_id

        def beat() -> agent_pb2.Assignment:
            return agents.Heartbeat(agent_pb2.HeartbeatRequest(
                node_id=node_id, node_secret=registered.node_secret),
                                    timeout=RPC_TIMEOUT_S).assignment

        deadline = time.monotonic() + 10
        while beat().job_id != job_id:
            assert time.monotonic() < deadline, "never assigned"
            time.sleep(0.05)
        assert not beat().checkpoint_now

        sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=endpoint)
        sqs.send_message(QueueUrl=url, MessageBody=spot_warning("i-0abc123"))
        deadline = time.monotonic() + 15
        while not beat().checkpoint_now:  # the drain asks the members to checkpoint now
            assert time.monotonic() < deadline, "the queued notice did not drain the node"
            time.sleep(0.05)
        job = jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
        assert job.generation == 1  # nothing moves before the drain checkpoint (or deadline)
        stream = jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, replay=True),
                               timeout=RPC_TIMEOUT_S)
        notice = next(e for e in stream if e.kind == "notice")
        stream.cancel()
        assert "terminate" in notice.message and node_id in notice.message
