"""One simulated node agent: a real gRPC client of AgentService on a connection of its own.

It does what a node agent does on the wire and nothing else (no processes, no rendezvous):

- `register()`: Register with the fleet's agent token (node_id "" the first time: the daemon
  assigns one; node_id and node_secret when it registers again).
- `run()`: beats every heartbeat interval (the Register answer's): on the daemon's beat channel
  when its Register answer names one (spotwise.daemon.beats; `stream` forces gRPC), else on ONE
  long-lived `Heartbeats` stream (the first message carries node_id and node_secret) or, with `unary`, one
  `Heartbeat` call per beat carrying both. Each beat says which assignment_version it holds and,
  once the node runs an assignment, its job, generation and one running process (local rank 0,
  global rank rank_start). An answer's assignment, when present, is adopted from the next beat
  on; an empty job_id means run nothing. A `reregister` answer makes it register again.
- The node that is rank 0 of its assignment reports Progress every `progress_interval_s`, as
  the runtime's rank 0 does, so the daemon's progress path and its database see real traffic.
- `silence()`: it stops sending (beats and reports) but keeps its stream and connection open.

Round trips are measured per beat: on a stream the daemon answers every beat in order, so the
oldest unanswered send time belongs to each answer.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
import ssl
import time
from array import array
from dataclasses import dataclass, field

import grpc
from grpc import aio

from spotwise.common.beatwire import ANSWER, BEAT, HELLO, REFUSED, FrameReader, frame
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc

MAX_BACKOFF_S = 5.0
"""Longest wait before reopening a failed stream or retrying a failed Register."""
DRAIN_ABOVE_BYTES = 64 * 1024
"""A beat connection with more than this not yet sent waits for it to drain."""


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    """How every simulated agent of a run talks to the daemon."""

    address: str
    """host:port of the daemon."""
    agent_token: str
    """The fleet's enrollment token (role agent)."""
    ca_pem: bytes | None = None
    """CA certificate (PEM) to verify the daemon over TLS; None: plaintext on loopback, the
    token sent as call metadata."""
    unary: bool = False
    """Beat with the unary Heartbeat call (older daemons) instead of the Heartbeats stream."""
    stream: bool = False
    """Beat on the gRPC Heartbeats stream even when the daemon offers its beat channel."""
    rpc_timeout_s: float = 10.0
    """Deadline of each unary call (Register, Heartbeat, ReportEvent) and of each stream write."""
    progress_interval_s: float = 0.5
    """How often a rank-0 node reports progress (the runtime's default); 0 = never."""


@dataclass
class AgentStats:
    """What the agents of one generator process saw; counters only grow, latencies are taken
    (and cleared) by whoever reads them."""

    latencies_ms: array = field(default_factory=lambda: array("d"))
    """Heartbeat round trips since the last take, in milliseconds."""
    answered: int = 0
    """Heartbeat answers received."""
    sent: int = 0
    """Heartbeats sent (on the beat channel only every ACK_EVERY-th one, and those with news,
    is answered)."""
    registered: int = 0
    """Successful first Register calls."""
    reregisters: int = 0
    """Register calls after an agent's first (each one the daemon forgot the node)."""
    reregister_answers: int = 0
    """Heartbeat answers that said reregister."""
    errors: collections.Counter = field(default_factory=collections.Counter)
    """Failed calls by "method: status code"."""
    stream_restarts: int = 0
    """Heartbeats streams reopened after failing."""
    silent_streams_closed: int = 0
    """Streams of silenced agents that the daemon closed (not an error: it may close the
    stream of a node it declared lost)."""
    reports: int = 0
    """Progress reports answered."""
    reports_refused: int = 0
    """Progress reports answered accepted=False (stale generation)."""
    connect_ms: array = field(default_factory=lambda: array("d"))
    """Beat-channel connections opened (TCP and TLS handshake), in milliseconds."""
    first_beat_ms: array = field(default_factory=lambda: array("d"))
    """From a Register answer to the first beat sent after it, in milliseconds: the daemon's
    lease runs from its Register, so past the lease this alone declares the node lost."""

    def take_latencies(self) -> array:
        taken, self.latencies_ms = self.latencies_ms, array("d")
        return taken

    def take_connects(self) -> tuple[array, array]:
        """(connect_ms, first_beat_ms) since the last take."""
        taken = self.connect_ms, self.first_beat_ms
        self.connect_ms, self.first_beat_ms = array("d"), array("d")
        return taken

    def counters(self) -> dict[str, object]:
        return {"answered": self.answered, "sent": self.sent, "registered": self.registered,
                "reregisters": self.reregisters, "reregister_answers": self.reregister_answers,
                "errors": dict(self.errors), "stream_restarts": self.stream_restarts,
                "silent_streams_closed": self.silent_streams_closed,
                "reports": self.reports, "reports_refused": self.reports_refused}


