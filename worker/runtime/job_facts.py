"""What the node agent tells a job's training processes about the job: the other direction of
spotwise.worker.runtime.events. The runtime never talks to the daemon; the agent, which does, appends
the job's figures to a file named by SPOTWISE_JOB_FACTS_FILE, and a tracker in rank 0 reads it
(spotwise.worker.runtime.tracking) to put them in the experiment's run.

One JSON object per line, appended with one write() each (O_APPEND), so a reader never sees a
torn record; a trailing partial line waits for the next read:

    {"time": 1764580000.5, "kind": "generation", "generation": 3, "world_size": 2,
     "step": 40, "lost_steps": 6, "cost_usd": 0.42, "message": "lost n2: 1 node(s)"}

`time` (unix seconds) orders the facts and makes them idempotent: every node's agent may write
the same facts, and a reader keeps only those newer than the last it handled.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "SPOTWISE_JOB_FACTS_FILE"
"""The variable the agent sets, in every training process's environment, to the file's path."""

MAX_LINE_BYTES = 64 * 1024
"""A longer line is not a fact the agent wrote; it is skipped."""


@dataclass(frozen=True)
class JobFact:
    """The job's figures as the daemon gave them to the agent at one moment."""

    time: float
    """Unix seconds of the fact (the daemon's event time, or when the agent learnt it)."""
    kind: str
    """"generation" (a new generation started), "cost", or any JobEvent kind."""
    generation: int
    """The job's generation."""
    world_size: int = 0
    """Training processes of the generation."""
    step: int = 0
    """The job's step (for a generation: the step it restores)."""
    lost_steps: int = 0
    """Steps lost over the whole job so far."""
    cost_usd: float = 0.0
    """Money the job has cost so far."""
    message: str = ""
    """The daemon's reason or message."""

    @classmethod
    def parse(cls, line: str) -> JobFact:
        """One line of the file; ValueError if it is not a fact."""
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        try:
            return cls(time=float(raw["time"]), kind=str(raw["kind"]),
                       generation=int(raw["generation"]),
                       world_size=int(raw.get("world_size", 0)), step=int(raw.get("step", 0)),
                       lost_steps=int(raw.get("lost_steps", 0)),
                       cost_usd=float(raw.get("cost_usd", 0.0)),
                       message=str(raw.get("message", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad fact {raw!r}: {exc}") from None

    def to_line(self) -> str:
        """The fact as one line of the file (with its newline)."""
        return json.dumps(asdict(self), sort_keys=True) + "\n"


def fact_from_assignment(assignment: Any, now: float) -> JobFact:
    """The fact an agent writes when it starts a generation: from its Assignment (spotwise.v1;
    generation, world size, the step restored, and the job's lost steps, cost and reason when
    the generation started), at unix time `now`."""
    return JobFact(time=now, kind="generation", generation=int(assignment.generation),
                   world_size=int(assignment.world_size),
                   step=max(0, int(assignment.restore_step)),
                   lost_steps=int(assignment.lost_steps), cost_usd=float(assignment.cost_usd),
                   message=str(assignment.reason))


def facts_path(job_dir: str | os.PathLike[str]) -> Path:
    """Where an agent keeps a job's facts file: `<job_dir>/job-facts.jsonl` (one per job and
    node; every generation's processes on the node read the same file)."""
    return Path(job_dir) / "job-facts.jsonl"


def append_fact(path: str | os.PathLike[str], fact: JobFact) -> None:
    """Append one fact (what the agent calls); creates the file and its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, fact.to_line().encode())
    finally:
        os.close(fd)


class JobFactsTail:
    """Reads the facts appended since the last read (what rank 0's tracker calls)."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path else None
        self._offset = 0
        self._partial = b""

    def read(self) -> list[JobFact]:
        """New complete facts, in file order; none if there is no file (yet). A bad line is
        logged and skipped: the agent's file must not stop training."""
        if self.path is None:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" after a final newline
        if len(self._partial) > MAX_LINE_BYTES:
            log.warning("job facts %s: dropping an unterminated line of %d bytes", self.path,
                        len(self._partial))
            self._partial = b""
        facts = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                facts.append(JobFact.parse(raw.decode("utf-8", errors="replace")))
            except ValueError as exc:
                log.warning("job facts %s: skipping a line: %s", self.path, exc)
        return facts
