"""The daemon over real gRPC on port 0: jobs, agents, assignments, fencing, health, reflection.

The "agents" here are this test speaking the agent protocol (register, heartbeat, report); the
real node agent has its own tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from spotwise.config import DaemonConfig
from spotwise.daemon.server import DaemonThread
from spotwise.daemon.store import Store
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec

T = TypeVar("T")
RPC_TIMEOUT_S = 5.0


def wait_for(what: str, fn: Callable[[], T | None], timeout_s: float = 10.0) -> T:
    """Poll `fn` until it returns something truthy, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def config(state_dir: Path) -> DaemonConfig:
    # Fast, but with leases long enough that a loaded 2-core machine does not lose nodes.
    return DaemonConfig(listen="127.0.0.1:0", state_dir=state_dir, agent_prices=True, heartbeat_interval_s=0.1,
                        lease_s=2.0, failure_lease_s=1.0, settle_s=0.2, tick_s=0.05,
                        grow_checkpoint_timeout_s=5.0)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonThread]:
    with DaemonThread(config(tmp_path / "state")) as d:
        yield d


@pytest.fixture
def channel(daemon: DaemonThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(daemon.address) as ch:
        yield ch


def spec(**kw: object) -> jobs_pb2.JobSpec:
    base: dict[str, object] = {"entrypoint": ["python", "train.py"], "checkpoint": {"uri": "/tmp/ck"},
                               "global_batch_size": 8, "nodes": {"min": 1, "max": 2},
                               "nproc_per_node": 2}
    base.update(kw)
    return JobSpec.model_validate(base).to_proto()


class Agent:
    """The agent side of the protocol, heartbeating in a thread like the real agent."""

    def __init__(self, channel: grpc.Channel, address: str, store_port: int, *,
                 price_per_hour: float = 0.0) -> None:
        self.stub = agent_pb2_grpc.AgentServiceStub(channel)
        self.address = address
        self.store_port = store_port
        self.price_per_hour = price_per_hour
        self.node_id = ""
        self.secret = ""
        self.version = 0
        self.job_id = ""
        self.generation = 0
        self.assignment = agent_pb2.Assignment()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self) -> str:
        resp = self.stub.Register(
            agent_pb2.RegisterRequest(node_id=self.node_id, node_secret=self.secret,
                                      address=self.address,
                                      store_port=self.store_port, slots=2,
                                      price_per_hour=self.price_per_hour,
                                      current_job_id=self.job_id,
                                      current_generation=self.generation),
            timeout=RPC_TIMEOUT_S,
        )
        self.node_id = resp.node_id
        self.secret = resp.node_secret or self.secret
        return resp.node_id

    def beat(self, **kw: object) -> agent_pb2.HeartbeatResponse:
        req = agent_pb2.HeartbeatRequest(node_id=self.node_id, node_secret=self.secret,
                                         job_id=self.job_id, generation=self.generation,
                                         assignment_version=self.version, **kw)
        resp = self.stub.Heartbeat(req, timeout=RPC_TIMEOUT_S)
        if not resp.HasField("assignment"):
            return resp  # unchanged
        self.version = resp.assignment_version
        self.assignment = resp.assignment
        # Like the agent: run what it is assigned (here: just claim to).
        self.job_id, self.generation = resp.assignment.job_id, resp.assignment.generation
        return resp

    def start(self) -> Agent:
        def loop() -> None:
            while not self._stop.wait(0.05):
                self.beat()

        self._stop.clear()
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(RPC_TIMEOUT_S)

    def report(self, *, job_id: str | None = None, generation: int | None = None,
               **event: object) -> agent_pb2.ReportEventResponse:
        return self.stub.ReportEvent(
            agent_pb2.ReportEventRequest(
                node_id=self.node_id, node_secret=self.secret,
                job_id=self.job_id if job_id is None else job_id,
                generation=self.generation if generation is None else generation,
                time=time.time(),
                **event,
            ),
            timeout=RPC_TIMEOUT_S,
        )


def get(jobs: jobs_pb2_grpc.JobServiceStub, job_id: str) -> jobs_pb2.Job:
    return jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)


