"""Checkpoint benchmark: what asynchronous, resharding checkpoints cost a training job.

Two ranks (gloo, CPU) train an FSDP2 MLP whose parameters plus AdamW state exceed 100 MB, and
checkpoint it with spotwise's Checkpointer to a moto S3 server on loopback and to local disk.
Every figure is a ratio against a baseline measured in the same run:

- async_block_over_sync: time training is blocked by one async save (staging) over one sync save,
  to S3 (also reported for local disk);
- step_slowdown_during_upload: mean step time while an async upload runs in the background over
  the mean step time with no checkpoint;
- s3_write_over_raw: DCP write throughput to S3 over a raw boto3 multipart upload of the same
  bytes with the same concurrency;
- reshard_restore_over_same: restore time of a checkpoint saved at 4 ranks over one saved at the
  same 2 ranks (both from local disk, both warm in the page cache).

Prints `name: value` lines and writes bench/results/checkpoint.json.
Run: python bench/checkpoint.py [--hidden 1024 --layers 10 --batch 128]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer

RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint.json"
TARGETS = {
    "async_block_over_sync": ("<=", 0.10),
    "step_slowdown_during_upload": ("<=", 1.15),
    "s3_write_over_raw": (">=", 0.7),
    "reshard_restore_over_same": ("<=", 1.25),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(hidden: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(layers)])


class Trainer:
    """An FSDP2 model, its optimizer and a step function, identical on every rank."""

    def __init__(self, args, world: int) -> None:
        mesh = init_device_mesh("cpu", (world,))
        self.model = build(args.hidden, args.layers)
        for block in self.model:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(args.batch, args.hidden)
        self.step()  # creates the optimizer state

    def step(self) -> None:
        self.model(self.x).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad()

    def state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def local_bytes(self) -> int:
        total = 0
        for t in [*self.model.parameters(), *(v for s in self.opt.state.values() for v in s.values())]:
            if torch.is_tensor(t):
                local = t.to_local() if hasattr(t, "to_local") else t
                total += local.numel() * local.element_size()
        return total


def agreed(flag: bool) -> bool:
    """True on every rank only if true on all (keeps loops in lockstep)."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def timed_steps(trainer: Trainer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.step()
        agreed(True)  # the same control collective the upload loop makes
        out.append(time.perf_counter() - t0)
    return out


def make_checkpointer(uri: str, rank: int, world: int, generation: int, mode: str, nice: int = 10) -> Checkpointer:
    return Checkpointer(
        CheckpointConfig(uri=uri, async_mode=mode, keep=2, io_threads=2, writer_nice=nice),
        rank=rank, world_size=world, generation=generation, device=torch.device("cpu"),
    )


