"""The one control loop: plan over what changed, carry it out, write the tick in one
transaction off the event loop, then publish it.

Handlers wake the loop (`wake`); it also ticks every `tick_s` for the rules that depend on the
clock (settle windows, drain deadlines), and at the end of the next lease still running. Ticks
are at least `min_gap_s` apart, so a burst of facts (2,000 agents reporting a new generation) is
planned in a few ticks, not in thousands. Callers whose answer must follow their write (Submit,
Cancel, Register) `await flush()`: it resolves once the tick holding their change is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from spotwise.daemon.coordinator import Coordinator

log = logging.getLogger(__name__)


class ControlLoop:
    def __init__(self, coordinator: Coordinator, *, tick_s: float, min_gap_s: float = 0.02,
                 clock: Callable[[], float] = time.time) -> None:
        self.coordinator = coordinator
        self.tick_s = tick_s
        self.min_gap_s = min_gap_s
        self.clock = clock
        self._wake = asyncio.Event()
        self._lags: list[tuple[float, float]] = []
        """(when, how late) of recent timed waits: the event loop's lag."""
        coordinator.wake = self.wake

    def wake(self) -> None:
        self._wake.set()

    async def flush(self) -> None:
        """Wait until what is staged now is committed; raises the store's error if the write
        failed (then the change did not happen)."""
        waiter = self.coordinator.outbox.waiter()
        self.wake()
        await waiter

    async def tick_once(self) -> None:
        c = self.coordinator
        c.plan_tick(self.clock(), lag_s=self.lag_s)
        batch = c.take()
        if batch.empty:
            return
        try:
            await asyncio.to_thread(c.store.write_batch, batch.stored)
        except Exception as exc:  # any store failure: the tick did not happen
            c.write_failed(batch, exc)
            raise
        c.committed(batch)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            self._wake.clear()
            try:
                await self.tick_once()
            except Exception:
                # A bug or a failed write in one tick must not stop the loop that detects lost
                # nodes; it is logged with its traceback and the next tick tries again.
                log.exception("control loop tick failed")
            gap = self.min_gap_s - (time.monotonic() - started)
            if gap > 0:
                await asyncio.sleep(gap)
            if self._wake.is_set() or stop.is_set():
                continue
            timeout = self._timeout()
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            waited = time.monotonic()
            try:
                done, _ = await asyncio.wait({waiter, stopper}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            if not done:  # a timed wait: how much later than asked it ended is the loop's lag
                self._note_lag(time.monotonic() - waited - timeout)

    LEASE_END_MARGIN_S = 0.002
    """A lease ends when the silence exceeds it: the loop wakes this much after its end."""

    def _timeout(self) -> float:
        """Until the next tick: `tick_s`, or sooner when a lease ends before it (a lost node is
        found at its lease's end, not up to a tick later)."""
        now = self.clock()
        end = self.coordinator.state.next_lease_end(now, self.lag_s)
        if end is None:
            return self.tick_s
        return min(self.tick_s, end - now + self.LEASE_END_MARGIN_S)

    LAG_WINDOW_S = 5.0
    """The lag that counts is the largest seen over this window."""

    def _note_lag(self, lateness: float) -> None:
        now = time.monotonic()
        self._lags = [(t, v) for t, v in self._lags if now - t < self.LAG_WINDOW_S]
        self._lags.append((now, max(0.0, lateness)))

    @property
    def lag_s(self) -> float:
        """The event loop's recent lag (what beats not read yet may be late by)."""
        now = time.monotonic()
        return max((v for t, v in self._lags if now - t < self.LAG_WINDOW_S), default=0.0)
