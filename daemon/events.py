"""Job events: stored with the change they describe, then fanned out live to WatchJob streams.

The coordinator stores an event inside the same transaction as the state change it reports
(`Store.add_event(row, conn)`) and hands it to `EventBus.publish` after the commit, so a watcher
never sees an event for a change that did not happen. A watcher subscribes before it reads the
stored history, and skips live events it already replayed, so nothing falls in the gap.

Everything here runs on the daemon's event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from spotwise.daemon.store import EventRow, Store

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000
"""Events buffered per watcher; a watcher further behind is cut off (it can re-watch)."""


class WatcherLagged(RuntimeError):
    """A watcher fell more than QUEUE_LIMIT events behind and was dropped."""


@dataclass(eq=False)
class _Subscription:
    job_id: str
    queue: asyncio.Queue[tuple[EventRow, bool] | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=QUEUE_LIMIT)
    )
    lagged: bool = False


class EventBus:
    """Live fan-out of stored job events to any number of watchers per job."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._subs: dict[str, set[_Subscription]] = {}

    def publish(self, row: EventRow, *, final: bool = False) -> None:
        """Deliver a committed event; `final` marks the job's last one (it reached an end)."""
        for sub in list(self._subs.get(row.job_id, ())):
            try:
                sub.queue.put_nowait((row, final))
            except asyncio.QueueFull:
                # Drop the backlog and wake the watcher with the end marker.
                log.warning("job=%s: a watcher fell %d events behind; dropping it",
                            row.job_id, QUEUE_LIMIT)
                sub.lagged = True
                while not sub.queue.empty():
                    sub.queue.get_nowait()
                sub.queue.put_nowait(None)
                self._unsubscribe(sub)

    def watchers(self, job_id: str) -> int:
        return len(self._subs.get(job_id, ()))

    def _unsubscribe(self, sub: _Subscription) -> None:
        subs = self._subs.get(sub.job_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.job_id]

    async def watch(
        self, job_id: str, *, replay: bool, ended: Callable[[], bool]
    ) -> AsyncIterator[EventRow]:
        """The job's events: the stored ones first if `replay`, then live ones until the job's
        final event. `ended()` says whether the job has already ended (then only the replay is
        sent). Raises WatcherLagged if the consumer falls too far behind.
        """
        sub = _Subscription(job_id)
        self._subs.setdefault(job_id, set()).add(sub)
        try:
            last_id = 0
            if replay:
                for row in self._store.events(job_id):
                    last_id = row.id
                    yield row
            if ended():
                return
            while True:
                item = await sub.queue.get()
                if item is None:
                    raise WatcherLagged(f"watcher of job {job_id} fell behind; watch again")
                row, final = item
                if row.id > last_id:
                    last_id = row.id
                    yield row
                if final:
                    return
        finally:
            self._unsubscribe(sub)
