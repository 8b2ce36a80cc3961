"""Emergency checkpoints: on request (SIGUSR1) training goes on; on SIGTERM the job saves, exits 143.

The signal reaches one rank only, as when one node gets a spot notice; the ranks agree on the
step through the per-step control all-reduce, so they checkpoint together.
"""

import json
import signal
import time

import pytest

from spotwise.worker.runtime.events import EventsTail
from tests.support.launch import TINY, kill_all, spawn_ranks
from tests.support.wait import until as _wait_for


class _Events:
    """Every event written so far, read as the agent reads them."""

    def __init__(self, path):
        self.tail, self.seen = EventsTail(path), []

    def __call__(self):
        self.seen += self.tail.read()
        return self.seen


def _committed(events):
    return [e["step"] for e in events() if e["event"] == "checkpoint_committed"]


@pytest.mark.slow
def test_sigusr1_checkpoints_and_continues_sigterm_checkpoints_and_exits_143(tmp_path):
    events = tmp_path / "events.jsonl"
    env = {
        "SPOTWISE_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "SPOTWISE_CHECKPOINT_EVERY": "0",  # no periodic checkpoints: only requested ones
        "SPOTWISE_EVENTS_FILE": str(events),
    }
    read = _Events(events)
    procs = spawn_ranks(TINY, 2, "--steps", "100000", "--step-sleep", "0.05", env=env, logs=tmp_path)
    try:
        _wait_for(lambda: any(e["event"] == "progress" for e in read()), 120, "training to start")
        procs[1].send_signal(signal.SIGUSR1)  # rank 1 only
        step = _wait_for(lambda: _committed(read), 60, "the requested checkpoint")[0]
        # Training went on past the checkpoint.
        _wait_for(lambda: max((e["step"] for e in read() if e["event"] == "progress"), default=0) > step + 2,
                  60, "steps after the checkpoint")
        assert all(p.poll() is None for p in procs)

        procs[0].send_signal(signal.SIGTERM)  # rank 0 only
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [143, 143], (tmp_path / "rank0.log").read_text()[-3000:]
        final = _committed(read)[-1]
        assert final > step
        # The SIGUSR1 save says it answers a request (a drain may end on it); the stop's does not.
        assert [e["requested"] for e in read() if e["event"] == "checkpoint_committed"] \
            == [True, False]
        (path,) = (tmp_path / "ckpt" / "manifests").glob(f"step-{final:010d}-g*.json")
        manifest = json.loads(path.read_text())
        assert manifest["world_size"] == 2 and manifest["cursor"] == final * 24
    finally:
        kill_all(procs)


def _last_progress(events) -> int:
    return max((e["step"] for e in events() if e["event"] == "progress"), default=0)


@pytest.mark.slow
def test_under_an_agent_a_requested_checkpoint_holds_until_its_end_or_the_stop(tmp_path):
    """With SPOTWISE_REQUEST_HOLD_S (the agent sets it), the ranks take no step after the commit
    of a SIGUSR1 checkpoint: the rescale it is for would replay every one. SIGUSR2 (the request
    ended with no rescale) lets them go on; SIGTERM (the rescale) stops them with nothing past
    the commit."""
    events = tmp_path / "events.jsonl"
    env = {
        "SPOTWISE_CHECKPOINT_URI": str(tmp_path / "ckpt"),
        "SPOTWISE_CHECKPOINT_EVERY": "0",
        "SPOTWISE_EVENTS_FILE": str(events),
        "SPOTWISE_REQUEST_HOLD_S": "120",
    }
    read = _Events(events)
    procs = spawn_ranks(TINY, 2, "--steps", "100000", "--step-sleep", "0.05", env=env, logs=tmp_path)
    try:
        _wait_for(lambda: any(e["event"] == "progress" for e in read()), 120, "training to start")
        procs[1].send_signal(signal.SIGUSR1)
        step = _wait_for(lambda: _committed(read), 60, "the requested checkpoint")[0]
        _wait_for(lambda: _last_progress(read) == step, 10, "the progress of the held step")
        time.sleep(2.0)  # 40 steps' time
        assert _last_progress(read) == step and all(p.poll() is None for p in procs)

        procs[0].send_signal(signal.SIGUSR2)  # the request is over: go on
        _wait_for(lambda: _last_progress(read) > step + 2, 60, "steps after the hold")

        procs[0].send_signal(signal.SIGUSR1)
        held = _wait_for(lambda: [s for s in _committed(read) if s > step], 60, "a second request")[0]
        _wait_for(lambda: _last_progress(read) == held, 10, "the second hold")
        procs[1].send_signal(signal.SIGTERM)  # the rescale: stop, nothing saved past the commit
        codes = [p.wait(timeout=120) for p in procs]
        assert codes == [143, 143], (tmp_path / "rank0.log").read_text()[-3000:]
        assert _committed(read) == [step, held] and _last_progress(read) == held
        assert all(e["requested"] for e in read() if e["event"] == "checkpoint_committed")
    finally:
        kill_all(procs)
