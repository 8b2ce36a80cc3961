"""The hold after a requested checkpoint, on a one-rank gloo group: what ends it and how."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from spotwise.worker.runtime.config import RuntimeConfig
from spotwise.worker.runtime.hold import Flags, hold


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _later(seconds: float, fn) -> threading.Timer:
    t = threading.Timer(seconds, fn)
    t.start()
    return t


@pytest.mark.parametrize(("signalled", "stops"), [("stop", True), ("resume", False)])
def test_a_signal_during_the_hold_ends_it(group: None, signalled: str, stops: bool) -> None:
    """SIGTERM's flag stops; SIGUSR2's resumes, and is used up (the next hold waits again)."""
    flags = Flags()
    _later(0.3, lambda: setattr(flags, signalled, True))
    t0 = time.monotonic()
    assert hold(flags, rank=0, committed=True, timeout_s=30) is stops
    assert 0.25 <= time.monotonic() - t0 < 5
    assert flags.resume is False


def test_the_hold_gives_up_after_its_timeout(group: None) -> None:
    t0 = time.monotonic()
    assert hold(Flags(), rank=0, committed=True, timeout_s=0.5) is False
    assert 0.5 <= time.monotonic() - t0 < 5


def test_no_hold_when_the_checkpoint_did_not_commit(group: None) -> None:
    t0 = time.monotonic()
    assert hold(Flags(), rank=0, committed=False, timeout_s=30) is False
    assert time.monotonic() - t0 < 1


def test_the_hold_is_read_from_the_environment_and_checked() -> None:
    assert RuntimeConfig.from_env({}).request_hold_s == 0  # standalone torchrun: no hold
    assert RuntimeConfig.from_env({"SPOTWISE_REQUEST_HOLD_S": "12.5"}).request_hold_s == 12.5
    for bad in ("soon", "-1", "nan"):
        with pytest.raises(ValueError, match="SPOTWISE_REQUEST_HOLD_S"):
            RuntimeConfig.from_env({"SPOTWISE_REQUEST_HOLD_S": bad})
