"""The pids of the agent's training processes, kept on disk so that an agent restarted after a
crash kills the ones its previous life left behind (they run in sessions of their own, so the
agent's death does not take them along)."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("spotwise.worker.agent")


def pid_file(state_dir: Path | str, name: str) -> Path:
    return Path(state_dir) / "agents" / f"{name or 'agent'}.pids"


def save_pids(path: Path, pids: Iterable[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(list(pids)))
    os.replace(tmp, path)


def kill_orphans(path: Path, log_dir: Path) -> None:
    """SIGKILL the process groups listed in `path` that are still ours, then forget them."""
    try:
        pids = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        log.warning("agent: unreadable pid file %s: %s", path, e)
        return
    for pid in pids:
        # Guard against pid reuse: only a process that carries a spotwise job's environment
        # and writes its events under our log dir is one of ours.
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        events = next((v for v in environ if v.startswith(b"SPOTWISE_EVENTS_FILE=")), b"")
        if not events.startswith(b"SPOTWISE_EVENTS_FILE=" + bytes(log_dir)):
            continue
        log.warning("agent: killing pid %d (and its group), left running by an earlier life of "
                    "this agent", pid)
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    path.unlink(missing_ok=True)
