"""Finding and following a job's process logs on this machine.

Agents write each training process's output to `<log_dir>/<job_id>/g<generation>/rank<r>.log`
(see the runtime <-> agent contract). With the local provider every agent runs here, so the
CLI reads the files directly; on a cluster each node holds the logs of its own ranks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from spotwise.config import default_state_dir

_GEN_DIR = re.compile(r"^g(\d+)$")
_RANK_FILE = re.compile(r"^rank(\d+)\.log$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_log_dir() -> Path:
    """$SPOTWISE_LOG_DIR, else <state dir>/logs (the daemon's and agents' default)."""
    env = os.environ.get("SPOTWISE_LOG_DIR")
    if env:
        return Path(env).expanduser()
    return default_state_dir() / "logs"


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it is safe as a directory name; ValueError otherwise."""
    if not _JOB_ID.match(job_id) or job_id in (".", ".."):
        raise ValueError(f"{job_id!r} is not a job id")
    return job_id


@dataclass(frozen=True, order=True)
class LogFile:
    """One process's log: generation and rank order it (oldest generation, lowest rank first)."""

    generation: int
    rank: int
    path: Path = field(compare=False)

    def header(self) -> str:
        """The line printed before this file's content, like `tail` does for several files."""
        return f"==> generation {self.generation}, rank {self.rank}: {self.path} <=="


def job_log_files(log_dir: Path, job_id: str) -> list[LogFile]:
    """Every rank*.log of the job, sorted by (generation, rank); [] if there are none yet."""
    root = Path(log_dir) / check_job_id(job_id)
    files: list[LogFile] = []
    try:
        gen_dirs = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    for gen_dir in gen_dirs:
        gen = _GEN_DIR.match(gen_dir.name)
        if gen is None or not gen_dir.is_dir():
            continue
        for entry in gen_dir.iterdir():
            rank = _RANK_FILE.match(entry.name)
            if rank is not None and entry.is_file():
                files.append(LogFile(int(gen.group(1)), int(rank.group(1)), entry))
    return sorted(files)


class LogFollower:
    """Reads what was appended to a job's log files since the last call (`tail -F` by polling).

    Files that appear later (a new generation) are picked up; a file that shrank (rewritten)
    is read again from its start.
    """

    def __init__(self, log_dir: Path, job_id: str, *, chunk_bytes: int = 1 << 20) -> None:
        self.log_dir = Path(log_dir)
        self.job_id = check_job_id(job_id)
        self.chunk_bytes = chunk_bytes
        self._offsets: dict[Path, int] = {}

    def poll(self) -> list[tuple[LogFile, bytes]]:
        """New bytes per file, oldest generation first; files with nothing new are left out."""
        out: list[tuple[LogFile, bytes]] = []
        for log in job_log_files(self.log_dir, self.job_id):
            offset = self._offsets.get(log.path, 0)
            try:
                with log.path.open("rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size < offset:
                        offset = 0
                    fh.seek(offset)
                    data = fh.read(self.chunk_bytes)
            except FileNotFoundError:
                continue
            if data:
                self._offsets[log.path] = offset + len(data)
                out.append((log, data))
            else:
                self._offsets.setdefault(log.path, offset)
        return out
