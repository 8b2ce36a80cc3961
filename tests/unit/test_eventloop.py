"""The one choice of event loop (DaemonConfig.event_loop) the daemon and the load generator use."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from spotwise.common import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


def test_asyncio_is_always_available_and_auto_prefers_uvloop_when_installed() -> None:
    assert eventloop.name("asyncio") == "asyncio"
    assert eventloop.run(_loop_module(), "asyncio") == "asyncio"
    installed = importlib.util.find_spec("uvloop") is not None
    assert eventloop.name("auto") == ("uvloop" if installed else "asyncio")
    assert eventloop.run(_loop_module(), "auto") == eventloop.name("auto")


def test_uvloop_asked_for_but_missing_is_a_clear_error_and_runs_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert eventloop.name("auto") == "asyncio"
    ran = []

    async def body() -> None:
        ran.append(True)

    coro = body()
    with pytest.raises(eventloop.LoopUnavailable, match="uvloop is not installed"):
        eventloop.run(coro, "uvloop")
    assert ran == [] and coro.cr_frame is None  # closed, never started
