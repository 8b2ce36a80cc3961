"""An approximate check of a Grafana panel's PromQL against scraped metrics text, for tests.

It does not evaluate PromQL. For one expression it finds every metric selector
(`name{label="v", label=~"re"}`) and checks, against the samples of one scrape (prometheus
_client's text parser), that each selector matches at least one sample, that every label an
aggregation groups `by` is on those samples (`instance`, which Prometheus adds at scrape time,
counts as present), and that a selector under rate()/increase() is a counter or a histogram
series. An expression whose selectors all pass returns a non-empty result in Prometheus as
long as it has no `or`/`unless` and no filter on values (the dashboard's have none); what it
cannot tell is whether a rate over a window is non-zero.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": ".*"}
"""What the dashboard's variables stand for here: any job, a 5-minute window."""

SCRAPE_LABELS = frozenset({"instance"})
"""Labels that Prometheus adds to every scraped series."""

_SELECTOR = re.compile(r"\b(?P<name>spotwise_[A-Za-z0-9_]+)\s*(?:\{(?P<matchers>[^}]*)\})?")
_MATCHER = re.compile(r'\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>[^"]*)"\s*,?')
_BY = re.compile(r"\bby\s*\((?P<labels>[^)]*)\)")
_RANGE_FN = re.compile(r"\b(?:rate|increase|irate)\s*\(\s*(?P<name>spotwise_[A-Za-z0-9_]+)")


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


def _matches(sample: Sample, matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = sample.labels.get(label, "")
        ok = {"=": have == value, "!=": have != value,
              "=~": re.fullmatch(value, have) is not None,
              "!~": re.fullmatch(value, have) is None}[op]
        if not ok:
            return False
    return True


def problems(expr: str, samples: list[Sample]) -> list[str]:
    """Why `expr` would return no series from these samples; [] if it would return some."""
    expr = substitute(expr)
    found: list[str] = []
    selectors = list(_SELECTOR.finditer(expr))
    if not selectors:
        return [f"no spotwise metric in {expr!r}"]
    grouped = {label.strip() for m in _BY.finditer(expr) for label in m.group("labels").split(",")
               if label.strip()} - SCRAPE_LABELS
    ranged = {m.group("name") for m in _RANGE_FN.finditer(expr)}
    for sel in selectors:
        name = sel.group("name")
        matchers = [(m.group("label"), m.group("op"), m.group("value"))
                    for m in _MATCHER.finditer(sel.group("matchers") or "")]
        hits = [s for s in samples if s.name == name and _matches(s, matchers)]
        if not hits:
            found.append(f"{name}{{{sel.group('matchers') or ''}}}: no sample")
            continue
        missing = {label for label in grouped if not all(label in s.labels for s in hits)}
        if missing:
            found.append(f"{name}: grouped by {sorted(missing)}, which its samples lack")
        if name in ranged and not all(s.type in ("counter", "histogram") for s in hits):
            found.append(f"{name}: rate/increase over a {hits[0].type}")
    return found


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
