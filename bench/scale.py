"""The coordinator at fleet scale: a real daemon process and N simulated agents.

    python bench/scale.py                               # N = 250, 500, 1000, 2000
    python bench/scale.py --nodes 1000 --processes 4 --phase-s 30
    python bench/scale.py --unary --quick               # a smoke run (N = 50, 5 s phases)

For each N: a `spotwise daemon` process as a head node runs it (TLS with a CA made for the run,
a tokens file with one client and one agent token, heartbeat interval 0.5 s and lease 2 s,
the defaults) and N simulated agents (bench/simagent.py: real gRPC clients, one connection
each, on one Heartbeats stream each, or unary Heartbeat calls with --unary), spread over
2-4 generator processes (bench/loadgen.py). The rank-0 node of each job reports progress every
0.5 s, as the runtime does. The phases, in this order:

  a. register   every agent registers (register_all_s: from the first call to the last
                answer), then an idle fleet for --phase-s (heartbeat_p99_ms_idle).
  b. job        one job with nodes {min: 1, max: N}: the rescale burst (job_start_s: submit
                until every agent holds the job's generation; its beats are the "burst"
                figures), then a steady state for --phase-s (heartbeat_p99_ms_job).
  d. loss       the member of node rank N/2 goes silent: it stops sending but keeps its
                connection (and stream) open. loss_to_generation_s: from the last beat it
                sent until every survivor holds the job's next generation.
  c. shared     the daemon never takes nodes from a running job for another, so a second job
                can share the fleet only on free nodes: the big job is cancelled and two jobs
                of half the (N-1 live nodes) fleet each are submitted together (share_start_s
                until every live agent holds one of them), then a steady state for --phase-s
                (heartbeat_p99_ms_shared). The loss phase runs before this one so that it
                hits a job spanning every node.

Measured for each phase: heartbeat round trips (p50/p99/max, on the agents' side),
heartbeats answered, the daemon's CPU time (/proc/<pid>/stat utime+stime) per heartbeat
sent, the growth of its database (pages in use, WAL included) extrapolated to MB per
hour, its RSS, and the busiest generator process's CPU share (near 1.0 the generator, not the
daemon, limits the figures). Over the whole run: `reregisters` (Register calls after an
agent's first: the daemon forgot a node; target 0) and failed calls by method and code.

Writes bench/results/scale.json (scale-quick.json with --quick): the headline figures of the
largest N (N = 2,000 by default), every N's figures, the targets of issue #9 and the setup.
Figures measured on a shared or small machine say little about a head node: the generator
shares the cores with the daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from headnode import DaemonSettings, HeadNode, cpu_seconds  # noqa: E402  (bench/, beside this)
from loadgen import REGISTER_CONCURRENCY, Batch, GeneratorError, LoadGenerator  # noqa: E402
from simagent import AgentSettings  # noqa: E402

from spotwise.client import Client, SpotwiseError, state_name  # noqa: E402
from spotwise.common import eventloop  # noqa: E402

T = TypeVar("T")

DEFAULT_NODES = (250, 500, 1000, 2000)
HEADLINE = ("heartbeat_p99_ms_idle", "heartbeat_p99_ms_job", "register_all_s",
            "loss_to_generation_s", "daemon_cpu_ms_per_heartbeat", "db_growth_mb_per_hour",
            "reregisters")


def targets(lease_s: float) -> dict[str, float]:
    """Issue #9's targets, each an upper bound."""
    return {"heartbeat_p99_ms_idle": 50.0, "heartbeat_p99_ms_job": 50.0,
            "daemon_cpu_ms_per_heartbeat": 0.15, "register_all_s": 10.0,
            "loss_to_generation_s": lease_s + 1.0, "reregisters": 0,
            "db_growth_mb_per_hour_per_1000_nodes": 50.0}


@dataclass(frozen=True, kw_only=True)
class ScaleConfig:
    """One benchmark run."""

    nodes: tuple[int, ...]
    """Fleet sizes, one daemon each, in this order."""
    processes: int
    """Generator processes the agents are spread over."""
    phase_s: float
    """Length of each measured steady phase (idle, job, shared)."""
    unary: bool
    """Agents beat with unary Heartbeat calls instead of one Heartbeats stream each."""
    stream: bool = False
    """Agents beat on the gRPC Heartbeats stream even though the daemon offers its beat
    channel (the protocol before it)."""
    quick: bool
    """A smoke run: small N and short phases unless given."""
    heartbeat_interval_s: float
    """The daemon's heartbeat interval (told to agents at Register)."""
    lease_s: float
    """The daemon's lease."""
    progress_interval_s: float
    """How often each job's rank-0 node reports progress (0: never)."""
    settle_timeout_s: float
    """Longest wait for a rescale to reach every agent before the N is given up."""
    out: Path
    """Where the JSON goes."""
    keep: bool = False
    """Keep each N's directory (daemon log, database) after a run that succeeded."""


