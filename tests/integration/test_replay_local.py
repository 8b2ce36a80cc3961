"""The trace replayer on a real local provider: what `begin` carries out before the clock runs."""

from __future__ import annotations

from pathlib import Path

from spotwise.cloud.local import LocalProvider
from spotwise.cloud.provider import NodeRequest
from spotwise.cloud.replay import TraceReplayer
from spotwise.cloud.trace import ReplayEvent, ReplaySchedule


def test_begin_launches_but_leaves_an_early_notice_for_the_clock(tmp_path: Path) -> None:
    # A drop 1 s in with a 4 s lead: its notice is due at t = 0, together with the launch.
    schedule = ReplaySchedule(events=(ReplayEvent(t=0.0, kind="add", count=1),
                                      ReplayEvent(t=0.0, kind="notice", count=1),
                                      ReplayEvent(t=1.0, kind="remove", count=1)),
                              levels=(1, 0), step_s=1.0, duration_s=2.0)
    # `true` stands in for the agent: begin() must launch without a notice, whatever runs.
    provider = LocalProvider(log_dir=tmp_path, cluster=f"begin-{tmp_path.name}", python="true")
    replayer = TraceReplayer(provider, schedule, NodeRequest(job_id="", daemon_address="x:1"))
    try:
        actions = replayer.begin()
        assert [a.kind for a in actions] == ["add"]
        assert replayer.stats.noticed == 0 and not replayer.done
    finally:
        replayer.stop()
        provider.shutdown()
