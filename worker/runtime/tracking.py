"""One experiment-tracker run per job, across every generation: MLflow.

A job that loses a node restarts from its last commit and replays the steps after it. A tracker
that logged each step as it ran would get those steps twice (MLflow cannot delete a point), and
a new run, or a clash, at every generation. Here:

- the run is the job's: found by the tag `spotwise.job_id` (the runtime's `run_id`), created
  by the first generation's rank 0 and continued by every later one;
- rank 0 is the only writer (on other ranks the tracker does nothing);
- the runtime's loss of every step is recorded on its own (inside end_step, before a save of
  that step can commit it); `log` adds other metrics for the step;
- a step's metrics are held until a checkpoint commit covers that step (`CommitGate`), then
  logged in step order. Steps after the last commit die with their generation and are logged
  once, by the generation that replays and commits them: each step once, with the value of the
  committed history. The newest committed step is kept in the run (`spotwise/committed_step`),
  so a new generation knows where logging stands. (What `log` is given for the very step at
  which a generation is stopped, after that step's own commit, is lost with the process; the
  loss is not: it was recorded before the commit.);
- the job's own figures (generation, world size, lost steps, cost) go to the same run, as
  metrics `spotwise/...` and tags `spotwise.*`: the world size and generation from the runtime
  itself, lost steps and cost from the facts the node agent appends to SPOTWISE_JOB_FACTS_FILE
  (spotwise.worker.runtime.job_facts).

    rt = Runtime.from_env(...)
    tracker = MLflowTracker.from_env(rt, tracking_uri="sqlite:///mlflow.db")
    ...
    loss = rt.train_step(sampler, loss_of)  # the tracker records the loss itself
    tracker.log({"lr": scheduler.get_last_lr()[0]})  # anything else, for this step
    ...
    rt.finish()
    tracker.finish()

Needs the `mlflow` extra (`pip install 'spotwise[mlflow]'`). A tracking server that fails is
retried a few times with backoff at each commit and then left until the next commit, which sends
what it could not (training does not stop for the tracker). Steps committed by a process that
then died before its write reached the server are named in the run's tag
`spotwise.unlogged_steps`: no generation runs them again. MLflow's own HTTP client bounds each
call (MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_HTTP_REQUEST_MAX_RETRIES).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from spotwise.worker.runtime.job_facts import ENV_VAR as FACTS_ENV_VAR
from spotwise.worker.runtime.job_facts import JobFact, JobFactsTail

log = logging.getLogger(__name__)

JOB_TAG = "spotwise.job_id"
"""The tag that names the job a run belongs to."""
COMMITTED_METRIC = "spotwise/committed_step"
"""Logged at every flush: the newest step whose metrics are in the run."""
FACTS_TAG = "spotwise.facts_through"
"""Unix time of the newest job fact in the run (facts up to it are not logged again)."""
UNLOGGED_TAG = "spotwise.unlogged_steps"
"""Committed steps whose metrics never reached the run ("6-10, 31-35"): see CommitGate.skip_to."""
LOG_ATTEMPTS = 3
"""Tries of one flush against the tracking server before it waits for the next commit."""
BATCH_LIMIT = 1000
"""MLflow's limit on metrics per log_batch call."""