class PhaseFailed(RuntimeError):
    """A phase did not reach its condition in time; the N's later phases are skipped."""


def percentile(values: Any, q: float) -> float | None:
    """The q-th percentile (0-100) of `values`, nearest rank; None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def wait_for(cond: Callable[[], T], timeout_s: float, what: str, head: HeadNode,
             interval_s: float = 0.2) -> T:
    """Poll `cond` until truthy; PhaseFailed after `timeout_s` or if the daemon died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not head.alive():
            raise PhaseFailed(f"the daemon died while waiting for {what}: {head.log_tail(800)}")
        value = cond()
        if value:
            return value
        time.sleep(interval_s)
    raise PhaseFailed(f"{what}: not within {timeout_s:g}s")


class Meter:
    """Readings at a phase's start; `figures()` turns the change since into phase figures."""

    def __init__(self, head: HeadNode, gen: LoadGenerator) -> None:
        self.head, self.gen = head, gen
        # This collect also drops the latencies of whatever came before.
        self.counters = gen.collect().counters
        self.t = time.monotonic()
        self.cpu = head.cpu_s()
        self.gen_cpu = [cpu_seconds(p) for p in gen.pids]
        self.db = head.db_size()

    def figures(self, batch: Batch | None = None) -> dict[str, Any]:
        batch = batch or self.gen.collect()
        wall = time.monotonic() - self.t
        cpu = self.head.cpu_s() - self.cpu
        # Beats the daemon took in (on the beat channel not every one is answered).
        beats = batch.counters["sent"] - self.counters["sent"]
        answered = batch.counters["answered"] - self.counters["answered"]
        grown = self.head.db_size().logical_bytes - self.db.logical_bytes
        gen_share = max((cpu_seconds(p) - c) / wall for p, c in zip(self.gen.pids, self.gen_cpu, strict=True))
        lat = batch.latencies_ms
        return {
            "seconds": _round(wall, 2), "heartbeats": beats, "heartbeats_answered": answered,
            "heartbeat_p50_ms": _round(percentile(lat, 50), 2),
            "heartbeat_p99_ms": _round(percentile(lat, 99), 2),
            "heartbeat_max_ms": _round(max(lat) if lat else None, 2),
            "heartbeat_mean_ms": _round(statistics.fmean(lat) if lat else None, 2),
            "daemon_cpu_s": _round(cpu), "daemon_cpu_share": _round(cpu / wall),
            "daemon_cpu_ms_per_heartbeat": _round(1000 * cpu / beats if beats else None, 4),
            "db_growth_bytes": grown,
            "db_growth_mb_per_hour": _round(grown / 1e6 / wall * 3600, 1),
            "db_file_bytes": self.head.db_size().file_bytes,
            "daemon_rss_mb": _round(self.head.rss_bytes() / 2**20, 1),
            "generator_cpu_share_max": _round(gen_share, 2),
            "reregisters": batch.counters["reregisters"] - self.counters["reregisters"],
        }


