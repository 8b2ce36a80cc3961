"""The local provider: node agents as subprocesses of this machine.

Each node is one `python -m spotwise.cli agent --provider-node local-N ...` started in its own
process group. The agent starts its training processes in their own sessions (so that it can
kill their groups), which takes them out of the agent's group; to still find every process of
a node, the provider marks the agent's environment with `SPOTWISE_LOCAL_NODE=<cluster>/<handle>`.
The agent hands its environment down to its training processes, and they to their children, so
a scan of /proc for that marker finds the node's whole tree, even after the agent died, even
for processes started a moment before it died, and even from a new provider object after a
daemon restart (`list_nodes` adopts live agents of its cluster the same way).

`kill(handle)` is a spot loss without notice: SIGKILL of the agent's group and of every process
carrying the node's marker. `terminate` does the same (a local node holds nothing worth saving
that its checkpoints do not).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spotwise.cloud.provider import NodeRequest, Provider, ProviderError, ProviderNode

log = logging.getLogger(__name__)

MARKER_ENV = "SPOTWISE_LOCAL_NODE"
"""Environment variable naming the local node (`<cluster>/<handle>`) a process belongs to."""
JOB_ENV = "SPOTWISE_LOCAL_NODE_JOB"
"""Environment variable naming the job a local node was launched for."""

_HANDLE_RE = re.compile(r"^local-(\d+)$")


@dataclass
class _Agent:
    handle: str
    job_id: str
    popen: subprocess.Popen[bytes] | None
    """None for an agent adopted from /proc (started by an earlier provider object)."""
    pid: int
    lifecycle: str


def processes_with_env(name: str, value: str, *, prefix: bool = False) -> dict[int, str]:
    """Pids of live processes whose environment has `name`=`value` (or, with prefix, a value
    starting with it); maps pid -> the value. Zombies and other users' processes are left out."""
    found: dict[int, str] = {}
    needle = f"{name}={value}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # gone, or another user's process: not ours either way
        if state == b"Z":
            continue
        for var in environ.split(b"\0"):
            if var == needle or (prefix and var.startswith(needle)):
                found[pid] = var.split(b"=", 1)[1].decode(errors="replace")
                break
    return found


def scan_marked(marker: str) -> dict[int, str]:
    """Pids of live processes whose environment has MARKER_ENV == `marker` or, when `marker`
    ends with "/", starts with it; maps pid -> the marker's value. Zombies are left out."""
    return processes_with_env(MARKER_ENV, marker, prefix=marker.endswith("/"))


