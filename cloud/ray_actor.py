"""The Ray actor that holds one node for spotwise: it runs the node agent there.

The provider (spotwise.cloud.ray) creates one `NodeAgentActor` per eligible Ray node, detached
and named `spotwise-agent-<node id>`, pinned to the node (hard node affinity) and holding the
node's eligibility resource, so that Ray schedules nothing else onto it. The actor starts the
real node agent (`spotwise agent`, the same program as on any machine) behind a guard
(spotwise.cloud.ray_guard) that kills the agent and its training processes when the actor goes.
The agent registers with the daemon like any agent, with the Ray node id as its provider node
and instance id (so the daemon matches Ray's drain notices to it).

This module is imported in the actor's worker process; it imports Ray only for the node's own
facts (its id and address).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spotwise.cloud.ray_guard import spawn, start_time

ACTOR_PREFIX = "spotwise-agent-"
"""Agent actors are named ACTOR_PREFIX + the Ray node id (hex), in the provider's namespace."""


def actor_name(node_id: str) -> str:
    """The name of the agent actor of a Ray node."""
    return ACTOR_PREFIX + node_id


def agent_env(base: Mapping[str, str], *, node_id: str, zone: str, gpus: int) -> dict[str, str]:
    """The agent's environment: the worker's, with this interpreter first on PATH (job
    entrypoints say "python") and the agent settings that have no command-line flag."""
    env = dict(base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["SPOTWISE_AGENT_INSTANCE_ID"] = node_id
    env["SPOTWISE_AGENT_GPUS"] = str(gpus)
    if zone:
        env["SPOTWISE_AGENT_ZONE"] = zone
    # Ray points a worker at its own session; the job's processes are not Ray workers.
    for name in ("RAY_JOB_ID", "RAY_RAYLET_PID"):
        env.pop(name, None)
    return env


class NodeAgentActor:
    """Runs `spotwise agent` on this node until killed (wrapped with ray.remote by the
    provider). Raises OSError from the constructor if the agent cannot be started."""

    def __init__(self, *, job_id: str, agent_args: Sequence[str], work_dir: str, marker: str,
                 zone: str = "", gpus: int = 0, grace_s: float = 30.0) -> None:
        import ray

        self.job_id = job_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.address = ray.util.get_node_ip_address()
        self.started_at = time.time()
        root = Path(work_dir)
        (root / "state").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = str(root / "agent.log")
        argv = [sys.executable, "-m", "spotwise.cli", "agent", *agent_args,
                "--address", self.address, "--state-dir", str(root / "state"),
                "--log-dir", str(root / "logs")]
        env = agent_env(os.environ, node_id=self.node_id, zone=zone, gpus=gpus)
        self.guard_pid = spawn(argv, watch_pid=os.getpid(), marker=marker, env=env,
                               log_path=self.log_path, grace_s=grace_s)
        self._guard_start = start_time(self.guard_pid)

    def describe(self) -> dict[str, Any]:
        """What the provider needs to adopt this agent after a daemon restart."""
        return {"job_id": self.job_id, "node_id": self.node_id, "address": self.address,
                "guard_pid": self.guard_pid, "started_at": self.started_at,
                "running": self.running(), "log_path": self.log_path}

    def running(self) -> bool:
        """Whether the guard (and so the agent) still runs."""
        return self._guard_start is not None and start_time(self.guard_pid) == self._guard_start

    def stop(self, timeout_s: float = 60.0) -> bool:
        """SIGTERM the guard (the agent stops its processes within its grace) and wait up to
        `timeout_s`; True if it is gone. The provider kills the actor afterwards."""
        if not self.running():
            return True
        try:
            os.kill(self.guard_pid, signal.SIGTERM)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                return True
            time.sleep(0.1)
        return False
