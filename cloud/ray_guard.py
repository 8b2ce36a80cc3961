"""The guard between a Ray agent actor and the node agent it runs: nothing outlives the actor.

    python -m spotwise.cloud.ray_guard --watch PID --marker VALUE [--grace-s S] -- AGENT ARGV...

The actor (spotwise.cloud.ray_actor) starts this program; it starts the node agent and watches
both. When the actor's process goes (ray.kill, its raylet died, the node is going), the guard
SIGKILLs the agent and every process whose environment carries `SPOTWISE_RAY_NODE=<marker>`:
the agent's training processes run in sessions of their own, so a process-group kill would miss
them, but they inherit the agent's environment. When the agent exits on its own, the guard
clears its leftovers the same way and exits with the agent's status.

The guard leaves the actor's process tree (it forks itself away, see `spawn`): Ray
kills a worker's child processes when the worker exits, and a guard killed with its actor could
not clean up. It watches the actor by pid and start time instead of by parenthood, so a reused
pid does not look alive. The agent gets PR_SET_PDEATHSIG=SIGKILL, so that a guard killed by
hand still takes its agent along. Ray is not imported here: the guard starts in milliseconds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

MARKER_ENV = "SPOTWISE_RAY_NODE"
"""Environment variable naming the Ray node (`<namespace>/<node id>`) a process belongs to."""

POLL_S = 0.2
"""How often the guard checks the actor and the agent."""

_PR_SET_PDEATHSIG = 1


def start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None if it is gone or a
    zombie; with the pid it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[19])  # field 22 of stat; fields here start at field 3 (the state)


def _die_with_parent() -> None:
    """In a forked child before exec: SIGKILL when the forking thread's process dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv: Sequence[str], *, watch_pid: int, marker: str, env: Mapping[str, str],
          log_path: str, grace_s: float, timeout_s: float = 30.0) -> int:
    """Start the guard outside the caller's process tree and return its pid.

    The guard forks itself into a new session and its first process exits at once (after
    printing the guard's pid), so the guard is reparented away from the caller. Raises OSError
    if it cannot be started within `timeout_s`.
    """
    cmd = [sys.executable, "-m", "spotwise.cloud.ray_guard", "--detach", "--watch",
           str(watch_pid), "--marker", marker, "--grace-s", str(grace_s), "--", *argv]
    with open(log_path, "ab") as log:
        launcher = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        try:
            out, _ = launcher.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait(timeout=10)
            raise OSError(f"ray guard did not start within {timeout_s}s: {cmd!r}") from None
    if launcher.returncode != 0 or not out.strip().isdigit():
        raise OSError(f"ray guard did not start (exit {launcher.returncode}, see {log_path})")
    return int(out)


def _detach() -> None:
    """Fork: the parent prints the child's pid and exits; the child leads a new session with
    its stdout on its stderr (the log), which closes the pipe the launcher's caller reads."""
    pid = os.fork()
    if pid:
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
        os._exit(0)
    os.setsid()
    os.dup2(2, 1)


def _kill_marked(marker: str) -> None:
    from spotwise.cloud.local import kill_with_env
    from spotwise.cloud.provider import ProviderError

    try:
        killed = kill_with_env(MARKER_ENV, marker, timeout_s=10.0)
    except ProviderError as e:
        print(f"ray guard: {e}", file=sys.stderr, flush=True)
        return
    if killed:
        print(f"ray guard: killed leftover processes {sorted(set(killed))}", file=sys.stderr,
              flush=True)


def run(watch_pid: int, marker: str, grace_s: float, argv: Sequence[str]) -> int:
    """Run the agent until it exits, the watched actor goes, or SIGTERM; then clear up."""
    watched = start_time(watch_pid)
    if watched is None:
        print(f"ray guard: actor pid {watch_pid} is already gone", file=sys.stderr, flush=True)
        return 1
    stopping = False

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    # The guard is single-threaded: PDEATHSIG (tied to the forking thread) is reliable here.
    # Only the agent and its descendants carry the marker: the guard's own sweep must not
    # find (and SIGKILL) the guard.
    env = dict(os.environ)
    env[MARKER_ENV] = marker
    agent = subprocess.Popen(list(argv), env=env, preexec_fn=_die_with_parent)
    print(f"ray guard: agent pid {agent.pid}, watching actor pid {watch_pid}", file=sys.stderr,
          flush=True)
    code = 1
    while True:
        rc = agent.poll()
        if rc is not None:
            code = rc
            print(f"ray guard: agent exited with {rc}", file=sys.stderr, flush=True)
            break
        if stopping:
            # A graceful stop: the agent stops its generation within its own grace period.
            agent.send_signal(signal.SIGTERM)
            try:
                code = agent.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _kill(agent)
            break
        if start_time(watch_pid) != watched:
            print("ray guard: the actor is gone; killing the agent and its processes",
                  file=sys.stderr, flush=True)
            _kill(agent)
            break
        time.sleep(POLL_S)
    _kill_marked(marker)
    return code


def _kill(agent: subprocess.Popen[bytes]) -> None:
    """SIGKILL the agent and reap it; one that does not go in 10 s is left to the sweep."""
    agent.kill()
    try:
        agent.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"ray guard: agent pid {agent.pid} still there 10s after SIGKILL",
              file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotwise.cloud.ray_guard")
    parser.add_argument("--watch", type=int, required=True, help="pid of the actor to watch")
    parser.add_argument("--marker", required=True, help=f"the {MARKER_ENV} value of the node")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="SIGTERM-to-SIGKILL grace for the agent on a graceful stop")
    parser.add_argument("--detach", action="store_true",
                        help="fork into a new session first and print the guard's pid")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- the agent's command")
    args = parser.parse_args(argv)
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        parser.error("no agent command after --")
    if args.detach:
        _detach()
    return run(args.watch, args.marker, args.grace_s, command)


if __name__ == "__main__":
    sys.exit(main())
