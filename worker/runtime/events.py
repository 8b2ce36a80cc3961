"""The runtime's event stream to its node agent: one JSON object per line, appended.

The agent tails the file named by SPOTWISE_EVENTS_FILE (one file per process) with EventsTail.
Each event is a single write() on an O_APPEND descriptor; the tail keeps a trailing partial line
for the next read.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path
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


class EventsTail:
    """Reads the complete lines appended to one events file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            # The job writes this folder: never follow a link it planted (the agent would read
            # its own files as events) nor block on a FIFO; only a regular file is read.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise OSError(f"{self.path} is not a regular file")
                f.seek(self._offset)
                data = f.read(1 << 20)
        except FileNotFoundError:
            return []
        except OSError as e:  # unreadable for now (permissions, a full disk): try again later
            log.warning("events file %s: cannot read: %s", self.path, e)
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("events file %s: skipping a bad line %r", self.path, line[:200])
        return events
