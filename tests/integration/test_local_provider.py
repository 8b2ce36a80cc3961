"""The local provider with real agents (`python -m spotwise.cli agent`) and a real AgentService.

Proves: launched agents register with their handles; `kill` takes the agent, its training
processes and even a grandchild that left their session (found by the /proc marker); a new
provider object adopts the live agents of its cluster; `terminate` leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from grpc import aio

from spotwise.cloud.local import LocalProvider, scan_marked
from spotwise.cloud.provider import NodeRequest
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2

# A trainer that starts a grandchild in a session of its own: not in the trainer's process
# group, so only the marker can find it.
TRAINER = """
import os, subprocess, sys, time
out = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
with open(out + "/pids", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
while True:
    time.sleep(0.1)
"""


class Daemon(agent_pb2_grpc.AgentServiceServicer):
    """A real AgentService that records registrations and hands out `assignments`."""

    def __init__(self) -> None:
        self.registers: dict[str, agent_pb2.RegisterRequest] = {}
        self.assignments: dict[str, agent_pb2.Assignment] = {}

    async def Register(self, request, context):  # noqa: N802 - gRPC method name
        node_id = request.node_id or f"n-{request.provider_node}"
        self.registers[request.provider_node] = request
        return agent_pb2.RegisterResponse(node_id=node_id, heartbeat_interval_s=0.2, lease_s=2)

    async def Heartbeat(self, request, context):  # noqa: N802
        return agent_pb2.HeartbeatResponse(
            assignment=self.assignments.get(request.node_id, agent_pb2.Assignment()))

    async def ReportEvent(self, request, context):  # noqa: N802
        return agent_pb2.ReportEventResponse(accepted=True)


async def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_launch_kill_adopt_terminate(tmp_path: Path) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario() -> None:
        daemon = Daemon()
        server = aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(daemon, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        provider = LocalProvider(log_dir=tmp_path / "logs", cluster=f"test-{tmp_path.name}",
                                 grace_s=2.0)
        try:
            request = NodeRequest(job_id="job-x", daemon_address=f"127.0.0.1:{port}", slots=1)
            nodes = await asyncio.to_thread(provider.launch, request, 2)
            assert [n.handle for n in nodes] == ["local-0", "local-1"]
            assert all(n.job_id == "job-x" and n.state == "running" for n in nodes)
            await _until(lambda: set(daemon.registers) == {"local-0", "local-1"}, 60,
                         "both agents to register")
            reg = daemon.registers["local-0"]
            assert reg.slots == 1 and reg.lifecycle == "spot" and reg.store_port > 0

            spec = jobs_pb2.JobSpec(name="t", entrypoint=["python", str(script), str(tmp_path)],
                                    nproc_per_node=1)
            daemon.assignments["n-local-0"] = agent_pb2.Assignment(
                job_id="job-x", generation=1, spec=spec, world_size=1, num_nodes=1, nproc=1,
                master_addr="127.0.0.1", master_port=reg.store_port, restore_step=-1)
            pids_file = tmp_path / "pids"
            await _until(lambda: pids_file.exists() and pids_file.read_text(), 30, "trainer")
            trainer, grandchild = map(int, pids_file.read_text().split())
            agent_pid = int(next(n for n in nodes if n.handle == "local-0").tags["pid"])
            node_pids = provider.node_pids("local-0")
            assert {agent_pid, trainer, grandchild} <= set(node_pids)

            killed = await asyncio.to_thread(provider.kill, "local-0")
            assert {agent_pid, trainer, grandchild} <= set(killed)
            for pid in (agent_pid, trainer, grandchild):
                assert not _alive(pid), pid
            assert provider.node_pids("local-0") == []
            assert [n.handle for n in provider.list_nodes()] == ["local-1"]

            # A new provider object (a restarted daemon) finds local-1 again, numbers on.
            again = LocalProvider(log_dir=tmp_path / "logs", cluster=provider.cluster)
            assert [n.handle for n in again.list_nodes()] == ["local-1"]
            assert again.list_nodes()[0].job_id == "job-x"
            more = await asyncio.to_thread(again.launch, request, 1)
            assert [n.handle for n in more] == ["local-2"]
            await asyncio.to_thread(again.terminate, ["local-1", "local-2", "local-99"])
            assert again.list_nodes() == []
            assert scan_marked(provider.cluster + "/") == {}
        finally:
            await asyncio.to_thread(provider.shutdown)
            leftover = scan_marked(provider.cluster + "/")
            for pid in leftover:
                os.kill(pid, signal.SIGKILL)
            await server.stop(0)
        assert leftover == {}

    asyncio.run(scenario())


def test_max_nodes_caps_launches(tmp_path: Path) -> None:
    provider = LocalProvider(log_dir=tmp_path / "logs", cluster=f"cap-{tmp_path.name}",
                             max_nodes=1)
    try:
        # An unreachable daemon is fine: the agent keeps retrying; we only count launches.
        request = NodeRequest(job_id="j", daemon_address="127.0.0.1:9", slots=1)
        assert len(provider.launch(request, 3)) == 1
        assert provider.launch(request, 1) == []
    finally:
        provider.shutdown()
    assert scan_marked(provider.cluster + "/") == {}
