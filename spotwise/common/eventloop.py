"""Which asyncio event loop runs a program: uvloop where it is installed, else the standard
library's (`DaemonConfig.event_loop`: auto, uvloop or asyncio).

    eventloop.run(main(), "auto")    # like asyncio.run
    eventloop.name("auto")           # "uvloop" or "asyncio": what run would use
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopUnavailable(RuntimeError):
    """The loop asked for by name is not installed."""


def name(choice: str = "auto") -> str:
    """The loop `run(..., choice)` uses. LoopUnavailable for "uvloop" without uvloop."""
    if choice == "asyncio":
        return "asyncio"
    if importlib.util.find_spec("uvloop") is not None:
        return "uvloop"
    if choice == "uvloop":
        raise LoopUnavailable('event_loop = "uvloop" but uvloop is not installed '
                              '(pip install uvloop, or event_loop = "asyncio")')
    return "asyncio"


def run(coro: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """Run `coro` to its end on the loop `choice` names (the coroutine is closed, not run, when
    that loop is unavailable)."""
    try:
        chosen = name(choice)
    except LoopUnavailable:
        coro.close()
        raise
    if chosen == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)
