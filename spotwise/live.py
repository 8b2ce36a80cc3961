"""How a job and its events are shown to a person: status lines, event lines, the live view.

Pure formatting of spotwise.v1 messages; the CLI decides where the text goes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from spotwise.client import is_terminal, state_name
from spotwise.proto.v1 import jobs_pb2

STATE_STYLES = {
    "PENDING": "yellow",
    "RUNNING": "green",
    "RESCALING": "cyan",
    "SUCCEEDED": "bold green",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "BUDGET_EXHAUSTED": "bold yellow",
}


def clock(unix_s: float) -> str:
    """Local wall-clock time of day, or '-' for an unset (zero) time."""
    if unix_s <= 0:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(unix_s))


def number(value: float, digits: int = 4) -> str:
    """A float for people: '-' when unset (0 or NaN), else `digits` significant digits."""
    if value == 0 or math.isnan(value):
        return "-"
    return f"{value:.{digits}g}"


def money(usd: float) -> str:
    """'$1.2345' with four decimals: spot jobs often cost cents."""
    return f"${usd:,.4f}"


def duration(seconds: float) -> str:
    """'1h02m', '3m05s', '12s'."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def checkpoint_text(job: jobs_pb2.Job) -> str:
    """'step 200 (path)' or '-' when the job has not committed one."""
    if not job.last_checkpoint_path and job.last_checkpoint_step == 0:
        return "-"
    text = f"step {job.last_checkpoint_step}"
    if job.last_checkpoint_path:
        text += f" ({job.last_checkpoint_path})"
    return text


def status_fields(job: jobs_pb2.Job, *, now: float | None = None) -> list[tuple[str, str]]:
    """The job as (label, value) rows, in the order `spotwise status` prints them."""
    now = time.time() if now is None else now
    spec = job.spec
    rows = [
        ("job", job.id),
        ("name", spec.name or "-"),
        ("state", state_name(job.state)),
        ("message", job.message or "-"),
        ("generation", str(job.generation)),
        ("world size", str(job.world_size)),
        ("nodes", f"{spec.nodes.min}..{spec.nodes.max} x {spec.nproc_per_node} proc"),
        ("step", str(job.step)),
        ("loss", number(job.loss)),
        ("samples/s", number(job.samples_per_second)),
        ("last checkpoint", checkpoint_text(job)),
        ("lost steps", str(job.lost_steps)),
        ("cost", money(job.cost_usd) + (f" of {money(spec.budget_usd)}" if spec.budget_usd else "")),
        ("node ids", ", ".join(
            f"{n} ({h})" if h else n
            for n, h in zip(job.node_ids, [*job.provider_nodes, *[""] * len(job.node_ids)],
                            strict=False)) or "-"),
        ("created", clock(job.created_at)),
        ("age", duration(now - job.created_at) if job.created_at else "-"),
        ("entrypoint", " ".join(spec.entrypoint) or "-"),
    ]
    return rows


def status_text(job: jobs_pb2.Job, *, now: float | None = None) -> str:
    """`spotwise status` output: aligned 'label: value' lines."""
    rows = status_fields(job, now=now)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)


