"""The chaos schedule is a pure function of its seed, covers every kind, and weights daemon
kills and partitions as the soak requires."""

from collections import Counter

import pytest

from spotwise.cloud.chaos import KINDS, MIN_COUNTS, PARTITIONS, schedule

WORKERS = ["w1", "w2", "w3", "w4"]


def test_same_seed_same_schedule_other_seed_other() -> None:
    assert schedule(7, 60, WORKERS) == schedule(7, 60, WORKERS)
    assert schedule(7, 60, WORKERS) != schedule(8, 60, WORKERS)


@pytest.mark.parametrize("seed", range(5))
def test_every_kind_and_the_minimum_counts(seed: int) -> None:
    short = schedule(seed, len(KINDS), WORKERS)
    assert {f.kind for f in short} == set(KINDS)
    long = schedule(seed, 60, WORKERS)
    counts = Counter(f.kind for f in long)
    assert len(long) == 60 and set(counts) == set(KINDS)
    assert counts["kill_daemon"] >= MIN_COUNTS["kill_daemon"]
    assert sum(counts[k] for k in PARTITIONS) >= MIN_COUNTS["partition"]
    for f in long:
        hosts = f.host.split("+")
        assert all(h in WORKERS for h in hosts) and len(set(hosts)) == len(hosts)
        assert (len(hosts) == 2) == (f.kind == "cut_workers")
        assert 2.0 <= f.hold_s <= 6.0 and 2.0 <= f.gap_s <= 6.0


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="one of each kind"):
        schedule(0, 3, WORKERS)
    with pytest.raises(ValueError, match="two worker hosts"):
        schedule(0, 20, ["w1"])