def submit(jobs: jobs_pb2_grpc.JobServiceStub, **kw: object) -> str:
    return jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(**kw)), timeout=RPC_TIMEOUT_S).job_id


# ---- JobService ------------------------------------------------------------------------------


def test_submit_get_list_cancel(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, name="first")
    job = get(jobs, job_id)
    assert job.state == jobs_pb2.JOB_STATE_PENDING and job.spec.name == "first"
    other = submit(jobs, name="second")
    listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs
    assert [j.id for j in listed] == [job_id, other]

    cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    pending = jobs.ListJobs(jobs_pb2.ListJobsRequest(states=[jobs_pb2.JOB_STATE_PENDING]),
                            timeout=RPC_TIMEOUT_S).jobs
    assert [j.id for j in pending] == [other]

    with pytest.raises(grpc.RpcError) as err:
        jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        get(jobs, "job-nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_spec_with_several_errors_lists_each_field_and_stores_nothing(
    daemon: DaemonThread, channel: grpc.Channel
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    bad = jobs_pb2.JobSpec(
        entrypoint=[],  # missing program
        nodes=jobs_pb2.NodeRange(min=3, max=1),  # max < min
        nproc_per_node=0,  # must be >= 1
        checkpoint=jobs_pb2.CheckpointSpec(uri="ftp://x/y", every_steps=10, keep=1),
        global_batch_size=8,
        market="cheap",
    )
    with pytest.raises(grpc.RpcError) as err:
        jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=bad), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(err.value)
    assert status is not None
    violations = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        assert detail.Unpack(bad_request)
        violations.update({v.field: v.description for v in bad_request.field_violations})
    assert {"spec.entrypoint", "spec.nodes.max", "spec.nproc_per_node", "spec.checkpoint.uri",
            "spec.market"} <= set(violations), violations
    assert "nodes.min" in violations["spec.nodes.max"]

    assert not jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs
    store = Store(daemon.daemon.config.db_path)  # a second reader of the same WAL database
    try:
        assert store.jobs() == [] and store._select("SELECT COUNT(*) FROM events")[0][0] == 0
    finally:
        store.close()


def test_watch_streams_stored_then_live_events_until_the_job_ends(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, nodes={"min": 1, "max": 1}, nproc_per_node=1)
    events: list[jobs_pb2.JobEvent] = []
    stream = jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, replay=True), timeout=30)
    reader = threading.Thread(target=lambda: events.extend(stream), daemon=True)
    reader.start()

    agent = Agent(channel, "127.0.0.1", 4000)
    agent.register()
    agent.start()
    try:
        wait_for("an assignment", lambda: agent.assignment.job_id == job_id)
        assert agent.report(progress=agent_pb2.Progress(step=5, loss=2.5, world_size=1)).accepted
        assert agent.report(checkpoint_committed=agent_pb2.CheckpointCommitted(
            step=5, path=f"/tmp/ck/{job_id}/data/step-5", bytes=100, cursor=40)).accepted
        assert agent.report(process_exited=agent_pb2.ProcessExited(rank=0, exit_code=0)).accepted
        reader.join(10)
        assert not reader.is_alive(), "the stream did not end with the job"
    finally:
        agent.stop()
    kinds = [e.kind for e in events]
    assert kinds[0] == "state" and "PENDING" in events[0].message
    # Progress is soft state, stored every few seconds: the checkpoint event carries its step.
    assert kinds.index("generation") < kinds.index("checkpoint")
    assert kinds[-1] == "state" and events[-1].job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    checkpoint = next(e for e in events if e.kind == "checkpoint")
    assert checkpoint.job.last_checkpoint_step == 5 and checkpoint.generation == 1
    assert checkpoint.job.step == 5 and not checkpoint.job.HasField("spec")
    assert get(jobs, job_id).last_checkpoint_path == f"/tmp/ck/{job_id}/data/step-5"


# ---- AgentService ------------------------------------------------------------------------------