def hold(head: HeadNode, seconds: float) -> None:
    """Let the fleet run for `seconds`, checking that the daemon lives."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not head.alive():
            raise PhaseFailed(f"the daemon died: {head.log_tail(800)}")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def job_spec(name: str, nodes: int, checkpoints: Path) -> dict[str, Any]:
    """A job the simulated agents "run": never started for real, so any entrypoint does."""
    return {"name": name, "entrypoint": ["python", "-c", "pass"],
            "nodes": {"min": 1, "max": nodes}, "nproc_per_node": 1,
            "checkpoint": {"uri": str(checkpoints / name), "every_steps": 50, "keep": 2},
            "global_batch_size": 4096}


def everyone_on(gen: LoadGenerator, wanted: dict[str, int]) -> list | None:
    """The live agents' holdings once, for each job in `wanted`, exactly that many live agents
    hold one and the same generation of it; else None."""
    held = [h for h in gen.assignments() if not h.silent]
    for job_id, count in wanted.items():
        on = [h for h in held if h.job_id == job_id]
        if len(on) != count or len({h.generation for h in on}) != 1:
            return None
    return held


def run_fleet(n: int, cfg: ScaleConfig, work: Path) -> dict[str, Any]:
    """Every phase at fleet size `n`; the figures (an "error" entry if a phase failed)."""
    result: dict[str, Any] = {"nodes": n}
    head = HeadNode.start(work, DaemonSettings(heartbeat_interval_s=cfg.heartbeat_interval_s,
                                               lease_s=cfg.lease_s))
    try:
        creds = head.credentials
        settings = AgentSettings(address=head.address, agent_token=creds.agent_token,
                                 ca_pem=creds.ca_file.read_bytes(), unary=cfg.unary,
                                 stream=cfg.stream,
                                 progress_interval_s=cfg.progress_interval_s)
        with LoadGenerator(settings, nodes=n, processes=cfg.processes) as gen, \
                Client(head.address, token=creds.client_token, ca_file=creds.ca_file) as client:
            try:
                _phases(n, cfg, head, gen, client, work, result)
            except (PhaseFailed, GeneratorError, SpotwiseError) as exc:
                # The figures of the phases before stay; the later phases are skipped.
                result["error"] = f"{type(exc).__name__}: {exc}"
            final = gen.collect()
            result["reregisters"] = final.counters["reregisters"]
            result["reregister_answers"] = final.counters["reregister_answers"]
            result["stream_restarts"] = final.counters["stream_restarts"]
            result["progress_reports"] = final.counters["reports"]
            result["errors"] = dict(final.errors)
        if head.alive():
            result["daemon_peak_rss_mb"] = _round(head.peak_rss_bytes() / 2**20, 1)
    finally:
        head.stop()
    return result


def _phases(n: int, cfg: ScaleConfig, head: HeadNode, gen: LoadGenerator, client: Client,
            work: Path, result: dict[str, Any]) -> None:
    settle = cfg.settle_timeout_s
    # (a) register, then the idle fleet (after one lease: the joins' settle window passes).
    started = time.time()
    result["register_all_s"] = _round(gen.register() - started)
    hold(head, cfg.lease_s)
    beats = gen.collect()
    if not beats.counters["answered"]:
        raise PhaseFailed(f"no heartbeat was answered (failed calls: {dict(beats.errors)}); a "
                          "daemon without the Heartbeats stream needs --unary")
    meter = Meter(head, gen)
    hold(head, cfg.phase_s)
    result["idle"] = meter.figures()

    # (b) one job spanning every node: the rescale burst, then a steady state.
    meter = Meter(head, gen)
    submitted = time.time()
    big = client.submit(job_spec("big", n, work / "ckpt"))
    held = wait_for(lambda: everyone_on(gen, {big: n}), settle, f"job {big} on all {n}", head)
    result["job_start_s"] = _round(max(h.since for h in held) - submitted)
    wait_for(lambda: state_name(client.get(big).state) == "RUNNING", settle,
             f"job {big} RUNNING", head)
    result["job_running_s"] = _round(time.time() - submitted)
    result["burst"] = meter.figures()
    meter = Meter(head, gen)
    hold(head, cfg.phase_s)
    result["job"] = meter.figures()

    # (d) one member goes silent, its connection open.
    if n < 2:
        return
    meter = Meter(head, gen)
    held = gen.assignments()
    victim = next((h for h in held if h.job_id == big and h.rank == n // 2), None)
    if victim is None:
        raise PhaseFailed(f"no agent holds rank {n // 2} of {big}")
    last_beat = gen.silence(victim.node_id)

    def survivors() -> list[float] | None:
        live = [when for _, when, silent in gen.reached(big, victim.generation + 1) if not silent]
        return live if all(when is not None for when in live) else None

    times = wait_for(survivors, cfg.lease_s * 5 + settle, "the next generation everywhere", head)
    result["loss_to_generation_s"] = _round(max(times) - last_beat)
    result["loss_world_size"] = client.get(big).world_size
    result["loss"] = meter.figures()

    # (c) two jobs share the live fleet.
    live = n - 1
    if live < 2:
        return
    client.cancel(big)
    meter = Meter(head, gen)
    submitted = time.time()
    first = client.submit(job_spec("shared-a", live // 2, work / "ckpt"))
    second = client.submit(job_spec("shared-b", live - live // 2, work / "ckpt"))
    held = wait_for(lambda: everyone_on(gen, {first: live // 2, second: live - live // 2}),
                    settle, "both shared jobs on their nodes", head)
    result["share_start_s"] = _round(max(h.since for h in held) - submitted)
    result["share_burst"] = meter.figures()
    meter = Meter(head, gen)
    hold(head, cfg.phase_s)
    result["shared"] = meter.figures()


# ---- the report ------------------------------------------------------------------------------


def headline(run: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures for one N: the idle and steady-job phases' p99, the steady job's CPU
    per heartbeat and database growth (the state a fleet spends its hours in)."""
    job, idle = run.get("job") or {}, run.get("idle") or {}
    growth = job.get("db_growth_mb_per_hour")
    return {
        "heartbeat_p99_ms_idle": idle.get("heartbeat_p99_ms"),
        "heartbeat_p99_ms_job": job.get("heartbeat_p99_ms"),
        "register_all_s": run.get("register_all_s"),
        "loss_to_generation_s": run.get("loss_to_generation_s"),
        "daemon_cpu_ms_per_heartbeat": job.get("daemon_cpu_ms_per_heartbeat"),
        "db_growth_mb_per_hour": growth,
        "db_growth_mb_per_hour_per_1000_nodes":
            None if growth is None else _round(growth * 1000 / run["nodes"], 1),
        "reregisters": run.get("reregisters"),
    }


