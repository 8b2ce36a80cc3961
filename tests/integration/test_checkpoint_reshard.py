"""Save at one world size, restore at others: model and optimizer state equal bit for bit."""

import pytest
import torch

from tests.support.launch import TINY, checked, torchrun
from tests.test_checkpoint_common import assert_equal_state


@pytest.fixture(scope="module")
def saved_at_4(tmp_path_factory):
    d = tmp_path_factory.mktemp("reshard4")
    env = {"SPOTWISE_CHECKPOINT_URI": str(d / "ckpt")}
    checked(torchrun(TINY, 4, "--steps", "3", "--save-full-end", str(d / "full.pt"), env=env))
    return d, env


@pytest.mark.parametrize("world", [3, 2, 1])
@pytest.mark.slow
def test_saved_at_4_restores_bit_exact_at(world, saved_at_4):
    d, env = saved_at_4
    out = d / f"restored{world}.pt"
    # --steps 3: restore step 3 and train no further.
    checked(torchrun(TINY, world, "--steps", "3", "--save-full", str(out), env=env))
    assert_equal_state(torch.load(d / "full.pt"), torch.load(out))


@pytest.mark.slow
def test_saved_at_1_restores_bit_exact_at_4(tmp_path):
    env = {"SPOTWISE_CHECKPOINT_URI": str(tmp_path / "ckpt")}
    checked(torchrun(TINY, 1, "--steps", "2", "--save-full-end", str(tmp_path / "full.pt"), env=env))
    checked(torchrun(TINY, 4, "--steps", "2", "--save-full", str(tmp_path / "r.pt"), env=env))
    assert_equal_state(torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "r.pt"))
