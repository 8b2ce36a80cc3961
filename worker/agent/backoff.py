"""Bounded exponential backoff for the agent's retries."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Backoff:
    """Bounded exponential backoff: initial_s, doubling, capped at max_s."""

    initial_s: float = 0.1
    """First delay."""
    max_s: float = 5.0
    """Largest delay."""
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._next = self.initial_s if self._next == 0 else min(self._next * 2, self.max_s)
        return self._next

    def reset(self) -> None:
        self._next = 0.0
