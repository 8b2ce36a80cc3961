"""The HTTP endpoint that serves a Prometheus registry (the daemon's and each agent's).

    exporter = start_exporter(metrics, "127.0.0.1:9450")   # anything with a .registry
    exporter.url; exporter.close()

No authentication: listen on loopback or a private network only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from spotwise.common.address import split_host_port

log = logging.getLogger(__name__)

HEARTBEAT_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    float("inf"),
)
"""Heartbeat handling should take milliseconds; the tail shows a stalled event loop or disk."""


def _split_address(address: str) -> tuple[str, int]:
    host, port = split_host_port(address)
    return host or "0.0.0.0", port


@dataclass
class MetricsExporter:
    """A running HTTP endpoint serving /metrics from one registry."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    """The bound port (the real one when asked for port 0)."""

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and wait (bounded) for the server thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("metrics exporter thread did not stop within %.1f s", timeout_s)


class _Registered(Protocol):
    registry: CollectorRegistry


def start_exporter(metrics: _Registered, address: str) -> MetricsExporter:
    """Serve `metrics` (the daemon's Metrics, an agent's AgentMetrics: anything with a
    `registry`) over HTTP at `address` ("host:port"; port 0 picks a free one).

    Runs in a daemon thread. OSError if the address cannot be bound.
    """
    host, port = _split_address(address)
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    bound_port = server.server_address[1]
    log.info("metrics exporter on %s:%d", host, bound_port)
    return MetricsExporter(server=server, thread=thread, host=host, port=bound_port)
