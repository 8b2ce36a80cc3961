"""A runtime's checkpoint_failed event becomes ReportEventRequest.checkpoint_failed (rank 0's)."""

from spotwise.worker.agent import event_report


def test_rank0_failure_is_reported_with_step_and_reason() -> None:
    req = event_report({"event": "checkpoint_failed", "time": 5.0, "step": 40,
                        "reason": "upload timed out after 900s"}, rank=0)
    assert req.WhichOneof("event") == "checkpoint_failed"
    assert (req.checkpoint_failed.step, req.checkpoint_failed.reason) == (40, "upload timed out after 900s")
    assert req.time == 5.0


def test_other_ranks_and_ready_are_not_reported() -> None:
    assert event_report({"event": "checkpoint_failed", "step": 40, "reason": "x"}, rank=1) is None
    assert event_report({"event": "ready", "rank": 0}, rank=0) is None
