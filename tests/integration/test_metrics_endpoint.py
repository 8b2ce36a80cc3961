"""The daemon's metrics, scraped over real HTTP and parsed with Prometheus' own parser."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spotwise.daemon.metrics import JOB_STATES, Metrics, MetricsExporter, start_exporter

EXPECTED_FAMILIES = {
    # family name as the parser reports it -> type
    "spotwise_jobs": "gauge",
    "spotwise_job_world_size": "gauge",
    "spotwise_job_steps_per_second": "gauge",
    "spotwise_job_generation": "gauge",
    "spotwise_job_last_checkpoint_timestamp_seconds": "gauge",
    "spotwise_checkpoint_seconds": "histogram",
    "spotwise_preemptions": "counter",
    "spotwise_cost_usd": "counter",
    "spotwise_heartbeat_latency_seconds": "histogram",
}


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsExporter]]:
    metrics = Metrics()
    exporter = start_exporter(metrics, "127.0.0.1:0")
    try:
        yield metrics, exporter
    finally:
        exporter.close()


def scrape(exporter: MetricsExporter) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from one scrape, checking the family types."""
    with urllib.request.urlopen(exporter.url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in EXPECTED_FAMILIES:
            assert family.type == EXPECTED_FAMILIES[family.name], family.name
        if family.samples:
            samples.setdefault(f"family:{family.name}", {})[()] = 0.0
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_port_zero_binds_a_real_port(served: tuple[Metrics, MetricsExporter]) -> None:
    _, exporter = served
    assert exporter.port > 0
    assert exporter.url == f"http://127.0.0.1:{exporter.port}/metrics"


def test_scrape_shows_every_update(served: tuple[Metrics, MetricsExporter]) -> None:
    metrics, exporter = served
    metrics.set_jobs_by_state({"RUNNING": 2, "JOB_STATE_PENDING": 1})
    metrics.set_job_world_size("job-a", 8)
    metrics.set_job_steps_per_second("job-a", 3.5)
    metrics.set_job_generation("job-a", 3)
    metrics.observe_checkpoint("job-a", 4.0, at=1_700_000_000.0)
    metrics.observe_checkpoint("job-a", 40.0, at=1_700_000_060.0)
    metrics.inc_preemptions("job-a")
    metrics.inc_preemptions("job-a", 2)
    metrics.add_cost("job-a", 0.25)
    metrics.add_cost("job-a", 0.5)
    metrics.observe_heartbeat_latency(0.003)

    s = scrape(exporter)
    jobs = {dict(k)["state"]: v for k, v in s["spotwise_jobs"].items()}
    assert jobs == {**dict.fromkeys(JOB_STATES, 0.0), "RUNNING": 2.0, "PENDING": 1.0}
    job = (("job", "job-a"),)
    assert s["spotwise_job_world_size"][job] == 8
    assert s["spotwise_job_steps_per_second"][job] == 3.5
    assert s["spotwise_job_generation"][job] == 3
    assert s["spotwise_job_last_checkpoint_timestamp_seconds"][job] == 1_700_000_060.0
    assert s["spotwise_checkpoint_seconds_count"][job] == 2
    assert s["spotwise_checkpoint_seconds_sum"][job] == 44.0
    buckets = {dict(k)["le"]: v for k, v in s["spotwise_checkpoint_seconds_bucket"].items()}
    assert buckets["5.0"] == 1 and buckets["60.0"] == 2 and buckets["+Inf"] == 2
    assert s["spotwise_preemptions_total"][job] == 3
    assert s["spotwise_cost_usd_total"][job] == pytest.approx(0.75)
    assert s["spotwise_heartbeat_latency_seconds_count"][()] == 1
    assert {f"family:{name}" for name in EXPECTED_FAMILIES} <= set(s)


def test_no_label_finer_than_the_job(served: tuple[Metrics, MetricsExporter]) -> None:
    metrics, exporter = served
    metrics.set_job_world_size("j", 1)
    metrics.observe_checkpoint("j", 1)
    metrics.inc_preemptions("j")
    metrics.add_cost("j", 1)
    metrics.set_job_steps_per_second("j", 1)
    metrics.observe_heartbeat_latency(0.1)
    for name, series in scrape(exporter).items():
        if not name.startswith("spotwise_"):  # skips the family: markers
            continue
        for labels in series:
            assert {k for k, _ in labels} <= {"job", "state", "le"}, (name, labels)


def test_cost_total_is_monotonic_and_survives_a_restart(
    served: tuple[Metrics, MetricsExporter],
) -> None:
    metrics, exporter = served
    metrics.set_cost_total("j", 1.5)
    metrics.set_cost_total("j", 1.0)  # a stale total never lowers the counter
    metrics.set_cost_total("j", 2.0)
    metrics.add_cost("j", 0.5)
    metrics.set_cost_total("j", 2.25)  # already past it through add_cost
    assert scrape(exporter)["spotwise_cost_usd_total"][(("job", "j"),)] == pytest.approx(2.5)
    # A restarted daemon exports the ledger's total at once: the series continues.
    restarted = Metrics()
    restarted.set_cost_total("j", 2.5)
    other = start_exporter(restarted, "127.0.0.1:0")
    try:
        assert scrape(other)["spotwise_cost_usd_total"][(("job", "j"),)] == pytest.approx(2.5)
    finally:
        other.close()


def test_forget_job_removes_its_series(served: tuple[Metrics, MetricsExporter]) -> None:
    metrics, exporter = served
    for job in ("old", "new"):
        metrics.set_job_world_size(job, 2)
        metrics.set_job_generation(job, 1)
        metrics.observe_checkpoint(job, 1)
        metrics.add_cost(job, 1)
    metrics.inc_preemptions("old")
    metrics.forget_job("old")
    metrics.forget_job("never-seen")
    assert metrics.jobs_with_series() == {"new"}
    s = scrape(exporter)
    assert all(("job", "old") not in k for series in s.values() for k in series)
    assert s["spotwise_job_world_size"] == {(("job", "new"),): 2}


def test_separate_registries_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.set_job_world_size("j", 4)
    assert b.jobs_with_series() == set()


def test_bad_input() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError):
        metrics.set_jobs_by_state({"EXPLODED": 1})
    with pytest.raises(ValueError):
        metrics.add_cost("j", -1)
    with pytest.raises(ValueError):
        start_exporter(metrics, "no-port")


def test_close_stops_serving() -> None:
    metrics = Metrics()
    exporter = start_exporter(metrics, "127.0.0.1:0")
    url = exporter.url
    exporter.close()
    assert not exporter.thread.is_alive()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
