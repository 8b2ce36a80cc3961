"""Interruption notices the daemon reads itself, from an SQS queue fed by EventBridge (flow 6).

An agent reports the notices its own instance metadata shows; the queue carries them for every
instance, so a node whose agent cannot report (a stalled agent, a full disk) is still drained.
`NoticeLoop` long-polls the queue off the event loop (each poll bounded by a timeout) and hands
each notice to the coordinator, which matches it to a node by instance id. A duplicate of a
notice an agent already reported changes nothing (the node is already DRAINING).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from spotwise.cloud.sqs_events import CloudNotice
from spotwise.daemon.coordinator import Coordinator

log = logging.getLogger(__name__)


class NoticeReader(Protocol):
    """A source of cloud notices: the SQS queue, or Ray's drain table (spotwise.cloud.ray_drain)."""

    def receive(self, wait_time_s: int = 20) -> list[CloudNotice]:
        """New notices, waiting up to `wait_time_s` for one."""
        ...


class NoticeLoop:
    """Reads notices from a reader until stopped; failures (the reader's `errors`, and
    timeouts) back off up to `max_backoff_s`."""

    def __init__(
        self,
        reader: NoticeReader,
        coordinator: Coordinator,
        *,
        wait_time_s: int = 20,
        max_backoff_s: float = 60.0,
        errors: tuple[type[Exception], ...] = (),
    ) -> None:
        """`errors`: what the reader raises for a failed read, besides SqsEventsError."""
        self.reader = reader
        self.coordinator = coordinator
        self.wait_time_s = wait_time_s
        self.max_backoff_s = max_backoff_s
        self.errors = errors
        # A long poll returns after at most wait_time_s; more than that plus the client's own
        # timeouts means the call is stuck.
        self.timeout_s = wait_time_s + 30.0

    async def run_once(self) -> int:
        """One long poll; returns how many notices matched a node. Raises SqsEventsError or
        TimeoutError if the poll fails."""
        notices = await asyncio.wait_for(
            asyncio.to_thread(self.reader.receive, wait_time_s=self.wait_time_s), self.timeout_s
        )
        matched = 0
        for notice in notices:
            if self.coordinator.cloud_notice(notice.instance_id, notice.action, notice.deadline):
                matched += 1
        return matched

    async def run(self, stop: asyncio.Event) -> None:
        from spotwise.cloud.sqs_events import SqsEventsError

        backoff = 1.0
        while not stop.is_set():
            try:
                await self.run_once()
                backoff = 1.0
                continue
            except (SqsEventsError, *self.errors, asyncio.TimeoutError) as exc:
                log.error("notice queue: %s (retry in %.0fs)", exc or "poll timed out", backoff)
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
            backoff = min(backoff * 2, self.max_backoff_s)