def jobs_table_text(jobs: Iterable[jobs_pb2.Job], *, now: float | None = None) -> str:
    """`spotwise jobs` output: one aligned row per job, newest first, with a header row."""
    now = time.time() if now is None else now
    header = ("ID", "NAME", "STATE", "GEN", "WORLD", "STEP", "LOSS", "COST", "AGE")
    rows = [header]
    for job in sorted(jobs, key=lambda j: j.created_at, reverse=True):
        rows.append(
            (
                job.id,
                job.spec.name or "-",
                state_name(job.state),
                str(job.generation),
                str(job.world_size),
                str(job.step),
                number(job.loss),
                money(job.cost_usd),
                duration(now - job.created_at) if job.created_at else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def event_line(event: jobs_pb2.JobEvent) -> str:
    """One line per event: time, generation, kind, message, and where the job stands."""
    job = event.job
    parts = [clock(event.time), f"g{event.generation}", f"{event.kind or '-':<10}"]
    if event.HasField("job"):
        parts.append(f"{state_name(job.state):<9}")
        parts.append(f"world={job.world_size} step={job.step}")
        if event.kind == "progress" or job.loss:
            parts.append(f"loss={number(job.loss)} samples/s={number(job.samples_per_second)}")
    if event.message:
        parts.append(f"- {event.message}")
    return " ".join(parts)


def final_line(job: jobs_pb2.Job) -> str:
    """The summary printed when a followed job ends."""
    text = (
        f"job {job.id} {state_name(job.state)}: step {job.step}, generation {job.generation}, "
        f"loss {number(job.loss)}, lost steps {job.lost_steps}, cost {money(job.cost_usd)}"
    )
    if job.message:
        text += f" ({job.message})"
    return text


def cost_text(report: jobs_pb2.CostReport) -> str:
    """`spotwise cost` output."""
    rows = [
        ("job", report.job_id),
        ("spent", money(report.spent_usd)),
        ("rate", f"{money(report.rate_usd_per_hour)}/h"),
        ("projected", money(report.projected_usd) if report.projected_usd else "-"),
        ("budget", money(report.budget_usd) if report.budget_usd else "none"),
        ("on-demand equivalent", money(report.on_demand_equivalent_usd)),
        ("savings", _savings(report)),
        ("price source", report.price_source or "-"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in rows)


def _savings(report: jobs_pb2.CostReport) -> str:
    text = money(report.savings_usd)
    if report.on_demand_equivalent_usd > 0:
        text += f" ({100 * report.savings_usd / report.on_demand_equivalent_usd:.0f}%)"
    return text


class LiveView:
    """What `spotwise watch` draws: the job's numbers and its recent events."""

    def __init__(self, job_id: str, *, recent: int = 10) -> None:
        self.job_id = job_id
        self.job: jobs_pb2.Job | None = None
        self.events: deque[jobs_pb2.JobEvent] = deque(maxlen=recent)
        self.note = ""

    def update(self, event: jobs_pb2.JobEvent) -> None:
        """Take in one event from the stream."""
        if event.HasField("job"):
            job = event.job
            if not job.HasField("spec") and self.job is not None and self.job.HasField("spec"):
                # Events carry the job's figures without its spec: keep the one GetJob gave.
                job = jobs_pb2.Job()
                job.CopyFrom(event.job)
                job.spec.CopyFrom(self.job.spec)
            self.job = job
        self.events.append(event)

    def set_job(self, job: jobs_pb2.Job) -> None:
        """Take in the job as GetJob returned it (before the first event)."""
        self.job = job

    @property
    def finished(self) -> bool:
        """True once the job is in a final state."""
        return self.job is not None and is_terminal(self.job.state)

    def render(self) -> RenderableType:
        """The whole view as one rich renderable."""
        numbers = Table.grid(padding=(0, 2))
        numbers.add_column(style="bold")
        numbers.add_column()
        if self.job is None:
            numbers.add_row("state", "waiting for the daemon...")
        else:
            for label, value in status_fields(self.job):
                if label in ("job", "entrypoint", "created", "node ids"):
                    continue
                style = STATE_STYLES.get(value, "") if label == "state" else ""
                numbers.add_row(label, Text(value, style=style))
        events = Table(show_header=True, header_style="bold", box=None, padding=(0, 1))
        events.add_column("time")
        events.add_column("gen", justify="right")
        events.add_column("kind")
        events.add_column("event", overflow="fold")
        for event in self.events:
            events.add_row(clock(event.time), str(event.generation), event.kind, _event_text(event))
        parts: list[RenderableType] = [numbers, Text(""), Text("recent events", style="bold"), events]
        if self.note:
            parts.append(Text(self.note, style="yellow"))
        title = f"spotwise job {self.job_id}"
        if self.job is not None and self.job.spec.name:
            title += f" ({self.job.spec.name})"
        return Panel(Group(*parts), title=title, title_align="left")


def _event_text(event: jobs_pb2.JobEvent) -> str:
    if event.message:
        return event.message
    job = event.job
    if event.kind == "progress":
        return f"step {job.step} loss {number(job.loss)} {number(job.samples_per_second)} samples/s"
    return state_name(job.state) if event.HasField("job") else "-"
