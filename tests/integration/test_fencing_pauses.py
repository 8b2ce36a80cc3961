"""A committer stopped between any two of its storage calls while the next generation starts
and commits: nothing it writes afterwards becomes visible, and the next generation is never
refused. Deterministic: the committer's filesystem blocks at its k-th call, for every k."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer
from spotwise.worker.runtime.fencing import list_manifests, write_fence
from spotwise.worker.runtime.storage import filesystem, parse_uri
from tests.support.wait import until


class PausingFS:
    """An fsspec filesystem that blocks at its `pause_at`-th call until `resume` is set."""

    def __init__(self, fs: Any, pause_at: int) -> None:
        self._fs = fs
        self.pause_at = pause_at
        self.calls: list[str] = []
        self.paused = threading.Event()
        self.resume = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr) or name == "invalidate_cache":  # a cache drop is no storage call
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if len(self.calls) == self.pause_at:
                self.paused.set()
                assert self.resume.wait(60), "never resumed"
            return attr(*args, **kwargs)

        return call


def _ck(uri: str, generation: int, **kw: Any) -> Checkpointer:
    return Checkpointer(CheckpointConfig(uri=uri, async_mode="sync", keep=2, **kw), rank=0,
                        world_size=1, generation=generation, device=torch.device("cpu"))


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "trainer": {"step": step}}


def _committer_calls(root: Path) -> int:
    """How many storage calls generation 1's commit of step 10 makes when nothing pauses it."""
    uri = str(root / "count")
    old = _ck(uri, 1)
    assert old.save(5, _state(5), cursor=50, blocking=True)
    spy = PausingFS(old.fs, pause_at=10**9)
    old.fs = spy
    assert old.save(10, _state(10), cursor=100, blocking=True)
    return len(spy.calls)


def _race(root: Path, k: int, total: int) -> bool:
    """Generation 1 commits step 10 and stops at its k-th storage call; generation 2 starts,
    restores and commits; then generation 1 goes on. Checks the outcome; returns whether
    generation 1's step 10 is visible."""
    uri = str(root / f"k{k}")
    loc = parse_uri(uri)
    old = _ck(uri, 1)
    assert old.save(5, _state(5), cursor=50, blocking=True)
    fenced: list[int] = []
    old.on_fenced = lambda step, _reason: fenced.append(step)
    pausing = PausingFS(old.fs, pause_at=k)
    old.fs = pausing
    result: dict[str, bool] = {}
    committer = threading.Thread(
        target=lambda: result.setdefault("ok", old.save(10, _state(10), cursor=100, blocking=True)))
    committer.start()
    until(lambda: pausing.paused.is_set() or not committer.is_alive(), 60,
          f"the committer to reach storage call {k}")
    assert pausing.paused.is_set(), f"call {k} of {total} never came"
    call = pausing.calls[-1]

    # The next generation: its agent fences it, its rank 0 restores and commits.
    write_fence(filesystem(loc), loc, 2)
    new = _ck(uri, 2)
    restored = new.choose(None)
    assert restored is not None and restored.generation == 1
    step = 10 if restored.step < 10 else 15
    assert new.save(step, _state(step + 100), cursor=10 * step + 1, blocking=True), \
        f"k={k} ({call}): the new generation's commit was refused"

    pausing.resume.set()
    committer.join(60)
    assert not committer.is_alive()

    reader = _ck(uri, 2)
    shown = reader.committed()
    stale = [m.step for m in shown if m.generation == 1 and m.step > restored.step]
    assert not stale, f"k={k} ({call}): generation 1 made {stale} visible after generation 2 chose"
    newest = reader.choose(None)
    assert (newest.step, newest.generation) == (step, 2), f"k={k} ({call})"
    # What the paused committer reported matches what storage decided.
    old_visible = any((m.step, m.generation) == (10, 1) for m in shown)
    written = any(s == 10 and g == 1 for _p, s, g in list_manifests(reader.fs, loc))
    assert result["ok"] == old_visible, f"k={k} ({call}): reported {result['ok']}"
    if written and not old_visible:
        assert fenced == [10], f"k={k} ({call}): a fenced commit not reported as fenced"
    return old_visible


def test_a_paused_committer_never_makes_a_step_visible_after_the_next_generation(tmp_path):
    total = _committer_calls(tmp_path)
    assert total >= 4  # fence check, data listing, post-check, pruning at least
    outcomes = {_race(tmp_path, k, total) for k in range(1, total + 1)}
    # Both sides of the race were exercised: stopped before its manifest (never visible) and
    # after it (visible, and restored by the next generation).
    assert outcomes == {True, False}


@pytest.mark.parametrize("name,expect", [
    ("step-0000000120-g0000000003.json", (120, 3)),
    ("step-0000000120.json", (120, None)),
    ("step-0000000120-gx.json", None),
    ("step-0000000120-g0000000003.json.tmp-1-ab", None),
    ("g-0000000003", None),
])
def test_manifest_names(name, expect):
    from spotwise.worker.runtime.fencing import parse_manifest_name

    assert parse_manifest_name(name) == expect


def test_fence_rule_and_old_layout():
    from spotwise.worker.runtime.fencing import Fence, visible

    f4 = Fence(4, {"3": 100, "legacy": 7})
    assert f4.admits(100, 3) and not f4.admits(105, 3)
    assert not f4.admits(1, 2)  # generation 2 had nothing when 4 was fenced
    assert f4.admits(500, 4) and f4.admits(500, 5)  # a fence constrains older ones only
    assert f4.admits(7, None) and not f4.admits(8, None)
    assert Fence(4, None).admits(10**6, 0)  # an old, empty marker constrains nothing
    assert not visible(100, 3, [f4, Fence(5, {"3": 90, "4": 0})])  # every newer fence counts


def test_an_unreadable_fence_hides_what_it_decides(tmp_path):
    from spotwise.worker.runtime.fencing import FenceError

    uri = str(tmp_path)
    old = _ck(uri, 1)
    assert old.save(5, _state(5), cursor=50, blocking=True)
    (tmp_path / "generations" / "g-0000000002").write_text("{broken")
    with pytest.raises(FenceError, match="g-0000000002 is unreadable"):
        old.committed()


def test_a_failed_save_is_reported_and_the_next_one_commits(tmp_path):
    failed: list[tuple[int, str]] = []
    ck = _ck(str(tmp_path), 0)
    ck.on_failed = lambda step, reason: failed.append((step, reason))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "step-0000000001-g0").write_text("a file where a directory must go")
    assert not ck.save(1, _state(1), cursor=1, blocking=True)
    assert [s for s, _ in failed] == [1] and failed[0][1].startswith("upload failed: ")
    assert ck.save(2, _state(2), cursor=2, blocking=True)
    assert [m.step for m in ck.committed()] == [2] and len(failed) == 1
