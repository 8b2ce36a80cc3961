"""The agent protocol against a real daemon: the Heartbeats stream, versioned assignments,
per-node credentials, and reports only from whom they concern. Each attack asserts that it
fails and that nothing changed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spotwise.config import DaemonConfig
from spotwise.daemon.server import DaemonThread
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec
from tests.support.wait import until

RPC_TIMEOUT_S = 10.0


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonThread]:
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state",
                          heartbeat_interval_s=0.1, lease_s=3.0, settle_s=0.1, tick_s=0.05,
                          grow_checkpoint_timeout_s=0)
    with DaemonThread(config) as d:
        yield d


class Stream:
    """One Heartbeats stream, driven beat by beat from the test."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub) -> None:
        self._out: queue.Queue[agent_pb2.HeartbeatRequest | None] = queue.Queue()
        self._call = stub.Heartbeats(iter(self._out.get, None), timeout=60)

    def beat(self, req: agent_pb2.HeartbeatRequest) -> agent_pb2.HeartbeatResponse:
        self._out.put(req)
        return next(self._call)

    def close(self) -> None:
        self._out.put(None)
        self._call.cancel()


def submit(channel: grpc.Channel, **kw: object) -> str:
    spec: dict[str, object] = {"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/tmp/ck"},
                               "global_batch_size": 4, "nodes": {"min": 1, "max": 2}}
    spec.update(kw)
    return jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(
        jobs_pb2.SubmitJobRequest(spec=JobSpec.model_validate(spec).to_proto()),
        timeout=RPC_TIMEOUT_S).job_id


def register(stub: agent_pb2_grpc.AgentServiceStub, address: str, **kw: object
             ) -> agent_pb2.RegisterResponse:
    return stub.Register(agent_pb2.RegisterRequest(address=address, store_port=7000, slots=1,
                                                   **kw), timeout=RPC_TIMEOUT_S)


def test_the_stream_answers_every_beat_and_sends_the_assignment_only_when_it_changes(
        daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.address) as ch:
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        node = register(agents, "10.0.0.1")
        assert node.node_secret and node.heartbeat_interval_s == pytest.approx(0.1)
        stream = Stream(agents)
        try:
            first = stream.beat(agent_pb2.HeartbeatRequest(node_id=node.node_id,
                                                           node_secret=node.node_secret))
            assert not first.reregister and not first.assignment.job_id
            job_id = submit(ch, nodes={"min": 1, "max": 1})
            held = first.assignment_version

            def assigned() -> agent_pb2.HeartbeatResponse | None:
                resp = stream.beat(agent_pb2.HeartbeatRequest(assignment_version=held))
                return resp if resp.assignment.job_id == job_id else None

            got = until(assigned, 15, "the job's assignment on the stream")
            assert got.assignment.generation == 1 and got.assignment.world_size == 1
            # Holding that version, the next beats are answered without the assignment.
            for _ in range(3):
                again = stream.beat(agent_pb2.HeartbeatRequest(
                    job_id=job_id, generation=1, assignment_version=got.assignment_version))
                assert again.assignment_version == got.assignment_version
                assert not again.HasField("assignment")
        finally:
            stream.close()


def test_a_second_stream_of_a_node_replaces_the_first(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.address) as ch:
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        node = register(agents, "10.0.0.1")
        hello = agent_pb2.HeartbeatRequest(node_id=node.node_id, node_secret=node.node_secret)
        old, new = Stream(agents), Stream(agents)
        try:
            old.beat(hello)
            new.beat(hello)
            with pytest.raises(grpc.RpcError) as info:
                old.beat(agent_pb2.HeartbeatRequest())
            assert info.value.code() is grpc.StatusCode.ABORTED
            assert not new.beat(agent_pb2.HeartbeatRequest()).reregister
        finally:
            old.close()
            new.close()


