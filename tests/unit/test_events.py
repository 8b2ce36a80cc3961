"""WatchJob fan-out: replay then live with no gap or duplicate, final event ends, laggards cut."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from spotwise.daemon import events as events_module
from spotwise.daemon.events import EventBus, WatcherLagged
from spotwise.daemon.store import EventRow, Store


def stored(store: Store, message: str) -> EventRow:
    row = EventRow(job_id="j", time=1.0, kind="progress", generation=1, message=message)
    store.add_event(row)
    return row


def test_replay_then_live_without_duplicates_until_the_final_event(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    bus = EventBus(store)
    stored(store, "old-1")
    # Committed before the watcher came, published after it subscribed: in its replay already.
    late = stored(store, "old-2")

    async def scenario() -> list[str]:
        seen: list[str] = []

        async def consume() -> None:
            async for row in bus.watch("j", replay=True, ended=lambda: False):
                seen.append(row.message)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # let the watcher subscribe and replay
        while bus.watchers("j") == 0:
            await asyncio.sleep(0)
        bus.publish(late)  # delivered once, by the replay
        bus.publish(stored(store, "live-1"))
        bus.publish(stored(store, "live-2"))
        bus.publish(stored(store, "the end"), final=True)
        await asyncio.wait_for(task, 5)
        return seen

    seen = asyncio.run(scenario())
    assert seen == ["old-1", "old-2", "live-1", "live-2", "the end"]
    assert bus.watchers("j") == 0


def test_a_watcher_that_falls_behind_is_cut_off(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_module, "QUEUE_LIMIT", 3)
    store = Store(tmp_path / "db")
    bus = EventBus(store)

    async def scenario() -> None:
        stream = bus.watch("j", replay=False, ended=lambda: False)
        first = asyncio.create_task(stream.__anext__())
        while bus.watchers("j") == 0:
            await asyncio.sleep(0)
        for i in range(3):
            bus.publish(stored(store, f"e{i}"))
        assert (await asyncio.wait_for(first, 5)).message == "e0"
        for i in range(3, 8):  # more than the queue holds while nobody reads
            bus.publish(stored(store, f"e{i}"))
        with pytest.raises(WatcherLagged):
            await asyncio.wait_for(stream.__anext__(), 5)

    asyncio.run(scenario())
    assert bus.watchers("j") == 0


def test_an_ended_job_sends_its_history_and_stops(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    bus = EventBus(store)
    stored(store, "only")

    async def collect() -> list[str]:
        return [r.message async for r in bus.watch("j", replay=True, ended=lambda: True)]

    assert asyncio.run(collect()) == ["only"]