def met(figures: dict[str, Any], bounds: dict[str, float]) -> dict[str, bool | None]:
    """For each target: whether the figure is within it (None: not measured)."""
    return {k: None if figures.get(k) is None else figures[k] <= bound
            for k, bound in bounds.items()}


COLUMNS = (
    ("N", lambda r: r["nodes"]),
    ("register s", lambda r: r.get("register_all_s")),
    ("idle p50/p99 ms", lambda r: _pair(r, "idle")),
    ("job start s", lambda r: r.get("job_start_s")),
    ("burst p99 ms", lambda r: (r.get("burst") or {}).get("heartbeat_p99_ms")),
    ("job p50/p99 ms", lambda r: _pair(r, "job")),
    ("loss->gen s", lambda r: r.get("loss_to_generation_s")),
    ("shared p50/p99 ms", lambda r: _pair(r, "shared")),
    ("cpu ms/beat", lambda r: (r.get("job") or {}).get("daemon_cpu_ms_per_heartbeat")),
    ("db MB/h", lambda r: (r.get("job") or {}).get("db_growth_mb_per_hour")),
    ("rss MB", lambda r: r.get("daemon_peak_rss_mb")),
    ("gen cpu", lambda r: max((r.get(p) or {}).get("generator_cpu_share_max") or 0
                              for p in ("idle", "job", "shared"))),
    ("rereg", lambda r: r.get("reregisters")),
)


def _pair(run: dict[str, Any], phase: str) -> str:
    figures = run.get(phase) or {}
    return f"{figures.get('heartbeat_p50_ms', '-')}/{figures.get('heartbeat_p99_ms', '-')}"


