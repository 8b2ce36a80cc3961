"""The node agent against a real grpc.aio AgentService that hands out scripted assignments.

The servicer here is a real server on a real port (not a mock): it records what agents send
and answers heartbeats with whatever assignment the test sets, so each test can walk an agent
through generations, drains, daemon outages and re-registration.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from grpc import aio

from spotwise.config import AgentConfig
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2
from spotwise.worker.agent import STAMP_KEY, Agent

TRAINER = """
import json, os, signal, sys, time
out, mode = sys.argv[1], sys.argv[2]
gen, rank = os.environ["SPOTWISE_GENERATION"], os.environ["RANK"]
world = int(os.environ["WORLD_SIZE"])
def emit(**kw):
    kw.update(time=time.time(), generation=int(gen))
    with open(os.environ["SPOTWISE_EVENTS_FILE"], "a") as f:
        f.write(json.dumps(kw) + "\\n")
usr1 = 0
def on_usr1(*_):
    global usr1
    usr1 += 1
    with open(f"{out}/usr1.{gen}.{rank}", "w") as f:
        f.write(str(usr1))
signal.signal(signal.SIGUSR1, on_usr1)
def on_usr2(*_):  # the request's end (the runtime's hold ends)
    with open(f"{out}/usr2.{gen}.{rank}", "a") as f:
        f.write("1")
signal.signal(signal.SIGUSR2, on_usr2)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else
              (lambda *_: sys.exit(143)))
if mode == "allreduce":
    import torch, torch.distributed as dist
    from datetime import timedelta
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    t = torch.tensor([float(int(rank) + 1)])
    dist.all_reduce(t)
    with open(f"{out}/sum.{gen}.{rank}", "w") as f:
        f.write(str(t.item()))
    dist.destroy_process_group()
    sys.exit(0)
