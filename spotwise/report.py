"""`spotwise report JOB`: one picture of a job's life, from the daemon's data alone.

The picture is drawn from the job's stored events (a replaying WatchJob: every event carries
the job's figures as they were after it), its current record (GetJob) and its cost report
(GetCost), so it works from any machine that can reach the daemon. This module turns the events
into `ReportData` (a pure function, `extract`), and writes the PNG and an HTML page with the
same figure embedded (`write_report`); spotwise.report_figure draws it.

    with spotwise.Client(address) as client:
        paths = write_report(client, job_id, out_dir)
    print(paths.png, paths.html)

The cause of each generation is read from the controller's reason in the generation event
(daemon/controller.py): "lost NODE" (a lease ran out: a loss without notice, unless a notice
event for that node came first), "drained NODE" (after an interruption notice), "grow ..."
(capacity back), "generation N failed" (a process failed, every node alive), and "budget".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotwise.client import is_terminal, state_name

CAUSE_START = "start"
CAUSE_NOTICE = "notice"
CAUSE_LOSS = "loss without notice"
CAUSE_CAPACITY = "capacity back"
CAUSE_FAILURE = "failure"
CAUSE_BUDGET = "budget"
CAUSE_OTHER = "other"
CAUSES = (CAUSE_START, CAUSE_NOTICE, CAUSE_LOSS, CAUSE_CAPACITY, CAUSE_FAILURE, CAUSE_BUDGET,
          CAUSE_OTHER)
"""Every label a generation start can carry, in the legend's order."""

_REASON = re.compile(r"^generation \d+ \([^)]*\): (?P<reason>.*)$", re.DOTALL)
_NODES_AFTER = re.compile(r"^(?:lost|drained) (?P<nodes>[^:;]+)")
_NOTICE_NODE = re.compile(r"^node (?P<node>\S+): ")
_STEP = re.compile(r"\bstep (?P<step>\d+)\b")


@dataclass(frozen=True)
class GenerationStart:
    """One generation: when it started, at which world size, and why."""

    generation: int
    """The generation number (1 for the first)."""
    time_s: float
    """Seconds since the job's first event."""
    world_size: int
    """Training processes of the generation."""
    cause: str
    """One of CAUSES."""
    reason: str
    """The controller's reason, as the generation event said it."""
    lost_steps: int = 0
    """Steps done and then lost when this generation restored from the last commit."""


@dataclass(frozen=True)
class CheckpointMark:
    """One checkpoint the job committed (ok) or failed to save."""

    time_s: float
    """Seconds since the job's first event."""
    step: int
    """The step saved (for a failure: the step the job was at, when the message names none)."""
    ok: bool
    """True for a commit, False for a failed save."""
    message: str
    """The event's message."""


@dataclass(frozen=True)
class JobEnd:
    """How the job ended (its final state event)."""

    time_s: float
    """Seconds since the job's first event."""
    state: str
    """The final state's name ("SUCCEEDED", "BUDGET_EXHAUSTED", ...)."""
    reason: str
    """The state event's message."""

    @property
    def cause(self) -> str:
        """CAUSE_BUDGET for a job the budget stopped (the budget never starts a generation: it
        caps growth and ends the job), else the state's name in lower case."""
        return CAUSE_BUDGET if self.state == "BUDGET_EXHAUSTED" else self.state.lower()


