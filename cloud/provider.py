"""The narrow interface every capacity provider implements (local, ec2, ray).

A provider turns "this job wants N more nodes" into machines running a node agent, and back.
Calls are synchronous and bounded in time; the daemon runs them off its event loop. A failed
outside call raises ProviderError naming what failed and what was tried.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field


class ProviderError(RuntimeError):
    """A provider's call to the outside (a cloud API, a subprocess) failed."""


@dataclass(frozen=True, kw_only=True)
class NodeRequest:
    """What the fleet reconciler asks a provider for."""

    job_id: str
    """The job the new nodes are for; providers tag nodes with it."""
    instance_types: tuple[str, ...] = ()
    """Allowed instance types, cheapest useful first; empty means the provider's default."""
    market: str = "spot"
    """"spot", "on-demand" or "spot-with-fallback"."""
    daemon_address: str = ""
    """host:port the node's agent registers with."""
    slots: int = 1
    """Training processes each node must be able to run (the job's nproc_per_node)."""


@dataclass(frozen=True, kw_only=True)
class ProviderNode:
    """A machine as the provider sees it."""

    handle: str
    """The provider's id for it: "local-3", "i-0abc...". Agents report it as provider_node."""
    job_id: str
    """The job it was launched for ("" if unknown)."""
    instance_type: str = ""
    zone: str = ""
    lifecycle: str = "spot"
    """"spot" or "on-demand"."""
    state: str = "running"
    """"pending", "running" or "terminated"."""
    tags: dict[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    """Starts and stops machines that run a node agent."""

    name: str = "provider"

    @abc.abstractmethod
    def launch(self, request: NodeRequest, count: int) -> list[ProviderNode]:
        """Start up to `count` nodes for `request.job_id`; returns those started (may be fewer)."""

    @abc.abstractmethod
    def terminate(self, handles: Sequence[str]) -> None:
        """Stop these nodes and everything they run. Unknown handles are ignored."""

    @abc.abstractmethod
    def list_nodes(self) -> list[ProviderNode]:
        """Every live node this provider started (found again by tag after a daemon restart)."""

    def node_price(self, handle: str) -> float | None:
        """USD per hour of a node this provider runs, when the provider itself sets it (its
        own config, not the node's word); None: the daemon's price book prices it."""
        return self.fleet_price()

    def fleet_price(self) -> float | None:
        """USD per hour of every node this provider runs, when its config sets one price for
        all; None: not so (the price book, or node_price, prices each)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release what the provider holds (not the nodes)."""
