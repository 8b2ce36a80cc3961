"""A bound on how many lines one kind of event may log: N per window, then one summary.

Anyone who reaches the daemon's port can send calls with bad tokens as fast as the network
allows; one WARNING line per denial would let them fill the disk and bury everything else in
the journal. A `LogBudget` lets the first lines of each window through (the ones that say who
and what) and, when the window ends, says how many it held back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class LogBudget:
    """At most `lines` log lines per `window_s` seconds for one kind of event.

    Not thread-safe: one event loop owns it (the daemon's interceptors run on its loop).
    """

    def __init__(self, logger: logging.Logger, *, what: str, lines: int = 20, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert lines >= 1 and window_s > 0
        self.logger = logger
        self.what = what
        self.lines = lines
        self.window_s = window_s
        self.clock = clock
        self._window_start = clock()
        self._used = 0
        self.suppressed = 0
        """Lines held back in the current window."""

    def log(self, level: int, msg: str, *args: object) -> bool:
        """Log the line if the window's budget allows; returns whether it was logged."""
        now = self.clock()
        if now - self._window_start >= self.window_s:
            if self.suppressed:
                self.logger.log(level, "%d more %s in the last %.0fs were not logged", self.suppressed,
                                self.what, now - self._window_start)
            self._window_start, self._used, self.suppressed = now, 0, 0
        if self._used >= self.lines:
            self.suppressed += 1
            return False
        self._used += 1
        self.logger.log(level, msg, *args)
        return True