def test_assignments_are_consistent_and_stale_generations_are_fenced(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, nodes={"min": 1, "max": 2}, nproc_per_node=2)
    a = Agent(channel, "10.0.0.1", 5001)
    b = Agent(channel, "10.0.0.2", 5002)
    a.register()
    b.register()
    a.start()
    b.start()
    try:
        # Both joined inside one settle window: one generation of two nodes.
        wait_for("both assigned", lambda: a.assignment.job_id and b.assignment.job_id)
        pa, pb = a.assignment, b.assignment
        assert pa.generation == pb.generation == 1
        assert pa.world_size == pb.world_size == 4 and pa.num_nodes == 2 and pa.nproc == 2
        assert sorted([pa.node_rank, pb.node_rank]) == [0, 1]
        for p in (pa, pb):
            assert p.rank_start == p.node_rank * 2 and p.restore_step == -1
        rank0 = a if pa.node_rank == 0 else b
        for p in (pa, pb):
            assert (p.master_addr, p.master_port) == (rank0.address, rank0.store_port)
        assert a.report(checkpoint_committed=agent_pb2.CheckpointCommitted(step=20, path=""))\
            .accepted

        # b goes silent: its lease runs out and a runs generation 2 alone, from step 20.
        b.stop()
        wait_for("generation 2", lambda: a.assignment.generation == 2)
        assert a.assignment.world_size == 2 and a.assignment.node_rank == 0
        assert a.assignment.restore_step == 20
        assert (a.assignment.master_addr, a.assignment.master_port) == ("10.0.0.1", 5001)

        # Fencing: b's processes of generation 1 come back and try to commit; refused.
        refused = b.report(job_id=job_id, generation=1,
                           checkpoint_committed=agent_pb2.CheckpointCommitted(step=30, path=""))
        assert not refused.accepted and refused.reason
        stale_a = a.report(generation=1,
                           checkpoint_committed=agent_pb2.CheckpointCommitted(step=31, path=""))
        assert not stale_a.accepted and "stale" in stale_a.reason
        job = get(jobs, job_id)
        assert job.last_checkpoint_step == 20 and job.last_checkpoint_path == ""
        assert job.generation == 2 and list(job.node_ids) == [a.node_id]
        # A lost node is told to register again and gets no work.
        resp = b.beat()
        assert resp.reregister and not resp.assignment.job_id
        # The current generation's report goes through.
        assert a.report(checkpoint_committed=agent_pb2.CheckpointCommitted(step=32, path=""))\
            .accepted
        assert get(jobs, job_id).last_checkpoint_step == 32
    finally:
        a.stop()
        b.stop()


def test_a_commit_of_the_newest_generation_counts_after_the_job_fell_back_to_pending(
    channel: grpc.Channel,
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, nodes={"min": 2, "max": 2}, nproc_per_node=1)
    a = Agent(channel, "10.0.0.1", 5001)
    b = Agent(channel, "10.0.0.2", 5002)
    for agent in (a, b):
        agent.register()
        agent.start()
    try:
        wait_for("generation 1", lambda: a.assignment.generation == 1 and b.assignment.generation == 1)
        b.stop()
        wait_for("PENDING", lambda: get(jobs, job_id).state == jobs_pb2.JOB_STATE_PENDING)
        # a's processes of generation 1 were stopped with SIGTERM and checkpointed on the way
        # out: no newer generation exists, so the commit is real and is where to go on from.
        assert a.report(job_id=job_id, generation=1, checkpoint_committed=agent_pb2.
                        CheckpointCommitted(step=12, path="")).accepted
        b.register()  # b's lease ran out; it comes back as a new join
        b.start()
        wait_for("generation 2", lambda: a.assignment.generation == 2 and b.assignment.generation == 2)
        assert a.assignment.restore_step == 12
        # ... while generation 1's reports are stale now.
        assert not a.report(job_id=job_id, generation=1, checkpoint_committed=agent_pb2.
                            CheckpointCommitted(step=13, path="")).accepted
        assert get(jobs, job_id).last_checkpoint_step == 12
    finally:
        a.stop()
        b.stop()


