"""The beat channel: agents' heartbeats as TLS frames on a port of their own.

A heartbeat on the gRPC Heartbeats stream costs the daemon about 0.4 ms of CPU in Python's
gRPC alone (bench/grpc_floor.py), so 2,000 agents at 2 Hz would take more than one core. Here a
beat is one frame read by an asyncio protocol: about a tenth of that. Register, reports and
everything else stay on gRPC; an agent whose Register answer names no beat port (or that cannot
reach it) beats on the Heartbeats stream as before.

Wire format, both ways: frames of a 4-byte big-endian length N (1 <= N <= MAX_FRAME) followed
by N bytes, the first of which is the frame's kind:

- agent -> daemon: HELLO (the agent's bearer token, UTF-8; empty without tokens), once, first;
  then BEAT (a spotwise.v1.HeartbeatRequest: the first names node_id and node_secret and binds
  the connection to that node; each carries seq, its number on the connection).
- daemon -> agent: ANSWER (a spotwise.v1.HeartbeatResponse carrying the seq it answers), for a
  beat whose answer has news (an assignment, "register again") and for every ACK_EVERY-th
  beat (so the agent knows the daemon hears it); REFUSED (a reason, UTF-8), then it closes.

The same TLS and token rules as the gRPC port hold (spotwise.daemon.auth.check_listen); a
connection that says nothing for HELLO_TIMEOUT_S, sends a malformed frame, or speaks for another
node is closed, and nothing it sent changes the state; at most REFUSAL_LOG_LINES refusals a
minute are logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from spotwise.common.beatwire import (
    ACK_EVERY,
    ANSWER,
    BEAT,
    HELLO,
    REFUSED,
    FrameError,
    FrameReader,
    frame,
)
from spotwise.daemon.agents import NodeCredentialError
from spotwise.daemon.log_budget import LogBudget
from spotwise.proto.v1 import agent_pb2

if TYPE_CHECKING:
    from spotwise.config import DaemonConfig
    from spotwise.daemon.auth import TokenStore
    from spotwise.daemon.coordinator import Coordinator

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 10.0
"""A connection must have said HELLO and its first BEAT within this time."""
HEARTBEATS_METHOD = "/spotwise.v1.AgentService/Heartbeats"
"""The gRPC method whose access rule the channel follows (the agent role may beat)."""
REFUSAL_LOG_LINES = 20
"""Refused connections logged per minute; the rest are counted in one line (see LogBudget):
anyone who reaches the port may open connections as fast as the network allows."""


class _Connection(asyncio.Protocol):
    """One agent's connection: HELLO, then beats of one node."""

    def __init__(self, server: BeatServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.hello = False
        self.node_id = ""
        self.peer = "?"
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is no asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._deadline = asyncio.get_running_loop().call_later(
            HELLO_TIMEOUT_S, self._refuse, f"no HELLO and first beat within {HELLO_TIMEOUT_S:g}s")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.node_id:
            self.server.coordinator.agents.unbind(self.node_id, self)

    def retire(self) -> None:
        """A newer connection of this node (on this channel or a gRPC stream) replaced it."""
        self._refuse("a newer heartbeat connection of this node replaced this one")

    def _refuse(self, reason: str) -> None:
        self.server.refusals.log(logging.INFO, "beat channel: refused %s%s: %s", self.peer,
                                 f" (node {self.node_id})" if self.node_id else "", reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(REFUSED, reason.encode()[:1000]))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameError as exc:
            self._refuse(str(exc))
            return
        for kind, payload in frames:
            if self.transport is None or self.transport.is_closing():
                return
            if kind == BEAT and self.node_id:
                self._beat(payload)  # the hot path: one node, already authenticated
            elif kind == HELLO and not self.hello:
                self._hello(payload)
            elif kind == BEAT and self.hello:
                self._first_beat(payload)
            else:
                self._refuse(f"unexpected frame of kind {kind}")

    def _hello(self, payload: bytes) -> None:
        why = self.server.check_token(payload)
        if why:
            self._refuse(why)
            return
        self.hello = True

    def _first_beat(self, payload: bytes) -> None:
        req = self._decode(payload)
        if req is None:
            return
        coordinator = self.server.coordinator
        if req.node_id not in coordinator.nodes:
            # As on the stream: a node the daemon does not know registers again.
            self._send(agent_pb2.HeartbeatResponse(reregister=True, seq=req.seq))
            return
        try:
            coordinator.agents.authenticate(req.node_id, req.node_secret)
        except NodeCredentialError as exc:
            self._refuse(str(exc))
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.node_id = req.node_id
        coordinator.agents.bind(req.node_id, self)  # retires its older connection, if any
        self._answer(req)

    def _beat(self, payload: bytes) -> None:
        req = self._decode(payload)
        if req is None:
            return
        if req.node_id and req.node_id != self.node_id:
            self._refuse("a beat connection speaks for one node")
            return
        self._answer(req)

    def _answer(self, req: agent_pb2.HeartbeatRequest) -> None:
        server = self.server
        started = time.perf_counter()
        resp = server.coordinator.agents.beat(server.coordinator.nodes.get(self.node_id), req,
                                              server.clock())
        if resp.reregister or resp.HasField("assignment") or req.seq % ACK_EVERY == 0:
            if resp.reregister:  # a shared answer: not to be written on
                resp = agent_pb2.HeartbeatResponse(reregister=True)
            resp.seq = req.seq
            self._send(resp)
        metrics = server.coordinator.metrics
        if metrics is not None:
            metrics.observe_heartbeat_latency(time.perf_counter() - started)

    def _send(self, resp: agent_pb2.HeartbeatResponse) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(ANSWER, resp.SerializeToString()))

    def _decode(self, payload: bytes) -> agent_pb2.HeartbeatRequest | None:
        try:
            return agent_pb2.HeartbeatRequest.FromString(payload)
        except DecodeError:
            self._refuse("a beat that is not a HeartbeatRequest")
            return None


