"""What people see of a real run: the report and the dashboard's queries, after a real daemon
(`spotwise daemon`, metrics exported), real agents (the local provider's subprocesses, metrics
exported) and the tiny workload on the real runtime went through a rescale.

The story, run once for the module: two nodes train; one is SIGKILLed (a loss without notice:
generation 2 at world size 1, replaying from the last commit); a node joins (capacity back:
generation 3 at world size 2); the job succeeds. The report is written once while the job still
runs and once after it ended; the daemon's and the agents' metrics are scraped over HTTP; the
workload logs to a local MLflow store (SQLite), with the job's figures from the real agents.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from spotwise.client import Client, state_name
from spotwise.cloud.local import LocalProvider, scan_marked, stop_process_group
from spotwise.cloud.provider import NodeRequest
from spotwise.report import CAUSE_CAPACITY, CAUSE_LOSS, CAUSE_START, ReportPaths, write_report
from spotwise.spec import JobSpec
from tests.support.wait import until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 60
PRICE_PER_HOUR = 3.06


@dataclass
class Observed:
    """What the module's run left to look at."""

    job_id: str
    address: str
    """The daemon's address (it serves until the module's tests are done)."""
    running_report: ReportPaths
    final_report: ReportPaths
    final_job: object
    mlflow_uri: str
    """The workload's MLflow tracking store."""
    loss_log: Path
    """Rank 0's "step loss generation" lines, every generation's."""
    mlflow_running: tuple[str, int, list[int]]
    """The run while generation 3 trained: its status, committed step and logged loss steps."""
    scrapes: dict[str, str] = field(default_factory=dict)
    """{"daemon" or an agent's handle: the text of one /metrics scrape after the rescale}."""
    dashboard: dict[str, list] | None = None
    """{panel title/refId: the series a real Prometheus answered for its query, while the job
    ran after the rescale}; None where this machine has no Prometheus."""


def _metrics_url(log: Path, what: str) -> str:
    def found() -> str | None:
        m = re.search(r"metrics exporter on (\S+):(\d+)", log.read_text() if log.exists() else "")
        return f"http://{m.group(1)}:{m.group(2)}/metrics" if m else None

    return until(found, 60, f"{what}'s metrics exporter")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def _dashboard_in_prometheus(urls: dict[str, str], workdir: Path) -> dict[str, list] | None:
    """Every dashboard query answered by a real Prometheus scraping the daemon and the agents
    (the shipped scrape config), once it has scraped each a few times; None without one."""
    import json

    from tests.support import prometheus
    from tests.support.promql import dashboard_targets, substitute

    if not prometheus.available():
        return None
    def target(url: str) -> str:
        return urllib.parse.urlsplit(url).netloc

    agents = [target(u) for name, u in urls.items() if name != "daemon"]
    with prometheus.scraping(target(urls["daemon"]), agents, workdir) as prom:
        until(lambda: prom.scraped(len(urls), samples=4), 60, "Prometheus scraping every target")
        answers = {}
        for title, ref, expr in dashboard_targets(json.loads(DASHBOARD.read_text())):
            answers[f"{title}/{ref}"] = prom.query(substitute(expr))
        return answers


