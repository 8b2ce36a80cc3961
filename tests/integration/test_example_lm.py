"""The example language model runs as it is under torchrun, and resumes at another world size."""

from tests.support.launch import ROOT, checked, torchrun

LM = ROOT / "examples" / "train_lm.py"
SMALL = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "32",
         "--corpus-bytes", "200000", "--global-batch-size", "8", "--micro-batch-size", "2", "--log-every", "1"]


def test_trains_checkpoints_and_resumes_at_another_world_size(tmp_path):
    env = {"SPOTWISE_CHECKPOINT_URI": str(tmp_path / "ckpt"), "SPOTWISE_CHECKPOINT_EVERY": "2"}
    out = checked(torchrun(LM, 2, "--steps", "4", *SMALL, env=env))
    assert "fresh start" in out and "step 4 loss" in out
    out = checked(torchrun(LM, 1, "--steps", "6", *SMALL, env=env))
    assert "resumed at step 4" in out and "step 6 loss" in out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]
    assert all(0 < x < 6.0 for x in losses)  # a byte-level model starts near ln(256) = 5.5