def raw_upload_seconds(nbytes: int, rank: int, bucket: str) -> float:
    """A plain boto3 multipart upload of `nbytes` from this rank, timed across all ranks."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.client("s3")
    payload = io.BytesIO(os.urandom(nbytes))
    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=2)
    dist.barrier()
    t0 = time.perf_counter()
    client.upload_fileobj(payload, bucket, f"raw/rank{rank}", Config=config)
    dist.barrier()
    return time.perf_counter() - t0


def run_ranks(rank: int, world: int, port: int, args, env: dict, queue) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer = Trainer(args, world)
    if args.phase == "save4":
        ck = make_checkpointer(args.local_uri + "/w4", rank, world, 0, "sync")
        ck.save(1, trainer.state(), cursor=0, blocking=True)
        dist.destroy_process_group()
        return

    r: dict = {"state_mb_per_rank": trainer.local_bytes() / 1e6}
    # Baseline step time with no checkpoint at all.
    timed_steps(trainer, 2)
    baseline = timed_steps(trainer, args.steps)
    r["step_s"] = statistics.mean(baseline)

    # Synchronous saves: the whole save blocks training.
    for target, uri in (("s3", args.s3_uri + "/sync"), ("local", args.local_uri + "/sync")):
        ck = make_checkpointer(uri, rank, world, 0, "sync")
        times = []
        for i in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(10 + i, trainer.state(), cursor=0, blocking=True)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        r[f"sync_block_s_{target}"] = statistics.median(times)
        if target == "s3":
            manifest = ck.last_committed
            nbytes = [manifest.bytes if manifest else 0]
            dist.broadcast_object_list(nbytes, src=0)
            r["s3_dcp_bytes"] = nbytes[0]
            r["s3_dcp_write_s"] = min(times)
        ck.close()

    # Asynchronous saves (upload in a background process): blocked time is staging only; the
    # steps that run while the upload goes on show what the upload costs training.
    for target, uri in (("s3", args.s3_uri + "/async"), ("local", args.local_uri + "/async")):
        ck = make_checkpointer(uri, rank, world, 0, "process", nice=args.writer_nice)
        ck.save(1, trainer.state(), cursor=0, blocking=False)  # first save starts the writer process
        ck.wait()
        blocks, during = [], []
        for i in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(10 + i, trainer.state(), cursor=0, blocking=False)
            blocks.append(time.perf_counter() - t0)
            # As the runtime does: a step, then poll() (which commits a finished upload).
            while not agreed(ck.pending_step is None):
                t1 = time.perf_counter()
                trainer.step()
                during.append(time.perf_counter() - t1)
                ck.poll()
        r[f"async_block_s_{target}"] = statistics.median(blocks)
        r[f"steps_during_upload_{target}"] = len(during)
        r[f"step_s_during_upload_{target}"] = statistics.mean(during) if during else float("nan")
        ck.close()

    # Raw boto3 multipart upload of the same bytes, same concurrency per rank.
    per_rank = r["s3_dcp_bytes"] // world
    r["s3_raw_write_s"] = min(raw_upload_seconds(per_rank, rank, args.bucket) for _ in range(2))

    # Restore: saved at the same 2 ranks vs saved at 4 (resharded on load).
    same = make_checkpointer(args.local_uri + "/sync", rank, world, 1, "sync")
    other = make_checkpointer(args.local_uri + "/w4", rank, world, 1, "sync")
    times: dict[str, list[float]] = {"same": [], "reshard": []}
    for _ in range(args.repeats):
        for name, ck in (("same", same), ("reshard", other)):
            manifest = ck.choose(None) if rank == 0 else None
            box = [manifest]
            dist.broadcast_object_list(box, src=0)
            state = trainer.state()
            dist.barrier()
            t0 = time.perf_counter()
            ck.load(state, box[0])
            dist.barrier()
            times[name].append(time.perf_counter() - t0)
    r["restore_same_s"] = statistics.median(times["same"])
    r["restore_reshard_s"] = statistics.median(times["reshard"])
    if rank == 0:
        queue.put(r)
    dist.destroy_process_group()


def spawn(world: int, args, env: dict):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run_ranks, args=(r, world, port, args, env, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = None
    deadline = time.monotonic() + args.timeout
    try:
        if args.phase == "main":
            result = queue.get(timeout=args.timeout)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.exitcode != 0:
                raise RuntimeError(f"rank process exited with {p.exitcode}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return result


MOTO = """
import sys, time
from moto.server import ThreadedMotoServer
s = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
s.start()
print(s.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""


def start_moto():
    """moto's S3 in its own process at nice 10: real S3 does not share the training machine's
    CPUs, so the stand-in should take only what training leaves idle."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: os.nice(10),
    )
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"moto server did not start: {line!r}")
    return proc, "127.0.0.1", int(line)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="baseline steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--writer-nice", type=int, default=CheckpointConfig.writer_nice,
                    help="niceness of the background writer process (the runtime's default)")
    args = ap.parse_args()

    import boto3

    server, host, port = start_moto()
    env = {
        "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "OMP_NUM_THREADS": "1",
    }
    os.environ.update(env)
    args.bucket = "bench"
    boto3.client("s3").create_bucket(Bucket=args.bucket)
    tmp = tempfile.mkdtemp(prefix="spotwise-bench-")
    args.local_uri, args.s3_uri = tmp, f"s3://{args.bucket}/ckpt"
    try:
        args.phase = "save4"
        spawn(4, args, env)
        args.phase = "main"
        r = spawn(2, args, env)
    finally:
        server.kill()
        server.wait(timeout=10)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)

    figures = {
        "async_block_over_sync": r["async_block_s_s3"] / r["sync_block_s_s3"],
        "async_block_over_sync_local": r["async_block_s_local"] / r["sync_block_s_local"],
        "step_slowdown_during_upload": r["step_s_during_upload_s3"] / r["step_s"],
        "step_slowdown_during_upload_local": r["step_s_during_upload_local"] / r["step_s"],
        "s3_write_over_raw": r["s3_raw_write_s"] / r["s3_dcp_write_s"],
        "reshard_restore_over_same": r["restore_reshard_s"] / r["restore_same_s"],
    }
    state_mb = r["state_mb_per_rank"] * 2
    out = {
        **{k: round(v, 4) for k, v in figures.items()},
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "met": {
            k: (figures[k] <= v if op == "<=" else figures[k] >= v) for k, (op, v) in TARGETS.items()
        },
        "measured": {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
        "setup": {
            "ranks": 2, "backend": "gloo", "params_plus_optimizer_mb": round(state_mb, 1),
            "hidden": args.hidden, "layers": args.layers, "batch": args.batch,
            "storage": "moto S3 server on loopback, and local disk", "torch": torch.__version__,
            "cpus": os.cpu_count(), "writer_nice": args.writer_nice,
        },
    }
    for k, v in figures.items():
        print(f"{k}: {v:.4f}")
    print(f"params_plus_optimizer_mb: {state_mb:.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
