"""A machine is charged from its launch until its provider confirms it gone (daemon.charging
through the coordinator, on a fake clock): the wind-down after a job ends is paid for, the
budget stop leaves a teardown margin, and a budget on machines nobody prices is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from spotwise.cloud.provider import ProviderNode
from spotwise.daemon.agents import MachineClaimed
from spotwise.daemon.coordinator import Coordinator, Unpriced
from spotwise.daemon.model import JobState, Policy
from spotwise.daemon.store import Store
from spotwise.proto.v1 import agent_pb2
from spotwise.spec import JobSpec
from tests.support import agents

USD_PER_S = 1.0
"""Every machine costs $1 per second ($3600/h): spends read as seconds."""


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make(tmp_path: Path, clock: Clock, **kw: object) -> Coordinator:
    policy = Policy(lease_s=1e9, settle_s=0.0, settle_max_s=0.0, grow_checkpoint_timeout_s=0)
    return Coordinator(Store(tmp_path / "db"), policy=policy, heartbeat_interval_s=0.5,
                       accounting_interval_s=10.0, clock=clock, **kw)


def spec(**kw: object) -> JobSpec:
    base: dict[str, object] = {"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                               "global_batch_size": 10, "nodes": {"min": 1, "max": 1}}
    base.update(kw)
    return JobSpec.model_validate(base)


def register(coord: Coordinator, address: str, **kw: object) -> agent_pb2.RegisterResponse:
    return agents.join(coord, address=address, instance_type="g4dn.xlarge", **kw)


def beat(coord: Coordinator, node: agent_pb2.RegisterResponse, job_id: str, generation: int,
         *, running: bool) -> None:
    coord.heartbeat(agent_pb2.HeartbeatRequest(
        node_id=node.node_id, node_secret=node.node_secret, job_id=job_id,
        generation=generation, processes=[agent_pb2.ProcessStatus(rank=0, running=running)]))


def spent(coord: Coordinator, job_id: str) -> float:
    return coord.cost_report(coord.jobs[job_id]).spent_usd


def test_a_providers_machine_is_charged_from_its_first_listing_to_the_first_without_it(
        tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock, provider_price=lambda handle: 3600.0 * USD_PER_S,
                 provider_prices_all=True)
    job = coord.submit(spec().to_proto())
    machine = ProviderNode(handle="local-1", job_id=job.row.id)
    coord.provider_seen([machine])  # launched for the job: it boots at the job's expense
    clock.now += 10
    node = register(coord, "10.0.0.1", provider_node="local-1")
    coord.tick()
    assert job.members == [node.node_id] and spent(coord, job.row.id) == pytest.approx(10)
    clock.now += 10
    coord.cancel(job.row.id)
    assert job.state is JobState.CANCELLED and spent(coord, job.row.id) == pytest.approx(20)
    clock.now += 10  # released, but the machine still runs (its final checkpoint, then the
    coord.account(clock.now)  # fleet's termination): still the job's cost
    assert spent(coord, job.row.id) == pytest.approx(30)
    assert coord.cost_report(job).rate_usd_per_hour == 0.0  # an ended job has no rate
    clock.now += 5
    coord.provider_seen([])  # the provider confirms it gone
    clock.now += 3600
    coord.account(clock.now)
    assert spent(coord, job.row.id) == pytest.approx(35)
    assert job.row.cost_usd == pytest.approx(35)
    # The teardown (its end to its last machine gone) is measured and widens the margin.
    assert coord.billing.teardown_s == pytest.approx(15)


def test_an_operators_machine_is_charged_while_it_stops_the_ended_jobs_processes(
        tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock, agent_prices=True)
    job = coord.submit(spec().to_proto())
    node = register(coord, "10.0.0.1", price_per_hour=3600.0 * USD_PER_S)
    coord.tick()
    beat(coord, node, job.row.id, 1, running=True)
    clock.now += 10
    coord.cancel(job.row.id)
    clock.now += 10
    beat(coord, node, job.row.id, 1, running=True)  # SIGTERMed, taking its final checkpoint
    coord.account(clock.now)
    assert spent(coord, job.row.id) == pytest.approx(20)
    clock.now += 10
    beat(coord, node, "", 0, running=False)  # stopped: the operator's again, not the job's
    coord.account(clock.now)
    clock.now += 3600
    coord.account(clock.now)
    assert spent(coord, job.row.id) == pytest.approx(30)


def test_a_machine_registered_twice_is_charged_once_and_a_lost_one_until_it_is_gone(
        tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock, provider_price=lambda handle: 3600.0 * USD_PER_S,
                 provider_prices_all=True)
    job = coord.submit(spec().to_proto())
    coord.provider_seen([ProviderNode(handle="i-1", job_id=job.row.id)])
    first = register(coord, "10.0.0.1", provider_node="i-1")
    coord.tick()
    with pytest.raises(MachineClaimed):  # another identity, while the first lives
        register(coord, "10.0.0.2", provider_node="i-1")
    coord.nodes[first.node_id].row.state = "LOST"
    # Its agent restarted with a new identity: two node records of one machine.
    second = register(coord, "10.0.0.2", provider_node="i-1")
    clock.now += 10
    coord.account(clock.now)
    assert coord.cost_report(job).rate_usd_per_hour == pytest.approx(3600.0)
    assert spent(coord, job.row.id) == pytest.approx(10)
    # The daemon declares it LOST too: a partitioned machine still runs, and costs, until its
    # provider says it is gone.
    coord.nodes[second.node_id].row.state = "LOST"
    clock.now += 10
    coord.account(clock.now)
    assert spent(coord, job.row.id) == pytest.approx(20)
    coord.provider_seen([])
    clock.now += 10
    coord.account(clock.now)
    assert spent(coord, job.row.id) == pytest.approx(20)


def test_the_budget_stop_leaves_the_teardown_margin(tmp_path: Path) -> None:
    clock = Clock()
    coord = make(tmp_path, clock, agent_prices=True, teardown_s=30.0)
    job = coord.submit(spec(budget_usd=100.0).to_proto())
    register(coord, "10.0.0.1", price_per_hour=3600.0 * USD_PER_S)
    coord.tick()
    for _ in range(12):  # $10 a tick: at $70 one more tick and the teardown would pass $100
        clock.now += 10
        coord.tick()
        if job.state.terminal:
            break
    assert job.state is JobState.BUDGET_EXHAUSTED
    assert spent(coord, job.row.id) == pytest.approx(70)  # + a 30 s teardown = the budget
    assert "teardown (30 s)" in job.row.message


def test_a_budget_on_instance_types_nobody_prices_is_refused_and_nothing_is_stored(
        tmp_path: Path) -> None:
    coord = make(tmp_path, Clock())
    with pytest.raises(Unpriced, match="x9.nothing"):
        coord.submit(spec(budget_usd=5.0, instance_types=["g4dn.xlarge", "x9.nothing"]).to_proto())
    assert not coord.jobs and not coord.store.jobs()
    # Without a budget, or on priced types, or where the provider prices its machines: fine.
    coord.submit(spec(instance_types=["x9.nothing"]).to_proto())
    coord.submit(spec(budget_usd=5.0, instance_types=["g4dn.xlarge"]).to_proto())
    priced = make(tmp_path / "p", Clock(), provider_prices_all=True)
    priced.submit(spec(budget_usd=5.0, instance_types=["x9.nothing"]).to_proto())
    # The provider's own types count when the spec names none.
    ec2 = make(tmp_path / "e", Clock(), default_instance_types=("x9.nothing",))
    with pytest.raises(Unpriced):
        ec2.submit(spec(budget_usd=5.0).to_proto())
