"""Emergency checkpoints: on request (SIGUSR1) training goes on; on SIGTERM the job saves, exits 143.

The signal reaches one rank only, as when one node gets a spot notice; the ranks agree on the
step through the per-step control all-reduce, so they checkpoint together.
"""

import json
import signal

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
        (path,) = (tmp_path / "ckpt" / "manifests").glob(f"step-{final:010d}-g*.json")
        manifest = json.loads(path.read_text())
        assert manifest["world_size"] == 2 and manifest["cursor"] == final * 24
    finally:
        kill_all(procs)
