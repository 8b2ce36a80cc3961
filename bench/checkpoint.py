"""Checkpoint benchmark: what asynchronous, resharding checkpoints cost a training job.

Two ranks (gloo, CPU) train an FSDP2 MLP whose parameters plus AdamW state exceed 100 MB, and
checkpoint it with spotwise's Checkpointer to a moto S3 server on loopback and to local disk.
Every figure is a ratio against a baseline measured in the same run (bench/checkpoint_ranks.py
says what each rank times); each run starts fresh processes, `--runs` runs are made, every run
is kept in the JSON and each figure is reported as its median with its spread:

- async_block_over_sync: time training is blocked by one steady-state async save (staging) over
  one sync save, to S3 (also for local disk); `first_save_block_s` is the first save of a new
  generation's processes (DCP's writer process starting, staging memory allocated), which every
  generation pays once, reported beside it;
- step_slowdown_during_upload: mean iteration time while an async upload runs in the background
  over the mean iteration time with nothing pending, the same calls timed in both (step, poll,
  control all-reduce), baseline and upload windows alternating; also for the first upload;
- s3_write_over_raw: DCP write throughput to S3 over a raw boto3 multipart upload of the same
  bytes with the same concurrency;
- reshard_restore_over_same: restore time of a checkpoint saved at 4 ranks over one saved at the
  same 2 ranks (both from local disk, both warm in the page cache);
- dcp_stock_restore_over_spotwise: DCP's stock restore (dcp.load with its FileSystemReader and
  distributed planning) over spotwise's (Checkpointer.load), same and resharded.

moto stands for a remote S3, which takes none of the training machine's CPU. Placements
(`--s3-placement`, each run in turn, the first that can run is the headline):
- pinned: moto on a core of its own, the training (ranks and their writer processes) on the
  others; needs 3 CPUs (two ranks need two cores), so it is skipped on a 2-core machine;
- idle: moto anywhere under SCHED_IDLE, so it runs only on CPU time nothing else wants (its
  work then shows as longer uploads, not slower steps);
- shared: moto anywhere at nice 10, taking what the scheduler gives it.
In each, the CPU every party took during the upload windows is reported (`s3_server_share`,
`writers_share`, `ranks_share`, and `others_share`: processes outside the benchmark).

Prints `name: median (min-max)` lines and writes bench/results/checkpoint.json.
Run: python bench/checkpoint.py [--runs 3 --s3-placement pinned,idle,shared]
(the default: 3 runs of each placement that can run; on a 2-core machine idle and shared)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from checkpoint_ranks import spawn
from repeats import judged, summarize_runs

from spotwise.worker.runtime.checkpoint import CheckpointConfig

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint.json"
TARGETS = {
    "async_block_over_sync": ("<=", 0.10),
    "step_slowdown_during_upload": ("<=", 1.15),
    "s3_write_over_raw": (">=", 0.7),
    "reshard_restore_over_same": ("<=", 1.25),
}
PLACEMENTS = ("pinned", "idle", "shared")

MOTO = """
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


def split_cpus(placement: str) -> tuple[set[int] | None, set[int] | None]:
    """(moto's CPUs, the training's CPUs) for a placement; None leaves affinity as it is."""
    if placement != "pinned":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[-1]}, set(cpus[:-1])


def pinned_refusal() -> str | None:
    """Why the pinned placement cannot run here, or None. Two ranks need two cores of their
    own: on fewer, pinning moto away would halve the training's CPU and starve its nice-19
    writer (measured: an upload did not finish in 2,000 iterations), which compares nothing."""
    cpus = len(os.sched_getaffinity(0))
    if cpus < 3:
        return f"needs 3 CPUs (one for moto, two for the ranks); this machine lets us use {cpus}"
    return None


def start_moto(placement: str, cpus: set[int] | None):
    """moto's S3 in its own process: at nice 10 (on `cpus` if given), or under SCHED_IDLE for
    the idle placement. Its threads inherit both from the process (set before exec), so the
    whole server keeps them."""

    def place() -> None:
        if placement == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.nice(10)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    # Its request log would drown the figures.
    proc = subprocess.Popen([sys.executable, "-c", MOTO], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=place)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"moto server did not start: {line!r}")
    return proc, "127.0.0.1", int(line)