class CommitGate:
    """Metrics of steps held until a commit covers them. Pure: no I/O, no clock.

    `logged_through` is the newest step already in the run: steps up to it are ignored (an
    earlier generation logged them). ValueError for a step older than one already recorded.
    At most `max_steps` steps are held (without commits the oldest go, counted in `dropped`).
    """

    def __init__(self, *, logged_through: int = 0, max_steps: int = 100_000) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        self.logged_through = logged_through
        self.max_steps = max_steps
        self._held: OrderedDict[int, tuple[dict[str, float], float]] = OrderedDict()
        self.dropped = 0
        # Keys released at step logged_through by a commit of this process: a step whose own
        # commit came before all its metrics (a blocking save inside end_step) takes the rest
        # at once. None until this process commits: a replayed step is never "late".
        self._edge_keys: set[str] | None = None

    @property
    def held(self) -> int:
        """Steps waiting for a commit."""
        return len(self._held)

    def record(self, step: int, metrics: Mapping[str, float], *,
               at: float = 0.0) -> list[tuple[int, dict[str, float], float]]:
        """Hold `metrics` of `step` (recorded at unix time `at`); a step recorded again gets
        the new keys merged in. Returns what to log now: metrics of the step this process
        just committed that its commit did not carry yet (else nothing)."""
        values = {k: float(v) for k, v in metrics.items()}
        if step <= self.logged_through:
            if step == self.logged_through and self._edge_keys is not None:
                late = {k: v for k, v in values.items() if k not in self._edge_keys}
                self._edge_keys |= set(late)
                return [(step, late, at)] if late else []
            return []  # already in the run: this is a replay of a committed step
        last = next(reversed(self._held)) if self._held else None
        if last is not None and step < last:
            raise ValueError(f"step {step} recorded after step {last}")
        held, first_at = self._held.get(step, ({}, at))
        held.update(values)
        self._held[step] = (held, first_at)
        while len(self._held) > self.max_steps:
            self._held.popitem(last=False)
            self.dropped += 1
        return []

    def commit(self, step: int) -> list[tuple[int, dict[str, float], float]]:
        """A commit covers every step up to `step`: those held, oldest first, as (step,
        metrics, recorded at). Later steps stay held."""
        released = []
        while self._held and next(iter(self._held)) <= step:
            s, (values, at) = self._held.popitem(last=False)
            released.append((s, values, at))
        if step > self.logged_through or self._edge_keys is None:
            self._edge_keys = set()
        self.logged_through = max(self.logged_through, step)
        for s, values, _ in released:
            if s == self.logged_through:
                self._edge_keys |= set(values)
        return released

    def requeue(self, released: list[tuple[int, dict[str, float], float]]) -> None:
        """Hold again what `commit` released and could not be logged (the tracking server
        failed): the next commit releases it first, so a failed write leaves no hole."""
        if not released:
            return
        held = OrderedDict((s, (dict(values), at)) for s, values, at in released)
        for s, (values, at) in self._held.items():
            if s in held:  # a late key recorded meanwhile
                held[s][0].update(values)
            else:
                held[s] = (values, at)
        self._held = held
        while len(self._held) > self.max_steps:
            self._held.popitem(last=False)
            self.dropped += 1

    def skip_to(self, step: int) -> tuple[int, int] | None:
        """A generation starts from the committed `step`. Steps after `logged_through` up to
        it were committed by a process that stopped before logging them (killed between its
        commit and its write, or its writes failed): no generation runs them again. Returns
        (first, last) of those steps, now given up, or None."""
        if step <= self.logged_through:
            return None
        missing = (self.logged_through + 1, step)
        self.logged_through = step
        return missing


