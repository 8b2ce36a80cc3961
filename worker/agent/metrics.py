"""The node agent's Prometheus metrics (served when `metrics_listen` is set).

What an operator of a spot fleet watches on each node: is the agent in touch with the daemon
(heartbeat round trips and failures), what it runs (generation, live training processes), how
those processes end, and what the cloud said (interruption notices, metadata-service errors).
Series carry no job or rank labels: a node runs one job at a time, and the daemon's metrics
hold the per-job view. Same conventions as spotwise.daemon.metrics (own registry, `spotwise_`
prefix, base units), and the same exporter:

    metrics = AgentMetrics()
    exporter = start_exporter(metrics, "127.0.0.1:9451")
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spotwise.common.exporter import HEARTBEAT_BUCKETS_S

EXIT_OUTCOMES = ("ok", "stopped", "failed")
"""How a training process ended: exit 0, stopped on request (143), anything else."""
NOTICE_ACTIONS = ("terminate", "stop", "hibernate", "rebalance")
"""The notices IMDS gives: exported from the start at 0, so that a rate over them is 0 (not
"no data") on a node that never had one."""


def exit_outcome(exit_code: int) -> str:
    if exit_code == 0:
        return "ok"
    return "stopped" if exit_code == 143 else "failed"


class AgentMetrics:
    """The agent's series, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.heartbeat_seconds = Histogram(
            "spotwise_agent_heartbeat_seconds",
            "Round trip of a successful Heartbeat to the daemon.",
            buckets=HEARTBEAT_BUCKETS_S, registry=r)
        self.daemon_errors = Counter(
            "spotwise_agent_daemon_errors_total",
            "Calls to the daemon that failed (unreachable, timed out); processes keep running.",
            registry=r)
        self.generation = Gauge(
            "spotwise_agent_generation",
            "Generation of the processes this node runs (0: none).", registry=r)
        self.processes = Gauge(
            "spotwise_agent_processes",
            "Training processes running on this node.", registry=r)
        self.process_exits = Counter(
            "spotwise_agent_process_exits_total",
            "Training processes that ended, by outcome: ok (0), stopped (143 on request), failed.",
            ["outcome"], registry=r)
        for outcome in EXIT_OUTCOMES:
            self.process_exits.labels(outcome)
        self.notices = Counter(
            "spotwise_agent_interruption_notices_total",
            "Interruption notices read from the instance metadata service, by action "
            "(terminate, stop, hibernate, rebalance).", ["action"], registry=r)
        for action in NOTICE_ACTIONS:
            self.notices.labels(action)
        self.imds_errors = Counter(
            "spotwise_agent_imds_errors_total",
            "Polls of the instance metadata service that failed or timed out.", registry=r)
        self.checkpoints = Counter(
            "spotwise_agent_checkpoints_committed_total",
            "Checkpoints committed by this node's rank 0.", registry=r)

    def count_processes(self, running: Callable[[], int]) -> None:
        """Read the live process count from `running` at each scrape."""
        self.processes.set_function(running)
