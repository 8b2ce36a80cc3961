"""The dashboard's PromQL and scraped metrics, for tests: each panel's queries
(`dashboard_targets`), with Grafana's variables filled in (`substitute`), the spotwise metrics
an expression reads (`metric_names`), and the samples of /metrics texts (`samples_of`). A real
Prometheus answers the queries (tests/support/prometheus.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}
"""What the dashboard's variables stand for here: any job, a 5-minute window."""

_SELECTOR = re.compile(r"\b(?P<name>spotwise_[A-Za-z0-9_]+)\s*(?:\{(?P<matchers>[^}]*)\})?")


@dataclass(frozen=True)
class Sample:
    """One scraped sample: its name (with _total/_bucket/... as exposed), labels, family type
    and value."""

    name: str
    labels: dict[str, str]
    type: str
    value: float


def samples_of(texts: Iterable[str]) -> list[Sample]:
    """Every sample of the given /metrics texts."""
    out: list[Sample] = []
    for text in texts:
        for family in text_string_to_metric_families(text):
            out.extend(Sample(s.name, dict(s.labels), family.type, s.value) for s in family.samples)
    return out


def substitute(expr: str) -> str:
    """The expression with the dashboard's variables replaced (GRAFANA_VARIABLES)."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_targets(dashboard: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query in a Grafana dashboard (rows included)."""
    out: list[tuple[str, str, str]] = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.append((panel.get("title", ""), target.get("refId", ""), target.get("expr", "")))
    return out


def metric_names(expr: str) -> set[str]:
    """The spotwise metric names (as exposed: _total, _bucket ...) an expression reads."""
    return {m.group("name") for m in _SELECTOR.finditer(expr)}
