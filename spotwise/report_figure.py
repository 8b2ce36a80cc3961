"""Draws a job report (spotwise.report.ReportData) with matplotlib, as PNG bytes and as an HTML
page that embeds the same PNG (base64), so the page is one file that opens anywhere.

Panels, top to bottom: world size over time with each generation's start marked and labelled
by its cause; the age of the last commit over time (failed saves as red crosses); cumulative
cost against the budget and against the same node-seconds on demand (these three share the
time axis); throughput and loss over steps with the checkpoints as ticks (failed saves as red
crosses); the steps each generation lost when it restored from the last commit.
"""

from __future__ import annotations

import base64
import html
import io

from spotwise.report import CAUSES, ReportData, causes_in

CAUSE_COLORS = {
    "start": "#4c72b0",
    "notice": "#dd8452",
    "loss without notice": "#c44e52",
    "capacity back": "#55a868",
    "failure": "#8172b3",
    "budget": "#937860",
    "other": "#8c8c8c",
}
"""One colour per cause (spotwise.report.CAUSES)."""
assert set(CAUSE_COLORS) == set(CAUSES)

FAILED_Y = 0.05
"""Height (axes fraction) of a failed save's cross: above the axis, so it is drawn whole."""

BUDGET_IN_SCALE = 5.0
"""The budget is drawn as a line while it is at most this many times the largest cost shown."""


def render_png(data: ReportData, *, dpi: int = 100) -> bytes:
    """The report's figure as PNG bytes."""
    out = io.BytesIO()
    figure(data, dpi=dpi).savefig(out, format="png")
    return out.getvalue()