class BeatServer:
    """The beat channel's listener, on the daemon's event loop."""

    def __init__(self, coordinator: Coordinator, *, tokens: TokenStore | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.coordinator = coordinator
        self.tokens = tokens
        self.clock = clock
        self.refusals = LogBudget(log, what="refused beat connections", lines=REFUSAL_LOG_LINES)
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    @property
    def connections(self) -> dict[str, _Connection]:
        """Node id -> its connection on this channel: the nodes of the agent protocol's one
        heartbeat connection per node (`AgentProtocol.beating`) that beat here."""
        return {node_id: conn for node_id, conn in self.coordinator.agents.beating.items()
                if isinstance(conn, _Connection)}

    def check_token(self, payload: bytes) -> str:
        """Why a HELLO's token may not beat ("": it may)."""
        if self.tokens is None:
            return ""
        from spotwise.daemon.auth import AccessPolicy, decide_access

        try:
            token = payload.decode()
        except UnicodeDecodeError:
            return "a HELLO token that is not UTF-8"
        decision = decide_access(HEARTBEATS_METHOD, token or None, self.tokens, AccessPolicy())
        return "" if decision.allowed else f"{decision.code.name}: {decision.reason}"

    def push(self, node_ids: list[str]) -> None:
        """Send the new assignments of these nodes now, to those on the channel (seq 0: no
        beat asked), rather than at their next beat: a generation starts half a heartbeat
        interval sooner."""
        answer, beating = self.coordinator.assignments.answer, self.coordinator.agents.beating
        for node_id in node_ids:
            conn = beating.get(node_id)
            if isinstance(conn, _Connection):
                conn._send(answer(node_id, -1))

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None) -> int:
        """Listen on host:port (0: a free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                ssl=ssl_context, backlog=4096,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("beat channel on %s:%d (%s)", host, self.port,
                 "TLS" if ssl_context is not None else "plaintext")
        return self.port

    async def stop(self) -> None:
        if self.coordinator.assignments.on_change == self.push:
            self.coordinator.assignments.on_change = None
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections.values()):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            self._server = None


def server_ssl_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                       client_ca_file: str | os.PathLike[str] | None = None,
                       require_client_cert: bool = False) -> ssl.SSLContext:
    """The same TLS as server_credentials, for a listener that is not gRPC's (the beat
    channel): a client certificate from `client_ca_file` is checked when sent, and required
    with `require_client_cert`."""
    if require_client_cert and not client_ca_file:
        raise ValueError("mutual TLS needs client_ca_file to verify client certificates")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    if client_ca_file:
        context.load_verify_locations(cafile=os.fspath(client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return context


async def start_beats(coordinator: Coordinator, config: DaemonConfig, *,
                      tokens: TokenStore | None, clock: Callable[[], float]
                      ) -> BeatServer | None:
    """The beat channel as the config says (None: beat_listen "off"): beat_listen, or the
    gRPC listen host on a free port, with the gRPC port's TLS. Raises RuntimeError, saying
    what to fix, when the address or a file is refused."""
    from spotwise.common.address import split_host_port
    from spotwise.daemon.auth import check_listen

    if config.beat_listen == "off":
        coordinator.agents.beat_port = 0
        return None
    try:
        if config.beat_listen:
            host, port = split_host_port(config.beat_listen)
        else:
            host, port = split_host_port(config.listen)[0], 0
        address = f"{host}:{port}"
        tls = bool(config.tls_cert_file)
        check_listen(address, tls, config.allow_insecure, tokens_enabled=tokens is not None)
        context = server_ssl_context(
            config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file or None,
            config.tls_require_client_cert) if tls else None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"beat channel: {exc}") from exc
    server = BeatServer(coordinator, tokens=tokens, clock=clock)
    try:
        await server.start(host.strip("[]") or "0.0.0.0", port, context)
    except OSError as exc:
        raise RuntimeError(f"beat channel: cannot listen on {address}: {exc}") from exc
    coordinator.agents.beat_port = server.port  # told to agents at Register
    coordinator.assignments.on_change = server.push
    return server

