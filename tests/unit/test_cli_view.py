"""What the CLI prints for jobs, events and costs (pure formatting of spotwise.v1 messages)."""

from __future__ import annotations

from rich.console import Console

from spotwise.live import (
    LiveView,
    cost_text,
    duration,
    event_line,
    final_line,
    jobs_table_text,
    money,
    number,
    status_text,
)
from spotwise.proto.v1 import jobs_pb2

NOW = 1_800_000_000.0


def _job(**fields: object) -> jobs_pb2.Job:
    spec = jobs_pb2.JobSpec(
        name="lm",
        entrypoint=["python", "train.py"],
        nodes=jobs_pb2.NodeRange(min=1, max=3),
        nproc_per_node=2,
        budget_usd=5.0,
    )
    base: dict[str, object] = dict(
        id="job-1",
        spec=spec,
        state=jobs_pb2.JOB_STATE_RUNNING,
        generation=3,
        world_size=4,
        step=120,
        loss=2.71828,
        samples_per_second=55.5,
        last_checkpoint_step=100,
        last_checkpoint_path="runs/ckpt/data/step-100",
        cost_usd=0.1234,
        created_at=NOW - 125,
        lost_steps=7,
    )
    base.update(fields)
    return jobs_pb2.Job(**base)  # type: ignore[arg-type]


def test_numbers_for_people() -> None:
    assert number(0.0) == "-" and number(float("nan")) == "-"
    assert number(2.718281) == "2.718"
    assert money(1234.5) == "$1,234.5000"
    assert [duration(s) for s in (5, 125, 3725)] == ["5s", "2m05s", "1h02m"]


def test_status_text_has_every_field_aligned() -> None:
    lines = status_text(_job(), now=NOW).splitlines()
    fields = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in lines}
    assert fields["state"] == "RUNNING"
    assert fields["generation"] == "3" and fields["world size"] == "4"
    assert fields["nodes"] == "1..3 x 2 proc"
    assert fields["last checkpoint"] == "step 100 (runs/ckpt/data/step-100)"
    assert fields["cost"] == "$0.1234 of $5.0000"
    assert fields["age"] == "2m05s"
    assert fields["lost steps"] == "7"
    assert fields["node ids"] == "-"
    with_nodes = status_text(_job(node_ids=["node-a", "node-b"],
                                  provider_nodes=["local-3", ""]), now=NOW)
    assert "node ids" in with_nodes and "node-a (local-3), node-b\n" in with_nodes
    # Values start in one column.
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(value_columns) == 1


def test_jobs_table_newest_first_in_columns() -> None:
    older = _job(id="job-old", created_at=NOW - 3600, state=jobs_pb2.JOB_STATE_SUCCEEDED)
    newer = _job(id="job-new-with-long-id", created_at=NOW - 10)
    rows = jobs_table_text([older, newer], now=NOW).splitlines()
    assert rows[0].split() == ["ID", "NAME", "STATE", "GEN", "WORLD", "STEP", "LOSS", "COST", "AGE"]
    assert [r.split()[0] for r in rows[1:]] == ["job-new-with-long-id", "job-old"]
    assert rows[2].split()[2] == "SUCCEEDED"
    # Columns line up: STATE starts at the same offset in every row.
    offsets = {row.index(word) for row, word in zip(rows, ["STATE", "RUNNING", "SUCCEEDED"], strict=True)}
    assert len(offsets) == 1


def test_event_and_final_lines() -> None:
    event = jobs_pb2.JobEvent(
        job_id="job-1", time=NOW, kind="generation", generation=3,
        message="generation 3 (world size 4)", job=_job(),
    )
    line = event_line(event)
    assert " g3 generation " in line and "world=4 step=120" in line and line.endswith(
        "- generation 3 (world size 4)"
    )
    done = _job(state=jobs_pb2.JOB_STATE_BUDGET_EXHAUSTED, message="budget reached")
    assert final_line(done).startswith("job job-1 BUDGET_EXHAUSTED: step 120, generation 3")
    assert final_line(done).endswith("(budget reached)")


def test_cost_text_shows_savings_share() -> None:
    report = jobs_pb2.CostReport(
        job_id="job-1", spent_usd=0.3, rate_usd_per_hour=0.9, projected_usd=1.2, budget_usd=0,
        on_demand_equivalent_usd=1.0, savings_usd=0.7, price_source="offline table (2026-09)",
    )
    fields = dict(line.split(": ", 1) for line in cost_text(report).splitlines())
    assert fields["spent"].strip() == "$0.3000"
    assert fields["rate"].strip() == "$0.9000/h"
    assert fields["budget"].strip() == "none"
    assert fields["savings"].strip() == "$0.7000 (70%)"


def test_live_view_renders_state_and_recent_events() -> None:
    view = LiveView("job-1", recent=3)
    console = Console(record=True, width=120, force_terminal=False)
    console.print(view.render())
    assert "waiting for the daemon" in console.export_text()
    for step in range(5):
        view.update(jobs_pb2.JobEvent(
            job_id="job-1", time=NOW + step, kind="progress", generation=3,
            job=_job(step=100 + step),
        ))
    console = Console(record=True, width=120, force_terminal=False)
    console.print(view.render())
    text = console.export_text()
    assert "spotwise job job-1 (lm)" in text and "RUNNING" in text
    # Only the 3 most recent events are kept.
    assert "step 104" in text and "step 102" in text and "step 101" not in text
    assert not view.finished
    view.update(jobs_pb2.JobEvent(job_id="job-1", kind="state",
                                  job=_job(state=jobs_pb2.JOB_STATE_SUCCEEDED)))
    assert view.finished
