"""Duplicate, late and malformed interruption notices are harmless.

- At the agent: a real `spotwise agent` subprocess polls a fake IMDSv2 that answers first a
  malformed body and an unknown action (ignored; the agent lives on and drains nothing), then one
  valid notice that stays visible poll after poll, as AWS keeps it (reported once: one drain,
  one notice event).
- At the daemon: a notice whose deadline is already past moves the job on without the node at
  once; the same notice again (from the agent or the queue) changes nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spotwise.cloud.fake_imds import FakeImds
from spotwise.cloud.imds import INSTANCE_ACTION_PATH
from spotwise.cloud.local import stop_process_group
from spotwise.config import DaemonConfig
from spotwise.daemon.controller import NodeState
from spotwise.daemon.server import DaemonThread
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec
from tests.support.wait import until as _until

RPC_TIMEOUT_S = 5.0
REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path) -> DaemonConfig:
    return DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state",
                        heartbeat_interval_s=0.2, lease_s=3.0, settle_s=0.1, tick_s=0.05,
                        drain_margin_s=0.5, grow_checkpoint_timeout_s=0)


def _spec(nodes_max: int) -> JobSpec:
    return JobSpec.model_validate({
        "entrypoint": ["python", "-c", "import time; time.sleep(300)"],
        "checkpoint": {"uri": "/tmp/spotwise-notice-inputs"}, "global_batch_size": 4,
        "nodes": {"min": 1, "max": nodes_max}})


def _notice_events(d: DaemonThread, job_id: str) -> list[str]:
    return d.call(lambda: [e.message for e in d.daemon.store.events(job_id)  # type: ignore[union-attr]
                           if e.kind == "notice"])  # type: ignore[return-value]


def _node_state(d: DaemonThread, node_id: str) -> NodeState:
    return d.call(lambda: d.daemon.coordinator.nodes[node_id].state)  # type: ignore[union-attr,return-value]


@pytest.fixture
def agent_and_imds(tmp_path: Path) -> Iterator[tuple[DaemonThread, FakeImds, subprocess.Popen]]:
    with DaemonThread(_config(tmp_path)) as d, FakeImds(instance_id="i-0notice0000000001") as imds:
        env = dict(os.environ, SPOTWISE_AGENT_IMDS_POLL_S="1", OMP_NUM_THREADS="1")
        agent = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", "agent", "--daemon", d.address,
             "--imds-endpoint", imds.url, "--state-dir", str(tmp_path / "agent"),
             "--log-dir", str(tmp_path / "logs"), "--grace-s", "2"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.log", "wb"), env=env,
            cwd=REPO, start_new_session=True)
        try:
            yield d, imds, agent
        finally:
            stop_process_group(agent)


@pytest.mark.slow
def test_agent_ignores_malformed_notices_and_reports_a_repeated_one_once(
        agent_and_imds: tuple[DaemonThread, FakeImds, subprocess.Popen]) -> None:
    d, imds, agent = agent_and_imds
    with grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job_id = jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=_spec(1).to_proto()),
                                timeout=RPC_TIMEOUT_S).job_id
        job = _until(lambda: (j := jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id),
                                                timeout=RPC_TIMEOUT_S)).world_size == 1 and j,
                     60, "the agent to join the job")
        (node_id,) = job.node_ids

        # Malformed: not JSON, then JSON with an action AWS never sends.
        imds.set_raw(INSTANCE_ACTION_PATH, "{not json")
        polls = imds.count("GET", INSTANCE_ACTION_PATH)
        _until(lambda: imds.count("GET", INSTANCE_ACTION_PATH) >= polls + 2, 10, "two polls")
        imds.set_raw(INSTANCE_ACTION_PATH, '{"action": "explode", "time": "2026-01-01T00:00:00Z"}')
        polls = imds.count("GET", INSTANCE_ACTION_PATH)
        _until(lambda: imds.count("GET", INSTANCE_ACTION_PATH) >= polls + 2, 10, "two polls")
        assert agent.poll() is None
        assert _node_state(d, node_id) is NodeState.ASSIGNED
        assert _notice_events(d, job_id) == []

        # A valid notice, visible at every poll from now on (AWS keeps answering it).
        imds.clear()
        imds.schedule_instance_action("terminate", after_s=0, lead_s=120)
        _until(lambda: _node_state(d, node_id) is NodeState.DRAINING, 10, "the drain")
        polls = imds.count("GET", INSTANCE_ACTION_PATH, 200)
        _until(lambda: imds.count("GET", INSTANCE_ACTION_PATH, 200) >= polls + 3, 10,
               "three more polls of the same notice")
        events = _notice_events(d, job_id)
        assert len(events) == 1, events
        assert "terminate" in events[0] and node_id in events[0]
        assert agent.poll() is None


SECRETS: dict[str, str] = {}
"""Node id -> the credential its Register issued."""


def _register(agents: agent_pb2_grpc.AgentServiceStub, instance_id: str) -> str:
    resp = agents.Register(agent_pb2.RegisterRequest(
        address="127.0.0.1", store_port=5001, slots=1, instance_id=instance_id),
        timeout=RPC_TIMEOUT_S)
    SECRETS[resp.node_id] = resp.node_secret
    return resp.node_id


def test_daemon_takes_late_and_duplicate_notices_in_stride(tmp_path: Path) -> None:
    with DaemonThread(_config(tmp_path)) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        job_id = jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=_spec(2).to_proto()),
                                timeout=RPC_TIMEOUT_S).job_id
        a, b = _register(agents, "i-0aaaa"), _register(agents, "i-0bbbb")

        def beat(node: str) -> agent_pb2.Assignment:
            return agents.Heartbeat(agent_pb2.HeartbeatRequest(node_id=node,
                                                               node_secret=SECRETS[node]),
                                    timeout=RPC_TIMEOUT_S).assignment

        def world() -> jobs_pb2.Job:
            beat(a), beat(b)
            return jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)

        job = _until(lambda: (j := world()).world_size == 2 and j, 15, "world 2")
        generation = job.generation

        # A notice whose deadline passed 30 s ago: nothing to wait for, b leaves at once.
        late = agent_pb2.ReportEventRequest(
            node_id=b, node_secret=SECRETS[b], job_id=job_id, generation=generation, time=time.time(),
            interruption_notice=agent_pb2.InterruptionNotice(action="terminate",
                                                             deadline=time.time() - 30))
        assert agents.ReportEvent(late, timeout=RPC_TIMEOUT_S).accepted
        job = _until(lambda: (j := world()).generation > generation and j, 5, "the next generation")
        assert list(job.node_ids) == [a]
        assert _node_state(d, b) is NodeState.DRAINING

        # The same notice again (a duplicate delivery): refused as stale, nothing moves.
        again = agents.ReportEvent(late, timeout=RPC_TIMEOUT_S)
        assert not again.accepted
        # And from the queue path, by instance id: the node stays DRAINING, the job stays put.
        assert d.call(lambda: d.daemon.coordinator.cloud_notice(  # type: ignore[union-attr]
            "i-0bbbb", "terminate", time.time() - 30))
        for _ in range(5):
            job2 = world()
            time.sleep(0.1)
        assert job2.generation == job.generation and list(job2.node_ids) == [a]
        assert _node_state(d, b) is NodeState.DRAINING
        assert _running_or_rescaling(job2.state)
        # b is never given work again.
        assert beat(b).job_id == ""


def _running_or_rescaling(state: int) -> bool:
    return jobs_pb2.JobState.Name(state) in ("JOB_STATE_RUNNING", "JOB_STATE_RESCALING")
