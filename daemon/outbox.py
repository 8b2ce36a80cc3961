"""What a tick changed, written in one transaction and made visible only once committed.

Handlers and the executor change records in memory and `stage` them here; events and
assignments that describe the change wait here too. `take()` copies the staged rows' values
(on the event loop), the control loop writes them with `Store.write_batch` (in a thread, off
the event loop), and only after the commit does `Batch.publish` hand the events to watchers,
the new assignments to the nodes' heartbeat answers, and the result to callers waiting for
their write (Submit, Cancel, Register). A node therefore never runs an assignment the daemon
could forget in a crash, and a watcher never sees an event for a change that did not happen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spotwise.daemon.store import (
    CheckpointRow,
    EventRow,
    GenerationRow,
    JobRow,
    NodeRow,
    StoredBatch,
    row_values,
)

if TYPE_CHECKING:
    from spotwise.daemon.events import EventBus
    from spotwise.proto.v1 import agent_pb2


@dataclass
class Batch:
    """One taken set of changes: the values to store and what to publish after."""

    stored: StoredBatch
    events: list[tuple[EventRow, bool]]
    assignments: dict[str, agent_pb2.Assignment]
    waiters: list[asyncio.Future[None]]

    @property
    def empty(self) -> bool:
        s = self.stored
        return not (s.rows or s.events or s.checkpoints or s.thin_progress or self.assignments
                    or self.waiters)


@dataclass
class Outbox:
    """Changes staged since the last `take()`."""

    _rows: dict[tuple[object, ...], JobRow | NodeRow | GenerationRow] = field(default_factory=dict)
    _events: list[tuple[EventRow, bool]] = field(default_factory=list)
    _checkpoints: list[CheckpointRow] = field(default_factory=list)
    _thin: list[str] = field(default_factory=list)
    _jobs_to_assign: set[str] = field(default_factory=set)
    _nodes_to_assign: set[str] = field(default_factory=set)
    _waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def stage(self, row: JobRow | NodeRow | GenerationRow) -> None:
        """Write this row (as it is at `take()`) with the tick."""
        if isinstance(row, GenerationRow):
            key: tuple[object, ...] = ("generation", row.job_id, row.generation)
        else:
            key = (type(row).__name__, row.id)
        self._rows[key] = row

    def event(self, row: EventRow, *, final: bool = False) -> None:
        self._events.append((row, final))

    def checkpoint(self, row: CheckpointRow) -> None:
        self._checkpoints.append(row)

    def thin_progress(self, job_id: str) -> None:
        self._thin.append(job_id)

    def reassign(self, *, job_id: str = "", node_id: str = "") -> None:
        """Recompute the assignments of the job's members (or of one node) at `take()`."""
        if job_id:
            self._jobs_to_assign.add(job_id)
        if node_id:
            self._nodes_to_assign.add(node_id)

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved once what is staged now is committed (or failed with the error)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return fut

    @property
    def pending(self) -> bool:
        return bool(self._rows or self._events or self._checkpoints or self._thin
                    or self._jobs_to_assign or self._nodes_to_assign or self._waiters)

    def take(self, assign: Callable[[set[str], set[str]], dict[str, agent_pb2.Assignment]]
             ) -> Batch:
        """Everything staged, values copied now; `assign(jobs, nodes)` computes the new
        assignments of the staged jobs' members and nodes."""
        stored = StoredBatch(
            rows=[row_values(r) for r in self._rows.values()],
            events=[row for row, _ in self._events],
            checkpoints=list(self._checkpoints),
            thin_progress=list(dict.fromkeys(self._thin)),
        )
        assignments = (assign(self._jobs_to_assign, self._nodes_to_assign)
                       if self._jobs_to_assign or self._nodes_to_assign else {})
        batch = Batch(stored=stored, events=list(self._events), assignments=assignments,
                      waiters=list(self._waiters))
        self.clear()
        return batch

    def clear(self) -> None:
        self._rows.clear()
        self._events.clear()
        self._checkpoints.clear()
        self._thin.clear()
        self._jobs_to_assign.clear()
        self._nodes_to_assign.clear()
        self._waiters.clear()


def publish(batch: Batch, bus: EventBus,
            install: Callable[[dict[str, agent_pb2.Assignment]], object]) -> None:
    """After the commit: events to watchers, assignments to heartbeats, callers released."""
    install(batch.assignments)
    for row, final in batch.events:
        bus.publish(row, final=final)
    for fut in batch.waiters:
        if not fut.done():
            fut.set_result(None)


def fail(batch: Batch, error: BaseException) -> None:
    """The write failed: callers waiting for it get the error; nothing is published."""
    for fut in batch.waiters:
        if not fut.done():
            fut.set_exception(error)