def test_a_heartbeat_of_an_old_generation_gets_the_current_assignment(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, nodes={"min": 1, "max": 2}, nproc_per_node=1)
    a = Agent(channel, "10.0.0.1", 5001)
    a.register()
    a.start()
    try:
        wait_for("generation 1", lambda: a.assignment.generation == 1)
        # Generation 1 trains (a generation still starting would grow at once).
        assert a.report(progress=agent_pb2.Progress(step=3, loss=1.0)).accepted
        b = Agent(channel, "10.0.0.2", 5002)
        b.register()
        b.start()
        # Growth asks a to checkpoint first, and grows from that commit.
        wait_for("a checkpoint request", lambda: a.assignment.checkpoint_now)
        assert a.assignment.generation == 1
        assert a.report(checkpoint_committed=agent_pb2.CheckpointCommitted(step=4, path=""))\
            .accepted
        wait_for("growth to generation 2", lambda: a.assignment.generation == 2)
        assert a.assignment.restore_step == 4 and a.assignment.world_size == 2
        assert not a.assignment.checkpoint_now
        b.stop()
        # An agent still running generation 1 is answered with generation 2, so it restarts.
        stale = a.stub.Heartbeat(agent_pb2.HeartbeatRequest(
            node_id=a.node_id, node_secret=a.secret, job_id=job_id, generation=1),
            timeout=RPC_TIMEOUT_S)
        assert stale.assignment.job_id == job_id and stale.assignment.generation >= 2
    finally:
        a.stop()


def test_an_interruption_notice_drains_the_node_after_the_checkpoint(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, nodes={"min": 1, "max": 2}, nproc_per_node=1)
    a = Agent(channel, "10.0.0.1", 5001)
    b = Agent(channel, "10.0.0.2", 5002)
    for agent in (a, b):
        agent.register()
        agent.start()
    try:
        wait_for("both in generation 1",
                 lambda: a.assignment.generation == 1 and b.assignment.generation == 1)
        assert b.report(interruption_notice=agent_pb2.InterruptionNotice(
            action="terminate", deadline=time.time() + 120)).accepted
        # Every member is asked to checkpoint now; nobody leaves before the commit.
        wait_for("checkpoint_now", lambda: a.assignment.checkpoint_now and b.assignment.checkpoint_now)
        assert a.assignment.generation == 1
        # A periodic save committing now does not end the drain (the ranks may be past it);
        # the one saved on the request (they hold at it) does.
        assert a.report(checkpoint_committed=agent_pb2.CheckpointCommitted(step=6, path=""))\
            .accepted
        time.sleep(0.5)
        assert a.assignment.generation == 1 and a.assignment.checkpoint_now
        assert a.report(checkpoint_committed=agent_pb2.CheckpointCommitted(
            step=7, path="", requested=True)).accepted
        wait_for("generation 2 without b", lambda: a.assignment.generation == 2)
        assert a.assignment.restore_step == 7 and a.assignment.world_size == 1
        assert not a.assignment.checkpoint_now
        wait_for("b told to stop", lambda: not b.assignment.job_id)
        assert list(get(jobs, job_id).node_ids) == [a.node_id]
    finally:
        a.stop()
        b.stop()


def test_a_failed_rank_with_every_node_alive_restarts_the_generation(channel: grpc.Channel) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    job_id = submit(jobs, nodes={"min": 1, "max": 1}, nproc_per_node=2, max_failures=1)
    a = Agent(channel, "10.0.0.1", 5001)
    a.register()
    a.start()
    try:
        wait_for("generation 1", lambda: a.assignment.generation == 1)
        assert a.report(process_exited=agent_pb2.ProcessExited(rank=1, exit_code=1)).accepted
        wait_for("generation 2", lambda: a.assignment.generation == 2)
        assert "failure 1 of 1" in get(jobs, job_id).message
        # A second failure in a row is one more than max_failures tolerates.
        assert a.report(process_exited=agent_pb2.ProcessExited(rank=0, exit_code=3)).accepted
        wait_for("FAILED", lambda: get(jobs, job_id).state == jobs_pb2.JOB_STATE_FAILED)
        wait_for("the node told to stop", lambda: not a.assignment.job_id)
    finally:
        a.stop()