class StreamEnded(Exception):
    """The daemon closed a Heartbeats stream without an error."""


def _code(exc: BaseException) -> str:
    if isinstance(exc, aio.AioRpcError):
        return exc.code().name
    return type(exc).__name__


class SimAgent:
    """A simulated agent. Call `open`, `register`, then run `run` as a task; `close` at the end."""

    def __init__(self, index: int, settings: AgentSettings, stats: AgentStats) -> None:
        self.index = index
        self.settings = settings
        self.stats = stats
        self.node_id = ""
        self.node_secret = ""
        self.interval_s = 0.5
        self.version = 0
        self.assignment: agent_pb2.Assignment | None = None
        self.adopted: list[tuple[str, int, float]] = []
        """(job_id, generation, wall time) of every assignment change, oldest first."""
        self.silent = False
        self.last_beat_wall = 0.0
        self._pid = 100_000 + index  # a fake pid, distinct per agent
        self._step = 0
        self._channel: aio.Channel | None = None
        self._stub: agent_pb2_grpc.AgentServiceStub | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._must_register = False
        self.beat_port = 0
        self._registered_at: float | None = None
        """When the last Register was answered, until the first beat after it is sent."""

    # ---- connection ---------------------------------------------------------------------

    def open(self) -> None:
        """Make this agent's own channel. `grpc.use_local_subchannel_pool` and an option of
        its own keep gRPC from sharing one connection between channels of a process (it may
        when two channels' target, arguments and credentials are equal), which would show
        the daemon a few connections instead of one per node."""
        s = self.settings
        options = [("grpc.use_local_subchannel_pool", 1), ("spotwise.bench.agent", self.index)]
        # The token goes as call metadata on both: the same header on the wire as
        # access_token_call_credentials, whose plugin runs a Python thread per call (the
        # generator's CPU, on the cores it shares with the daemon).
        self._metadata = (("authorization", f"Bearer {s.agent_token}"),)
        if s.ca_pem is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=s.ca_pem)
            self._channel = aio.secure_channel(s.address, creds, options=options)
        else:
            self._channel = aio.insecure_channel(s.address, options=options)
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    # ---- the calls ----------------------------------------------------------------------

    async def register(self) -> None:
        """Register (again, with node_id and node_secret, when it has before). Raises the
        call's AioRpcError after counting it."""
        assert self._stub is not None
        again = bool(self.node_id)
        req = agent_pb2.RegisterRequest(
            node_id=self.node_id, node_secret=self.node_secret, address="127.0.0.1",
            store_port=20_000 + self.index % 40_000, slots=1, lifecycle="spot",
            provider_node=f"bench-{self.index}")
        if self.assignment is not None and self.assignment.job_id:
            req.current_job_id = self.assignment.job_id
            req.current_generation = self.assignment.generation
        try:
            resp = await self._stub.Register(req, timeout=self.settings.rpc_timeout_s,
                                             metadata=self._metadata)
        except aio.AioRpcError as exc:
            self.stats.errors[f"Register: {_code(exc)}"] += 1
            raise
        self.node_id = resp.node_id
        # An older daemon issues no secret: keep the one held (empty then).
        self.node_secret = resp.node_secret or self.node_secret
        if resp.heartbeat_interval_s > 0:
            self.interval_s = resp.heartbeat_interval_s
        self.beat_port = resp.beat_port
        # A (re)registered node holds no version of the daemon's new record: the next
        # answer must carry the assignment.
        self.version = 0
        if again:
            self.stats.reregisters += 1
        else:
            self.stats.registered += 1
        self._must_register = False
        self._registered_at = time.monotonic()

    def beat(self, *, first: bool) -> agent_pb2.HeartbeatRequest:
        """The next HeartbeatRequest: credentials on the first of a stream (every unary one)."""
        req = agent_pb2.HeartbeatRequest(assignment_version=self.version)
        if first:
            req.node_id, req.node_secret = self.node_id, self.node_secret
        a = self.assignment
        if a is not None and a.job_id:
            req.job_id, req.generation = a.job_id, a.generation
            req.processes.append(agent_pb2.ProcessStatus(
                local_rank=0, rank=a.rank_start, pid=self._pid, running=True))
        return req

    def answered(self, resp: agent_pb2.HeartbeatResponse, sent: float | None) -> None:
        """Take in one heartbeat answer to the beat sent at monotonic time `sent` (None: an
        assignment the daemon pushed, no beat's answer)."""
        if sent is not None:
            self.stats.latencies_ms.append((time.monotonic() - sent) * 1000.0)
            self.stats.answered += 1
        if resp.reregister:
            self.stats.reregister_answers += 1
            self._must_register = True
            return
        if resp.HasField("assignment"):
            self._adopt(resp.assignment)
        self.version = resp.assignment_version

    def _adopt(self, a: agent_pb2.Assignment) -> None:
        old = self.assignment
        if old is None or (old.job_id, old.generation) != (a.job_id, a.generation):
            self.adopted.append((a.job_id, a.generation, time.time()))
        self.assignment = a

    def _note_sent(self) -> None:
        self.last_beat_wall = time.time()
        if self._registered_at is not None:
            self.stats.first_beat_ms.append((time.monotonic() - self._registered_at) * 1000)
            self._registered_at = None

    def silence(self) -> float:
        """Stop sending from now on (the connection stays open); the wall time of the last
        beat sent."""
        self.silent = True
        return self.last_beat_wall

    # ---- the beat loops -------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until `stop` is set. A failed stream is reopened, a failed Register retried,
        each after a backoff that doubles up to MAX_BACKOFF_S."""
        # A random phase spreads the fleet's beats over the interval, as agents started at
        # different times are.
        await _sleep_or_stop(stop, random.uniform(0, self.interval_s))
        backoff = 0.1
        while not stop.is_set():
            if self.silent:
                # Its stream ended or the daemon asked it to register again: a silent node
                # does neither; its channel (the connection) stays open until the run ends.
                await _sleep_or_stop(stop, self.interval_s)
                continue
            try:
                if self._must_register:
                    await self.register()  # counts its own failures
                elif self.settings.unary:
                    await self._run_unary(stop)
                elif self.beat_port and not self.settings.stream:
                    await self._run_channel(stop)
                else:
                    await self._run_stream(stop)
                backoff = 0.1
                continue
            except (aio.AioRpcError, asyncio.TimeoutError, StreamEnded) as exc:
                if self.silent:
                    # The daemon may close the stream of a node it declared lost.
                    self.stats.silent_streams_closed += 1
                    continue
                if not self._must_register:
                    self.stats.errors[f"Heartbeats: {_code(exc)}"] += 1
                    self.stats.stream_restarts += 1
            await _sleep_or_stop(stop, backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _run_unary(self, stop: asyncio.Event) -> None:
        assert self._stub is not None
        next_at = time.monotonic()
        while not stop.is_set() and not self._must_register:
            next_at = await _tick(stop, next_at, self.interval_s)
            if self.silent or stop.is_set():
                continue
            sent = time.monotonic()
            self._note_sent()
            try:
                self.stats.sent += 1
                resp = await self._stub.Heartbeat(self.beat(first=True),
                                                  timeout=self.settings.rpc_timeout_s,
                                                  metadata=self._metadata)
            except aio.AioRpcError as exc:
                self.stats.errors[f"Heartbeat: {_code(exc)}"] += 1
                continue
            self.answered(resp, sent)
            self._maybe_report()

    async def _run_stream(self, stop: asyncio.Event) -> None:
        assert self._stub is not None
        call = self._stub.Heartbeats(metadata=self._metadata)
        sent: collections.deque[float] = collections.deque()

        async def read() -> None:
            async for resp in call:
                self.answered(resp, sent.popleft() if sent else time.monotonic())

        reader = asyncio.create_task(read())
        try:
            first = True
            next_at = time.monotonic()
            while not stop.is_set() and not self._must_register:
                next_at = await _tick(stop, next_at, self.interval_s)
                if reader.done():
                    reader.result()  # raises the stream's error, if it failed
                    raise StreamEnded("the daemon ended the Heartbeats stream")
                if self.silent or stop.is_set():
                    continue
                sent.append(time.monotonic())
                self._note_sent()
                await asyncio.wait_for(call.write(self.beat(first=first)),
                                       self.settings.rpc_timeout_s)
                self.stats.sent += 1
                first = False
                self._maybe_report()
        finally:
            call.cancel()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _run_channel(self, stop: asyncio.Event) -> None:
        """Beat on the daemon's beat channel (spotwise.daemon.beats): frames on a TLS
        connection of its own; answers name the beat they answer, which times them."""
        s = self.settings
        host = s.address.rpartition(":")[0].strip("[]")
        context = _client_context(s.ca_pem) if s.ca_pem is not None else None
        connecting = time.monotonic()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, self.beat_port, ssl=context, server_hostname=host if context else None),
            s.rpc_timeout_s)
        self.stats.connect_ms.append((time.monotonic() - connecting) * 1000)
        writer.write(frame(HELLO, s.agent_token.encode()))
        sent: dict[int, float] = {}

        async def read() -> None:
            frames = FrameReader()
            while True:
                data = await reader.read(65536)
                if not data:
                    raise StreamEnded("the daemon closed the beat connection")
                for kind, payload in frames.feed(data):
                    if kind == REFUSED:
                        raise StreamEnded(f"beat connection refused: {payload.decode()}")
                    if kind == ANSWER:
                        resp = agent_pb2.HeartbeatResponse.FromString(payload)
                        self.answered(resp, sent.pop(resp.seq, None) if resp.seq else None)

        reading = asyncio.create_task(read())
        try:
            seq = 0
            next_at = time.monotonic()
            while not stop.is_set() and not self._must_register:
                next_at = await _tick(stop, next_at, self.interval_s)
                if reading.done():
                    reading.result()
                    raise StreamEnded("the beat connection ended")
                if self.silent or stop.is_set():
                    continue
                seq += 1
                sent[seq] = time.monotonic()
                sent.pop(seq - 16, None)  # beats without news go unanswered
                self._note_sent()
                req = self.beat(first=seq == 1)
                req.seq = seq
                writer.write(frame(BEAT, req.SerializeToString()))
                if writer.transport.get_write_buffer_size() > DRAIN_ABOVE_BYTES:
                    # Only a backed-up connection waits (wait_for makes a task a call: at
                    # 8,000 beats a second that is the generator's CPU, not the daemon's).
                    await asyncio.wait_for(writer.drain(), s.rpc_timeout_s)
                self.stats.sent += 1
                self._maybe_report()
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            writer.close()

    # ---- progress ---------------------------------------------------------------------------

    def _maybe_report(self) -> None:
        a = self.assignment
        every = self.settings.progress_interval_s
        if every <= 0 or a is None or not a.job_id or a.rank_start != 0:
            return
        # Beats come every interval_s; report on the beats that cross a progress interval.
        steps_per_report = max(1, round(every / self.interval_s))
        self._step += 1
        if self._step % steps_per_report == 0:
            asyncio.get_running_loop().create_task(self._report(a))

    async def _report(self, a: agent_pb2.Assignment) -> None:
        assert self._stub is not None
        req = agent_pb2.ReportEventRequest(
            node_id=self.node_id, node_secret=self.node_secret, job_id=a.job_id,
            generation=a.generation, time=time.time(),
            progress=agent_pb2.Progress(step=self._step, loss=2.0 + 1.0 / self._step,
                                        samples_per_second=100.0, world_size=a.world_size))
        try:
            resp = await self._stub.ReportEvent(req, timeout=self.settings.rpc_timeout_s,
                                                metadata=self._metadata)
        except aio.AioRpcError as exc:
            self.stats.errors[f"ReportEvent: {_code(exc)}"] += 1
            return
        self.stats.reports += 1
        self.stats.reports_refused += 0 if resp.accepted else 1


@functools.lru_cache(maxsize=4)
def _client_context(ca_pem: bytes) -> ssl.SSLContext:
    """One TLS client context per generator process (each real agent makes its own once, on
    its own machine; making one per connection here would bill the generator's CPU to the
    run, on the cores it shares with the daemon)."""
    return ssl.create_default_context(cadata=ca_pem.decode())


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep unless stopped. A plain sleep: every loop that calls this checks `stop` after it,
    so a stop is seen within one interval or backoff (at most MAX_BACKOFF_S, inside the
    generators' STOP_GRACE_S); waiting on the event as well would make a task per beat."""
    if not stop.is_set():
        await asyncio.sleep(seconds)


async def _tick(stop: asyncio.Event, next_at: float, interval_s: float) -> float:
    """Sleep until `next_at`; the time of the beat after it. A beat that is late by more than
    an interval does not cause a burst of catch-up beats: the schedule restarts from now."""
    await _sleep_or_stop(stop, max(0.0, next_at - time.monotonic()))
    now = time.monotonic()
    return next_at + interval_s if now - next_at < interval_s else now + interval_s