def _spec(tmp: Path, mlflow_uri: str) -> Path:
    spec = {
        "name": "observe",
        "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", str(STEPS),
                       "--global-batch-size", "24", "--micro-batch-size", "2",
                       "--dataset-size", "100", "--step-sleep", "0.15",
                       "--mlflow-uri", mlflow_uri, "--loss-log", str(tmp / "loss.txt")],
        "working_dir": str(REPO),
        "nodes": {"min": 1, "max": 2},
        "nproc_per_node": 1,
        "checkpoint": {"uri": str(tmp / "ck"), "every_steps": 5, "keep": 5},
        "global_batch_size": 24,
        "budget_usd": 50.0,
        "max_failures": 5,
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _mlflow_now(uri: str) -> tuple[str, int, list[int]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spotwise").experiment_id])
    # The committed step first: what the history holds is then at least up to it.
    committed = int(run.data.metrics.get("spotwise/committed_step", 0))
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    return run.info.status, committed, steps


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observe")
    state_dir, log_dir = tmp / "state", tmp / "logs"
    env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir),
               SPOTWISE_DAEMON_METRICS_LISTEN="127.0.0.1:0",
               # The test launches the agents with their price: an operator's own fleet.
               SPOTWISE_DAEMON_AGENT_PRICES="true",
               SPOTWISE_AGENT_METRICS_LISTEN="127.0.0.1:0")
    daemon_log = tmp / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
         "--state-dir", str(state_dir), "--provider", "none", "--log-dir", str(log_dir)],
        stdout=subprocess.DEVNULL, stderr=open(daemon_log, "wb"), env=env,
        start_new_session=True, cwd=REPO)
    provider = LocalProvider(log_dir=log_dir, cluster=f"observe-{uuid.uuid4().hex[:8]}",
                             grace_s=5.0, env=env, cwd=str(REPO),
                             price_per_hour=PRICE_PER_HOUR)
    client: Client | None = None
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    try:
        # The store's first migration (seconds), here while the daemon starts, not in rank 0.
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=mlflow_uri).search_experiments()
        address = until(lambda: (m := re.search(r"daemon serving on (\S+)",
                                                daemon_log.read_text())) and m.group(1),
                        60, "the daemon to serve")
        client = Client(address, timeout=10)
        request = NodeRequest(job_id="", daemon_address=address, slots=1)
        provider.launch(request, 2)
        job_id = client.submit(JobSpec.from_yaml(_spec(tmp, mlflow_uri)))

        until(lambda: (j := client.get(job_id)).world_size == 2 and
              j.last_checkpoint_step >= 5 and j.step > j.last_checkpoint_step + 1, 180,
              "world 2 with a commit and steps after it")
        victim = list(client.get(job_id).provider_nodes)[-1]
        provider.kill(victim)
        until(lambda: (j := client.get(job_id)).generation >= 2 and j.world_size == 1 and
              j.step > j.last_checkpoint_step, 90, "world 1 after the loss")
        provider.launch(request, 1)
        until(lambda: (j := client.get(job_id)).generation >= 3 and j.world_size == 2 and
              state_name(j.state) == "RUNNING", 90, "world 2 again")
        running = write_report(client, job_id, tmp / "running")
        mlflow_running = _mlflow_now(mlflow_uri)

        urls = {"daemon": _metrics_url(daemon_log, "the daemon")}
        for node in provider.list_nodes():
            agent_log = log_dir / "agents" / f"{node.handle}.log"
            urls[node.handle] = _metrics_url(agent_log, f"agent {node.handle}")
        scrapes = {name: _scrape(url) for name, url in urls.items()}
        answers = _dashboard_in_prometheus(urls, tmp / "prometheus")

        final = until(lambda: (j := client.get(job_id)) and
                      state_name(j.state) in ("SUCCEEDED", "FAILED", "CANCELLED") and j, 240,
                      "the job to end")
        ended = write_report(client, job_id, tmp / "ended")
        yield Observed(job_id=job_id, address=address, running_report=running, final_report=ended,
                       final_job=final, mlflow_uri=mlflow_uri, loss_log=tmp / "loss.txt",
                       mlflow_running=mlflow_running, scrapes=scrapes, dashboard=answers)
    finally:
        if client is not None:
            client.close()
        provider.shutdown()
        stop_process_group(daemon)
        assert scan_marked(provider.cluster + "/") == {}


def test_report_of_a_run_through_a_rescale(observed: Observed) -> None:
    assert state_name(observed.final_job.state) == "SUCCEEDED", observed.final_job
    running, ended = observed.running_report.data, observed.final_report.data
    assert not running.ended and "still running" in running.title
    assert ended.ended and "SUCCEEDED, ended" in ended.title

    # Files: a PNG, and an HTML page embedding that same PNG.
    import base64

    png = observed.final_report.png.read_bytes()
    assert png.startswith(b"\x89PNG") and observed.final_report.png.name == (
        f"{observed.job_id}-report.png")
    assert base64.b64encode(png).decode() in observed.final_report.html.read_text()

    # World size panel: the three generations of the story, with their causes.
    causes = [(g.generation, g.world_size, g.cause) for g in ended.generations]
    assert causes[:3] == [(1, 2, CAUSE_START), (2, 1, CAUSE_LOSS), (3, 2, CAUSE_CAPACITY)], causes
    assert {w for _, w in ended.world} >= {1, 2}
    times = [t for t, _ in ended.world]
    assert times == sorted(times)
    # Steps panel: progress up to the end, throughput measured, the loss went down.
    steps = [s for s, _, _ in ended.progress]
    assert steps and max(steps) == STEPS and all(r > 0 for _, r, _ in ended.progress)
    assert ended.progress[-1][2] < ended.progress[0][2]
    # Checkpoints: every 5 steps, the one the daemon asked for before growing, the final one;
    # none failed.
    commits = sorted({c.step for c in ended.checkpoints if c.ok})
    assert commits[-1] == STEPS and len([s for s in commits if s % 5 == 0]) >= 3, commits
    assert not [c for c in ended.checkpoints if not c.ok]
    # Age of the last commit: from the first commit on, never negative, back to ~0 at each
    # commit (a commit every 5 steps of 0.15 s; the loss and the rescale let it grow more).
    ages = [a for _, a in ended.commit_age]
    assert ages and min(ages) >= 0 and sum(1 for a in ages if a < 1.0) >= 3, ages
    # Cost: it grew, with the budget from the spec.
    assert ended.budget_usd == 50.0
    spent = [c for _, c, _ in ended.cost]
    assert spent == sorted(spent) and spent[-1] > 0
    # Lost steps: the loss without notice replayed what followed the last commit; the job's
    # total is the generations' sum, as the daemon counted it.
    lost = ended.lost_steps_by_generation()
    assert lost[2] > 0 and lost[1] == 0
    assert sum(lost.values()) == observed.final_job.lost_steps == ended.lost_steps
    # The running report was the picture so far: a prefix of the final one.
    assert len(running.generations) >= 3 and running.step <= ended.step