class MLflowTracker:
    """The job's MLflow run, written by rank 0 only (see the module docstring).

    Build it after the runtime and before the first step. ImportError (with the install hint)
    without the mlflow extra; the tracking server's errors at start propagate.
    """

    def __init__(self, runtime: Any, *, tracking_uri: str, experiment: str = "spotwise",
                 facts_file: str | None = None, params: Mapping[str, Any] | None = None,
                 retry_backoff_s: float = 0.5) -> None:
        self.runtime = runtime
        self.active = runtime.rank == 0
        self.run_id = ""
        self.retry_backoff_s = retry_backoff_s
        self.gate = CommitGate()
        self._facts = JobFactsTail(facts_file)
        self._facts_through = 0.0
        if not self.active:
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ImportError("MLflow tracking needs the mlflow extra: "
                              "pip install 'spotwise[mlflow]'") from exc
        self._client = MlflowClient(tracking_uri=tracking_uri)
        run = self._job_run(experiment, runtime.run_id)
        self.run_id = run.info.run_id
        self.gate.logged_through = int(run.data.metrics.get(COMMITTED_METRIC, 0))
        self._facts_through = float(run.data.tags.get(FACTS_TAG, 0.0))
        if params and not run.data.params:
            self._client.log_batch(self.run_id, params=_params(params))
        tags = {"spotwise.generation": str(runtime.generation),
                "spotwise.world_size": str(runtime.world_size)}
        missing = self.gate.skip_to(runtime.global_step)
        if missing is not None:
            # Said in the run, not only in a log: a person reading the curves sees the hole.
            log.warning("job %s: steps %d-%d were committed but their metrics never reached "
                        "MLflow run %s; they are not run again", runtime.run_id, *missing,
                        self.run_id)
            before = run.data.tags.get(UNLOGGED_TAG, "")
            tags[UNLOGGED_TAG] = (f"{before}, " if before else "") + f"{missing[0]}-{missing[1]}"
        # What this generation is, at the step it starts from (never before a logged step,
        # so every series stays in step order).
        at = max(runtime.global_step, self.gate.logged_through)
        self._write([], step=at, extra={"spotwise/generation": runtime.generation,
                                        "spotwise/world_size": runtime.world_size}, tags=tags)
        runtime.add_step_listener(self._on_step)
        if runtime.checkpointer is not None:
            runtime.add_commit_listener(self._on_commit)
        else:
            log.warning("job %s has no checkpoints: metrics are logged as they come, and a "
                        "restarted generation's steps are skipped up to step %d",
                        runtime.run_id, self.gate.logged_through)
        log.info("job %s: MLflow run %s, logged through step %d", runtime.run_id, self.run_id,
                 self.gate.logged_through)

    @classmethod
    def from_env(cls, runtime: Any, *, tracking_uri: str, **kw: Any) -> MLflowTracker:
        """As the constructor, with the agent's facts file from SPOTWISE_JOB_FACTS_FILE."""
        return cls(runtime, tracking_uri=tracking_uri,
                   facts_file=os.environ.get(FACTS_ENV_VAR) or None, **kw)

    def _job_run(self, experiment: str, job_id: str) -> Any:
        found = self._client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = self._client.create_experiment(experiment)
            except Exception:  # noqa: BLE001 - another job created it first; read it back
                found = self._client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        else:
            experiment_id = found.experiment_id
        runs = self._client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{_quoted(job_id)}'",
            order_by=["attributes.start_time ASC"], max_results=1)
        if runs:
            return runs[0]
        return self._client.create_run(experiment_id, run_name=job_id, tags={JOB_TAG: job_id})

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Metrics of `step` (default: the runtime's global step), logged once a commit covers
        it. Call after the step's end_step/train_step."""
        if not self.active:
            return
        step = self.runtime.global_step if step is None else step
        late = self.gate.record(step, metrics, at=time.time())
        if late:
            self.gate.requeue(self._write(late, step=step, extra={}, tags={})[1])
        if self.runtime.checkpointer is None:
            self._on_commit(step)

    def _on_step(self, step: int, loss: float) -> None:
        # The runtime's own loss (the global batch's mean) reaches the gate inside end_step,
        # before a save of this very step can commit it.
        if math.isfinite(loss):
            self.gate.record(step, {"loss": loss}, at=time.time())

    def _on_commit(self, step: int) -> None:
        released = self.gate.commit(step)
        facts = [f for f in self._facts.read() if f.time > self._facts_through]
        extra: dict[str, float] = {COMMITTED_METRIC: float(step)}
        tags: dict[str, str] = {}
        if facts:
            extra.update(_fact_metrics(facts[-1]))
            tags.update(_fact_tags(facts[-1]))
        if self.gate.dropped:
            log.warning("job %s: %d steps' metrics dropped without a commit", self.runtime.run_id,
                        self.gate.dropped)
            self.gate.dropped = 0
        ok, unsent = self._write(released, step=step, extra=extra, tags=tags)
        self.gate.requeue(unsent)  # sent with the next commit's
        if ok and facts:
            self._facts_through = facts[-1].time

    def _write(self, released: list[tuple[int, dict[str, float], float]], *, step: int,
               extra: Mapping[str, float], tags: Mapping[str, str]
               ) -> tuple[bool, list[tuple[int, dict[str, float], float]]]:
        """Log `released` (whole steps per call, oldest first), then `extra` and `tags` with
        the last call, so the committed step and the facts land only after every step before
        them. Returns (all logged, the steps not logged when the server failed)."""
        from mlflow.entities import Metric, RunTag

        now_ms = int(time.time() * 1000)
        calls = [([Metric(k, v, int(at * 1000), s) for s, k, v, at in points], upto)
                 for points, upto in log_calls(released, reserve=len(extra) + len(tags))]
        calls[-1][0].extend(Metric(k, float(v), now_ms, step) for k, v in extra.items())
        done = 0
        for i, (batch, upto) in enumerate(calls):
            run_tags = [RunTag(k, v) for k, v in tags.items()] if i == len(calls) - 1 else []
            for attempt in range(1, LOG_ATTEMPTS + 1):
                try:
                    self._client.log_batch(self.run_id, metrics=batch, tags=run_tags)
                    break
                except Exception as exc:  # noqa: BLE001 - the tracker must not stop training
                    if attempt == LOG_ATTEMPTS:
                        log.warning("job %s: MLflow log of steps up to %d failed %d times, "
                                    "kept for the next commit: %s", self.runtime.run_id, step,
                                    attempt, exc)
                        # A step split over calls (over BATCH_LIMIT metrics) goes again whole.
                        return False, released[done:]
                    time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            done = upto
        return True, []

    def finish(self) -> None:
        """Mark the run FINISHED: call once the job's last step is committed (after
        Runtime.finish); a generation that is only stopped leaves the run RUNNING."""
        if self.active:
            self._client.set_terminated(self.run_id, "FINISHED")


def log_calls(released: list[tuple[int, dict[str, float], float]], *, reserve: int = 0,
              limit: int = BATCH_LIMIT) -> list[tuple[list[tuple[int, str, float, float]], int]]:
    """Split released steps' metrics into log_batch calls of at most `limit` entries (whole
    steps per call, unless one step alone has more), the last with room for `reserve` more
    (the committed step, facts and tags). Each call: its (step, key, value, at) points and how
    many entries of `released` are complete once it is logged. At least one call."""
    calls: list[tuple[list[tuple[int, str, float, float]], int]] = []
    points: list[tuple[int, str, float, float]] = []
    for n, (s, values, at) in enumerate(released, start=1):
        if points and len(points) + len(values) > limit:
            calls.append((points, n - 1))
            points = []
        for k, v in values.items():
            if len(points) == limit:
                calls.append((points, n - 1))
                points = []
            points.append((s, k, v, at))
    if points and len(points) + reserve > limit:
        calls.append((points, len(released)))
        points = []
    calls.append((points, len(released)))
    return calls


def _fact_metrics(fact: JobFact) -> dict[str, float]:
    return {"spotwise/generation": float(fact.generation),
            "spotwise/world_size": float(fact.world_size),
            "spotwise/lost_steps": float(fact.lost_steps),
            "spotwise/cost_usd": fact.cost_usd}


def _fact_tags(fact: JobFact) -> dict[str, str]:
    return {"spotwise.generation": str(fact.generation),
            "spotwise.world_size": str(fact.world_size),
            "spotwise.lost_steps": str(fact.lost_steps),
            "spotwise.cost_usd": f"{fact.cost_usd:.4f}",
            "spotwise.last_event": f"{fact.kind}: {fact.message}"[:5000],
            FACTS_TAG: repr(fact.time)}


def _params(params: Mapping[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:6000]) for k, v in params.items()]


def _quoted(value: str) -> str:
    """`value` inside a single-quoted MLflow filter string."""
    if "'" in value or "\\" in value:
        raise ValueError(f"job id {value!r} cannot be used in an MLflow filter")
    return value
