"""The hold after a checkpoint its agent asked for.

The agent asks for a checkpoint (SIGUSR1) when the daemon is about to start the next
generation from it: a node drains, or one joins. Every step taken after that commit would be
replayed by the next generation, so the ranks take none: they wait at the step boundary until
their agent stops them for the rescale (SIGTERM: exit 143, the step already committed), or
says the request is over with no rescale (SIGUSR2: training goes on), or `timeout_s` passes
(a daemon that never follows up costs at most that). Standalone torchrun runs, where nobody
sets SPOTWISE_REQUEST_HOLD_S, never hold.

Every rank holds at the same step and each round is one small all-reduce, so a signal that
reached one rank ends the hold on all of them at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

ROUND_S = 0.05
"""Time between two rounds of the hold (each one all-reduce of three numbers)."""


@dataclass
class Flags:
    """What the signal handlers set, read at step boundaries."""

    checkpoint: bool = False
    stop: bool = False
    requested: bool = False
    """A checkpoint request came by SIGUSR1 (the agent's), not from the script."""
    resume: bool = False
    """SIGUSR2: the agent's request is over."""


def hold(flags: Flags, *, rank: int, committed: bool, timeout_s: float,
         round_s: float = ROUND_S) -> bool:
    """Wait after a requested checkpoint (collective: every rank calls it at the same step).
    Returns True to stop (a SIGTERM reached a rank), False to go on (a SIGUSR2 reached one,
    `timeout_s` passed, or rank 0's save did not commit: `committed` is read on rank 0)."""
    deadline = time.monotonic() + timeout_s
    while True:
        over = rank == 0 and (not committed or time.monotonic() >= deadline)
        votes = torch.tensor([float(flags.stop), float(flags.resume), float(over)],
                             dtype=torch.float64)
        dist.all_reduce(votes)
        if votes[0] > 0:
            return True
        if votes[1] > 0 or votes[2] > 0:
            flags.resume = False
            return False
        time.sleep(round_s)
