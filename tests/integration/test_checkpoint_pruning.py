"""Pruning after a commit runs off the training thread: poll() commits and returns while the
old checkpoint's deletion is still held up in storage; wait() (and so the next save, a blocking
save, close) returns only once the pruning is done."""

from __future__ import annotations

import threading
from typing import Any

import torch

from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer
from spotwise.worker.runtime.fencing import list_manifests
from tests.support.wait import until


class GatedRemovals:
    """An fsspec filesystem whose rm() blocks until `gate` is set (other calls pass)."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if name != "rm":
            return attr

        def rm(*args: Any, **kwargs: Any) -> Any:
            self.waiting.set()
            assert self.gate.wait(30), "the gate never opened"
            return attr(*args, **kwargs)

        return rm


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((256,), float(step))}}


def _steps(ck: Checkpointer) -> list[int]:
    return [step for _path, step, _gen in list_manifests(ck.fs, ck.loc)]


def test_a_commit_by_poll_does_not_wait_for_the_pruning_and_wait_does(tmp_path):
    ck = Checkpointer(CheckpointConfig(uri=str(tmp_path / "ck"), async_mode="thread", keep=1),
                      rank=0, world_size=1, generation=0, device=torch.device("cpu"))
    assert ck.save(1, _state(1), cursor=10, blocking=True)
    gated = GatedRemovals(ck.fs)
    ck.fs = gated
    try:
        assert ck.save(2, _state(2), cursor=20, blocking=False)
        committed = until(ck.poll, 30, "the upload of step 2 to be committed by poll()")
        assert committed.step == 2
        # poll() has returned although the pruning of step 1 is blocked in storage.
        until(gated.waiting.is_set, 30, "the pruning to reach its first removal")
        assert _steps(ck) == [1, 2]
        assert ck.last_committed.step == 2
    finally:
        gated.gate.set()
    assert ck.wait() is None  # nothing pending; the pruning is waited for
    assert _steps(ck) == [2]
    assert [m.step for m in ck.committed()] == [2]
    ck.close()


def test_a_blocking_save_returns_with_its_pruning_done(tmp_path):
    ck = Checkpointer(CheckpointConfig(uri=str(tmp_path / "ck"), async_mode="sync", keep=1),
                      rank=0, world_size=1, generation=0, device=torch.device("cpu"))
    for step in (1, 2, 3):
        assert ck.save(step, _state(step), cursor=10 * step, blocking=True)
        assert _steps(ck) == [step]
    ck.close()