def _environ_value(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for var in f.read().split(b"\0"):
                if var.startswith(name.encode() + b"="):
                    return var.split(b"=", 1)[1].decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return ""


def stop_process_group(proc: subprocess.Popen[bytes], *, grace_s: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session), wait up to
    `grace_s` for the leader, then SIGKILL the group. A group that is already gone is fine."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def kill_marked(marker: str, *, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process carrying `marker` (see scan_marked) until a scan finds none.
    Returns the pids killed. Raises ProviderError if some survive `timeout_s`."""
    return kill_with_env(MARKER_ENV, marker, prefix=marker.endswith("/"), timeout_s=timeout_s)


def kill_with_env(name: str, value: str, *, prefix: bool = False,
                  timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process whose environment has `name`=`value` (see processes_with_env)
    until a scan finds none (a process may fork between a scan and the kill, so scan again).
    Returns the pids killed. Raises ProviderError if some survive `timeout_s`."""
    marker = f"{name}={value}"
    killed: list[int] = []
    deadline = time.monotonic() + timeout_s
    while True:
        pids = processes_with_env(name, value, prefix=prefix)
        if not pids:
            # A SIGKILLed process drops its memory (and so its readable environ) before it
            # becomes a zombie: the scan no longer sees it while it still runs. Wait for those.
            dying = [p for p in killed if _alive(p)]
            if not dying:
                return killed
            if time.monotonic() > deadline:
                raise ProviderError(f"processes with {marker}: pids {dying} still exiting "
                                    f"{timeout_s}s after SIGKILL")
            time.sleep(0.02)
            continue
        if time.monotonic() > deadline:
            raise ProviderError(f"processes with {marker}: pids {sorted(pids)} survive SIGKILL "
                                f"after {timeout_s}s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


class LocalProvider(Provider):
    """Starts node agents as subprocesses on this machine."""

    name = "local"

    def __init__(self, *, log_dir: Path, cluster: str = "", grace_s: float = 30.0,
                 python: str = sys.executable, agent_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, max_nodes: int = 0,
                 price_per_hour: float = 0.0, instance_type: str = "local",
                 cwd: str | None = None,
                 node_args: Callable[[str], Sequence[str]] | None = None) -> None:
        """`log_dir`: agents' process logs (<log_dir>/<job>/g<gen>/...) and the agents' own
        output (<log_dir>/agents/<handle>.log). `cluster` scopes the /proc marker so that two
        providers (two daemons, two tests) never touch each other's nodes; default: the
        absolute log_dir, which a restarted daemon with the same state dir finds again.
        `max_nodes` (0 = no limit) caps live nodes. `agent_args` are extra CLI arguments;
        `node_args(handle)` adds arguments for one node (a trace replay gives each node its own
        `--imds-endpoint`, as each EC2 instance has its own metadata service)."""
        self.log_dir = Path(log_dir).absolute()
        self.cluster = cluster or str(self.log_dir)
        self.grace_s = grace_s
        self.python = python
        self.agent_args = tuple(agent_args)
        self.env = dict(os.environ if env is None else env)
        self.max_nodes = max_nodes
        self.price_per_hour = price_per_hour
        self.instance_type = instance_type
        self.cwd = cwd
        self.node_args = node_args
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._next = 0
        self._adopt()

    def marker(self, handle: str) -> str:
        """The MARKER_ENV value of a node's processes."""
        return f"{self.cluster}/{handle}"

    def _adopt(self) -> None:
        """Find live agents of this cluster started by an earlier provider object."""
        for pid, value in scan_marked(self.cluster + "/").items():
            handle = value[len(self.cluster) + 1:]
            if "/" in handle:
                continue  # a node of another cluster whose name extends ours
            m = _HANDLE_RE.match(handle)
            if m:
                self._next = max(self._next, int(m.group(1)) + 1)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if b"--provider-node" in cmdline and handle not in self._agents:
                self._agents[handle] = _Agent(handle=handle, job_id=_environ_value(pid, JOB_ENV),
                                              popen=None, pid=pid, lifecycle="spot")
                log.info("local provider: adopted agent %s pid %d", handle, pid)

    def launch(self, request: NodeRequest, count: int) -> list[ProviderNode]:
        if not request.daemon_address:
            raise ValueError("NodeRequest.daemon_address is required for local nodes")
        started: list[ProviderNode] = []
        with self._lock:
            self._reap()
            if self.max_nodes:
                count = min(count, self.max_nodes - len(self._agents))
            for _ in range(max(0, count)):
                handle = f"local-{self._next}"
                self._next += 1
                lifecycle = "on-demand" if request.market == "on-demand" else "spot"
                started.append(self._start(handle, request, lifecycle))
        return started

    def node_command(self, handle: str, request: NodeRequest, lifecycle: str) -> list[str]:
        """The command a node runs: a spotwise node agent. (A benchmark's subclass runs a
        torchrun elastic agent instead, to compare the two on the same simulated machines.)"""
        argv = [self.python, "-m", "spotwise.cli", "agent", "--daemon", request.daemon_address,
                "--provider-node", handle, "--slots", str(request.slots),
                "--log-dir", str(self.log_dir), "--instance-type", self.instance_type,
                "--lifecycle", lifecycle, "--price-per-hour", str(self.price_per_hour),
                "--grace-s", str(self.grace_s), *self.agent_args]
        if self.node_args is not None:
            argv += list(self.node_args(handle))
        return argv

    def _start(self, handle: str, request: NodeRequest, lifecycle: str) -> ProviderNode:
        argv = self.node_command(handle, request, lifecycle)
        env = dict(self.env)
        env[MARKER_ENV] = self.marker(handle)
        env[JOB_ENV] = request.job_id
        agents_dir = self.log_dir / "agents"
        agents_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(agents_dir / f"{handle}.log", "ab") as out:
                popen = subprocess.Popen(argv, env=env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as e:
            raise ProviderError(f"local provider: cannot start agent {handle}: {argv!r}: {e}") from e
        self._agents[handle] = _Agent(handle=handle, job_id=request.job_id, popen=popen,
                                      pid=popen.pid, lifecycle=lifecycle)
        log.info("local provider: started agent %s pid %d for job %s", handle, popen.pid,
                 request.job_id or "-")
        return ProviderNode(handle=handle, job_id=request.job_id, instance_type=self.instance_type,
                            zone="local", lifecycle=lifecycle, state="running",
                            tags={"pid": str(popen.pid)})

    def kill(self, handle: str) -> list[int]:
        """A spot loss without notice: SIGKILL the agent and every process of the node.
        Returns the pids killed (the agent's group included). Unknown handles kill nothing."""
        with self._lock:
            agent = self._agents.pop(handle, None)
        killed: list[int] = []
        if agent is not None:
            try:
                os.killpg(agent.pid, signal.SIGKILL)
                killed.append(agent.pid)
            except (ProcessLookupError, PermissionError):
                pass
        killed += kill_marked(self.marker(handle))
        if agent is not None and agent.popen is not None:
            try:
                agent.popen.wait(timeout=10)
            except subprocess.TimeoutExpired as e:
                raise ProviderError(f"local node {handle}: agent pid {agent.pid} not reaped "
                                    "10s after SIGKILL") from e
        if killed:
            log.info("local provider: killed node %s (pids %s)", handle, sorted(set(killed)))
        return sorted(set(killed))

    def terminate(self, handles: Sequence[str]) -> None:
        for handle in handles:
            self.kill(handle)

    def node_pids(self, handle: str) -> list[int]:
        """Every live process of a node: the agent and its training processes."""
        return sorted(scan_marked(self.marker(handle)))

    def _reap(self) -> None:
        for handle, agent in list(self._agents.items()):
            alive = (agent.popen.poll() is None) if agent.popen is not None else _alive(agent.pid)
            if not alive:
                log.info("local provider: agent %s (pid %d) has exited", handle, agent.pid)
                del self._agents[handle]
                # Its training processes must not outlive it as orphans.
                kill_marked(self.marker(handle))

    def fleet_price(self) -> float | None:
        """The price this provider was configured with (0: none)."""
        return self.price_per_hour or None

    def list_nodes(self) -> list[ProviderNode]:
        with self._lock:
            self._reap()
            return [ProviderNode(handle=a.handle, job_id=a.job_id,
                                 instance_type=self.instance_type, zone="local",
                                 lifecycle=a.lifecycle, state="running",
                                 tags={"pid": str(a.pid)})
                    for a in self._agents.values()]

    def close(self) -> None:
        """Leaves the nodes running (a restarted daemon adopts them); `shutdown` stops them."""

    def shutdown(self) -> None:
        """Kill every node of this provider."""
        with self._lock:
            handles = list(self._agents)
        self.terminate(handles)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