def test_a_restarted_daemon_reloads_its_state_and_reconciles_re_registering_agents(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path / "state")
    with DaemonThread(cfg) as first, grpc.insecure_channel(first.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job_id = submit(jobs, nodes={"min": 1, "max": 1}, nproc_per_node=1)
        agent = Agent(ch, "10.0.0.1", 5001)
        agent.register()
        agent.start()
        wait_for("generation 1", lambda: agent.assignment.generation == 1)
        assert agent.report(checkpoint_committed=agent_pb2.CheckpointCommitted(step=9, path=""))\
            .accepted
        agent.stop()
    node_id = agent.node_id

    with DaemonThread(cfg) as second, grpc.insecure_channel(second.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job = get(jobs, job_id)
        assert job.generation == 1 and job.last_checkpoint_step == 9
        assert list(job.node_ids) == [node_id]
        back = Agent(ch, "10.0.0.1", 5001)
        back.node_id, back.job_id, back.generation = node_id, job_id, 1
        back.secret = agent.secret  # the node's credential survives the restart
        back.register()  # with its current job and generation: kept, no rescale
        back.start()
        try:
            wait_for("an assignment", lambda: back.assignment.job_id == job_id)
            assert back.assignment.generation == 1
            assert get(jobs, job_id).generation == 1
        finally:
            back.stop()


def test_a_job_is_charged_and_stopped_before_it_overspends_its_budget(tmp_path: Path) -> None:
    # $3600/h is $1/s; with a $3 budget, 0.2 s accounting ticks and a 1 s teardown margin the
    # job must stop once one more tick and the teardown would pass $3, so it stops at about
    # $2 and, its node stopped, has spent no more than $3.
    cfg = config(tmp_path / "state").model_copy(update={"accounting_interval_s": 0.2,
                                                        "budget_teardown_s": 1.0})
    with DaemonThread(cfg) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job_id = submit(jobs, nodes={"min": 1, "max": 1}, nproc_per_node=1, budget_usd=3.0)
        agent = Agent(ch, "10.0.0.1", 5001, price_per_hour=3600.0)
        agent.register()
        agent.start()
        try:
            wait_for("generation 1", lambda: agent.assignment.generation == 1)
            cost = jobs.GetCost(jobs_pb2.GetCostRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
            assert cost.rate_usd_per_hour == 3600.0 and cost.budget_usd == 3.0
            job = wait_for("BUDGET_EXHAUSTED", lambda: (j := get(jobs, job_id)).state
                           == jobs_pb2.JOB_STATE_BUDGET_EXHAUSTED and j)
            # A tick may come late on a loaded machine: allow one more tick past the margin.
            assert 1.0 < job.cost_usd <= 2.0 + 0.2, job.cost_usd
            assert "budget" in job.message and "teardown (1 s)" in job.message
            wait_for("the node told to stop", lambda: not agent.assignment.job_id)
            final = jobs.GetCost(jobs_pb2.GetCostRequest(job_id=job_id), timeout=RPC_TIMEOUT_S)
            # This agent runs no processes: nothing of the job runs after its release.
            assert final.spent_usd == pytest.approx(job.cost_usd) and final.rate_usd_per_hour == 0
            assert final.spent_usd <= 3.0
        finally:
            agent.stop()


# ---- health and reflection ------------------------------------------------------------------------


def test_health_and_reflection_answer(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "spotwise.v1.JobService", "spotwise.v1.AgentService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="spotwise.v1.AgentService"),
    ]
    answers = list(reflect.ServerReflectionInfo(iter(requests), timeout=RPC_TIMEOUT_S))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"spotwise.v1.JobService", "spotwise.v1.AgentService",
            "grpc.health.v1.Health"} <= names
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert files, answers[1]


# ---- security and metrics from the config ----------------------------------------------------------


def test_tokens_from_the_config_are_checked_by_role(tmp_path: Path) -> None:
    from spotwise.common.credentials import bearer_metadata
    from spotwise.daemon.auth import mint_token

    client, agent = mint_token("client", "alice"), mint_token("agent", "fleet")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{client.line}\n{agent.line}\n")
    cfg = config(tmp_path / "state").model_copy(update={"tokens_file": str(tokens)})
    with DaemonThread(cfg) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        request = jobs_pb2.SubmitJobRequest(spec=spec())
        with pytest.raises(grpc.RpcError) as err:
            jobs.SubmitJob(request, timeout=RPC_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            jobs.SubmitJob(request, timeout=RPC_TIMEOUT_S, metadata=bearer_metadata(agent.token))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert jobs.SubmitJob(request, timeout=RPC_TIMEOUT_S,
                              metadata=bearer_metadata(client.token)).job_id


def test_the_daemon_refuses_plaintext_beyond_loopback_a_bad_state_dir_and_a_taken_port(tmp_path: Path) -> None:
    wide = config(tmp_path / "a").model_copy(update={"listen": "0.0.0.0:0"})
    with pytest.raises(RuntimeError, match="without TLS"):
        DaemonThread(wide).start()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match="state database"):
        DaemonThread(config(blocker / "state")).start()
    with DaemonThread(config(tmp_path / "b")) as first:
        taken = config(tmp_path / "c").model_copy(update={"listen": first.address})
        with pytest.raises(RuntimeError, match="cannot listen"):
            DaemonThread(taken).start()


def test_checkpoint_prefixes_refuse_a_job_outside_them(tmp_path: Path) -> None:
    cfg = config(tmp_path / "state").model_copy(update={"checkpoint_prefixes": ["/data/ck"]})
    with DaemonThread(cfg) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec(checkpoint={"uri": "/tmp/x"})),
                           timeout=RPC_TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(err.value)
        bad = error_details_pb2.BadRequest()
        assert status is not None and status.details[0].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["spec.checkpoint.uri"]
        assert jobs.SubmitJob(jobs_pb2.SubmitJobRequest(
            spec=spec(checkpoint={"uri": "/data/ck/job1"})), timeout=RPC_TIMEOUT_S).job_id


def test_a_budget_on_instance_types_nobody_prices_is_refused_and_nothing_is_stored(
        tmp_path: Path) -> None:
    with DaemonThread(config(tmp_path / "state")) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            submit(jobs, budget_usd=10.0, instance_types=["g4dn.xlarge", "zz9.plural"])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "zz9.plural" in err.value.details() and "budget" in err.value.details()
        status = rpc_status.from_call(err.value)
        bad = error_details_pb2.BadRequest()
        assert status is not None and status.details[0].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["spec.budget_usd"]
        assert not jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=RPC_TIMEOUT_S).jobs
        assert not d.call(lambda: d.daemon.store.jobs())


