"""Which job each machine is charged to: from its launch until its provider confirms it gone.

A machine costs money while it runs, not while the daemon wants it. So a provider's machine
is charged from the first listing that shows it (before its agent registers: it boots at the
job's expense) to the first listing that no longer does (after its agent stopped the job's
processes and the provider terminated it), and an operator's own machine (no provider lists
it) while its agent serves a job or is still stopping one. `ProviderView` keeps what the fleet
loop's listings said; `charged_to` and `unregistered` are the rules (pure over their inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from spotwise.cloud.provider import ProviderNode
from spotwise.daemon.model import NodeState
from spotwise.daemon.state import JobRecord, NodeRecord


class ProviderView:
    """The provider's last listing of its live machines, and every handle it ever listed."""

    def __init__(self) -> None:
        self.live: dict[str, ProviderNode] | None = None
        """Handle -> machine, as last listed; None: no provider lists machines."""
        self.known: set[str] = set()
        """Handles listed since this daemon started: those machines are the provider's."""

    def seen(self, machines: Iterable[ProviderNode]) -> None:
        self.live = {m.handle: m for m in machines}
        self.known.update(self.live)

    def handle_of(self, node: NodeRecord) -> str:
        """The node's handle if its machine is the provider's ("": an operator's own)."""
        for handle in (node.row.provider_node, node.row.instance_id):
            if handle and handle in self.known:
                return handle
        return ""

    def runs(self, handle: str) -> bool:
        return self.live is not None and handle in self.live


def charged_to(node: NodeRecord, view: ProviderView, jobs: Mapping[str, JobRecord]) -> str:
    """The job the node's machine is charged to now ("": none).

    A provider's machine is charged while the provider lists it: to the job it is a member
    of, else to the job whose processes it is still stopping (a final checkpoint may be in
    flight), else to a live job it waits to join, else to the job it last served or was
    launched for (the fleet terminates it on that job's behalf). An operator's machine is
    charged while its agent serves a job or is still stopping one; once its lease ran out
    nobody can say, and it is charged no further.
    """
    handle = view.handle_of(node)
    if handle:
        if not view.runs(handle):
            return ""  # the provider confirmed it gone
    elif node.state is NodeState.LOST:
        return ""
    if node.row.job_id:
        return node.row.job_id
    if node.reported_running and node.reported_job_id:
        return node.reported_job_id
    launched = jobs.get(node.launched_for)
    if (launched is not None and not launched.state.terminal
            and node.state in (NodeState.JOINING, NodeState.READY)):
        return node.launched_for
    return (node.last_job or node.launched_for) if handle else ""


def unregistered(view: ProviderView, nodes: Iterable[NodeRecord]) -> list[ProviderNode]:
    """Live provider machines no registered node stands for yet (booting, or whose agent
    never registered): each is charged to the job it was launched for."""
    if not view.live:
        return []
    registered = {h for n in nodes for h in (n.row.provider_node, n.row.instance_id) if h}
    return [m for h, m in sorted(view.live.items()) if h not in registered and m.job_id]
