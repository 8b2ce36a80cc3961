"""The beat channel (spotwise.daemon.beats) on a real daemon: a registered node beats there and
gets its assignment; every hostile connection is refused and changes nothing; the real agent
uses it, and falls back to the gRPC stream when it cannot reach it."""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spotwise.common.beatwire import ANSWER, BEAT, HELLO, REFUSED, FrameReader, frame
from spotwise.config import DaemonConfig
from spotwise.daemon import beats
from spotwise.daemon.server import DaemonThread
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec
from tests.support.wait import until

RPC_TIMEOUT_S = 5.0


def config(state_dir: Path, **kw: object) -> DaemonConfig:
    base: dict[str, object] = {"listen": "127.0.0.1:0", "state_dir": state_dir,
                               "heartbeat_interval_s": 0.1, "lease_s": 5.0, "settle_s": 0.1,
                               "tick_s": 0.05, "grow_checkpoint_timeout_s": 0}
    base.update(kw)
    return DaemonConfig(**base)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonThread]:
    with DaemonThread(config(tmp_path / "state")) as d:
        yield d


def register(daemon: DaemonThread, address: str = "10.0.0.1",
             metadata: tuple = ()) -> agent_pb2.RegisterResponse:
    with grpc.insecure_channel(daemon.address) as ch:
        return agent_pb2_grpc.AgentServiceStub(ch).Register(agent_pb2.RegisterRequest(
            address=address, store_port=7000, slots=1), timeout=RPC_TIMEOUT_S, metadata=metadata)