def test_report_command_prints_its_paths(observed: Observed, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spotwise.cli", "--address", observed.address, "report",
         observed.job_id, "--out", str(tmp_path / "cli")],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    title, png, html = out.stdout.strip().splitlines()
    assert "SUCCEEDED, ended" in title
    assert Path(png) == tmp_path / "cli" / f"{observed.job_id}-report.png"
    assert Path(png).read_bytes().startswith(b"\x89PNG") and Path(html).is_file()


def test_report_of_an_unknown_job_is_one_line(observed: Observed, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spotwise.cli", "--address", observed.address, "report",
         "job-nosuch", "--out", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1 and "job-nosuch" in out.stderr, out
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "none").exists()


DASHBOARD = REPO / "deploy" / "grafana" / "spotwise-dashboard.json"
def test_every_dashboard_query_returns_series_after_a_rescale(observed: Observed) -> None:
    """A real Prometheus, with the shipped scrape config, scraped the daemon and both agents
    while the job ran after its rescale: every panel's query answers at least one series."""
    from tests.support.promql import samples_of

    if observed.dashboard is None:
        if os.geteuid() == 0:
            pytest.fail("no prometheus binary: `make setup-os` installs it (CI runs as root)")
        pytest.skip("no prometheus binary; `make setup-os` (as root) installs it")
    empty = [panel for panel, series in observed.dashboard.items() if not series]
    assert observed.dashboard and not empty, f"no series for {empty}"
    jobs = {s["metric"].get("job") for series in observed.dashboard.values() for s in series}
    assert observed.job_id in jobs, sorted(j for j in jobs if j)  # this run's job, per job
    samples = samples_of(observed.scrapes.values())
    # The values are this run's: the job at world 2 after the rescale, an agent in generation
    # 3 or later, the lost node counted.
    def value(name: str, **labels: str) -> list[float]:
        return [s.value for s in samples if s.name == name
                and all(s.labels.get(k) == v for k, v in labels.items())]

    assert value("spotwise_job_world_size", job=observed.job_id) == [2.0]
    assert max(value("spotwise_agent_generation")) >= 3
    assert value("spotwise_preemptions_total", job=observed.job_id) == [1.0]
    assert value("spotwise_cost_usd_total", job=observed.job_id)[0] > 0


def test_one_mlflow_run_through_the_rescale_with_the_agents_figures(observed: Observed) -> None:
    """The tracker in the real agents' processes: one run, each step once with the value of the
    committed history (the replayed steps included), the job's figures from the agents' facts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=observed.mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spotwise").experiment_id])
    assert run.data.tags["spotwise.job_id"] == observed.job_id and run.info.status == "FINISHED"
    # While generation 3 trained (after the loss and its replay): the same run, RUNNING, with
    # the committed steps only, each once, from step 1.
    status, committed, steps = observed.mlflow_running
    assert status == "RUNNING" and committed >= 5, observed.mlflow_running
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= committed, steps
    final: dict[int, float] = {}
    ran: dict[int, int] = {}
    for line in observed.loss_log.read_text().splitlines():
        step, loss, _generation = line.split()
        final[int(step)] = float(loss)
        ran[int(step)] = ran.get(int(step), 0) + 1
    assert max(ran.values()) >= 2  # the loss without notice replayed steps
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))  # once each, in order
    assert [m.value for m in history] == pytest.approx([final[s] for s in range(1, STEPS + 1)],
                                                       rel=1e-12)

    def series(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    generations = [v for _, v in series("spotwise/generation")]
    assert generations == sorted(generations) and generations[-1] >= 3
    assert {1.0, 2.0} <= {v for _, v in series("spotwise/world_size")}
    # Lost steps and cost came from the agents (the assignments of generations 2 and 3).
    assert series("spotwise/lost_steps")[-1][1] > 0 and series("spotwise/cost_usd")[-1][1] > 0
    assert int(run.data.tags["spotwise.lost_steps"]) > 0
    assert run.data.tags["spotwise.last_event"].startswith("generation: ")
    for key in ("spotwise/generation", "spotwise/world_size", "spotwise/committed_step"):
        steps = [s for s, _ in series(key)]
        assert steps == sorted(steps), key
