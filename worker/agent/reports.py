"""The runtime's events as the daemon's ReportEvent calls, and the agent's queue of reports.

Reports wait in a bounded queue while the daemon is unreachable; progress is a level, so a
newer progress report replaces an unsent older one of the same generation.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Any

from grpc import aio

from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc
from spotwise.worker.agent.backoff import Backoff
from spotwise.worker.agent.session import is_transient

log = logging.getLogger("spotwise.worker.agent")

QUEUE_LIMIT = 10_000
"""Reports kept while the daemon is unreachable; the oldest go first beyond this."""


def event_report(event: dict[str, Any], *, rank: int) -> agent_pb2.ReportEventRequest | None:
    """The ReportEvent for one runtime event line (rank 0's restore, progress and commits),
    or None for events the daemon is not told: finished and fenced are logged only."""
    kind = event.get("event")
    t = float(event.get("time") or time.time())
    if kind == "restored" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, restored=agent_pb2.Restored(
            step=int(event["step"]), world_size=int(event.get("world_size", 0))))
    if kind == "progress" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, progress=agent_pb2.Progress(
            step=int(event["step"]), loss=float(event.get("loss", math.nan)),
            samples_per_second=float(event.get("samples_per_second", 0.0)),
            world_size=int(event.get("world_size", 0))))
    if kind == "checkpoint_failed" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, checkpoint_failed=agent_pb2.CheckpointFailed(
            step=int(event["step"]), reason=str(event.get("reason", ""))[:1000]))
    if kind == "checkpoint_committed" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, checkpoint_committed=agent_pb2.CheckpointCommitted(
            step=int(event["step"]), path=str(event.get("path", "")),
            bytes=int(event.get("bytes", 0)), cursor=int(event.get("cursor", 0)),
            requested=event.get("requested") is True))
    return None


def forwarded(node_id: str, spec: Any, rank: int, event: dict[str, Any], metrics: Any
              ) -> agent_pb2.ReportEventRequest | None:
    """Log one runtime event of `spec`'s rank `rank` and return what to report of it (None:
    nothing, or an event that does not parse, which is logged)."""
    kind = event.get("event")
    where = f"agent {node_id}: job {spec.job_id} g{spec.generation}"
    if kind == "fenced":
        log.warning("%s rank %d: commit fenced at step %s: %s", where, rank, event.get("step"),
                    event.get("reason"))
    elif kind == "restored" and rank == 0:
        log.info("%s: restored step %s at world size %s", where, event.get("step"),
                 event.get("world_size"))
    elif kind == "finished":
        log.info("%s rank %d finished at step %s", where, rank, event.get("step"))
    elif kind == "checkpoint_committed" and rank == 0:
        metrics.checkpoints.inc()
        log.info("%s: checkpoint committed at step %s: %s", where, event.get("step"),
                 event.get("path"))
    try:
        return event_report(event, rank=rank)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("%s rank %d: bad event %r: %s", where, rank, event, e)
        return None


class ReportQueue:
    """The reports waiting to be sent, oldest first."""

    def __init__(self) -> None:
        self.items: collections.deque[agent_pb2.ReportEventRequest] = collections.deque()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, req: agent_pb2.ReportEventRequest) -> None:
        if req.WhichOneof("event") == "progress":
            for i, old in enumerate(self.items):
                if (old.WhichOneof("event") == "progress"
                        and (old.job_id, old.generation) == (req.job_id, req.generation)):
                    del self.items[i]
                    break
        if len(self.items) >= QUEUE_LIMIT:
            dropped = self.items.popleft()
            log.warning("report queue full, dropping %s", dropped.WhichOneof("event"))
        self.items.append(req)


class Reporter:
    """Sends the queue's reports in order, retrying transient failures with backoff."""

    def __init__(self, queue: ReportQueue, ready: asyncio.Event,
                 stub: agent_pb2_grpc.AgentServiceStub, *, metadata: tuple, credential: Any,
                 timeout_s: float, max_backoff_s: float) -> None:
        self.queue = queue
        self.ready = ready
        self.stub = stub
        self.metadata = metadata
        self.credential = credential
        self.timeout_s = timeout_s
        self.max_backoff_s = max_backoff_s

    async def run(self) -> None:
        backoff = Backoff(max_s=self.max_backoff_s)
        while True:
            await self.ready.wait()
            self.ready.clear()
            while self.queue.items:
                if await self.send(self.queue.items[0]):
                    self.queue.items.popleft()
                    backoff.reset()
                else:
                    await asyncio.sleep(backoff.next())

    async def send(self, req: agent_pb2.ReportEventRequest) -> bool:
        """Send one report; True when it is done with (accepted, refused or undeliverable)."""
        req.node_id, req.node_secret = self.credential.node_id, self.credential.secret
        try:
            resp = await self.stub.ReportEvent(req, timeout=self.timeout_s,
                                               metadata=self.metadata)
        except aio.AioRpcError as e:
            if is_transient(e):
                return False
            log.warning("agent %s: ReportEvent %s refused: %s: %s", req.node_id,
                        req.WhichOneof("event"), e.code().name, e.details())
            return True
        if not resp.accepted:
            log.info("agent %s: job %s g%d: %s report refused as stale: %s", req.node_id,
                     req.job_id, req.generation, req.WhichOneof("event"), resp.reason)
        return True

    async def flush(self, *, timeout_s: float) -> None:
        """Send what is queued, for at most `timeout_s` (the agent is stopping)."""
        deadline = time.monotonic() + timeout_s
        while self.queue.items and time.monotonic() < deadline:
            if not await self.send(self.queue.items[0]):
                break
            self.queue.items.popleft()