class RawBeats:
    """A hand-made beat-channel client: whatever frames the test wants, on a plain socket."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=RPC_TIMEOUT_S)
        self.sock = tls.wrap_socket(sock, server_hostname="127.0.0.1") if tls else sock
        self.frames = FrameReader()
        self.pending: list[tuple[int, bytes]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def beat(self, node: agent_pb2.RegisterResponse, seq: int, **kw: object) -> None:
        req = agent_pb2.HeartbeatRequest(node_id=node.node_id, node_secret=node.node_secret,
                                         seq=seq, **kw)
        self.send(frame(BEAT, req.SerializeToString()))

    def read(self) -> tuple[int, bytes] | None:
        """The next frame; None when the daemon closed the connection."""
        while not self.pending:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)

    def close(self) -> None:
        self.sock.close()


def last_seen(daemon: DaemonThread, node_id: str) -> float:
    return daemon.call(lambda: daemon.daemon.coordinator.nodes[node_id].last_seen)


def test_a_node_beats_on_the_channel_and_gets_its_assignment(daemon: DaemonThread) -> None:
    node = register(daemon)
    assert node.beat_port and node.beat_port != daemon.daemon.port
    with grpc.insecure_channel(daemon.address) as ch:
        job_id = jobs_pb2_grpc.JobServiceStub(ch).SubmitJob(jobs_pb2.SubmitJobRequest(
            spec=JobSpec.model_validate({"entrypoint": ["python", "t.py"],
                                         "checkpoint": {"uri": "/tmp/ck"},
                                         "global_batch_size": 8}).to_proto()),
            timeout=RPC_TIMEOUT_S).job_id
    raw = RawBeats(node.beat_port)
    try:
        raw.send(frame(HELLO, b""))
        answers = []
        for seq in range(1, 40):
            raw.beat(node, seq)
            if seq % beats.ACK_EVERY == 0 or not answers:
                kind, payload = raw.read() or (0, b"")
                assert kind == ANSWER
                answers.append(agent_pb2.HeartbeatResponse.FromString(payload))
                if answers[-1].assignment.job_id:
                    break
            time.sleep(0.05)
        got = [a for a in answers if a.assignment.job_id]
        assert got and got[0].assignment.job_id == job_id and got[0].assignment.generation == 1
        # An answer says which beat it answers (an assignment pushed between beats says 0).
        assert answers[0].seq == 1
        assert daemon.call(lambda: list(daemon.daemon.beats.connections)) == [node.node_id]
    finally:
        raw.close()


@pytest.mark.parametrize("attack", [
    "oversized frame", "empty frame", "beat before hello", "wrong secret", "not a beat",
    "another node's beat", "unknown kind"])
def test_a_hostile_connection_is_refused_and_changes_nothing(daemon: DaemonThread,
                                                             attack: str) -> None:
    node, other = register(daemon, "10.0.0.1"), register(daemon, "10.0.0.2")
    before = {n.node_id: last_seen(daemon, n.node_id) for n in (node, other)}
    time.sleep(0.05)  # a beat that counted would move last_seen past this
    raw = RawBeats(node.beat_port)
    try:
        if attack == "oversized frame":
            raw.send((10**9).to_bytes(4, "big") + b"x" * 100)
        elif attack == "empty frame":
            raw.send(frame(HELLO, b"") + (0).to_bytes(4, "big"))
        elif attack == "beat before hello":
            raw.beat(node, 1)
        elif attack == "wrong secret":
            raw.send(frame(HELLO, b""))
            raw.beat(agent_pb2.RegisterResponse(node_id=node.node_id, node_secret="x" * 43), 1)
        elif attack == "not a beat":
            raw.send(frame(HELLO, b"") + frame(BEAT, b"\xff\xff\xff"))
        elif attack == "another node's beat":
            raw.send(frame(HELLO, b""))
            raw.beat(node, 1)
            assert raw.read() is not None  # the first beat is answered: bound to `node`
            before[node.node_id] = last_seen(daemon, node.node_id)
            raw.send(frame(BEAT, agent_pb2.HeartbeatRequest(
                node_id=other.node_id, seq=2).SerializeToString()))
        elif attack == "unknown kind":
            raw.send(frame(HELLO, b"") + frame(9, b"hello"))
        kind, reason = raw.read() or (0, b"")
        assert kind == REFUSED and reason, attack
        assert raw.read() is None  # then it closes
    finally:
        raw.close()
    assert {n.node_id: last_seen(daemon, n.node_id) for n in (node, other)} == before
    assert daemon.call(lambda: list(daemon.daemon.beats.connections)) == []


def test_a_silent_connection_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(beats, "HELLO_TIMEOUT_S", 0.3)
    with DaemonThread(config(tmp_path / "state")) as d:
        node = register(d)
        raw = RawBeats(node.beat_port)
        try:
            kind, reason = raw.read() or (0, b"")
            assert kind == REFUSED and b"no HELLO" in reason
            assert raw.read() is None
        finally:
            raw.close()


def test_tokens_are_checked_by_role_and_tls_is_required_when_the_daemon_has_it(
        tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from pki import make_credentials

    from spotwise.common.credentials import bearer_metadata

    creds = make_credentials(tmp_path / "pki")
    cfg = config(tmp_path / "state", tokens_file=str(creds.tokens_file),
                 tls_cert_file=str(creds.server_cert), tls_key_file=str(creds.server_key))
    with DaemonThread(cfg) as d:
        ca = grpc.ssl_channel_credentials(root_certificates=creds.ca_file.read_bytes())
        with grpc.secure_channel(d.address, ca) as ch:
            node = agent_pb2_grpc.AgentServiceStub(ch).Register(
                agent_pb2.RegisterRequest(address="10.0.0.1", store_port=7000, slots=1),
                timeout=RPC_TIMEOUT_S, metadata=bearer_metadata(creds.agent_token))
        before = last_seen(d, node.node_id)
        tls = ssl.create_default_context(cafile=str(creds.ca_file))
        for token, refusal in ((b"", b"UNAUTHENTICATED"), (b"not-a-token", b"UNAUTHENTICATED"),
                               (creds.client_token.encode(), b"PERMISSION_DENIED")):
            raw = RawBeats(node.beat_port, tls=tls)
            try:
                raw.send(frame(HELLO, token))
                raw.beat(node, 1)
                kind, reason = raw.read() or (0, b"")
                assert kind == REFUSED and reason.startswith(refusal), (token, reason)
            finally:
                raw.close()
        # Plaintext to a TLS channel gets no further than the handshake.
        raw = RawBeats(node.beat_port)
        try:
            raw.send(frame(HELLO, creds.agent_token.encode()))
            raw.beat(node, 1)
            assert raw.read() is None
        finally:
            raw.close()
        assert last_seen(d, node.node_id) == before
        # The agent's token over TLS: it beats.
        raw = RawBeats(node.beat_port, tls=tls)
        try:
            raw.send(frame(HELLO, creds.agent_token.encode()))
            raw.beat(node, 1)
            kind, _ = raw.read() or (0, b"")
            assert kind == ANSWER
            until(lambda: last_seen(d, node.node_id) > before, 5, "the beat to count")
        finally:
            raw.close()


def test_beat_listen_off_leaves_agents_on_the_grpc_stream(tmp_path: Path) -> None:
    with DaemonThread(config(tmp_path / "state", beat_listen="off")) as d:
        assert d.daemon.beats is None and register(d).beat_port == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("reachable", [True, False])
def test_the_real_agent_beats_on_the_channel_or_falls_back_to_the_stream(
        tmp_path: Path, reachable: bool) -> None:
    import os
    import sys
    import uuid

    from spotwise.cloud.local import LocalProvider
    from spotwise.cloud.provider import NodeRequest

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    provider = LocalProvider(log_dir=tmp_path / "logs", cluster=f"beats-{uuid.uuid4().hex[:8]}",
                             grace_s=5.0, env=env)
    with DaemonThread(config(tmp_path / "state", heartbeat_interval_s=0.2)) as d:
        coordinator = d.daemon.coordinator
        if not reachable:  # nothing listens there: the agent must beat on the gRPC stream
            closed = _free_port()
            d.call(lambda: setattr(coordinator.agents, "beat_port", closed))
        try:
            [handle] = [n.handle for n in provider.launch(
                NodeRequest(job_id="", daemon_address=d.address, slots=1), 1)]
            node_id = until(lambda: d.call(lambda: next(
                (n.row.id for n in coordinator.nodes.values()
                 if n.row.provider_node == handle), None)), 60, "the agent to register")
            first = last_seen(d, node_id)
            until(lambda: last_seen(d, node_id) > first + 1.0, 30, "a second of beats")
            on_channel = d.call(lambda: list(d.daemon.beats.connections))
            log = (tmp_path / "logs" / "agents" / f"{handle}.log").read_text()
            if reachable:
                assert on_channel == [node_id]
                assert "beating on the gRPC stream" not in log
            else:
                assert on_channel == []
                assert "beating on the gRPC stream" in log and str(closed) in log
            assert d.call(lambda: coordinator.nodes[node_id].state.value) != "LOST"
        finally:
            provider.shutdown()


def test_a_new_assignment_is_pushed_without_waiting_for_a_beat(daemon: DaemonThread) -> None:
    node = register(daemon)
    raw = RawBeats(node.beat_port)
    try:
        raw.send(frame(HELLO, b""))
        raw.beat(node, 1)  # binds the connection; answered (news: no assignment held yet)
        kind, _ = raw.read() or (0, b"")
        assert kind == ANSWER
        with grpc.insecure_channel(daemon.address) as ch:
            job_id = jobs_pb2_grpc.JobServiceStub(ch).SubmitJob(jobs_pb2.SubmitJobRequest(
                spec=JobSpec.model_validate({"entrypoint": ["python", "t.py"],
                                             "checkpoint": {"uri": "/tmp/ck"},
                                             "global_batch_size": 8}).to_proto()),
                timeout=RPC_TIMEOUT_S).job_id
        # No more beats: the generation's assignment comes on its own.
        kind, payload = raw.read() or (0, b"")
        pushed = agent_pb2.HeartbeatResponse.FromString(payload)
        assert kind == ANSWER and pushed.seq == 0
        assert pushed.assignment.job_id == job_id and pushed.assignment.generation == 1
    finally:
        raw.close()


def test_a_node_has_one_heartbeat_connection_on_either_transport(daemon: DaemonThread) -> None:
    """A node's newer connection replaces its older one, whichever transport each is on: a
    second beat connection refuses the first at once; a gRPC Heartbeats stream retires the
    beat connection (refused at its next beat), and a beat connection retires the stream
    (ABORTED at its next read)."""
    node = register(daemon)
    hello = agent_pb2.HeartbeatRequest(node_id=node.node_id, node_secret=node.node_secret)
    first, second = RawBeats(node.beat_port), RawBeats(node.beat_port)
    with grpc.insecure_channel(daemon.address) as ch:
        stream = ch.stream_stream("/spotwise.v1.AgentService/Heartbeats",
                                  request_serializer=agent_pb2.HeartbeatRequest.SerializeToString,
                                  response_deserializer=agent_pb2.HeartbeatResponse.FromString)
        try:
            for raw in (first, second):  # one after the other: the second replaces the first
                raw.send(frame(HELLO, b""))
                raw.beat(node, 1)
                assert (raw.read() or (0, b""))[0] == ANSWER
            kind, reason = first.read() or (0, b"")
            assert kind == REFUSED and b"replaced" in reason
            # A gRPC stream now: the beat connection is refused at its next beat.
            out: queue.Queue[agent_pb2.HeartbeatRequest | None] = queue.Queue()
            call = stream(iter(out.get, None), timeout=30)
            out.put(hello)
            assert not next(call).reregister
            second.beat(node, beats.ACK_EVERY)
            kind, reason = second.read() or (0, b"")
            assert kind == REFUSED and b"replaced" in reason
            # And a beat connection again: the stream is aborted at its next read.
            third = RawBeats(node.beat_port)
            try:
                third.send(frame(HELLO, b""))
                third.beat(node, 1)
                assert (third.read() or (0, b""))[0] == ANSWER
                out.put(agent_pb2.HeartbeatRequest())
                with pytest.raises(grpc.RpcError) as info:
                    next(call)
                assert info.value.code() is grpc.StatusCode.ABORTED
                assert daemon.call(lambda: list(daemon.daemon.beats.connections)) == [node.node_id]
            finally:
                third.close()
            out.put(None)
        finally:
            for raw in (first, second):
                raw.close()


def test_a_flood_of_refused_connections_logs_a_bounded_number_of_lines(
        daemon: DaemonThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spotwise.daemon.beats")
    node = register(daemon)
    for _ in range(60):
        raw = RawBeats(node.beat_port)
        try:
            raw.beat(node, 1)  # before HELLO: refused
            assert (raw.read() or (0, b""))[0] == REFUSED
        finally:
            raw.close()
    refused = [r for r in caplog.records if r.getMessage().startswith("beat channel: refused")]
    assert len(refused) == beats.REFUSAL_LOG_LINES
    assert daemon.call(lambda: daemon.daemon.beats.refusals.suppressed) == 60 - len(refused)