@dataclass
class ReportData:
    """What each panel of the report shows; built by `extract` from the job's events."""

    job_id: str
    """The job's id."""
    name: str
    """The job's name from its spec ("" when unknown)."""
    state: str
    """The job's state name now ("RUNNING", "SUCCEEDED", ...)."""
    ended: bool
    """True when the state is final; False: the picture so far."""
    world: list[tuple[float, int]] = field(default_factory=list)
    """(seconds, world size) after every event: the world-size panel's step line."""
    generations: list[GenerationStart] = field(default_factory=list)
    """Every generation's start, oldest first."""
    progress: list[tuple[int, float, float]] = field(default_factory=list)
    """(step, samples per second, loss) of every progress event, in event order."""
    checkpoints: list[CheckpointMark] = field(default_factory=list)
    """Commits and failed saves, in event order."""
    cost: list[tuple[float, float, float]] = field(default_factory=list)
    """(seconds, spent USD, same node-seconds on demand USD), non-decreasing, after every event."""
    commit_age: list[tuple[float, float]] = field(default_factory=list)
    """(seconds, seconds since the last commit) from the first commit on: the age panel's
    sawtooth (a commit adds the age just before it, then the drop to its own age)."""
    budget_usd: float = 0.0
    """The job's budget (0: none)."""
    end: JobEnd | None = None
    """The job's end; None while it runs."""
    step: int = 0
    """The job's step now."""
    lost_steps: int = 0
    """Steps lost over the whole job."""

    @property
    def title(self) -> str:
        """The figure's title: the job, its state, and whether it is still running."""
        who = f"{self.name} ({self.job_id})" if self.name else self.job_id
        when = "ended" if self.ended else "still running: the picture so far"
        return (f"spotwise job {who}: {self.state}, {when} - step {self.step}, "
                f"{len(self.generations)} generation(s), {self.lost_steps} steps lost")

    def lost_steps_by_generation(self) -> dict[int, int]:
        """{generation: steps it lost at its start}, for the lost-steps panel."""
        return {g.generation: g.lost_steps for g in self.generations}


def classify(reason: str, noticed_nodes: set[str]) -> str:
    """The cause of a generation from the controller's reason (the text after
    "generation N (world size W, from ...): ") and the nodes that had a notice before it."""
    text = reason.strip()
    if text.startswith("start on"):
        return CAUSE_START
    if "budget" in text:
        return CAUSE_BUDGET
    if text.startswith(("lost ", "drained ")):
        m = _NODES_AFTER.match(text)
        nodes = {n.strip() for n in m.group("nodes").split(",")} if m else set()
        if nodes & noticed_nodes:
            return CAUSE_NOTICE
        # A drain without a notice we saw (a cloud notice read from a queue before this
        # watch, an operator's drain) still left on purpose: it is not a loss.
        return CAUSE_LOSS if text.startswith("lost ") else CAUSE_NOTICE
    if re.match(r"^generation \d+ failed", text):
        return CAUSE_FAILURE
    if text.startswith(("grow ", "checkpoint now, then grow")) or " grow from " in text:
        return CAUSE_CAPACITY
    return CAUSE_OTHER


def _reason_of(message: str) -> str:
    m = _REASON.match(message)
    return m.group("reason") if m else message


def extract(events: Iterable[Any], *, job: Any = None, budget_usd: float = 0.0) -> ReportData:
    """The report's data from a job's events (spotwise.v1.JobEvent, oldest first).

    `job` (the job now, from GetJob) gives the name, the state and the figures of a job whose
    newest change made no event; without it they come from the last event. `budget_usd` is
    the job's budget (0: none). ValueError if there are neither events nor a job.
    """
    events = list(events)
    if not events and job is None:
        raise ValueError("no events and no job: nothing to report")
    job_id = job.id if job is not None and job.id else (events[0].job_id if events else "")
    t0 = events[0].time if events else 0.0
    data = ReportData(job_id=job_id, name="", state="", ended=False, budget_usd=budget_usd)
    noticed: set[str] = set()
    lost_before = 0  # the job's lost_steps just before the current generation started
    lost_now = 0  # the job's lost_steps after the previous event
    spent = on_demand = 0.0
    for event in events:
        t = max(0.0, event.time - t0)
        figures = event.job if event.HasField("job") else None
        kind = event.kind
        if kind == "notice":
            m = _NOTICE_NODE.match(event.message)
            if m:
                noticed.add(m.group("node"))
        elif kind == "generation":
            # Steps lost up to here belong to the generations before; the daemon counts a
            # generation's loss at its start and corrects it when the restore is reported.
            lost_before = lost_now
            world = figures.world_size if figures is not None else 0
            data.generations.append(GenerationStart(
                generation=int(event.generation), time_s=t, world_size=world,
                cause=classify(_reason_of(event.message), noticed), reason=event.message))
            noticed = set()
        elif kind == "state" and figures is not None and is_terminal(figures.state):
            data.end = JobEnd(time_s=t, state=state_name(figures.state), reason=event.message)
        elif kind == "progress" and figures is not None:
            data.progress.append((int(figures.step), float(figures.samples_per_second),
                                  float(figures.loss)))
        elif kind in ("checkpoint", "checkpoint_failed"):
            ok = kind == "checkpoint"
            m = _STEP.search(event.message)
            if m:
                step = int(m.group("step"))
            elif figures is not None:
                step = int(figures.last_checkpoint_step if ok else figures.step)
            else:
                step = 0
            data.checkpoints.append(CheckpointMark(time_s=t, step=step, ok=ok,
                                                   message=event.message))
        if figures is not None:
            data.world.append((t, int(figures.world_size)))
            _add_commit_age(data.commit_age, t, event.time - figures.last_checkpoint_at
                            if figures.last_checkpoint_at > 0 else None)
            # Cost never goes down; an event of an older snapshot must not make it dip.
            spent = max(spent, float(figures.cost_usd))
            on_demand = max(on_demand, float(figures.on_demand_usd))
            data.cost.append((t, spent, on_demand))
            if data.generations and figures.generation == data.generations[-1].generation:
                last = data.generations[-1]
                lost = max(0, int(figures.lost_steps) - lost_before)
                if lost != last.lost_steps:
                    data.generations[-1] = _with_lost(last, lost)
            data.step = max(data.step, int(figures.step))
            lost_now = data.lost_steps = int(figures.lost_steps)
            data.state = state_name(figures.state)
            data.ended = is_terminal(figures.state)
    if job is not None:
        data.name = job.spec.name if job.HasField("spec") else ""
        data.state = state_name(job.state)
        data.ended = is_terminal(job.state)
        data.step = max(data.step, int(job.step))
        data.lost_steps = max(data.lost_steps, int(job.lost_steps))
    return data