def one_run(args, placement: str) -> dict:
    """One run in fresh processes (moto, then 4 ranks saving the reshard source, then 2 ranks
    measuring); returns rank 0's measurements."""
    import boto3

    moto_cpus, train_cpus = split_cpus(placement)
    before = os.sched_getaffinity(0)
    server, host, port = start_moto(placement, moto_cpus)
    env = {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update(env)
    args.bucket, args.moto_pid = "bench", server.pid
    boto3.client("s3").create_bucket(Bucket=args.bucket)
    tmp = tempfile.mkdtemp(prefix="spotwise-bench-")
    args.local_uri, args.s3_uri = tmp, f"s3://{args.bucket}/ckpt"
    try:
        if train_cpus is not None:
            os.sched_setaffinity(0, train_cpus)  # the ranks and their writers inherit it
        args.phase = "save4"
        spawn(4, args, env)
        args.phase = "main"
        return spawn(2, args, env)
    finally:
        os.sched_setaffinity(0, before)
        server.kill()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def figures(r: dict) -> dict:
    """A run's figures from rank 0's measurements."""
    up = r["cpu_upload_s3"]
    wall = sum(w["wall_s"] for w in up)
    return {
        "async_block_over_sync": r["async_block_s_s3"] / r["sync_block_s_s3"],
        "async_block_over_sync_local": r["async_block_s_local"] / r["sync_block_s_local"],
        "first_save_block_s": r["first_save_block_s_s3"],
        "steady_save_block_s": r["async_block_s_s3"],
        "first_save_block_s_local": r["first_save_block_s_local"],
        "steady_save_block_s_local": r["async_block_s_local"],
        "step_slowdown_during_upload": r["step_s_during_upload_s3"] / r["baseline_step_s_s3"],
        "step_slowdown_during_upload_local": r["step_s_during_upload_local"] / r["baseline_step_s_local"],
        "step_slowdown_during_first_upload": r["first_upload_step_s_s3"] / r["baseline_step_s_s3"],
        "s3_write_over_raw": r["s3_raw_write_s"] / r["s3_dcp_write_s"],
        "reshard_restore_over_same": r["restore_reshard_s"] / r["restore_same_s"],
        "dcp_stock_restore_over_spotwise": r["restore_same_dcp_stock_s"] / r["restore_same_s"],
        "dcp_stock_restore_over_spotwise_reshard": r["restore_reshard_dcp_stock_s"] / r["restore_reshard_s"],
        "dcp_stock_reshard_over_same": r["restore_reshard_dcp_stock_s"] / r["restore_same_dcp_stock_s"],
        "baseline_step_s": r["baseline_step_s_s3"],
        # Who took the CPU while uploads to S3 ran (shares of all the machine's cores).
        "s3_server_share": sum(w["s3_server_cpu_s"] for w in up) / (wall * os.cpu_count()),
        "writers_share": sum(w["writers_cpu_s"] for w in up) / (wall * os.cpu_count()),
        "ranks_share": sum(w["ranks_cpu_s"] for w in up) / (wall * os.cpu_count()),
        "ranks_share_baseline": (sum(w["ranks_cpu_s"] for w in r["cpu_baseline_s3"])
                                 / (sum(w["wall_s"] for w in r["cpu_baseline_s3"]) * os.cpu_count())),
        # Processes outside the benchmark: above a few percent, the run is not on a quiet machine.
        "others_share": sum(w["others_cpu_s"] for w in up) / (wall * os.cpu_count()),
        "others_share_baseline": (sum(w["others_cpu_s"] for w in r["cpu_baseline_s3"])
                                  / (sum(w["wall_s"] for w in r["cpu_baseline_s3"]) * os.cpu_count())),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="iterations per baseline window")
    ap.add_argument("--repeats", type=int, default=3, help="saves / restores per kind and run")
    ap.add_argument("--runs", type=int, default=3, help="runs (fresh processes) per placement")
    ap.add_argument("--s3-placement", default="pinned,idle,shared",
                    help="comma-separated, in order: pinned (moto on a core of its own), idle "
                         "(SCHED_IDLE), shared (anywhere, nice 10); the first that runs is the headline")
    ap.add_argument("--max-upload-steps", type=int, default=2000,
                    help="an upload not committed after this many iterations fails the run")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--writer-nice", type=int, default=CheckpointConfig.writer_nice,
                    help="niceness of the background writer process (the runtime's default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    placements = [p.strip() for p in args.s3_placement.split(",") if p.strip()]
    bad = [p for p in placements if p not in PLACEMENTS]
    if bad or not placements or args.runs < 1:
        ap.error(f"--s3-placement takes {', '.join(PLACEMENTS)} (got {args.s3_placement!r}); --runs >= 1")

    started = time.time()
    out: dict = {"placements": {}}
    for placement in list(placements):
        refusal = pinned_refusal() if placement == "pinned" else None
        if refusal:
            print(f"[{placement}] skipped: {refusal}", flush=True)
            out["placements"][placement] = {"skipped": refusal}
            placements.remove(placement)
            continue
        runs = []
        for i in range(args.runs):
            r = one_run(args, placement)
            runs.append({"figures": {k: round(v, 4) for k, v in figures(r).items()},
                         "measured": r})
            print(f"[{placement} run {i + 1}/{args.runs}] " + ", ".join(
                f"{k} {runs[-1]['figures'][k]}" for k in TARGETS), flush=True)
        medians = summarize_runs([run["figures"] for run in runs])
        out["placements"][placement] = {"figures": medians, "met": judged(medians, TARGETS),
                                        "runs": runs}
    if not placements:
        raise SystemExit("no placement could run: " + json.dumps(out["placements"]))
    headline = out["placements"][placements[0]]
    out = {
        "headline_placement": placements[0],
        "figures": headline["figures"],
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "met": headline["met"],
        **out,
        "setup": {
            "ranks": 2, "backend": "gloo", "hidden": args.hidden, "layers": args.layers,
            "batch": args.batch, "runs": args.runs, "repeats": args.repeats,
            "baseline_window_steps": args.steps,
            "params_plus_optimizer_mb": round(headline["runs"][0]["measured"]["state_mb_per_rank"] * 2, 1),
            "storage": "moto S3 server (ThreadedMotoServer, its own process) on loopback, and local disk",
            "s3_placement": {
                "pinned": "moto at nice 10 on the last CPU alone; the ranks and their DCP writer processes on the others",
                "idle": "no CPU affinity; moto under SCHED_IDLE (only CPU time nothing else wants)",
                "shared": "no CPU affinity: moto, ranks and writers anywhere (moto at nice 10)",
            },
            "timed_iteration": "optimizer step + Checkpointer.poll() + control all-reduce, in baseline and upload windows alike",
            "first_save": "the first save of a new Checkpointer in new processes: DCP's writer process starts (S3, the first target) and staging buffers are allocated; local's first save reuses the writer process",
            "s3_placements_run": placements,
            "torch": torch.__version__, "cpus": os.cpu_count(), "writer_nice": args.writer_nice,
            "wall_s": round(time.time() - started, 1),
        },
    }
    for name, s in headline["figures"].items():
        print(f"{name}: {s['median']} ({s['min']}-{s['max']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
