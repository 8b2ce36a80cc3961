"""The runtime's event stream to its node agent: one JSON object per line, appended.

The agent tails the file named by SPOTWISE_EVENTS_FILE (one file per process). Each event is a
single write() on an O_APPEND descriptor, so a reader never sees half a line from a live writer.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("spotwise.events")


class EventLog:
    """Appends events to a file; with no path it only logs them."""

    def __init__(self, path: str | None, *, generation: int) -> None:
        self.path = path
        self.generation = generation
        self._fd: int | None = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": time.time(), "generation": self.generation, **fields}
        log.info("event %s", json.dumps(record, sort_keys=True))
        if self._fd is not None:
            os.write(self._fd, (json.dumps(record) + "\n").encode())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_events(path: str) -> list[dict[str, Any]]:
    """Every complete event in a file (a trailing partial line is left for the next read)."""
    out = []
    with open(path, "rb") as f:
        for line in f.read().split(b"\n")[:-1]:
            if line.strip():
                out.append(json.loads(line))
    return out