def test_an_agent_token_cannot_act_as_another_node(daemon: DaemonThread) -> None:
    with grpc.insecure_channel(daemon.address) as ch:
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        victim = register(agents, "10.0.0.1")
        job_id = submit(ch, nodes={"min": 1, "max": 1},
                        env={"SECRET": "hunter2"})
        stream = Stream(agents)
        try:
            stream.beat(agent_pb2.HeartbeatRequest(node_id=victim.node_id,
                                                   node_secret=victim.node_secret))
            until(lambda: stream.beat(agent_pb2.HeartbeatRequest()).assignment.job_id == job_id,
                  15, "the victim's assignment")
            before = daemon.call(lambda: (
                daemon.daemon.coordinator.nodes[victim.node_id].row.address,
                daemon.daemon.coordinator.jobs[job_id].row.last_checkpoint_step))

            def denied(call: object) -> grpc.StatusCode:
                with pytest.raises(grpc.RpcError) as info:
                    call()  # type: ignore[operator]
                return info.value.code()

            # Re-register the victim's id at another address (to become master_addr).
            assert denied(lambda: register(agents, "10.6.6.6", node_id=victim.node_id)) \
                is grpc.StatusCode.PERMISSION_DENIED
            assert denied(lambda: register(agents, "10.6.6.6", node_id=victim.node_id,
                                           node_secret="guess")) is grpc.StatusCode.PERMISSION_DENIED
            # Heartbeat as the victim (and be handed its job's spec and env).
            assert denied(lambda: agents.Heartbeat(agent_pb2.HeartbeatRequest(
                node_id=victim.node_id), timeout=RPC_TIMEOUT_S)) is grpc.StatusCode.PERMISSION_DENIED
            thief = Stream(agents)
            try:
                assert denied(lambda: thief.beat(agent_pb2.HeartbeatRequest(
                    node_id=victim.node_id, node_secret="x"))) is grpc.StatusCode.PERMISSION_DENIED
            finally:
                thief.close()
            # Report a commit or a failure for the victim.
            fake = agent_pb2.ReportEventRequest(node_id=victim.node_id, job_id=job_id,
                                                generation=1)
            fake.checkpoint_committed.step = 999_999_999
            assert denied(lambda: agents.ReportEvent(fake, timeout=RPC_TIMEOUT_S)) \
                is grpc.StatusCode.PERMISSION_DENIED
            # A node of its own (valid credential) that is no member: its commit is refused.
            intruder = register(agents, "10.0.0.9")
            fake.node_id, fake.node_secret = intruder.node_id, intruder.node_secret
            refused = agents.ReportEvent(fake, timeout=RPC_TIMEOUT_S)
            assert not refused.accepted and "no member" in refused.reason
            # The member itself may not report a foreign path, nor another rank's exit.
            own = agent_pb2.ReportEventRequest(node_id=victim.node_id,
                                               node_secret=victim.node_secret, job_id=job_id,
                                               generation=1)
            own.checkpoint_committed.step = 7
            own.checkpoint_committed.path = "/tmp/ck/job-someone-else/data/step-0000000007-g1"
            assert not agents.ReportEvent(own, timeout=RPC_TIMEOUT_S).accepted
            exit_ = agent_pb2.ReportEventRequest(node_id=victim.node_id,
                                                 node_secret=victim.node_secret, job_id=job_id,
                                                 generation=1)
            exit_.process_exited.rank, exit_.process_exited.exit_code = 5, 1
            assert not agents.ReportEvent(exit_, timeout=RPC_TIMEOUT_S).accepted
            # Nor on its heartbeat (which carries its processes' exits).
            stream.beat(agent_pb2.HeartbeatRequest(
                job_id=job_id, generation=1,
                processes=[agent_pb2.ProcessStatus(rank=5, running=False, exit_code=1)]))
            after = daemon.call(lambda: (
                daemon.daemon.coordinator.nodes[victim.node_id].row.address,
                daemon.daemon.coordinator.jobs[job_id].row.last_checkpoint_step))
            assert after == before == ("10.0.0.1", -1)
            assert daemon.call(lambda: dict(daemon.daemon.coordinator.jobs[job_id].exit_codes)) == {}
            job = jobs_pb2_grpc.JobServiceStub(ch).GetJob(jobs_pb2.GetJobRequest(job_id=job_id),
                                                          timeout=RPC_TIMEOUT_S)
            assert job.generation == 1 and job.state != jobs_pb2.JOB_STATE_FAILED
        finally:
            stream.close()


