"""The daemon's Prometheus metrics and the HTTP endpoint that exports them.

Every metric lives in the `Metrics` object's own CollectorRegistry (not prometheus-client's
global one), so tests and several daemons in one process never collide. Names follow
Prometheus conventions: the `spotwise_` prefix, base units, `_total` for counters, `_seconds`
for durations. No label is finer than the job: per-node or per-rank series would grow with the
fleet, and a job's series are removed with `forget_job` once it ends.

    metrics = Metrics()
    exporter = start_exporter(metrics, "127.0.0.1:9450")   # spotwise.common.exporter
    metrics.set_jobs_by_state({"RUNNING": 2, "PENDING": 1})
    metrics.observe_checkpoint("job-1", 4.2)
    ...
    exporter.close()

The exporter has no authentication: listen on loopback or a private network only (the
Terraform module admits the metrics port from the admin CIDRs alone).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from spotwise.common.exporter import HEARTBEAT_BUCKETS_S, MetricsExporter, start_exporter

log = logging.getLogger(__name__)

JOB_STATES = (
    "PENDING",
    "RUNNING",
    "RESCALING",
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "BUDGET_EXHAUSTED",
)
"""Every job state, so that `spotwise_jobs` shows an explicit 0 for the empty ones."""

CHECKPOINT_BUCKETS_S = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf"))
"""Checkpoint commits take seconds (small models to local disk) to minutes (large ones to S3)."""




class Metrics:
    """The daemon's metrics; the update methods are what the daemon calls.

    Thread-safe (prometheus-client's metrics are), so the gRPC loop and the exporter's thread
    can share one instance.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("spotwise_jobs", "Jobs by state.", ["state"], registry=r)
        self.job_world_size = Gauge(
            "spotwise_job_world_size",
            "Training processes in the job's current generation (0 when not running).",
            ["job"],
            registry=r,
        )
        self.job_steps_per_second = Gauge(
            "spotwise_job_steps_per_second",
            "Optimizer steps per second, from the job's latest progress reports.",
            ["job"],
            registry=r,
        )
        self.job_generation = Gauge(
            "spotwise_job_generation",
            "The job's current generation (it grows by one at every change of membership).",
            ["job"],
            registry=r,
        )
        self.job_last_checkpoint_timestamp_seconds = Gauge(
            "spotwise_job_last_checkpoint_timestamp_seconds",
            "Unix time of the job's newest committed checkpoint (its age: time() minus this).",
            ["job"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "spotwise_checkpoint_seconds",
            "Seconds from a checkpoint request (or the previous commit) to its commit.",
            ["job"],
            buckets=CHECKPOINT_BUCKETS_S,
            registry=r,
        )
        # prometheus-client appends _total to counter names.
        self.preemptions = Counter(
            "spotwise_preemptions",
            "Nodes a job lost to the cloud (interruption notices and losses without notice).",
            ["job"],
            registry=r,
        )
        self.cost_usd = Counter(
            "spotwise_cost_usd",
            "Money charged to the job by the ledger, in US dollars.",
            ["job"],
            registry=r,
        )
        self.teardown_seconds = Histogram(
            "spotwise_job_teardown_seconds",
            "Seconds from a job's end to its last machine gone (charged until then).",
            buckets=CHECKPOINT_BUCKETS_S,
            registry=r,
        )
        self.heartbeat_latency_seconds = Histogram(
            "spotwise_heartbeat_latency_seconds",
            "Seconds the daemon took to handle one agent heartbeat.",
            buckets=HEARTBEAT_BUCKETS_S,
            registry=r,
        )
        self.checkpoint_failures = Counter(
            "spotwise_checkpoint_failures",
            "Checkpoint saves of the job that failed or timed out (not committed).",
            ["job"],
            registry=r,
        )
        self._cost_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self.set_jobs_by_state({})

    def set_jobs_by_state(self, counts: Mapping[str, int]) -> None:
        """Set `spotwise_jobs{state}` from {state name: count}; states not given are 0.

        Accepts "RUNNING" or "JOB_STATE_RUNNING". ValueError for an unknown state.
        """
        normalized: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        for state, count in counts.items():
            name = state.removeprefix("JOB_STATE_").upper()
            if name not in normalized:
                raise ValueError(f"unknown job state {state!r}")
            normalized[name] += count
        for name, count in normalized.items():
            self.jobs.labels(state=name).set(count)

    def set_job_world_size(self, job_id: str, world_size: int) -> None:
        """The job's current world size (0 while it has no running generation)."""
        self.job_world_size.labels(job=job_id).set(world_size)

    def set_job_steps_per_second(self, job_id: str, steps_per_second: float) -> None:
        """The job's current step rate."""
        self.job_steps_per_second.labels(job=job_id).set(steps_per_second)

    def set_job_generation(self, job_id: str, generation: int) -> None:
        """The job's current generation (call at every generation start, and at load)."""
        self.job_generation.labels(job=job_id).set(generation)

    def observe_checkpoint(self, job_id: str, seconds: float, *, at: float | None = None) -> None:
        """One committed checkpoint and how long it took; `at` (unix seconds, default now) is
        when it committed, exported as the job's last-commit time."""
        self.checkpoint_seconds.labels(job=job_id).observe(seconds)
        self.set_job_last_checkpoint(job_id, time.time() if at is None else at)

    def observe_teardown(self, seconds: float) -> None:
        """One ended job's teardown: from its end to its last machine gone."""
        self.teardown_seconds.observe(seconds)

    def set_job_last_checkpoint(self, job_id: str, committed_at: float) -> None:
        """When the job's newest checkpoint committed (unix seconds): what observe_checkpoint
        sets, and what a restarted daemon sets from its stored jobs."""
        self.job_last_checkpoint_timestamp_seconds.labels(job=job_id).set(committed_at)

    def inc_checkpoint_failures(self, job_id: str) -> None:
        """A checkpoint save of the job failed."""
        self.checkpoint_failures.labels(job=job_id).inc()

    def inc_preemptions(self, job_id: str, count: int = 1) -> None:
        """Nodes of the job taken back by the cloud."""
        self.preemptions.labels(job=job_id).inc(count)

    def add_cost(self, job_id: str, usd: float) -> None:
        """Money charged to the job since the last call (a ledger tick)."""
        if usd < 0:
            raise ValueError(f"cost increment must not be negative, got {usd}")
        with self._lock:
            self._cost_seen[job_id] = self._cost_seen.get(job_id, 0.0) + usd
        self.cost_usd.labels(job=job_id).inc(usd)

    def set_cost_total(self, job_id: str, total_usd: float) -> None:
        """Bring the job's cost counter up to the ledger's total (what the job has spent).

        Counters only go up: a total below what was already exported is ignored. After a
        daemon restart the first call exports the whole total at once, so the series carries
        on from where the previous process left it.
        """
        counter = self.cost_usd.labels(job=job_id)  # exported from the first charge, even $0
        with self._lock:
            delta = total_usd - self._cost_seen.get(job_id, 0.0)
            if delta <= 0:
                return
            self._cost_seen[job_id] = total_usd
        counter.inc(delta)

    def observe_heartbeat_latency(self, seconds: float) -> None:
        """How long one heartbeat took to handle."""
        self.heartbeat_latency_seconds.observe(seconds)

    def forget_job(self, job_id: str) -> None:
        """Drop the job's series (call some time after the job ends, to bound cardinality)."""
        for metric in (
            self.job_world_size,
            self.job_steps_per_second,
            self.job_generation,
            self.job_last_checkpoint_timestamp_seconds,
            self.checkpoint_seconds,
            self.preemptions,
            self.cost_usd,
            self.checkpoint_failures,
        ):
            try:
                metric.remove(job_id)
            except KeyError:
                pass  # the job never reported this metric
        with self._lock:
            self._cost_seen.pop(job_id, None)

    def jobs_with_series(self) -> set[str]:
        """Jobs that currently have series (for the daemon's cleanup and for tests)."""
        jobs: set[str] = set()
        for family in self.registry.collect():
            for sample in family.samples:
                if "job" in sample.labels:
                    jobs.add(sample.labels["job"])
        return jobs


__all__ = ["HEARTBEAT_BUCKETS_S", "JOB_STATES", "Metrics", "MetricsExporter", "start_exporter"]
