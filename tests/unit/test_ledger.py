import pytest

from spotwise.worker.runtime.ledger import Ledger, LedgerError, verify_ledger
from spotwise.worker.runtime.sampler import GlobalSampler

N, B = 10, 4


def _run(ledger, sampler, gen, start, end, world, commits=()):
    ledger.restored(generation=gen, step=start)
    for step in range(start + 1, end + 1):
        for rank in range(world):
            ids = sampler.rank_window(cursor=(step - 1) * B, global_batch_size=B, rank=rank, world_size=world)
            ledger.step(generation=gen, step=step, rank=rank, ids=ids)
        if step in commits:
            ledger.committed(generation=gen, step=step)


def test_replayed_steps_are_not_counted_twice(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led, s = Ledger(str(path)), GlobalSampler(dataset_size=N, seed=0)
    _run(led, s, 0, 0, 5, world=4, commits=(3,))     # steps 4, 5 lost
    _run(led, s, 1, 3, 7, world=2, commits=(6,))     # step 7 lost
    _run(led, s, 2, 6, 10, world=1, commits=(9, 10))
    led.close()
    report = verify_ledger(str(path), dataset_size=N, global_batch_size=B)
    assert report.final_step == 10
    assert report.generations == [0, 1, 2]
    assert report.samples == 40
    assert report.replayed_steps == 3


def test_a_sample_read_twice_in_an_epoch_is_caught(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(str(path))
    led.restored(generation=0, step=0)
    led.step(generation=0, step=1, rank=0, ids=[0, 1, 2, 3])
    led.step(generation=0, step=2, rank=0, ids=[4, 5, 2, 7])
    led.committed(generation=0, step=2)
    led.close()
    with pytest.raises(LedgerError, match=r"read more than once: \[2\]"):
        verify_ledger(str(path), dataset_size=N, global_batch_size=B)


def test_a_missing_rank_is_caught(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led = Ledger(str(path))
    led.restored(generation=0, step=0)
    led.step(generation=0, step=1, rank=0, ids=[0, 1])
    led.committed(generation=0, step=1)
    led.close()
    with pytest.raises(LedgerError, match="read 2 samples, not 4"):
        verify_ledger(str(path), dataset_size=N, global_batch_size=B)


def test_a_step_committed_by_two_generations_follows_the_newer(tmp_path):
    path = tmp_path / "ledger.jsonl"
    led, s = Ledger(str(path)), GlobalSampler(dataset_size=N, seed=0)
    _run(led, s, 0, 0, 6, world=2, commits=(3, 6))
    _run(led, s, 1, 3, 8, world=1, commits=(6, 8))   # restored 3 (say 6 looked torn), re-committed 6
    _run(led, s, 2, 6, 10, world=2, commits=(10,))
    led.close()
    report = verify_ledger(str(path), dataset_size=N, global_batch_size=B)
    assert report.generations == [0, 1, 2] and report.final_step == 10
