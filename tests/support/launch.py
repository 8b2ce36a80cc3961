"""Run training scripts as real process groups (torchrun --standalone) from tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

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

    The whole process group is killed if it outlives `timeout`, so a hung collective cannot
    hang the test run.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "--max-restarts=0", str(script), *args,
    ]
    proc = subprocess.Popen(
        cmd, env=full_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd} timed out after {timeout}s:\n{out[-4000:]}") from None
    finally:
        # torchrun's children (and DCP's checkpoint processes) share its session.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


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
