"""The example language model runs as it is under torchrun, and resumes at another world size,
logging one MLflow run across both generations."""

import pytest

from tests.support.launch import ROOT, checked, torchrun

LM = ROOT / "examples" / "train_lm.py"
SMALL = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
         "--corpus-bytes", "200000", "--global-batch-size", "8", "--micro-batch-size", "2", "--log-every", "1"]


@pytest.mark.slow
def test_trains_checkpoints_and_resumes_at_another_world_size(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"SPOTWISE_CHECKPOINT_URI": str(tmp_path / "ckpt"), "SPOTWISE_CHECKPOINT_EVERY": "2",
           "SPOTWISE_JOB_ID": "job-lm"}
    out = checked(torchrun(LM, 2, "--steps", "4", *SMALL, "--mlflow-uri", uri, env=env))
    assert "fresh start" in out and "step 4 loss" in out
    out = checked(torchrun(LM, 1, "--steps", "6", *SMALL, "--mlflow-uri", uri, env=env))
    assert "resumed at step 4" in out and "step 6 loss" in out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]
    assert all(0 < x < 6.0 for x in losses)  # a byte-level model starts near ln(256) = 5.5
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("spotwise").experiment_id])
    assert run.data.tags["spotwise.job_id"] == "job-lm"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
    printed = {int(line.split()[1]): float(line.split()[3]) for line in out.splitlines()
               if line.startswith("step ")}
    for m in history[4:]:  # printed with 4 decimals by the second generation
        assert abs(m.value - printed[m.step]) < 1e-4
