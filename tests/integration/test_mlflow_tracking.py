"""One MLflow run across generations, against a real local tracking store (SQLite).

Generation 1 trains the tiny workload at world size 2 and SIGKILLs itself between checkpoints,
as a machine lost without notice; generation 2 restores the newest commit at world size 1,
replays the steps after it and finishes. The agent's part (the job's figures in the facts file)
is played by this test, through the same functions the agent is to call.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spotwise.proto.v1 import agent_pb2
from spotwise.worker.runtime.job_facts import ENV_VAR, append_fact, fact_from_assignment
from tests.support.launch import TINY, checked, torchrun

pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow  # two process groups and MLflow's first database migration

STEPS, EVERY, DIE_AT = 12, 3, 8
JOB = "job-mlflow1"


def _final_losses(path: Path) -> tuple[dict[int, float], dict[int, int]]:
    """Per step, the loss of the last generation that ran it, and how often it ran."""
    last: dict[int, float] = {}
    runs: dict[int, int] = {}
    for line in path.read_text().splitlines():
        step, loss, _gen = line.split()
        last[int(step)] = float(loss)
        runs[int(step)] = runs.get(int(step), 0) + 1
    return last, runs


def test_one_run_each_step_once_with_its_final_value_through_a_rescale(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    facts = tmp_path / "agent" / "facts.jsonl"
    env = {"SPOTWISE_CHECKPOINT_URI": str(tmp_path / "ckpt"),
           "SPOTWISE_CHECKPOINT_EVERY": str(EVERY), "SPOTWISE_JOB_ID": JOB, ENV_VAR: str(facts)}
    common = ["--steps", str(STEPS), "--global-batch-size", "24", "--dataset-size", "100",
              "--loss-log", str(tmp_path / "loss.txt"), "--mlflow-uri", uri]

    # As the agent does when it starts each generation: the assignment's figures, appended.
    append_fact(facts, fact_from_assignment(agent_pb2.Assignment(
        job_id=JOB, generation=1, world_size=2, restore_step=-1,
        reason="start on 2 node(s): n1, n2"), now=1.0))
    r = torchrun(TINY, 2, *common, "--die-at", str(DIE_AT), env=env)
    assert r.returncode != 0, r.stdout[-3000:]

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("spotwise")
    (run,) = client.search_runs([experiment.experiment_id])
    committed = int(run.data.metrics["spotwise/committed_step"])
    assert committed in (3, 6), committed  # the kill came after a commit, before step 9's
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert logged == list(range(1, committed + 1))  # nothing past the commit
    assert run.info.status == "RUNNING"

    # The agent learns of the loss from the daemon and writes it down for the next generation.
    append_fact(facts, fact_from_assignment(agent_pb2.Assignment(
        job_id=JOB, generation=2, world_size=1, restore_step=committed,
        lost_steps=DIE_AT - committed, cost_usd=0.25, reason="lost n2: 1 node(s)"), now=2.0))
    checked(torchrun(TINY, 1, *common, env=env))

    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["spotwise.job_id"] == JOB and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    final, ran = _final_losses(tmp_path / "loss.txt")
    assert [ran[s] for s in range(committed + 1, DIE_AT + 1)] == [2] * (DIE_AT - committed)
    assert [m.step for m in history] == list(range(1, STEPS + 1))  # once each, in order
    for m in history:
        assert m.value == pytest.approx(final[m.step], rel=1e-12), m.step
    lr_steps = [m.step for m in client.get_metric_history(run.info.run_id, "lr")]
    assert lr_steps == list(range(1, STEPS + 1))

    # The job's own figures reached the same run.
    def series(key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]

    assert [v for _, v in series("spotwise/world_size")][:1] == [2.0]
    assert 1.0 in [v for _, v in series("spotwise/world_size")]
    assert [v for _, v in series("spotwise/generation")][-1] == 2.0
    assert series("spotwise/lost_steps")[-1][1] == DIE_AT - committed
    assert run.data.tags["spotwise.lost_steps"] == str(DIE_AT - committed)
    assert run.data.tags["spotwise.cost_usd"] == "0.2500"
    assert run.data.tags["spotwise.last_event"] == "generation: lost n2: 1 node(s)"
    for key in ("spotwise/world_size", "spotwise/generation", "spotwise/committed_step"):
        points = [s for s, _ in series(key)]
        assert points == sorted(points), key  # no series goes back in steps
