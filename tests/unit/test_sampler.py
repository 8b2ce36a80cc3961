import numpy as np
import pytest

from spotwise.worker.runtime.sampler import GlobalSampler


def test_every_index_once_per_epoch_including_windows_across_epochs():
    s = GlobalSampler(dataset_size=10, seed=3)
    seq = s.indices(0, 30)
    for e in range(3):
        assert sorted(seq[e * 10 : (e + 1) * 10]) == list(range(10))
    # A window straddling the epoch boundary is the tail of one epoch and the head of the next.
    assert list(s.indices(7, 6)) == list(seq[7:13])
    # Epochs are shuffled differently.
    assert list(seq[:10]) != list(seq[10:20])


def test_rank_windows_partition_the_global_window_at_any_world_size():
    s = GlobalSampler(dataset_size=50, seed=0)
    whole = s.indices(40, 12)
    for world in (1, 2, 3, 4, 6):
        parts = [s.rank_window(cursor=40, global_batch_size=12, rank=r, world_size=world) for r in range(world)]
        assert list(np.concatenate(parts)) == list(whole)


def test_same_seed_same_order_other_seed_other_order():
    a = GlobalSampler(dataset_size=100, seed=1).indices(0, 100)
    b = GlobalSampler(dataset_size=100, seed=1).indices(0, 100)
    c = GlobalSampler(dataset_size=100, seed=2).indices(0, 100)
    assert list(a) == list(b)
    assert list(a) != list(c)


def test_bad_sizes():
    with pytest.raises(ValueError):
        GlobalSampler(dataset_size=0, seed=0)
    with pytest.raises(ValueError):
        GlobalSampler(dataset_size=5, seed=0).indices(-1, 2)