def _add_commit_age(points: list[tuple[float, float]], t: float, age: float | None) -> None:
    """Append the age of the last commit at `t` (None: no commit yet). Between events the age
    grows with the clock, so a drop (a commit since the previous point) first gets the age it
    had reached just before: the line climbs to the commit, then falls."""
    if age is None:
        return
    age = max(0.0, age)
    if points:
        t0, age0 = points[-1]
        reached = age0 + (t - t0)
        if age < reached - 1e-6:
            points.append((t, reached))
    points.append((t, age))


def _with_lost(g: GenerationStart, lost: int) -> GenerationStart:
    return GenerationStart(generation=g.generation, time_s=g.time_s, world_size=g.world_size,
                           cause=g.cause, reason=g.reason, lost_steps=lost)


@dataclass(frozen=True)
class ReportPaths:
    """Where write_report put the report."""

    png: Path
    """The figure."""
    html: Path
    """An HTML page with the same figure embedded and a table of the generations."""
    data: ReportData
    """What the figure shows."""


def write_report(client: Any, job_id: str, out_dir: Path, *, quiet_s: float = 2.0,
                 timeout_s: float = 60.0) -> ReportPaths:
    """Read the job's events, record and cost from the daemon and write
    `<out_dir>/<job_id>-report.png` and `.html`.

    For a running job the events end where the stream goes quiet for `quiet_s` after the
    replay (the picture so far); an ended job's stream ends after its replay, which is read
    to its end however slowly it comes. `timeout_s` bounds the whole read. Raises the client's errors
    (JobNotFound, DaemonUnavailable) and OSError if out_dir cannot be written.
    """
    from spotwise.report_figure import render_html, render_png

    job = client.get(job_id)
    # A pause in a loaded daemon's replay must not cut an ended job's history short.
    quiet = timeout_s if is_terminal(job.state) else quiet_s
    events = client.history(job_id, quiet_s=quiet, timeout=timeout_s)
    budget = client.cost(job_id).budget_usd
    data = extract(events, job=job, budget_usd=budget)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{job_id}-report.png"
    html = out_dir / f"{job_id}-report.html"
    image = render_png(data)
    png.write_bytes(image)
    html.write_text(render_html(data, image), encoding="utf-8")
    return ReportPaths(png=png, html=html, data=data)


def causes_in(generations: Sequence[GenerationStart]) -> list[str]:
    """The causes that occur, in CAUSES order (the legend's entries)."""
    seen = {g.cause for g in generations}
    return [c for c in CAUSES if c in seen]
