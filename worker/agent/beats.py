"""The agent's side of the beat channel (the protocol: spotwise.daemon.beats).

`BeatChannel.beat(req)` sends one beat and returns at once: the answer with news (an
assignment, "register again") that arrived since the last beat, or a plain "nothing new".
Answers arrive on their own (the daemon sends one for each beat with news and for every
ACK_EVERY-th beat), and `news` is set when one with news does, so the heartbeat loop can act on
it before its next beat. A daemon that answers nothing for `silence_s` counts as unreachable
(a half-open connection after a partition looks exactly like a quiet one otherwise).

Errors are raised as grpc.aio.AioRpcError, as the Heartbeats stream raises them, so the
heartbeat loop handles both alike: UNAVAILABLE for a connection that fails or goes silent,
PERMISSION_DENIED when the daemon refuses the node, and BeatUnreachable when the channel cannot
be reached at all (the loop then beats on the gRPC stream for a while).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import grpc
from grpc import aio

from spotwise.common.beatwire import ANSWER, BEAT, HELLO, REFUSED, FrameError, FrameReader, frame
from spotwise.proto.v1 import agent_pb2

log = logging.getLogger("spotwise.worker.agent")

READ_CHUNK = 64 * 1024


def _error(code: grpc.StatusCode, details: str) -> aio.AioRpcError:
    return aio.AioRpcError(code, aio.Metadata(), aio.Metadata(), details=details)


class BeatUnreachable(aio.AioRpcError):
    """The beat channel cannot be reached (connect or TLS handshake failed)."""


class BeatChannel:
    """One beat connection of one registration."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, token: str,
                 timeout_s: float, silence_s: float) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.token = token
        self.timeout_s = timeout_s
        self.silence_s = silence_s
        self.news = asyncio.Event()
        """Set when an answer with news arrived (cleared when beat() hands it out)."""
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._seq = 0
        self._pending: agent_pb2.HeartbeatResponse | None = None
        self._refused = ""
        self._failed = ""
        self._last_answer = 0.0

    async def _connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.host, self.port, ssl=self.ssl_context,
                server_hostname=self.host if self.ssl_context is not None else None,
                limit=READ_CHUNK), self.timeout_s)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            raise BeatUnreachable(grpc.StatusCode.UNAVAILABLE, aio.Metadata(), aio.Metadata(),
                                  details=f"beat channel {self.host}:{self.port}: "
                                  f"{exc or type(exc).__name__}") from None
        writer.write(frame(HELLO, self.token.encode()))
        self._writer = writer
        self._seq = 0
        self._refused = self._failed = ""
        self._last_answer = time.monotonic()
        self._reader_task = asyncio.create_task(self._read(reader), name="beat-reader")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        frames = FrameReader()
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    self._failed = self._failed or "the daemon closed the beat connection"
                    return
                for kind, payload in frames.feed(data):
                    self._last_answer = time.monotonic()
                    if kind == REFUSED:
                        self._refused = payload.decode(errors="replace")
                        return
                    if kind == ANSWER:
                        self._take(agent_pb2.HeartbeatResponse.FromString(payload))
        except (OSError, ssl.SSLError, FrameError, ValueError) as exc:
            self._failed = f"beat connection broken: {exc}"
        finally:
            self.news.set()  # wake the heartbeat loop: the next beat() raises

    def _take(self, resp: agent_pb2.HeartbeatResponse) -> None:
        if resp.reregister or resp.HasField("assignment"):
            # "register again" outranks an assignment; a newer assignment replaces an older.
            if self._pending is None or not self._pending.reregister:
                self._pending = resp
            self.news.set()

    async def beat(self, req: agent_pb2.HeartbeatRequest) -> agent_pb2.HeartbeatResponse:
        """Send one beat; the news since the last one, or "nothing new"."""
        if self._writer is None:
            await self._connect()
        self._raise_if_broken()
        self._seq += 1
        req.seq = self._seq
        writer = self._writer
        assert writer is not None
        try:
            writer.write(frame(BEAT, req.SerializeToString()))
            await asyncio.wait_for(writer.drain(), self.timeout_s)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE, f"beat not sent: {exc}") from None
        if time.monotonic() - self._last_answer > self.silence_s:
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE,
                         f"the daemon answered no beat for {self.silence_s:.1f}s")
        self.news.clear()
        resp, self._pending = self._pending, None
        return resp or agent_pb2.HeartbeatResponse(assignment_version=req.assignment_version)

    def _raise_if_broken(self) -> None:
        if self._refused:
            reason = self._refused
            self.close()
            code = (grpc.StatusCode.UNAUTHENTICATED if reason.startswith("UNAUTHENTICATED")
                    else grpc.StatusCode.PERMISSION_DENIED)
            raise _error(code, f"the daemon refused the beat connection: {reason}")
        if self._failed:
            reason = self._failed
            self.close()
            raise _error(grpc.StatusCode.UNAVAILABLE, reason)

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._pending = None
