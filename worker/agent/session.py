"""The agent's connection to the daemon: credentials, Register, the Heartbeats stream, reports.

The fleet's agent token is an enrollment credential: the first Register answers with the
node's own secret, which every later call of this node carries (the daemon keeps only its
hash; another agent token cannot register, heartbeat or report as this node). Beats travel on
one long-lived stream (`AgentService.Heartbeats`): one message per beat each way, far cheaper
than a unary call; a daemon without the stream (UNIMPLEMENTED) gets unary Heartbeat calls.
The answer carries the assignment only when it changed (`assignment_version`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from spotwise.config import AgentConfig
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger("spotwise.worker.agent")

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.ABORTED})
"""Codes that mean "the daemon is not there right now" (or replaced this stream): retry."""
UNKNOWN_NODE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})
"""Codes that mean "the daemon does not know this node": register again."""


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace stripped). OSError if unreadable,
    ValueError if empty."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def agent_token(config: AgentConfig, token: str | None) -> str | None:
    """The enrollment token: `token`, else config.token_file's content, else
    $SPOTWISE_AGENT_TOKEN or $SPOTWISE_TOKEN."""
    if token is None and config.token_file:
        token = read_token_file(config.token_file)
    if token is not None:
        return token
    return os.environ.get("SPOTWISE_AGENT_TOKEN") or os.environ.get("SPOTWISE_TOKEN")


class HeartbeatStream:
    """One open Heartbeats stream (or unary calls, for a daemon without it)."""

    def __init__(self, stub: agent_pb2_grpc.AgentServiceStub, *, metadata: tuple,
                 timeout_s: float) -> None:
        self._stub = stub
        self._metadata = metadata
        self._timeout_s = timeout_s
        self._call: aio.StreamStreamCall | None = None
        self.unary = False

    async def beat(self, req: agent_pb2.HeartbeatRequest) -> agent_pb2.HeartbeatResponse:
        """Send one beat and read its answer. Raises aio.AioRpcError when the stream breaks
        (the next beat opens a new one)."""
        if self.unary:
            return await self._stub.Heartbeat(req, timeout=self._timeout_s,
                                              metadata=self._metadata)
        if self._call is None:
            self._call = self._stub.Heartbeats(metadata=self._metadata)
        call = self._call
        try:
            await asyncio.wait_for(call.write(req), self._timeout_s)
            resp = await asyncio.wait_for(call.read(), self._timeout_s)
        except asyncio.TimeoutError:
            self.close()
            raise _timeout() from None
        except aio.AioRpcError as e:
            self.close()
            if e.code() is grpc.StatusCode.UNIMPLEMENTED:
                log.info("the daemon has no Heartbeats stream: unary heartbeats")
                self.unary = True
                return await self.beat(req)
            raise
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            # The call ended under us (the daemon closed it): read its status as the error.
            self.close()
            raise _ended(call) from None
        if resp is aio.EOF:
            self.close()
            raise _ended(call)
        return resp

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class _StreamEnded(aio.AioRpcError):
    pass


def _ended(call: aio.StreamStreamCall) -> aio.AioRpcError:
    return _StreamEnded(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(),
                        details="the daemon ended the heartbeat stream")


def _timeout() -> aio.AioRpcError:
    return _StreamEnded(grpc.StatusCode.DEADLINE_EXCEEDED, aio.Metadata(), aio.Metadata(),
                        details="no heartbeat answer in time")


class Credential:
    """This node's id and secret, kept under the agent's state dir when the node id is
    configured (so that a restarted agent with the same --node-id can register again)."""

    def __init__(self, path: Path | None, node_id: str) -> None:
        self.path = path
        self.node_id = node_id
        self.secret = ""
        if path is not None and node_id:
            try:
                self.secret = path.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                pass

    def update(self, node_id: str, secret: str) -> None:
        self.node_id = node_id
        if not secret:
            return  # a re-register keeps the credential it presented
        self.secret = secret
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secret)

    def forget(self) -> None:
        """The daemon does not accept this node: join as a new one next time."""
        self.node_id, self.secret = "", ""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]
"""The agent's channel pings the daemon, so a stream to a daemon that vanished breaks."""


def is_transient(e: aio.AioRpcError) -> bool:
    return e.code() in TRANSIENT


def register_request(config: AgentConfig, credential: Credential, *, store_port: int,
                     running: Any, log_dir: Path) -> agent_pb2.RegisterRequest:
    """What this node says of itself when it registers (`running`: the LaunchSpec of the
    generation it runs, for a restarted daemon to reconcile)."""
    c = config
    return agent_pb2.RegisterRequest(
        node_id=credential.node_id, node_secret=credential.secret,
        instance_id=c.instance_id, instance_type=c.instance_type, zone=c.zone,
        lifecycle=c.lifecycle, gpus=c.gpus, slots=c.slots, address=c.address,
        store_port=store_port, price_per_hour=c.price_per_hour,
        current_job_id=running.job_id if running else "",
        current_generation=running.generation if running else 0,
        log_dir=str(log_dir), provider_node=c.provider_node)


def heartbeat_request(credential: Credential, held_version: int, current: Any,
                      start_failed: list[agent_pb2.ProcessStatus]) -> agent_pb2.HeartbeatRequest:
    """One beat: what runs (the Supervisor `current`, polled now) and the version held."""
    req = agent_pb2.HeartbeatRequest(node_id=credential.node_id, node_secret=credential.secret,
                                     assignment_version=held_version)
    if current is not None:
        req.job_id, req.generation = current.spec.job_id, current.spec.generation
        current.poll()
        for p in current.processes:
            req.processes.add(local_rank=p.local_rank, rank=p.rank, pid=p.pid,
                              running=p.running, exit_code=p.exit_code or 0)
        req.processes.extend(start_failed)
    return req