def table(runs: list[dict[str, Any]]) -> str:
    rows = [[name for name, _ in COLUMNS]]
    rows += [["-" if (v := get(r)) is None else str(v) for _, get in COLUMNS] for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in runs:
        if r.get("error"):
            lines.append(f"N={r['nodes']}: {r['error']}")
        if r.get("errors"):
            lines.append(f"N={r['nodes']}: failed calls {r['errors']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> ScaleConfig:
    cpus = os.cpu_count() or 2
    p = argparse.ArgumentParser(prog="bench/scale.py", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=None,
                   help=f"fleet sizes (default {' '.join(map(str, DEFAULT_NODES))}; --quick: 50)")
    p.add_argument("--processes", type=int, default=4 if cpus >= 8 else 2,
                   help="generator processes, 2-4 (default: 4 with 8+ cores, else 2)")
    p.add_argument("--phase-s", type=float, default=None,
                   help="seconds of each steady phase (default 20; --quick: 5)")
    p.add_argument("--stream", action="store_true",
                   help="beat on the gRPC Heartbeats stream, not the daemon's beat channel")
    p.add_argument("--unary", action="store_true",
                   help="beat with unary Heartbeat calls (older daemons) instead of a stream")
    p.add_argument("--quick", action="store_true", help="a smoke run: N = 50, 5 s phases")
    p.add_argument("--progress-interval-s", type=float, default=0.5,
                   help="rank-0 progress reports every this many seconds (0: none)")
    p.add_argument("--settle-timeout-s", type=float, default=120.0,
                   help="longest wait for a rescale to reach every agent")
    p.add_argument("--keep", action="store_true",
                   help="keep each N's directory (the daemon's log, its database) after a run")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default bench/results/scale.json, scale-quick.json)")
    a = p.parse_args(argv)
    nodes = tuple(a.nodes or ((50,) if a.quick else DEFAULT_NODES))
    if min(nodes) < 1:
        p.error("--nodes must be positive")
    if not 1 <= a.processes <= 16:
        p.error("--processes must be 1-16")
    phase_s = a.phase_s if a.phase_s is not None else (5.0 if a.quick else 20.0)
    if phase_s <= 0 or a.settle_timeout_s <= 0 or a.progress_interval_s < 0:
        p.error("--phase-s and --settle-timeout-s must be positive, --progress-interval-s >= 0")
    out = a.out or ROOT / "bench" / "results" / ("scale-quick.json" if a.quick else "scale.json")
    defaults = DaemonSettings()
    return ScaleConfig(nodes=nodes, processes=a.processes, phase_s=phase_s, unary=a.unary, stream=a.stream,
                       quick=a.quick, heartbeat_interval_s=defaults.heartbeat_interval_s,
                       lease_s=defaults.lease_s, progress_interval_s=a.progress_interval_s,
                       settle_timeout_s=a.settle_timeout_s, out=out, keep=a.keep)


def raise_fd_limit(nodes: int) -> None:
    """Lift the open-files limit (inherited by the daemon and the generators) to its hard cap:
    the daemon holds one socket per agent. SystemExit if even the cap is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = nodes + 512  # the agents' sockets plus the daemon's files, pipes and database
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise SystemExit(f"the open-files hard limit ({hard}) is below the {wanted} that "
                         f"{nodes} agents need: raise it (ulimit -Hn) or use fewer --nodes")
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, through every finally that stops a process.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    raise_fd_limit(max(cfg.nodes))
    signal.signal(signal.SIGTERM, _terminate)
    runs = []
    for n in cfg.nodes:
        work = Path(tempfile.mkdtemp(prefix=f"spotwise-scale-{n}-"))
        print(f"N={n}: daemon and {cfg.processes} generator processes in {work}", flush=True)
        try:
            run = run_fleet(n, cfg, work)
        except Exception as exc:  # one N failing (e.g. the daemon would not start) is reported
            run = {"nodes": n, "error": f"{type(exc).__name__}: {exc}"}
        except (KeyboardInterrupt, SystemExit):
            # run_fleet's finally blocks have stopped the generators and the daemon by now.
            shutil.rmtree(work, ignore_errors=True)
            print(f"N={n}: interrupted; every process it started is stopped", flush=True)
            return 130
        runs.append(run)
        if run.get("error"):
            print(f"N={n}: {run['error']} (daemon log kept in {work})", flush=True)
        elif cfg.keep:
            print(f"N={n}: the daemon's log and database kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(table([run]), flush=True)
    print("\nall fleet sizes:\n" + table(runs))
    top = max(runs, key=lambda r: r["nodes"])
    figures = headline(top)
    bounds = targets(cfg.lease_s)
    report = {
        "benchmark": "scale", "headline_nodes": top["nodes"],
        **{k: figures[k] for k in HEADLINE},
        "db_growth_mb_per_hour_per_1000_nodes": figures["db_growth_mb_per_hour_per_1000_nodes"],
        "met": met(figures, bounds), "targets": bounds,
        "per_n": {str(r["nodes"]): {**headline(r), **r} for r in runs},
        "setup": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                  "agent_protocol": ("unary Heartbeat" if cfg.unary else "Heartbeats stream"
                                     if cfg.stream else "beat channel (TLS frames)"),
                  "daemon": asdict(DaemonSettings(heartbeat_interval_s=cfg.heartbeat_interval_s,
                                                  lease_s=cfg.lease_s)),
                  "daemon_command": "spotwise daemon --config <toml>, provider none, "
                                    "listen 127.0.0.1:0",
                  "register_concurrency_per_process": REGISTER_CONCURRENCY,
                  "tls": True, "tokens": True, "connections": "one per agent",
                  # The daemon runs its default event_loop ("auto": uvloop when installed);
                  # the generators run on uvloop when installed, else asyncio.
                  "event_loop": eventloop.name(),
                  "python": sys.version.split()[0], "cpus": os.cpu_count(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {cfg.out}")
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
