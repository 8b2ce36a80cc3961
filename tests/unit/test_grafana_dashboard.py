"""deploy/grafana/spotwise-dashboard.json: a dashboard Grafana can import, over metrics that
exist. (That its queries return series from a real daemon and agents: tests/e2e/test_observe_e2e.)"""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from spotwise.daemon.metrics import Metrics
from spotwise.worker.agent.metrics import AgentMetrics
from tests.support.promql import dashboard_targets, metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "spotwise-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exposed(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry's metrics can expose, with or without samples yet."""
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_the_dashboard_is_importable() -> None:
    dash = load()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and p["title"] and p["description"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_it_shows_what_the_issue_asks_for() -> None:
    titles = " | ".join(p["title"].lower() for p in load()["panels"])
    for topic in ("jobs by state", "world size", "generation", "heartbeat", "notices",
                  "commits", "age of the last commit", "spend rate"):
        assert topic in titles, topic


def test_every_query_reads_metrics_that_exist() -> None:
    known = exposed(Metrics().registry) | exposed(AgentMetrics().registry)
    for title, ref, expr in dashboard_targets(load()):
        names = metric_names(expr)
        assert names, (title, ref, expr)
        assert names <= known, (title, ref, sorted(names - known))