def figure(data: ReportData, *, dpi: int = 100):
    """The report's matplotlib Figure (not attached to any display); its axes, top to bottom:
    world size, age of the last commit, cost, steps, lost steps."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 15), dpi=dpi, layout="constrained")
    world_ax, age_ax, cost_ax, steps_ax, lost_ax = fig.subplots(
        5, 1, height_ratios=(1.2, 0.8, 0.9, 1.2, 0.8))
    age_ax.sharex(world_ax)
    cost_ax.sharex(world_ax)
    fig.suptitle(data.title, fontsize=11)
    _world(world_ax, data)
    _commit_age(age_ax, data)
    _cost(cost_ax, data)
    _steps(steps_ax, data)
    _lost(lost_ax, data)
    return fig


def _world(ax, data: ReportData) -> None:
    ax.set_title("World size over time, and why each generation started", fontsize=10)
    if data.world:
        t, w = zip(*data.world, strict=True)
        ax.step(t, w, where="post", color="black", linewidth=1.5)
        ax.set_ylim(0, max(w) + 1)
    for g in data.generations:
        color = CAUSE_COLORS[g.cause]
        ax.axvline(g.time_s, color=color, linestyle="--", linewidth=1)
        # On a white ground: the label stays readable where it crosses the world-size line.
        ax.annotate(f"g{g.generation}: {g.cause}", (g.time_s, 0.02), xycoords=("data", "axes fraction"),
                    xytext=(-2, 0), textcoords="offset points",
                    rotation=90, fontsize=8, color=color, ha="right", va="bottom",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    if data.end is not None:
        color = CAUSE_COLORS.get(data.end.cause, "black")
        ax.axvline(data.end.time_s, color=color, linestyle=":", linewidth=1.5)
        ax.annotate(f"end: {data.end.state}", (data.end.time_s, 0.02),
                    xycoords=("data", "axes fraction"), xytext=(-2, 0),
                    textcoords="offset points", rotation=90, fontsize=8, color=color,
                    ha="right", va="bottom",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    for cause in causes_in(data.generations):
        ax.plot([], [], color=CAUSE_COLORS[cause], linestyle="--", label=cause)
    if data.generations:
        ax.legend(loc="best", fontsize=8, title="generation started by", title_fontsize=8)
    ax.set_xlabel("seconds since the job's first event")
    ax.set_ylabel("world size (processes)")
    ax.yaxis.get_major_locator().set_params(integer=True)


def _commit_age(ax, data: ReportData) -> None:
    ax.set_title("Age of the last commit (the training a loss now would cost)", fontsize=10)
    if data.commit_age:
        t, age = zip(*data.commit_age, strict=True)
        ax.plot(t, age, color="#4c72b0", linewidth=1, label="seconds since the last commit")
        ax.set_ylim(bottom=0)
    else:
        ax.text(0.5, 0.5, "no commit yet", transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color="#8c8c8c")
    failed = [c.time_s for c in data.checkpoints if not c.ok]
    if failed:
        ax.plot(failed, [FAILED_Y] * len(failed), "x", transform=ax.get_xaxis_transform(),
                markersize=9, color="#c44e52", label="checkpoint failed")
    if data.commit_age or failed:
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("seconds since the job's first event")
    ax.set_ylabel("seconds")


def _steps(ax, data: ReportData) -> None:
    ax.set_title("Throughput and loss over steps; checkpoints as ticks", fontsize=10)
    if data.progress:
        steps, rate, loss = zip(*data.progress, strict=True)
        ax.plot(steps, rate, ".", markersize=3, color="#4c72b0", label="samples/s")
        ax.set_ylabel("samples per second", color="#4c72b0")
        loss_ax = ax.twinx()
        loss_ax.plot(*_runs(steps, loss), "-", linewidth=1, color="#c44e52", label="loss")
        loss_ax.set_ylabel("loss", color="#c44e52")
    committed = [c.step for c in data.checkpoints if c.ok]
    failed = [c.step for c in data.checkpoints if not c.ok]
    trans = ax.get_xaxis_transform()  # x in steps, y in axes fraction: ticks along the bottom
    if committed:
        ax.plot(committed, [0.0] * len(committed), "|", transform=trans, markersize=16, markeredgewidth=2,
                color="#55a868", label="checkpoint committed", clip_on=False)
    if failed:
        ax.plot(failed, [FAILED_Y] * len(failed), "x", transform=trans, markersize=9,
                color="#c44e52", label="checkpoint failed")
    if data.progress or data.checkpoints:
        ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("step")


def _cost(ax, data: ReportData) -> None:
    ax.set_title("Cumulative cost", fontsize=10)
    if data.cost:
        t, spent, on_demand = zip(*data.cost, strict=True)
        ax.plot(t, spent, color="#4c72b0", label="spent")
        ax.plot(t, on_demand, color="#8c8c8c", linestyle=":", label="same node-hours on demand")
    top = max((max(c[1], c[2]) for c in data.cost), default=0.0)
    spent_now = data.cost[-1][1] if data.cost else 0.0
    if top == 0:
        ax.text(0.5, 0.5, "nothing charged (the nodes' price is 0)", transform=ax.transAxes,
                ha="center", va="center", fontsize=9, color="#8c8c8c")
    if data.budget_usd > 0 and data.budget_usd <= BUDGET_IN_SCALE * top:
        ax.axhline(data.budget_usd, color="#c44e52", linestyle="--", label="budget")
        top = max(top, data.budget_usd)
    elif data.budget_usd > 0:
        # A budget far above the spend would flatten both lines to the axis: say it instead.
        ax.text(0.99, 0.95, f"budget ${data.budget_usd:,.2f}: {100 * spent_now / data.budget_usd:.1f}% "
                "used (off the scale)", transform=ax.transAxes, ha="right", va="top",
                fontsize=8, color="#c44e52")
    # Set last, over every line drawn: the budget line inside the axes, the legend above it.
    ax.set_ylim(0, top * 1.4 or 1)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlabel("seconds since the job's first event")
    ax.set_ylabel("USD")


def _lost(ax, data: ReportData) -> None:
    ax.set_title("Steps lost at each generation's start (replayed from the last commit)",
                 fontsize=10)
    gens = data.generations
    lost = [g.lost_steps for g in gens]
    bars = ax.bar([f"g{g.generation}\n{g.cause}" for g in gens], lost,
                  color=[CAUSE_COLORS[g.cause] for g in gens])
    ax.bar_label(bars, fontsize=8)
    # Integer steps from 0 up, with room for the labels; all zero is said, not drawn as a
    # band around 0.
    ax.set_ylim(0, max(lost, default=0) * 1.2 or 1)
    if gens and not any(lost):
        ax.text(0.5, 0.6, "no steps lost", transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color="#8c8c8c")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("steps")
    ax.yaxis.get_major_locator().set_params(integer=True)


def _runs(steps, values) -> tuple[list[float], list[float]]:
    """The points with a break (NaN) wherever the step goes back (a generation replaying from
    the last commit), so a replay is drawn over the steps it repeats, not as a line back."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (x, y) in enumerate(zip(steps, values, strict=True)):
        if i and x < steps[i - 1]:
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(x)
        ys.append(y)
    return xs, ys


def render_html(data: ReportData, png: bytes) -> str:
    """A self-contained page: the title, the figure (embedded PNG), the generations and how
    the job ended."""
    rows = "\n".join(
        f"<tr><td>{g.generation}</td><td>{g.time_s:.1f}</td><td>{g.world_size}</td>"
        f"<td>{html.escape(g.cause)}</td><td>{g.lost_steps}</td>"
        f"<td>{html.escape(g.reason)}</td></tr>"
        for g in data.generations
    )
    title = html.escape(data.title)
    image = base64.b64encode(png).decode("ascii")
    end = (f"<p>Ended {html.escape(data.end.state)} at {data.end.time_s:.1f} s: "
           f"{html.escape(data.end.reason)}</p>" if data.end is not None else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:1em}} td,th{{padding:2px 8px;text-align:left}}
img{{max-width:100%}}</style></head>
<body><h1 style="font-size:1.1em">{title}</h1>
<img alt="report of job {html.escape(data.job_id)}" src="data:image/png;base64,{image}">
<h2 style="font-size:1em">Generations</h2>
<table><tr><th>generation</th><th>start (s)</th><th>world size</th><th>cause</th>
<th>lost steps</th><th>reason</th></tr>
{rows}
</table>{end}</body></html>
"""