def test_metrics_are_exported_when_configured(tmp_path: Path) -> None:
    import urllib.request

    cfg = config(tmp_path / "state").model_copy(update={"metrics_listen": "127.0.0.1:0"})
    with DaemonThread(cfg) as d, grpc.insecure_channel(d.address) as ch:
        submit(jobs_pb2_grpc.JobServiceStub(ch))
        exporter = d.daemon.metrics_exporter
        assert exporter is not None

        def pending_gauge() -> bool:
            with urllib.request.urlopen(exporter.url, timeout=RPC_TIMEOUT_S) as resp:
                return 'spotwise_jobs{state="PENDING"} 1.0' in resp.read().decode()

        wait_for("the PENDING gauge", pending_gauge)


def test_a_stop_during_a_ticks_write_still_commits_it(tmp_path: Path) -> None:
    """The control loop finishes the tick it is writing before the daemon stops: an accepted
    report in that batch is not cut off by the stop (the final commit no longer holds it)."""
    cfg = config(tmp_path / "state")
    with DaemonThread(cfg) as d, grpc.insecure_channel(d.address) as ch:
        jobs = jobs_pb2_grpc.JobServiceStub(ch)
        job_id = submit(jobs, nodes={"min": 1, "max": 1}, nproc_per_node=1)
        agent = Agent(ch, "10.0.0.1", 5001)
        agent.register()
        agent.start()
        wait_for("generation 1", lambda: agent.assignment.generation == 1)
        agent.stop()
        store = d.daemon.store
        write, writing = store.write_batch, threading.Event()

        def slow_write(batch):  # type: ignore[no-untyped-def]
            writing.set()
            time.sleep(1.0)
            write(batch)

        store.write_batch = slow_write  # type: ignore[method-assign]
        assert agent.report(checkpoint_committed=agent_pb2.CheckpointCommitted(step=9, path=""))\
            .accepted
        assert writing.wait(10)  # the tick holding the commit is being written: stop now
    with DaemonThread(cfg) as second, grpc.insecure_channel(second.address) as ch:
        assert get(jobs_pb2_grpc.JobServiceStub(ch), job_id).last_checkpoint_step == 9
