"""The fleet reconciler: as many provider nodes as the jobs want, no more (flow 2).

`plan_fleet(now, demands, nodes)` is pure: given what each live job wants and what the provider
runs (with what the daemon knows of each node), it says how many nodes to launch per job and
which to terminate, with a reason per action. `FleetLoop` gathers those inputs, calls the
provider off the event loop with a timeout, and logs the reasons.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from spotwise.cloud.provider import NodeRequest, Provider, ProviderError, ProviderNode
from spotwise.daemon.controller import NodeState
from spotwise.daemon.coordinator import Coordinator

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class JobDemand:
    """What one live job wants from the provider."""

    job_id: str
    wanted: int
    """Nodes it should have (its nodes.max, or less if the budget says so)."""
    request: NodeRequest


@dataclass(frozen=True, kw_only=True)
class FleetNode:
    """A provider node with what the daemon knows about it."""

    handle: str
    launched_for: str
    """The job the provider launched it for."""
    first_seen: float
    """When the reconciler first saw it (for the registration timeout)."""
    daemon_state: NodeState | None = None
    """None while its agent has not registered."""
    assigned_job: str = ""
    """The job it is a member of now, if any."""
    winding_down_since: float | None = None
    """Since when its agent has been stopping processes of a job it no longer belongs to (a
    final checkpoint may be in flight); None: it runs nothing it should not."""


@dataclass(frozen=True, kw_only=True)
class FleetPlan:
    launch: Mapping[str, int] = field(default_factory=dict)
    """job id -> how many nodes to launch for it."""
    terminate: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.launch and not self.terminate


def plan_fleet(
    now: float,
    demands: Sequence[JobDemand],
    nodes: Sequence[FleetNode],
    *,
    register_timeout_s: float = 120.0,
    max_nodes: int = 0,
    wind_down_s: float = 60.0,
) -> FleetPlan:
    """Launches and terminations that bring the provider's nodes to the jobs' demands.

    Dead weight goes first: nodes the daemon declared LOST, nodes whose agent never registered
    within `register_timeout_s`, drained nodes, nodes no live job wants. Then each job, oldest
    first, gets launches up to `wanted` (within `max_nodes` in total, 0 = no cap; a draining
    member does not count, so its replacement starts during the notice), and loses its
    surplus (idle nodes before members). A node no job wants whose agent is still stopping an
    ended job's processes (the final checkpoint of a cancel or a budget stop) is kept for up
    to `wind_down_s`.
    """
    terminate: list[str] = []
    reasons: list[str] = []
    wanted = {d.job_id: d.wanted for d in demands}
    live: list[FleetNode] = []
    for node in sorted(nodes, key=lambda n: n.handle):
        owner = node.assigned_job or node.launched_for
        if node.daemon_state is NodeState.LOST:
            terminate.append(node.handle)
            reasons.append(f"terminate {node.handle}: the daemon declared it LOST")
        elif node.daemon_state is None and now - node.first_seen > register_timeout_s:
            terminate.append(node.handle)
            reasons.append(f"terminate {node.handle}: its agent did not register within "
                           f"{register_timeout_s:.0f}s")
        elif node.daemon_state is NodeState.DRAINING and not node.assigned_job:
            terminate.append(node.handle)
            reasons.append(f"terminate {node.handle}: drained after an interruption notice")
        elif (owner not in wanted and node.winding_down_since is not None
              and now - node.winding_down_since < wind_down_s):
            reasons.append(f"keep {node.handle} for now: its agent is stopping the processes of "
                           f"ended job {owner or '-'} (final checkpoint)")
        elif owner not in wanted:
            terminate.append(node.handle)
            reasons.append(f"terminate {node.handle}: no live job wants it "
                           f"(launched for {node.launched_for or 'no job'})")
        else:
            live.append(node)

    launch: dict[str, int] = {}
    total = len(live)
    for demand in demands:
        # A draining member still works for its job but is going away: replace it now.
        mine = [n for n in live if (n.assigned_job or n.launched_for) == demand.job_id
                and n.daemon_state is not NodeState.DRAINING]
        if len(mine) < demand.wanted:
            count = demand.wanted - len(mine)
            if max_nodes:
                count = min(count, max(0, max_nodes - total))
            if count > 0:
                launch[demand.job_id] = count
                total += count
                reasons.append(f"launch {count} for {demand.job_id}: has {len(mine)}, "
                               f"wants {demand.wanted}")
        elif len(mine) > demand.wanted:
            # Idle (not a member) first, newest first: members cost a rescale.
            surplus = sorted(mine, key=lambda n: (n.assigned_job == demand.job_id, -n.first_seen))
            for node in surplus[: len(mine) - demand.wanted]:
                terminate.append(node.handle)
                reasons.append(f"terminate {node.handle}: {demand.job_id} has {len(mine)}, "
                               f"wants {demand.wanted}")
    return FleetPlan(launch=launch, terminate=tuple(terminate), reasons=tuple(reasons))


def demands_of(coordinator: Coordinator, *, daemon_address: str,
               wanted: Callable[[str], int] | None = None) -> list[JobDemand]:
    """Each live job's demand: its nodes.max (or what the budget caps growth at, never below
    what it has) unless `wanted(job_id)` says otherwise; instance types best first by price
    per unit of measured throughput."""
    out = []
    for job in sorted(coordinator.jobs.values(), key=lambda j: (j.row.created_at, j.row.id)):
        if job.state.terminal:
            continue
        spec = job.spec
        count = coordinator.job_view(job).grow_to if job.members else spec.nodes.max
        out.append(
            JobDemand(
                job_id=job.row.id,
                wanted=wanted(job.row.id) if wanted is not None else count,
                request=NodeRequest(
                    job_id=job.row.id,
                    instance_types=coordinator.instance_types_for(job),
                    market=spec.market or "spot",
                    daemon_address=daemon_address,
                    slots=spec.nproc_per_node,
                ),
            )
        )
    return out


class FleetLoop:
    """Runs plan_fleet every `interval_s` and carries it out through a provider.

    Provider calls run in a worker thread, each bounded by `timeout_s` (a call that times out
    is abandoned, not interrupted: the thread finishes on its own). Failures back off
    exponentially up to `max_backoff_s` and are retried forever at that bound, because the
    fleet must keep trying while jobs wait.
    """

    def __init__(
        self,
        provider: Provider,
        coordinator: Coordinator,
        *,
        daemon_address: str,
        interval_s: float = 2.0,
        timeout_s: float = 60.0,
        register_timeout_s: float = 120.0,
        max_nodes: int = 0,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.coordinator = coordinator
        self.daemon_address = daemon_address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.register_timeout_s = register_timeout_s
        self.max_nodes = max_nodes
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._first_seen: dict[str, float] = {}
        self._winding_since: dict[str, float] = {}

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.timeout_s)
        except asyncio.TimeoutError:
            name = getattr(fn, "__name__", "call")
            raise ProviderError(
                f"{self.provider.name} provider: {name} took longer than {self.timeout_s}s"
            ) from None

    def _fleet_nodes(self, provider_nodes: Sequence[ProviderNode], now: float) -> list[FleetNode]:
        by_handle = {}
        for rec in self.coordinator.nodes.values():
            # A cloud machine's agent may know only its instance id (from IMDS), which is the
            # EC2 provider's handle.
            for handle in {rec.row.provider_node, rec.row.instance_id} - {""}:
                # A handle may have registered more than once; the newest registration counts.
                if (handle not in by_handle
                        or rec.row.registered_at >= by_handle[handle].row.registered_at):
                    by_handle[handle] = rec
        out = []
        live_handles = set()
        for pn in provider_nodes:
            if pn.state == "terminated":
                continue
            live_handles.add(pn.handle)
            first = self._first_seen.setdefault(pn.handle, now)
            rec = by_handle.get(pn.handle)
            if rec is not None:
                rec.launched_for = pn.job_id
            winding = (rec is not None and rec.state is not NodeState.LOST and rec.reported_running
                       and rec.reported_job_id and rec.reported_job_id != rec.row.job_id)
            if winding:
                self._winding_since.setdefault(pn.handle, now)
            else:
                self._winding_since.pop(pn.handle, None)
            out.append(FleetNode(
                handle=pn.handle,
                launched_for=pn.job_id,
                first_seen=first,
                daemon_state=rec.state if rec is not None else None,
                assigned_job=rec.row.job_id if rec is not None else "",
                winding_down_since=self._winding_since.get(pn.handle),
            ))
        for seen in (self._first_seen, self._winding_since):
            for handle in list(seen):
                if handle not in live_handles:
                    del seen[handle]
        return out

    async def run_once(self) -> FleetPlan:
        """One reconciliation. Raises ProviderError if a provider call fails or times out."""
        provider_nodes = await self._call(self.provider.list_nodes)
        now = self.clock()
        # What the provider runs is what is charged: a machine it no longer lists is gone.
        machines = [pn for pn in provider_nodes if pn.state != "terminated"]
        self.coordinator.provider_seen(machines, now)
        demands = demands_of(self.coordinator, daemon_address=self.daemon_address)
        plan = plan_fleet(now, demands, self._fleet_nodes(provider_nodes, now),
                          register_timeout_s=self.register_timeout_s, max_nodes=self.max_nodes)
        for reason in plan.reasons:
            log.info("fleet: %s", reason)
        if plan.terminate:
            await self._call(self.provider.terminate, list(plan.terminate))
        requests = {d.job_id: d.request for d in demands}
        for job_id, count in plan.launch.items():
            started = await self._call(self.provider.launch, requests[job_id], count)
            for node in started:
                self._first_seen.setdefault(node.handle, self.clock())
            if started:  # charged from their launch, not from the next listing
                machines += started
                self.coordinator.provider_seen(machines, self.clock())
            if len(started) < count:
                log.warning("fleet: job=%s: asked %s for %d node(s), got %d", job_id,
                            self.provider.name, count, len(started))
        return plan

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile until `stop` is set."""
        backoff = self.interval_s
        while not stop.is_set():
            try:
                await self.run_once()
                backoff = self.interval_s
            except ProviderError as exc:
                log.error("fleet: %s (retry in %.1fs)", exc, backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except asyncio.TimeoutError:
                pass
