"""Run training scripts as real process groups (torchrun --standalone) from tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from spotwise.cloud.local import kill_with_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "workloads" / "tiny_train.py"


def torchrun(
    script: Path | str,
    nproc: int,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 240.0,
) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` local ranks; returns the finished process (never raises on exit code).

    Every process of the run carries a marker in its environment; when torchrun ends or
    outlives `timeout`, every marked process still alive is SIGKILLed. torchrun starts each
    worker in its own session, and DCP's checkpoint writer (a child of a worker) can outlive a
    worker that was SIGKILLed, so neither torchrun's process group nor a pipe's EOF marks the
    end of the run: the output goes to a file and torchrun's own exit is what is waited for.
    """
    marker = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), RUN_MARKER: marker}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "--max-restarts=0", str(script), *args,
    ]
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_with_env(RUN_MARKER, marker)
            proc.wait()
        out.seek(0)
        output = out.read()
    if timed_out:
        raise AssertionError(f"{cmd} timed out after {timeout}s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


RUN_MARKER = "SPOTWISE_TEST_RUN"
"""Environment variable marking every process of one `torchrun` call."""


def checked(result: subprocess.CompletedProcess, expect: int | tuple[int, ...] = 0) -> str:
    """The output of a run whose exit code is as expected; fails the test with the output otherwise."""
    codes = (expect,) if isinstance(expect, int) else expect
    assert result.returncode in codes, f"exit {result.returncode}, wanted {codes}:\n{result.stdout[-6000:]}"
    return result.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(script: Path | str, nproc: int, *args: str, env: dict[str, str] | None = None, logs: Path) -> list[subprocess.Popen]:
    """Start `nproc` ranks with the torchrun environment, as a node agent does (no torchrun),
    each in its own session so that tests can signal one rank by pid."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {
            **os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        }
        out = open(logs / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=rank_env, cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)
