"""The commit record of a checkpoint (its manifest) and the rules its fields must follow.

A manifest is read back from storage that more than the job can write, and its `data` field
is read and, when pruned, deleted: every field is checked against what a Checkpointer writes
before anything follows it.
"""

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
        m._check_layout(where)
        return m

    def _check_layout(self, where: str) -> None:
        """Raise CheckpointError unless every field is what a Checkpointer writes.

        `data` is read, and deleted when pruned: it must be exactly this step's and
        generation's own folder, so a planted manifest cannot point a restore or a prune at
        anything else (`../../another-job`)."""
        for name in ("step", "generation", "world_size", "cursor", "bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"manifest {where} has a malformed {name}: {value!r}")
        if self.data != data_dir_name(self.step, self.generation):
            raise CheckpointError(
                f"manifest {where} names data {self.data!r}; a commit of step {self.step} by "
                f"generation {self.generation} lives in {data_dir_name(self.step, self.generation)!r}"
            )
        if not isinstance(self.files, dict) or not all(
            _plain_file_name(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in self.files.items()
        ):
            raise CheckpointError(f"manifest {where} has a malformed file list")


def step_name(step: int) -> str:
    return f"step-{step:010d}"


def data_dir_name(step: int, generation: int) -> str:
    """The data folder of a step committed by a generation, relative to the checkpoint root."""
    return f"data/{step_name(step)}-g{generation}"


def _plain_file_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def describe(exc: BaseException | tuple) -> str:
    """One line for a (DCP) failure: each failing rank's exception type and first line."""
    if isinstance(exc, tuple):  # DCP keeps (exception, traceback frames) per rank
        exc = exc[0]
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {r}: {describe(e)}" for r, e in sorted(failures.items()))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"
