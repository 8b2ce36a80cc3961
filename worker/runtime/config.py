"""Where a training process is in its job: the torchrun variables and SPOTWISE_* settings,
read once into a RuntimeConfig (what the node agent sets; standalone torchrun works too)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from spotwise.worker.runtime.checkpoint import CheckpointConfig

T = TypeVar("T")
D = TypeVar("D")


def _env(env: Mapping[str, str], name: str, parse: Callable[[str], T], what: str,
         default: D) -> T | D:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not {what}") from None


def env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int | None:
    return _env(env, name, int, "an integer", default)


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    value = _env(env, name, float, "a number", default)
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"environment variable {name}={env[name]!r} must be a number >= 0")
    return value


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    """Everything a training process needs to know about its place in the job."""

    rank: int = 0
    """Global rank (RANK)."""
    local_rank: int = 0
    """Rank on this node (LOCAL_RANK); picks the GPU."""
    world_size: int = 1
    """Ranks in this generation (WORLD_SIZE)."""
    job_id: str = "local"
    """The job (SPOTWISE_JOB_ID, else TORCHELASTIC_RUN_ID)."""
    generation: int | None = None
    """The fencing token (SPOTWISE_GENERATION); None: one past the newest in storage."""
    checkpoint: CheckpointConfig | None = None
    """Where and how often to checkpoint (SPOTWISE_CHECKPOINT_*); None disables checkpoints."""
    restore_step: int | None = None
    """Committed step to restore (SPOTWISE_RESTORE_STEP); -1 starts fresh; None: the newest."""
    events_file: str | None = None
    """JSON-lines file for the agent (SPOTWISE_EVENTS_FILE)."""
    ledger_file: str | None = None
    """Optional sample-id ledger for exactly-once audits (SPOTWISE_LEDGER)."""
    backend: str | None = None
    """Process group backend; None: "cpu:gloo,cuda:nccl" with a GPU, else "gloo"."""
    collective_timeout_s: float = 120.0
    """How long a collective may block before the process group fails it."""
    progress_interval_s: float = 0.5
    """Minimum time between progress events."""
    request_hold_s: float = 0.0
    """After a checkpoint asked for by SIGUSR1 commits, take no step for up to this long, until
    the rescale's SIGTERM or the request's end (SIGUSR2) (SPOTWISE_REQUEST_HOLD_S, which the
    agent sets; 0: no hold). See `spotwise.worker.runtime.hold`."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> RuntimeConfig:
        """Read the torchrun and SPOTWISE_* variables; raises ValueError on a bad value."""
        env = os.environ if env is None else env
        uri = env.get("SPOTWISE_CHECKPOINT_URI") or None
        checkpoint = None
        if uri:
            checkpoint = CheckpointConfig(
                uri=uri,
                every_steps=env_int(env, "SPOTWISE_CHECKPOINT_EVERY", 0),
                keep=env_int(env, "SPOTWISE_CHECKPOINT_KEEP", 3),
                async_mode=env.get("SPOTWISE_CHECKPOINT_ASYNC", "process"),
            )
        gen = env_int(env, "SPOTWISE_GENERATION")
        config = cls(
            rank=env_int(env, "RANK", 0),
            local_rank=env_int(env, "LOCAL_RANK", 0),
            world_size=env_int(env, "WORLD_SIZE", 1),
            job_id=env.get("SPOTWISE_JOB_ID") or env.get("TORCHELASTIC_RUN_ID") or "local",
            generation=gen,
            checkpoint=checkpoint,
            restore_step=env_int(env, "SPOTWISE_RESTORE_STEP"),
            events_file=env.get("SPOTWISE_EVENTS_FILE") or None,
            ledger_file=env.get("SPOTWISE_LEDGER") or None,
            request_hold_s=env_float(env, "SPOTWISE_REQUEST_HOLD_S", 0.0),
        )
        return replace(config, **overrides)