emit(event="ready", rank=int(rank))  # the SIGUSR1 handler is installed: checkpoint requests may come
emit(event="restored", step=4, world_size=world)
emit(event="progress", step=5, loss=2.5, samples_per_second=10.0, world_size=world)
emit(event="checkpoint_committed", step=5, path="/ck/5", bytes=100, cursor=40)
with open(f"{out}/pid.{gen}.{rank}", "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""


class ScriptedDaemon(agent_pb2_grpc.AgentServiceServicer):
    """A real AgentService: records calls, answers heartbeats with `assignments[node_id]`."""

    def __init__(self, *, heartbeat_interval_s: float = 0.1, lease_s: float = 1.0) -> None:
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_s = lease_s
        self.registers: list[agent_pb2.RegisterRequest] = []
        self.heartbeats: list[agent_pb2.HeartbeatRequest] = []
        self.reports: list[agent_pb2.ReportEventRequest] = []
        self.assignments: dict[str, agent_pb2.Assignment] = {}
        self._nodes = 0

    async def Register(self, request, context):  # noqa: N802 - gRPC method name
        self.registers.append(request)
        node_id = request.node_id
        if not node_id:
            self._nodes += 1
            node_id = f"node-{self._nodes}"
        return agent_pb2.RegisterResponse(node_id=node_id,
                                          heartbeat_interval_s=self.heartbeat_interval_s,
                                          lease_s=self.lease_s)

    async def Heartbeat(self, request, context):  # noqa: N802
        self.heartbeats.append(request)
        return agent_pb2.HeartbeatResponse(
            assignment=self.assignments.get(request.node_id, agent_pb2.Assignment()))

    async def ReportEvent(self, request, context):  # noqa: N802
        self.reports.append(request)
        return agent_pb2.ReportEventResponse(accepted=True)

    def reports_of(self, kind: str, generation: int | None = None) -> list:
        return [r for r in self.reports if r.WhichOneof("event") == kind
                and (generation is None or r.generation == generation)]


async def _serve(daemon: ScriptedDaemon, port: int = 0) -> tuple[aio.Server, int]:
    server = aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(daemon, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


async def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _assignment(script: Path, out: Path, mode: str, *, generation: int, store_port: int,
                job_id: str = "job-a", world_size: int = 1, node_rank: int = 0,
                num_nodes: int = 1, rank_start: int = 0, checkpoint_now: bool = False,
                ) -> agent_pb2.Assignment:
    spec = jobs_pb2.JobSpec(name="t", entrypoint=["python", str(script), str(out), mode],
                            nproc_per_node=1)
    return agent_pb2.Assignment(
        job_id=job_id, generation=generation, spec=spec, world_size=world_size,
        node_rank=node_rank, num_nodes=num_nodes, rank_start=rank_start, nproc=1,
        master_addr="127.0.0.1", master_port=store_port, restore_step=-1,
        checkpoint_now=checkpoint_now)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _store_get(port: int, key: str) -> str:
    from torch.distributed import TCPStore

    client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    return client.get(key).decode()


def test_agent_follows_assignments_and_forwards_events(tmp_path: Path) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario() -> None:
        daemon = ScriptedDaemon()
        server, port = await _serve(daemon)
        config = AgentConfig.load(daemon=f"127.0.0.1:{port}", log_dir=tmp_path / "logs",
                                  provider_node="local-7", slots=2, grace_s=5.0,
                                  state_dir=tmp_path / "state")
        agent = Agent(config)
        task = asyncio.create_task(agent.run())
        try:
            await _until(lambda: daemon.registers, 30, "Register")
            reg = daemon.registers[0]
            assert reg.store_port > 0 and reg.slots == 2 and reg.provider_node == "local-7"
            assert reg.log_dir == str(tmp_path / "logs") and reg.current_job_id == ""
            await _until(lambda: len(daemon.heartbeats) >= 3, 10, "heartbeats")
            node = daemon.heartbeats[-1].node_id
            assert node == "node-1"

            # Generation 1: the process starts, its events reach the daemon tagged with g1.
            daemon.assignments[node] = _assignment(script, tmp_path, "wait", generation=1,
                                                   store_port=reg.store_port)
            await _until(lambda: daemon.reports_of("checkpoint_committed", 1), 30, "commit")
            ck = daemon.reports_of("checkpoint_committed", 1)[0]
            assert (ck.job_id, ck.node_id, ck.checkpoint_committed.step,
                    ck.checkpoint_committed.path, ck.checkpoint_committed.cursor) == (
                        "job-a", node, 5, "/ck/5", 40)
            # The restored event (step 4) is a Restored report, not a Progress.
            restored = daemon.reports_of("restored", 1)
            assert [(r.restored.step, r.restored.world_size) for r in restored] == [(4, 1)]
            assert all(p.progress.step == 5 for p in daemon.reports_of("progress", 1))
            await _until(lambda: any(p.progress.step == 5 and p.progress.loss == 2.5
                                     for p in daemon.reports_of("progress", 1)), 5, "progress")
            assert _store_get(reg.store_port, STAMP_KEY) == "job-a:1"
            await _until(lambda: (tmp_path / "pid.1.0").exists(), 10, "pid file")
            pid1 = int((tmp_path / "pid.1.0").read_text())
            # (A heartbeat built just before the start may still be in flight: wait for one.)
            await _until(lambda: daemon.heartbeats[-1].job_id, 10, "a heartbeat with the job")
            hb = daemon.heartbeats[-1]
            assert (hb.job_id, hb.generation) == ("job-a", 1)
            assert [(p.rank, p.pid, p.running) for p in hb.processes] == [(0, pid1, True)]

            # A drain: SIGUSR1 once per request, however many heartbeats carry the flag.
            usr1 = tmp_path / "usr1.1.0"
            daemon.assignments[node].checkpoint_now = True
            await _until(usr1.exists, 10, "SIGUSR1")
            n = len(daemon.heartbeats)
            await _until(lambda: len(daemon.heartbeats) >= n + 5, 10, "more heartbeats")
            assert usr1.read_text() == "1"
            daemon.assignments[node].checkpoint_now = False
            # The request ended with no new generation: SIGUSR2, once.
            usr2 = tmp_path / "usr2.1.0"
            await _until(usr2.exists, 10, "SIGUSR2 at the request's end")
            n = len(daemon.heartbeats)
            await _until(lambda: len(daemon.heartbeats) >= n + 2, 10, "more heartbeats")
            assert usr2.read_text() == "1"
            daemon.assignments[node].checkpoint_now = True
            await _until(lambda: usr1.read_text() == "2", 10, "a second SIGUSR1")

            # Generation 2: g1's process is stopped (143 reported under g1), g2's starts with
            # a fresh store.
            daemon.assignments[node] = _assignment(script, tmp_path, "wait", generation=2,
                                                   store_port=reg.store_port)
            await _until(lambda: daemon.reports_of("process_exited", 1), 15, "g1 exit")
            assert daemon.reports_of("process_exited", 1)[0].process_exited.exit_code == 143
            assert not _alive(pid1)
            await _until(lambda: (tmp_path / "pid.2.0").exists(), 30, "g2 process")
            pid2 = int((tmp_path / "pid.2.0").read_text())
            assert _store_get(reg.store_port, STAMP_KEY) == "job-a:2"
            env = Path(f"/proc/{pid2}/environ").read_bytes().split(b"\0")
            assert b"TORCHELASTIC_RESTART_COUNT=2" in env
            log = tmp_path / "logs" / "job-a" / "g2" / "rank0.log"
            assert log.exists()

            # An empty assignment stops everything.
            daemon.assignments[node] = agent_pb2.Assignment()
            await _until(lambda: daemon.reports_of("process_exited", 2), 15, "g2 exit")
            assert not _alive(pid2)
            await _until(lambda: daemon.heartbeats[-1].job_id == "", 5, "idle heartbeat")
        finally:
            agent.request_stop()
            rc = await asyncio.wait_for(task, 30)
            await server.stop(0)
        assert rc == 0

    asyncio.run(scenario())


@pytest.mark.slow
def test_new_generation_is_fenced_before_the_old_one_is_stopped(tmp_path: Path) -> None:
    """The agent writes the new generation's fence marker at once, and since the old
    generation can then commit nothing, it stops it with the short switch grace, not the
    full one (a process stuck in a collective would otherwise hold recovery for grace_s)."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario() -> None:
        daemon = ScriptedDaemon()
        server, port = await _serve(daemon)
        config = AgentConfig.load(daemon=f"127.0.0.1:{port}", log_dir=tmp_path / "logs",
                                  grace_s=8.0, state_dir=tmp_path / "state")
        agent = Agent(config, switch_grace_s=1.0)
        task = asyncio.create_task(agent.run())
        try:
            await _until(lambda: daemon.heartbeats, 30, "heartbeat")
            node, store_port = daemon.heartbeats[-1].node_id, daemon.registers[0].store_port
            a1 = _assignment(script, tmp_path, "stubborn", generation=1, store_port=store_port)
            a1.spec.working_dir = str(tmp_path)
            a1.spec.checkpoint.uri = "ck"  # relative to working_dir, as the runtime sees it
            daemon.assignments[node] = a1
            await _until(lambda: (tmp_path / "pid.1.0").exists(), 30, "g1 process")
            marker = tmp_path / "ck" / "job-a" / "generations" / "g-0000000002"
            assert (tmp_path / "ck" / "job-a" / "generations" / "g-0000000001").exists()
            assert not marker.exists()
            a2 = agent_pb2.Assignment()
            a2.CopyFrom(a1)
            a2.generation = 2
            t0 = time.monotonic()
            daemon.assignments[node] = a2
            await _until(marker.exists, 10, "the g2 fence marker")
            await _until(lambda: daemon.reports_of("process_exited", 1), 20, "g1 stopped")
            took = time.monotonic() - t0
            assert daemon.reports_of("process_exited", 1)[0].process_exited.exit_code == 137
            assert 1.0 <= took < 6.0, took  # the switch grace, not grace_s=8
            await _until(lambda: (tmp_path / "pid.2.0").exists(), 30, "g2 process")

            # An empty assignment is not a switch: the full grace applies (SIGKILL after 8s),
            # so the stubborn process is still there a couple of seconds later.
            pid2 = int((tmp_path / "pid.2.0").read_text())
            daemon.assignments[node] = agent_pb2.Assignment()
            t1 = time.monotonic()
            await _until(lambda: time.monotonic() - t1 > 2.5, 5, "time to pass")
            assert _alive(pid2)
        finally:
            agent.request_stop()
            await asyncio.wait_for(task, 90)
            await server.stop(0)

    asyncio.run(scenario())


@pytest.mark.slow
def test_two_agents_rendezvous_on_node0_store_across_generations(tmp_path: Path) -> None:
    """Real gloo collectives over two agents, twice on the same store port: the second
    generation must not see the first one's rendezvous keys."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario() -> None:
        daemon = ScriptedDaemon()
        server, port = await _serve(daemon)
        agents = [Agent(AgentConfig.load(daemon=f"127.0.0.1:{port}", grace_s=5.0,
                                         log_dir=tmp_path / f"logs{i}",
                                         state_dir=tmp_path / "state"))
                  for i in range(2)]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        try:
            await _until(lambda: len({h.node_id for h in daemon.heartbeats}) == 2, 30, "2 nodes")
            ports = {a.node_id: a.store.port for a in agents}
            n0, n1 = agents[0].node_id, agents[1].node_id
            for gen in (1, 2):
                for rank, node in enumerate((n0, n1)):
                    daemon.assignments[node] = _assignment(
                        script, tmp_path, "allreduce", generation=gen, store_port=ports[n0],
                        world_size=2, node_rank=rank, num_nodes=2, rank_start=rank)
                sums = [tmp_path / f"sum.{gen}.{r}" for r in (0, 1)]
                await _until(lambda sums=sums: all(s.exists() for s in sums), 90,
                             f"g{gen} all_reduce")
                assert [s.read_text() for s in sums] == ["3.0", "3.0"]
                await _until(lambda gen=gen: len(daemon.reports_of("process_exited", gen)) == 2,
                             15, f"g{gen} exits")
                assert [r.process_exited.exit_code
                        for r in daemon.reports_of("process_exited", gen)] == [0, 0]
        finally:
            for a in agents:
                a.request_stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            await server.stop(0)

    asyncio.run(scenario())


@pytest.mark.slow
def test_daemon_outage_keeps_processes_and_reregisters(tmp_path: Path) -> None:
    """The agent as a real subprocess: the daemon goes away longer than the lease, training
    keeps running, and the agent re-registers with its current job and generation."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario() -> None:
        daemon = ScriptedDaemon(lease_s=0.5)
        server, port = await _serve(daemon)
        proc = subprocess.Popen(
            [sys.executable, "-m", "spotwise.worker.agent", "--daemon", f"127.0.0.1:{port}",
             "--log-dir", str(tmp_path / "logs"), "--state-dir", str(tmp_path / "state"),
             "--grace-s", "5", "--provider-node", "local-1"],
            stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)
        server2 = None
        try:
            await _until(lambda: daemon.heartbeats, 30, "first heartbeat")
            node = daemon.heartbeats[-1].node_id
            store_port = daemon.registers[0].store_port
            a = _assignment(script, tmp_path, "wait", generation=3, store_port=store_port)
            daemon.assignments[node] = a
            await _until(lambda: (tmp_path / "pid.3.0").exists(), 30, "process")
            pid = int((tmp_path / "pid.3.0").read_text())

            await server.stop(0)
            outage_start = time.monotonic()
            # The outage must outlast the lease; meanwhile training must keep running.
            await _until(lambda: time.monotonic() - outage_start > 2.0, 5, "the outage")
            assert _alive(pid) and proc.poll() is None

            daemon2 = ScriptedDaemon(lease_s=0.5)
            daemon2.assignments[node] = a
            server2, _ = await _serve(daemon2, port)
            await _until(lambda: daemon2.registers, 30, "re-register")
            reg = daemon2.registers[0]
            assert (reg.node_id, reg.current_job_id, reg.current_generation) == (node, "job-a", 3)
            assert reg.store_port == store_port
            await _until(lambda: daemon2.heartbeats, 10, "heartbeats to the new daemon")
            assert _alive(pid)  # the same process, never restarted
            assert not (tmp_path / "logs" / "job-a" / "g3" / "rank1.log").exists()
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=30)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
            if server2 is not None:
                await server2.stop(0)
        assert rc == 0
        assert not _alive(pid)  # the agent stopped its processes on the way out

    asyncio.run(scenario())


def test_agent_cli_flags_build_the_config(tmp_path: Path) -> None:
    import argparse

    from spotwise.worker.agent import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--daemon", "127.0.0.1:9", "--slots", "3", "--log-dir",
                              str(tmp_path), "--provider-node", "local-4", "--lifecycle",
                              "on-demand", "--price-per-hour", "0.5", "--grace-s", "7"])
    c = config_from_args(args)
    assert (c.daemon, c.slots, c.effective_log_dir, c.provider_node, c.lifecycle,
            c.price_per_hour, c.grace_s) == ("127.0.0.1:9", 3, tmp_path, "local-4", "on-demand",
                                             0.5, 7.0)


@pytest.mark.slow
def test_restarted_agent_kills_what_its_crashed_life_left_running(tmp_path: Path) -> None:
    """Training processes run in sessions of their own, so an agent that dies (SIGKILL, a
    crash) leaves them running; the agent started again on the node kills them first."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    def start_agent(port: int, name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "spotwise.worker.agent", "--daemon", f"127.0.0.1:{port}",
             "--log-dir", str(tmp_path / "logs"), "--state-dir", str(tmp_path / "state"),
             "--grace-s", "5", "--provider-node", "local-5"],
            stdout=open(tmp_path / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True)

    async def scenario() -> None:
        daemon = ScriptedDaemon()
        server, port = await _serve(daemon)
        first = start_agent(port, "first")
        second = None
        try:
            await _until(lambda: daemon.heartbeats, 30, "first heartbeat")
            node = daemon.heartbeats[-1].node_id
            daemon.assignments[node] = _assignment(script, tmp_path, "wait", generation=1,
                                                   store_port=daemon.registers[0].store_port)
            await _until(lambda: (tmp_path / "pid.1.0").exists(), 30, "process")
            orphan = int((tmp_path / "pid.1.0").read_text())
            os.kill(first.pid, signal.SIGKILL)  # the agent only, not its training process
            first.wait(timeout=10)
            assert _alive(orphan)
            daemon.assignments.clear()
            second = start_agent(port, "second")
            await _until(lambda: not _alive(orphan), 30, "the orphan to be killed")
            assert "left running by an earlier life" in (tmp_path / "second.log").read_text()
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            pid_file = tmp_path / "pid.1.0"
            if pid_file.exists() and _alive(pid := int(pid_file.read_text())):
                os.killpg(pid, signal.SIGKILL)
            await server.stop(0)

    asyncio.run(scenario())


def test_imds_identity_and_interruption_notice_reach_the_daemon(tmp_path: Path) -> None:
    """With an IMDS endpoint (a real HTTP metadata server here), the agent registers with the
    instance's identity and reports a spot interruption notice once, tagged with its job."""
    from spotwise.cloud.fake_imds import FakeImds

    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario(imds: FakeImds) -> None:
        daemon = ScriptedDaemon()
        server, port = await _serve(daemon)
        config = AgentConfig.load(daemon=f"127.0.0.1:{port}", log_dir=tmp_path / "logs",
                                  state_dir=tmp_path / "state", grace_s=5.0,
                                  imds_endpoint=imds.url, imds_poll_s=1.0)
        agent = Agent(config)
        task = asyncio.create_task(agent.run())
        try:
            await _until(lambda: daemon.heartbeats, 30, "heartbeat")
            reg = daemon.registers[0]
            assert (reg.instance_id, reg.instance_type, reg.zone, reg.lifecycle) == (
                "i-0123", "g5.xlarge", "us-west-2b", "spot")
            node = daemon.heartbeats[-1].node_id
            daemon.assignments[node] = _assignment(script, tmp_path, "wait", generation=7,
                                                   store_port=reg.store_port)
            await _until(lambda: (tmp_path / "pid.7.0").exists(), 30, "process")
            deadline = imds.schedule_instance_action("terminate", after_s=0, lead_s=120)
            await _until(lambda: daemon.reports_of("interruption_notice"), 10, "the notice")
            n = len(daemon.heartbeats)
            await _until(lambda: len(daemon.heartbeats) >= n + 25, 10, "more polls")
            notices = daemon.reports_of("interruption_notice")
            assert len(notices) == 1  # reported once, though IMDS keeps showing it
            r = notices[0]
            assert (r.job_id, r.generation, r.interruption_notice.action) == ("job-a", 7,
                                                                               "terminate")
            assert abs(r.interruption_notice.deadline - deadline) < 1.0
            # Counted once in the agent's metrics (no exporter needed to read the registry).
            assert agent.metrics.registry.get_sample_value(
                "spotwise_agent_interruption_notices_total", {"action": "terminate"}) == 1
            assert agent.metrics.registry.get_sample_value(
                "spotwise_agent_imds_errors_total") == 0
        finally:
            agent.request_stop()
            await asyncio.wait_for(task, 30)
            await server.stop(0)

    with FakeImds(instance_id="i-0123", instance_type="g5.xlarge", zone="us-west-2b") as imds:
        asyncio.run(scenario(imds))


def _scrape(port: int) -> dict[str, float]:
    """The exporter's samples as {name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_agent_metrics_follow_heartbeats_processes_exits_and_outages(tmp_path: Path) -> None:
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)

    async def scenario() -> None:
        daemon = ScriptedDaemon()
        server, port = await _serve(daemon)
        config = AgentConfig.load(daemon=f"127.0.0.1:{port}", log_dir=tmp_path / "logs",
                                  state_dir=tmp_path / "state", grace_s=5.0,
                                  metrics_listen="127.0.0.1:0")
        agent = Agent(config, max_disconnect_s=60)
        task = asyncio.create_task(agent.run())

        async def metrics() -> dict[str, float]:
            assert agent.metrics_exporter is not None
            return await asyncio.to_thread(_scrape, agent.metrics_exporter.port)

        try:
            await _until(lambda: len(daemon.heartbeats) >= 3, 30, "heartbeats")
            m = await metrics()
            assert m["spotwise_agent_heartbeat_seconds_count"] >= 2
            assert m["spotwise_agent_processes"] == 0 and m["spotwise_agent_generation"] == 0
            node = daemon.heartbeats[-1].node_id
            daemon.assignments[node] = _assignment(script, tmp_path, "wait", generation=4,
                                                   store_port=daemon.registers[0].store_port)
            await _until(lambda: daemon.reports_of("checkpoint_committed", 4), 30, "a commit")
            m = await metrics()
            assert m["spotwise_agent_processes"] == 1 and m["spotwise_agent_generation"] == 4
            assert m["spotwise_agent_checkpoints_committed_total"] == 1
            assert m['spotwise_agent_process_exits_total{outcome="stopped"}'] == 0

            daemon.assignments[node] = agent_pb2.Assignment()  # stop: SIGTERM, exit 143
            await _until(lambda: daemon.reports_of("process_exited", 4), 30, "the exit")
            m = await metrics()
            assert m["spotwise_agent_processes"] == 0
            assert m['spotwise_agent_process_exits_total{outcome="stopped"}'] == 1
            assert m['spotwise_agent_process_exits_total{outcome="failed"}'] == 0

            await server.stop(0)  # the daemon goes away: failed heartbeats are counted
            await asyncio.sleep(1.5)
            assert (await metrics())["spotwise_agent_daemon_errors_total"] >= 1
        finally:
            agent.request_stop()
            await asyncio.wait_for(task, 30)
            await server.stop(0)
        assert agent.metrics_exporter is not None
        with pytest.raises(OSError):  # closed with the agent
            await asyncio.to_thread(_scrape, agent.metrics_exporter.port)

    asyncio.run(scenario())
