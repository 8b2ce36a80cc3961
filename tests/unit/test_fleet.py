"""The fleet reconciler: the pure plan, and the loop's bounded provider calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from spotwise.cloud.provider import NodeRequest, Provider, ProviderError, ProviderNode
from spotwise.daemon.controller import NodeState, Policy
from spotwise.daemon.coordinator import Coordinator
from spotwise.daemon.fleet import FleetLoop, FleetNode, JobDemand, plan_fleet
from spotwise.daemon.store import Store
from spotwise.spec import JobSpec

T = 1000.0


def demand(job_id: str, wanted: int) -> JobDemand:
    return JobDemand(job_id=job_id, wanted=wanted, request=NodeRequest(job_id=job_id))


def fnode(handle: str, job: str, *, state: NodeState | None = NodeState.READY,
          assigned: str = "", first_seen: float = T - 10) -> FleetNode:
    return FleetNode(handle=handle, launched_for=job, first_seen=first_seen, daemon_state=state,
                     assigned_job=assigned)


def test_launches_up_to_what_each_job_wants() -> None:
    plan = plan_fleet(T, [demand("a", 3), demand("b", 1)], [fnode("n1", "a")])
    assert dict(plan.launch) == {"a": 2, "b": 1} and not plan.terminate
    assert any("has 1, wants 3" in r for r in plan.reasons)


def test_the_node_cap_applies_oldest_job_first() -> None:
    plan = plan_fleet(T, [demand("a", 3), demand("b", 2)], [fnode("n1", "a")], max_nodes=3)
    assert dict(plan.launch) == {"a": 2}


def test_lost_unregistered_and_unwanted_nodes_are_terminated() -> None:
    nodes = [
        fnode("lost", "a", state=NodeState.LOST),
        fnode("late", "a", state=None, first_seen=T - 200),
        fnode("young", "a", state=None, first_seen=T - 5),  # still starting: counts
        fnode("orphan", "gone"),
    ]
    plan = plan_fleet(T, [demand("a", 1)], nodes, register_timeout_s=120)
    assert set(plan.terminate) == {"lost", "late", "orphan"}
    assert not plan.launch  # "young" covers the one node a wants


def test_surplus_goes_idle_nodes_first_and_reassigned_nodes_count_for_their_new_job() -> None:
    nodes = [fnode("member", "a", state=NodeState.ASSIGNED, assigned="a"),
             fnode("idle", "a"),
             fnode("moved", "gone", state=NodeState.ASSIGNED, assigned="a")]
    plan = plan_fleet(T, [demand("a", 2)], nodes)
    assert plan.terminate == ("idle",)


def test_a_draining_member_is_replaced_during_its_notice_and_terminated_once_drained() -> None:
    nodes = [fnode("leaving", "a", state=NodeState.DRAINING, assigned="a"), fnode("ok", "a")]
    plan = plan_fleet(T, [demand("a", 2)], nodes)
    assert dict(plan.launch) == {"a": 1} and not plan.terminate
    drained = [fnode("leaving", "a", state=NodeState.DRAINING), fnode("ok", "a"), fnode("new", "a")]
    plan = plan_fleet(T, [demand("a", 2)], drained)
    assert plan.terminate == ("leaving",) and not plan.launch


def test_nothing_to_do_is_an_empty_plan() -> None:
    assert plan_fleet(T, [demand("a", 1)], [fnode("n", "a")]).empty


class _RecordingProvider(Provider):
    """A provider that keeps its nodes in a dict (the interface's contract, nothing more)."""

    name = "recording"

    def __init__(self, *, block: threading.Event | None = None) -> None:
        self.nodes: dict[str, ProviderNode] = {}
        self.block = block
        self.launched: list[tuple[str, int]] = []

    def launch(self, request: NodeRequest, count: int) -> list[ProviderNode]:
        self.launched.append((request.job_id, count))
        out = []
        for _ in range(count):
            handle = f"r-{len(self.nodes)}"
            self.nodes[handle] = ProviderNode(handle=handle, job_id=request.job_id)
            out.append(self.nodes[handle])
        return out

    def terminate(self, handles: Sequence[str]) -> None:
        for h in handles:
            self.nodes.pop(h, None)

    def list_nodes(self) -> list[ProviderNode]:
        if self.block is not None:
            self.block.wait(1.0)  # longer than the loop waits; short for the test
        return list(self.nodes.values())


def _coordinator(tmp_path: Path, max_nodes: int) -> Coordinator:
    coord = Coordinator(Store(tmp_path / "db"), policy=Policy(), heartbeat_interval_s=0.5)
    spec = JobSpec.model_validate({"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                                   "global_batch_size": 4, "nodes": {"min": 1, "max": max_nodes}})
    coord.submit(spec.to_proto())
    return coord


def test_the_loop_launches_for_a_submitted_job_and_stops_when_it_ends(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, max_nodes=2)
    provider = _RecordingProvider()
    loop = FleetLoop(provider, coord, daemon_address="127.0.0.1:1", timeout_s=5)
    asyncio.run(loop.run_once())
    job_id = next(iter(coord.jobs))
    assert provider.launched == [(job_id, 2)] and len(provider.nodes) == 2
    asyncio.run(loop.run_once())
    assert provider.launched == [(job_id, 2)]  # steady
    coord.cancel(job_id)
    asyncio.run(loop.run_once())
    assert provider.nodes == {}


def test_a_provider_call_that_hangs_times_out_as_a_provider_error(tmp_path: Path) -> None:
    coord = _coordinator(tmp_path, max_nodes=1)
    release = threading.Event()
    loop = FleetLoop(_RecordingProvider(block=release), coord, daemon_address="127.0.0.1:1",
                     timeout_s=0.2)
    try:
        with pytest.raises(ProviderError, match="longer than 0.2s"):
            asyncio.run(loop.run_once())
    finally:
        release.set()
