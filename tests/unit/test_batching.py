import pytest

from spotwise.worker.runtime.batching import BatchPlan


def test_accumulation_absorbs_world_size_changes():
    for world, accum in [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1)]:
        plan = BatchPlan.make(global_batch_size=24, micro_batch_size=2, world_size=world)
        assert plan.accumulation_steps == accum
        assert plan.micro_batch_size * plan.accumulation_steps * plan.world_size == 24


def test_indivisible_world_names_the_sizes_that_work():
    with pytest.raises(ValueError) as err:
        BatchPlan.make(global_batch_size=32, micro_batch_size=4, world_size=3)
    msg = str(err.value)
    assert "cannot be split over 3 ranks" in msg
    assert "world sizes that work: 1, 2, 4, 8" in msg


def test_micro_batch_must_divide_global_batch():
    with pytest.raises(ValueError, match="not a multiple of micro-batch 5"):
        BatchPlan.make(global_batch_size=32, micro_batch_size=5, world_size=1)


@pytest.mark.parametrize("field", ["global_batch_size", "micro_batch_size", "world_size"])
def test_sizes_must_be_positive(field):
    sizes = {"global_batch_size": 8, "micro_batch_size": 2, "world_size": 2, field: 0}
    with pytest.raises(ValueError, match="must be positive"):
        BatchPlan.make(**sizes)
