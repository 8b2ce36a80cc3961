"""The rank side of bench/checkpoint.py: what each of the training processes measures.

Every timed training iteration is the same calls whether or not a checkpoint is in flight: the
optimizer step, the checkpointer's poll() (a no-op with nothing pending; with an upload in flight
it commits a finished one), and the control all-reduce that keeps the ranks in lockstep, as the
runtime's end_step makes them. Baseline windows (nothing pending) alternate with upload windows,
so a drift of the machine's speed shows in both.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from cpu_meter import CpuWindow, children_of, threads
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from spotwise.worker.runtime.checkpoint import CheckpointConfig, Checkpointer


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


PARTS = ("step", "poll", "all_reduce")
"""The parts of a timed iteration, timed apart too: where an excess goes."""


def iteration(trainer: Trainer, ck: Checkpointer, parts: list[tuple[float, float, float]] | None = None) -> tuple[float, bool]:
    """One timed training iteration (see the module docstring); returns its duration and
    whether every rank's checkpointer is idle after it. Appends its parts' durations to `parts`."""
    t0 = time.perf_counter()
    trainer.step()
    t1 = time.perf_counter()
    ck.poll()
    t2 = time.perf_counter()
    idle = agreed(ck.pending_step is None)
    t3 = time.perf_counter()
    if parts is not None:
        parts.append((t1 - t0, t2 - t1, t3 - t2))
    return t3 - t0, idle


def mean_parts(parts: list[tuple[float, float, float]]) -> dict[str, float]:
    return {name: round(statistics.mean(p[i] for p in parts), 5) for i, name in enumerate(PARTS)}


def upload_window(trainer: Trainer, ck: Checkpointer, step: int, limit: int,
                  parts: list | None = None) -> tuple[float, list[float]]:
    """Save `step` asynchronously, then iterate until every rank's upload is committed:
    (time blocked in save, each iteration's duration)."""
    dist.barrier()
    t0 = time.perf_counter()
    ck.save(step, trainer.state(), cursor=0, blocking=False)
    blocked = time.perf_counter() - t0
    during = []
    for _ in range(limit):
        dt, idle = iteration(trainer, ck, parts)
        during.append(dt)
        if idle:
            return blocked, during
    raise RuntimeError(f"upload of step {step} not committed after {limit} iterations")


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


def async_saves(r: dict, trainer: Trainer, target: str, uri: str, rank: int, world: int, args,
                meter: CpuWindow | None) -> None:
    """A new checkpointer's first save (new staging buffers; for the first target, DCP's writer
    process starts too), then `repeats` rounds of a baseline window and an upload window."""
    ck = make_checkpointer(uri, rank, world, 0, "process", nice=args.writer_nice)
    for _ in range(2):
        iteration(trainer, ck)  # warm: the loop as the baseline windows run it
    if meter:
        meter.start()
    first_block, first_during = upload_window(trainer, ck, 1, args.max_upload_steps)
    if meter:
        r[f"cpu_first_upload_{target}"] = meter.stop()
    r[f"first_save_block_s_{target}"] = first_block
    r[f"first_upload_steps_{target}"] = len(first_during)
    r[f"first_upload_step_s_{target}"] = statistics.mean(first_during)
    blocks, base, during, cpu_base, cpu_up = [], [], [], [], []
    base_parts: list = []
    up_parts: list = []
    for i in range(args.repeats):
        if meter:
            meter.start()
        window = [iteration(trainer, ck, base_parts)[0] for _ in range(args.steps)]
        if meter:
            cpu_base.append(meter.stop())
            meter.start()
        block, up = upload_window(trainer, ck, 10 + i, args.max_upload_steps, up_parts)
        if meter:
            cpu_up.append(meter.stop())
        base.extend(window)
        blocks.append(block)
        during.extend(up)
    r[f"async_block_s_{target}"] = statistics.median(blocks)
    r[f"async_block_all_s_{target}"] = [round(b, 4) for b in blocks]
    r[f"baseline_step_s_{target}"] = statistics.mean(base)
    r[f"steps_during_upload_{target}"] = len(during)
    r[f"step_s_during_upload_{target}"] = statistics.mean(during)
    r[f"parts_baseline_{target}"] = mean_parts(base_parts)
    r[f"parts_upload_{target}"] = mean_parts(up_parts)
    if meter:
        r[f"cpu_baseline_{target}"] = cpu_base
        r[f"cpu_upload_{target}"] = cpu_up
        writers = children_of([os.getpid()])
        r[f"writer_threads_{target}"] = {str(pid): threads(pid) for pid in writers}
    ck.close()


def sync_saves(r: dict, trainer: Trainer, target: str, uri: str, rank: int, world: int, args) -> None:
    """Blocking saves: the whole save blocks training."""
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


def profiled(fn, top: int = 12) -> list[dict]:
    """Run `fn` under cProfile: its `top` functions by own time (where a restore's time goes)."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = []
    for (path, line, name), (_cc, calls, own, cum, _callers) in rows:
        short = path.split("site-packages/")[-1].split("/spotwise/")[-1]
        out.append({"function": f"{short}:{line}({name})", "calls": calls,
                    "own_s": round(own, 4), "cumulative_s": round(cum, 4)})
    return out


def restores(r: dict, trainer: Trainer, rank: int, world: int, args) -> None:
    """Restore a checkpoint saved at the same 2 ranks and one saved at 4 (resharded on load),
    each with spotwise's Checkpointer.load and with DCP's stock reader (dcp.load with a
    FileSystemReader and its default, distributed planning), in interleaved order."""
    same = make_checkpointer(args.local_uri + "/sync", rank, world, 1, "sync")
    other = make_checkpointer(args.local_uri + "/w4", rank, world, 1, "sync")
    chosen = {}
    for name, ck in (("same", same), ("reshard", other)):
        box = [ck.choose(None) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        chosen[name] = (ck, box[0])

    def spotwise(ck, manifest, state):
        ck.load(state, manifest)

    def stock(ck, manifest, state):
        path = ck.loc.url(ck.loc.join(manifest.data))
        dcp.load(state, storage_reader=dcp.FileSystemReader(path))

    times: dict[str, list[float]] = {}
    for i in range(args.repeats):
        order = [("same", spotwise), ("reshard", spotwise), ("same", stock), ("reshard", stock)]
        if i % 2:
            order.reverse()
        for name, load in order:
            ck, manifest = chosen[name]
            state = trainer.state()
            dist.barrier()
            t0 = time.perf_counter()
            load(ck, manifest, state)
            dist.barrier()
            key = f"restore_{name}_s" if load is spotwise else f"restore_{name}_dcp_stock_s"
            times.setdefault(key, []).append(time.perf_counter() - t0)
    for key, values in times.items():
        r[key] = statistics.median(values)
    for name, load in (("same", spotwise), ("reshard", spotwise), ("reshard", stock)):
        ck, manifest = chosen[name]
        state = trainer.state()
        dist.barrier()
        key = f"profile_restore_{name}" + ("" if load is spotwise else "_dcp_stock")
        if rank == 0:  # rank 0's view; the other rank runs the same collective unprofiled
            r[key] = profiled(lambda ck=ck, manifest=manifest, state=state, load=load: load(ck, manifest, state))
        else:
            load(ck, manifest, state)


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

    pids = [0] * world
    dist.all_gather_object(pids, os.getpid())
    meter = None
    if rank == 0:
        meter = CpuWindow({
            "ranks": lambda: pids,
            "writers": lambda: children_of(pids),  # DCP's writer processes
            "s3_server": lambda: [args.moto_pid],
        })
    r: dict = {"state_mb_per_rank": trainer.local_bytes() / 1e6,
               "cpu_affinity": sorted(os.sched_getaffinity(0))}
    for target, uri in (("s3", args.s3_uri + "/async"), ("local", args.local_uri + "/async")):
        async_saves(r, trainer, target, uri, rank, world, args, meter)
    for target, uri in (("s3", args.s3_uri + "/sync"), ("local", args.local_uri + "/sync")):
        sync_saves(r, trainer, target, uri, rank, world, args)
    per_rank = r["s3_dcp_bytes"] // world
    r["s3_raw_write_s"] = min(raw_upload_seconds(per_rank, rank, args.bucket) for _ in range(2))
    restores(r, trainer, rank, world, args)
    if rank == 0:
        queue.put(r)
    dist.destroy_process_group()


def spawn(world: int, args, env: dict):
    """Run `run_ranks` on `world` fresh processes; rank 0's results (phase "main")."""
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