def test_an_agent_token_cannot_claim_a_live_nodes_machine(daemon: DaemonThread) -> None:
    """The fleet drains, bills and terminates machines through the instance id and provider
    node a node registered with: another registration may not name them while that node
    lives (ABORTED, which agents retry), and nothing changes; once it is lost, a node on that
    machine (an agent restarted without its credential) registers."""
    coordinator = daemon.daemon.coordinator
    with grpc.insecure_channel(daemon.address) as ch:
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        victim = register(agents, "10.0.0.1", instance_id="i-victim", provider_node="local-1")
        intruder = register(agents, "10.0.0.9", instance_id="i-intruder")
        stream = Stream(agents)
        stream.beat(agent_pb2.HeartbeatRequest(node_id=victim.node_id,
                                               node_secret=victim.node_secret))
        before = daemon.call(lambda: (sorted(coordinator.nodes),
                                      coordinator.nodes[intruder.node_id].row.instance_id,
                                      dict(coordinator.state.by_instance),
                                      dict(coordinator.state.by_provider_node)))

        def aborted(**kw: object) -> str:
            with pytest.raises(grpc.RpcError) as info:
                register(agents, "10.6.6.6", **kw)
            assert info.value.code() is grpc.StatusCode.ABORTED, info.value.details()
            return info.value.details()

        assert victim.node_id in aborted(instance_id="i-victim")
        assert victim.node_id in aborted(provider_node="local-1")
        # A node of its own, with its credential, may not move onto the victim's machine.
        aborted(node_id=intruder.node_id, node_secret=intruder.node_secret,
                instance_id="i-victim")
        after = daemon.call(lambda: (sorted(coordinator.nodes),
                                     coordinator.nodes[intruder.node_id].row.instance_id,
                                     dict(coordinator.state.by_instance),
                                     dict(coordinator.state.by_provider_node)))
        assert after == before
        assert before[2]["i-victim"] == victim.node_id
        # The cloud's notice for the victim's instance still reaches the victim.
        assert daemon.call(lambda: coordinator.agents.cloud_notice(
            "i-victim", "terminate", coordinator.clock() + 120, coordinator.clock()))
        assert daemon.call(lambda: coordinator.nodes[victim.node_id].row.drain_deadline)

        stream.close()  # the victim falls silent: lost at its lease's end
        until(lambda: daemon.call(lambda: coordinator.nodes[victim.node_id].row.state)
              == "LOST", 15, "the victim lost")
        again = register(agents, "10.0.0.2", instance_id="i-victim", provider_node="local-1")
        assert again.node_id != victim.node_id
        assert daemon.call(lambda: (coordinator.state.by_instance["i-victim"],
                                    coordinator.state.by_provider_node["local-1"])) \
            == (again.node_id, again.node_id)


def test_a_node_credential_survives_a_daemon_restart(tmp_path: Path) -> None:
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state",
                          heartbeat_interval_s=0.1, lease_s=3.0, tick_s=0.05)
    with DaemonThread(config) as first, grpc.insecure_channel(first.address) as ch:
        node = register(agent_pb2_grpc.AgentServiceStub(ch), "10.0.0.1")
    with DaemonThread(config) as second, grpc.insecure_channel(second.address) as ch:
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        again = register(agents, "10.0.0.1", node_id=node.node_id, node_secret=node.node_secret)
        assert again.node_id == node.node_id and not again.node_secret  # kept, not reissued
        with pytest.raises(grpc.RpcError) as info:
            register(agents, "10.0.0.1", node_id=node.node_id)
        assert info.value.code() is grpc.StatusCode.PERMISSION_DENIED
        stored = second.daemon.store.nodes()  # type: ignore[union-attr]
        assert [n.secret_hash for n in stored if n.id == node.node_id] != [""]
        assert node.node_secret not in str(stored)  # only its hash is kept


def test_registrations_answer_after_their_write_commits(daemon: DaemonThread) -> None:
    """Many agents register at once: every answer's node is already in the database."""
    with grpc.insecure_channel(daemon.address) as ch:
        agents = agent_pb2_grpc.AgentServiceStub(ch)
        ids: list[str] = []
        lock = threading.Lock()
        store = daemon.daemon.store
        batches: list[int] = []
        write = store.write_batch  # type: ignore[union-attr]

        def counting(batch: object) -> None:
            batches.append(sum(1 for table, _, _ in batch.rows if table == "nodes"))  # type: ignore[attr-defined]
            write(batch)  # type: ignore[arg-type]

        store.write_batch = counting  # type: ignore[union-attr,method-assign]

        def one(k: int) -> None:
            node_id = register(agents, f"10.0.1.{k}").node_id
            stored = {n.id for n in daemon.daemon.store.nodes()}  # type: ignore[union-attr]
            assert node_id in stored
            with lock:
                ids.append(node_id)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(ids) == 40
        # Batched: fewer transactions than registrations, several nodes in one of them.
        assert sum(batches) >= 40 and len([b for b in batches if b]) < 40 and max(batches) > 1
