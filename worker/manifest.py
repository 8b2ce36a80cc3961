"""The manifest: what rank 0 writes, last, to commit a checkpoint, and the errors of a checkpoint
that cannot be used. Parsed, never unpickled: every field is checked before anything is read
or deleted on its word."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

MANIFEST_VERSION = 1
class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: torn, unreadable, or not there."""


class CheckpointMissing(CheckpointError):
    """No manifest for the requested step (never committed, or pruned)."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What rank 0 writes, last, to commit a checkpoint."""

    step: int
    generation: int
    world_size: int
    cursor: int
    """Global sample cursor after `step` (the next sample to read)."""
    data: str
    """The data directory, relative to the checkpoint root."""
    files: dict[str, int]
    """Every data file (relative to `data`) and its size in bytes."""
    bytes: int
    time: float
    """Unix time of the commit."""
    save_seconds: float
    """From the start of the save to the commit."""
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, where: str) -> Manifest:
        try:
            doc = json.loads(raw)
            if doc.get("version") != MANIFEST_VERSION:
                raise CheckpointError(f"manifest {where} has version {doc.get('version')!r}, expected {MANIFEST_VERSION}")
            m = cls(**doc)
        except CheckpointError:
            raise
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"manifest {where} is unreadable: {exc}") from exc
        if not isinstance(m.files, dict) or not all(isinstance(v, int) for v in m.files.values()):
            raise CheckpointError(f"manifest {where} has a malformed file list")
        return m


def describe(exc: BaseException | tuple) -> str:
    """One line for a (DCP) failure: each failing rank's exception type and first line."""
    if isinstance(exc, tuple):  # DCP keeps (exception, traceback frames) per rank
        exc = exc[0]
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {r}: {describe(e)}" for r, e in sorted(failures.items()))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"
