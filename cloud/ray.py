"""The Ray provider: one spotwise node agent on each eligible node of an existing Ray cluster.

The daemon connects to the cluster as a Ray driver (`address`: "auto", a GCS host:port, or
"ray://..."). A node is eligible when it is alive, has the configured custom resource and/or
GPUs, and carries the configured labels. `launch` places a detached, named agent actor
(spotwise.cloud.ray_actor, named `spotwise-agent-<node id>` in the configured namespace) on a
free eligible node with hard node affinity; the actor holds all of the node's eligibility
resource and GPUs, so Ray schedules nothing else there, and runs `spotwise agent` behind a
guard that takes the agent and its training processes down with the actor (and so with the
raylet). The provider's handle for a node is its Ray node id, which the agent reports as both
its provider node and its instance id.

Ray's node table says which nodes exist: `list_nodes` lists the agent actors (found by name,
so a restarted daemon adopts them) whose nodes are alive; an agent on a dead node is gone.
When jobs want more nodes than there are free eligible ones, the provider asks Ray's
autoscaler for the shortfall (`request_resources`, the total of eligible bundles wanted) and
withdraws the request when the shortfall is gone. Drains (a GCS DrainNode with a deadline, as
`ray drain-node` and autoscalers send ahead of a reclaim) are read by `RayDrainReader`
(spotwise.cloud.ray_drain), which the daemon's notice loop turns into interruption notices.

Ray is imported lazily; a failed call to Ray raises ProviderError saying what failed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spotwise.cloud.provider import NodeRequest, Provider, ProviderError, ProviderNode
from spotwise.cloud.ray_actor import ACTOR_PREFIX, NodeAgentActor, actor_name

log = logging.getLogger(__name__)

LIFECYCLES = ("spot", "on-demand")


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Which Ray cluster, which of its nodes, and how they are priced."""

    address: str = "auto"
    """"auto" (the cluster this machine belongs to), a GCS host:port, or "ray://host:port"."""
    namespace: str = "spotwise"
    """Ray namespace of the agent actors (two daemons on one cluster use two namespaces)."""
    resource: str = ""
    """Custom resource that marks a node eligible; the agent holds all of it on its node."""
    gpus_per_node: int = 0
    """GPUs an eligible node must have (0: none needed); the agent holds all of a node's GPUs."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Node labels an eligible node must carry (e.g. {"ray.io/node-group": "spot-gpu"})."""
    instance_type: str = "ray"
    """Instance type reported for a node without an instance-type label (prices come from it)."""
    instance_type_label: str = ""
    """Node label naming the node's instance type (e.g. "ray.io/instance-type"); empty: none."""
    price_per_hour: float = 0.0
    """USD per hour of one node; 0: the daemon's price table for the instance type."""
    lifecycle: str = "spot"
    """"spot" or "on-demand", for nodes without a lifecycle label."""
    lifecycle_label: str = ""
    """Node label saying "spot" or "on-demand"; empty: none."""
    zone_label: str = "ray.io/availability-zone"
    """Node label naming the node's zone."""
    work_dir: str = ""
    """Directory on each node for the agents' state and logs; default /tmp/spotwise-ray/<ns>."""
    grace_s: float = 30.0
    """Agents' SIGTERM-to-SIGKILL grace period when they stop a generation."""
    call_timeout_s: float = 10.0
    """Longest wait for one answer from an agent actor."""
    quarantine_s: float = 60.0
    """A node whose agent stopped answering gets no new agent for this long (it may be dying
    while Ray still lists it as alive)."""
    autoscale: bool = True
    """Ask Ray's autoscaler for nodes when jobs want more than the cluster has."""

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("ray provider: address must not be empty (use \"auto\")")
        if not self.namespace:
            raise ValueError("ray provider: namespace must not be empty")
        if not self.resource and self.gpus_per_node <= 0:
            raise ValueError("ray provider: set resource or gpus_per_node, so that the agent "
                             "holds something Ray would otherwise give to other work")
        if self.gpus_per_node < 0:
            raise ValueError(f"ray provider: gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.lifecycle not in LIFECYCLES:
            raise ValueError(f"ray provider: lifecycle must be spot or on-demand, "
                             f"got {self.lifecycle!r}")
        if self.price_per_hour < 0:
            raise ValueError(f"ray provider: price_per_hour must be >= 0, got {self.price_per_hour}")

    @property
    def effective_work_dir(self) -> str:
        return self.work_dir or f"/tmp/spotwise-ray/{self.namespace}"


@dataclass(frozen=True, kw_only=True)
class RayNode:
    """A row of Ray's node table."""

    node_id: str
    alive: bool
    address: str = ""
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_table(cls, row: Mapping[str, Any]) -> RayNode:
        """From one entry of ray.nodes()."""
        return cls(node_id=str(row["NodeID"]), alive=bool(row.get("Alive")),
                   address=str(row.get("NodeManagerAddress", "")),
                   resources=dict(row.get("Resources") or {}),
                   labels=dict(row.get("Labels") or {}))


def eligible(node: RayNode, config: RayConfig) -> bool:
    """Whether spotwise may place an agent on `node` (pure)."""
    if not node.alive:
        return False
    if config.resource and node.resources.get(config.resource, 0) <= 0:
        return False
    if config.gpus_per_node and node.resources.get("GPU", 0) < config.gpus_per_node:
        return False
    return all(node.labels.get(k) == v for k, v in config.labels.items())


def reservation(node: RayNode, config: RayConfig) -> dict[str, float]:
    """What the agent actor holds on `node`: all of its eligibility resource and GPUs."""
    held = {}
    if config.resource:
        held[config.resource] = float(node.resources[config.resource])
    if node.resources.get("GPU", 0) > 0:
        held["GPU"] = float(node.resources["GPU"])
    return held


def autoscale_request(config: RayConfig, nodes_wanted: int
                      ) -> tuple[list[dict[str, float]], list[dict[str, str]]]:
    """The bundles (and their label selectors) that ask the autoscaler for `nodes_wanted`
    eligible nodes in all (request_resources counts what runs already); empty: no request."""
    bundle: dict[str, float] = {}
    if config.resource:
        bundle[config.resource] = 1.0
    if config.gpus_per_node:
        bundle["GPU"] = float(config.gpus_per_node)
    count = max(0, nodes_wanted)
    return [dict(bundle) for _ in range(count)], [dict(config.labels) for _ in range(count)]


def node_identity(node: RayNode, config: RayConfig) -> tuple[str, str, str]:
    """(instance type, lifecycle, zone) of a node, from its labels or the config (pure)."""
    itype = node.labels.get(config.instance_type_label, "") if config.instance_type_label else ""
    lifecycle = node.labels.get(config.lifecycle_label, "") if config.lifecycle_label else ""
    if lifecycle not in LIFECYCLES:
        lifecycle = config.lifecycle
    return itype or config.instance_type, lifecycle, node.labels.get(config.zone_label, "")


@dataclass
class _Agent:
    node_id: str
    job_id: str
    actor: Any
    ready: Any
    """ObjectRef of the actor's first describe(): done once the actor runs; None once seen."""
    instance_type: str = ""
    lifecycle: str = "spot"
    zone: str = ""


class RayProvider(Provider):
    """Places spotwise node agents as actors on a Ray cluster's eligible nodes."""

    name = "ray"

    def __init__(self, config: RayConfig, *, clock: Callable[[], float] = time.time) -> None:
        """Connects to the cluster (reusing this process's Ray connection if there is one).
        Raises ProviderError if Ray is not installed or the cluster cannot be reached."""
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._quarantine: dict[str, float] = {}
        self._shortfall: dict[str, int] = {}
        self._requested: list[dict[str, float]] = []
        self._owns_connection = False
        self._actor_cls: Any = None
        self._connect()

    # ---- Ray calls ------------------------------------------------------------------------

    def _connect(self) -> None:
        try:
            import ray
        except ImportError as e:
            raise ProviderError("ray provider: Ray is not installed (pip install "
                                "'spotwise[ray]')") from e
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.config.address, namespace=self.config.namespace,
                     log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ProviderError(f"ray provider: cannot connect to Ray at "
                                f"{self.config.address!r}: {e}") from e
        self._owns_connection = True

    def nodes(self) -> list[RayNode]:
        """Ray's node table. Raises ProviderError if the GCS does not answer."""
        import ray

        try:
            return [RayNode.from_table(row) for row in ray.nodes()]
        except Exception as e:  # Ray raises many types for a GCS it cannot reach
            raise ProviderError(f"ray provider: reading the node table failed: {e}") from e

    def draining(self) -> dict[str, float]:
        """Nodes Ray is draining -> their deadline (Unix seconds, 0.0 = none). Raises
        ProviderError if the GCS does not answer."""
        import ray._private.state

        try:
            drains = ray._private.state.state.get_draining_nodes()
        except Exception as e:  # as above; the state accessor is Ray's own (Ray Train uses it)
            raise ProviderError(f"ray provider: reading the drain state failed: {e}") from e
        return {str(node): ms / 1000.0 if ms else 0.0 for node, ms in (drains or {}).items()}

    def _available(self) -> dict[str, dict[str, float]] | None:
        """Free resources per node, None where Ray cannot say (a ray:// client)."""
        import ray._private.state

        try:
            return ray._private.state.state.available_resources_per_node()
        except Exception:  # a client connection has no state accessor: Ray queues instead
            return None

    def _agent_node_ids(self) -> set[str]:
        """Node ids of the live agent actors in our namespace."""
        import ray

        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception as e:
            raise ProviderError(f"ray provider: listing named actors failed: {e}") from e
        return {a["name"][len(ACTOR_PREFIX):] for a in named
                if a["namespace"] == self.config.namespace and a["name"].startswith(ACTOR_PREFIX)}

    def _wait(self, refs: Sequence[Any], timeout_s: float) -> set[Any]:
        """The refs among `refs` that finished within `timeout_s` (failed ones included)."""
        import ray

        if not refs:
            return set()
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        return set(done)

    # ---- the provider interface -----------------------------------------------------------

    def fleet_price(self) -> float | None:
        """`[daemon.ray] price_per_hour` (0: the price table for the node's instance type)."""
        return self.config.price_per_hour or None

    def list_nodes(self) -> list[ProviderNode]:
        import ray

        table = {n.node_id: n for n in self.nodes()}
        names = self._agent_node_ids()
        with self._lock:
            for node_id in sorted(names - set(self._agents)):
                self._adopt(node_id, table.get(node_id))
            out = []
            for node_id, agent in list(self._agents.items()):
                node = table.get(node_id)
                if node_id not in names or node is None or not node.alive:
                    # The actor died (ray.kill, a failed start) or Ray declared its node dead.
                    del self._agents[node_id]
                    log.info("ray provider: agent on node %s is gone (%s)", node_id,
                             "node dead" if node_id in names else "actor gone")
                    continue
                state = "running"
                if agent.ready is not None:
                    if agent.ready in self._wait([agent.ready], 0):
                        try:
                            ray.get(agent.ready, timeout=0)
                            agent.ready = None
                        except Exception as e:  # the actor's constructor failed
                            log.warning("ray provider: agent on node %s failed to start: %s",
                                        node_id, e)
                            del self._agents[node_id]
                            continue
                    else:
                        state = "pending"
                out.append(self._provider_node(agent, state))
            self._update_autoscaler()
            return out

    def _provider_node(self, agent: _Agent, state: str) -> ProviderNode:
        return ProviderNode(handle=agent.node_id, job_id=agent.job_id,
                            instance_type=agent.instance_type, zone=agent.zone,
                            lifecycle=agent.lifecycle, state=state,
                            tags={"ray_namespace": self.config.namespace})

    def _adopt(self, node_id: str, node: RayNode | None) -> None:
        """Take over an agent actor an earlier provider object (daemon) placed."""
        import ray

        if node is None or not node.alive:
            return
        try:
            actor = ray.get_actor(actor_name(node_id), namespace=self.config.namespace)
            info = ray.get(actor.describe.remote(), timeout=self.config.call_timeout_s)
        except Exception as e:  # gone meanwhile, or not answering: try again next time
            log.warning("ray provider: cannot adopt the agent on node %s: %s", node_id, e)
            return
        itype, lifecycle, zone = node_identity(node, self.config)
        self._agents[node_id] = _Agent(node_id=node_id, job_id=str(info.get("job_id", "")),
                                       actor=actor, ready=None, instance_type=itype,
                                       lifecycle=lifecycle, zone=zone)
        log.info("ray provider: adopted the agent on node %s (job %s)", node_id,
                 info.get("job_id") or "-")

    def launch(self, request: NodeRequest, count: int) -> list[ProviderNode]:
        if not request.daemon_address:
            raise ValueError("NodeRequest.daemon_address is required for Ray nodes")
        table = self.nodes()
        draining = self.draining()
        available = self._available()
        now = self.clock()
        started: list[ProviderNode] = []
        with self._lock:
            self._quarantine = {n: t for n, t in self._quarantine.items() if t > now}
            free = [n for n in sorted(table, key=lambda n: n.node_id)
                    if eligible(n, self.config) and n.node_id not in self._agents
                    and n.node_id not in draining and n.node_id not in self._quarantine
                    and _fits(reservation(n, self.config), available, n.node_id)]
            for node in free[:max(0, count)]:
                agent = self._place(node, request)
                if agent is not None:
                    started.append(self._provider_node(agent, "pending"))
            self._shortfall[request.job_id] = max(0, count - len(started))
        return started

    def _place(self, node: RayNode, request: NodeRequest) -> _Agent | None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        c = self.config
        if self._actor_cls is None:
            self._actor_cls = ray.remote(NodeAgentActor)
        itype, lifecycle, zone = node_identity(node, c)
        if request.market == "on-demand":
            lifecycle = "on-demand"
        held = reservation(node, c)
        gpus = held.pop("GPU", 0.0)
        agent_args = ["--daemon", request.daemon_address, "--provider-node", node.node_id,
                      "--slots", str(request.slots), "--instance-type", itype,
                      "--lifecycle", lifecycle, "--price-per-hour", str(c.price_per_hour),
                      "--grace-s", str(c.grace_s)]
        try:
            actor = self._actor_cls.options(
                name=actor_name(node.node_id), namespace=c.namespace, lifetime="detached",
                max_restarts=0, num_cpus=0, num_gpus=gpus, resources=held,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            ).remote(job_id=request.job_id, agent_args=agent_args,
                     work_dir=f"{c.effective_work_dir}/{node.node_id}",
                     marker=f"{c.namespace}/{node.node_id}", zone=zone, gpus=int(gpus),
                     grace_s=c.grace_s)
        except ValueError as e:  # the name is taken: an agent is there already
            log.info("ray provider: node %s already has an agent: %s", node.node_id, e)
            return None
        agent = _Agent(node_id=node.node_id, job_id=request.job_id, actor=actor,
                       ready=actor.describe.remote(), instance_type=itype, lifecycle=lifecycle,
                       zone=zone)
        self._agents[node.node_id] = agent
        log.info("ray provider: placed an agent on node %s (%s) for job %s, holding %s",
                 node.node_id, node.address, request.job_id or "-",
                 {**held, **({"GPU": gpus} if gpus else {})})
        return agent

    def terminate(self, handles: Sequence[str]) -> None:
        import ray

        with self._lock:
            victims = []
            for handle in handles:
                agent = self._agents.pop(handle, None)
                actor = agent.actor if agent is not None else self._lookup(handle)
                if actor is not None:
                    victims.append((handle, actor))
            # A node whose agent does not answer may be dying while Ray still lists it.
            probes = {handle: actor.describe.remote() for handle, actor in victims}
            answered = self._wait(list(probes.values()), min(2.0, self.config.call_timeout_s))
            now = self.clock()
            for handle, actor in victims:
                if probes[handle] not in answered:
                    self._quarantine[handle] = now + self.config.quarantine_s
                try:
                    ray.kill(actor, no_restart=True)
                except Exception as e:  # already dead: nothing to stop
                    log.info("ray provider: killing the agent on node %s: %s", handle, e)
                log.info("ray provider: removed the agent on node %s", handle)

    def _lookup(self, node_id: str) -> Any:
        import ray

        try:
            return ray.get_actor(actor_name(node_id), namespace=self.config.namespace)
        except ValueError:
            return None

    def _update_autoscaler(self) -> None:
        """Ask for (or withdraw) capacity from what the last round of launches could not
        place: one eligible bundle per agent that runs or is owed."""
        if not self.config.autoscale:
            return
        owed = sum(self._shortfall.values())
        self._shortfall = {}
        bundles, selectors = autoscale_request(self.config, len(self._agents) + owed if owed else 0)
        if bundles == self._requested:
            return
        from ray.autoscaler.sdk import request_resources

        try:
            if any(selectors):
                request_resources(bundles=bundles, bundle_label_selectors=selectors)
            else:
                request_resources(bundles=bundles)
        except Exception as e:  # the request is a hint; the next round asks again
            log.warning("ray provider: request_resources failed: %s", e)
            return
        self._requested = bundles
        if bundles:
            log.info("ray provider: asked the autoscaler for %d eligible node(s) in all "
                     "(%d more than run)", len(bundles), owed)
        else:
            log.info("ray provider: withdrew the autoscaler request")

    def close(self) -> None:
        """Leaves the agents running (a restarted daemon adopts them); `shutdown` removes
        them. Disconnects from Ray if this provider connected."""
        if self._owns_connection:
            import ray

            ray.shutdown()
            self._owns_connection = False

    def shutdown(self) -> None:
        """Remove every agent actor of this namespace (those of earlier daemons included)."""
        with self._lock:
            handles = set(self._agents)
        self.terminate(sorted(handles | self._agent_node_ids()))
        with self._lock:
            self._shortfall = {}
            self._update_autoscaler()


def _fits(held: Mapping[str, float], available: Mapping[str, Mapping[str, float]] | None,
          node_id: str) -> bool:
    """Whether the node has `held` free (unknown availability: assume it has)."""
    if available is None:
        return True
    free = available.get(node_id, {})
    return all(free.get(k, 0.0) >= v for k, v in held.items())
