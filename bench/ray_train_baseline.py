"""Ray Train v2 elastic on the benchmark's workload: the baseline of bench/ray_recovery.py.

`TorchTrainer` with `ScalingConfig(num_workers=(1, 3))`, one worker per eligible node
(`resources_per_worker` holds the node's `spotwise_node`), `FailureConfig(max_failures=-1)`,
and its own checkpointing (`ray.train.report` with a checkpoint every N steps, restored from
`ray.train.get_checkpoint()`). The training function is the tiny workload's model and data
(tests/workloads/tiny_train.py) under DDP on gloo, with the global batch fixed at 24 (fewer
workers take more micro-batches). Ray Train's preemption handling is on: when
`ray.train.get_preemption_info()` says a node of the run is being drained, the workers take a
just-in-time checkpoint, as Ray's docs recommend.

Each step, rank 0 appends `step loss generation` to the loss log, and each worker group
writes `step` (with as many ids as rank 0's share of the batch, so that the world size reads
as in the spotwise ledger), `restored` and `committed` records to the ledger: the same files
bench/step_watch.py's StepWatch reads for spotwise.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GLOBAL_BATCH = 24
MICRO_BATCH = 2


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def train_fn(config: dict[str, Any]) -> None:
    """The per-worker training loop (runs in Ray Train's worker actors)."""
    import sys

    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    sys.path.insert(0, config["repo"])
    from tests.workloads.tiny_train import TinyModel, dataset

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # One generation id per worker group, agreed through the process group.
    gen = torch.tensor([int(time.time() * 1000) % 1_000_000_000 if rank == 0 else 0])
    dist.broadcast(gen, 0)
    generation = int(gen.item())
    _append(config["nodes_log"], json.dumps({"generation": generation, "rank": rank,
                                             "node_id": ray.get_runtime_context().get_node_id()}))
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])
        step = int(state["step"])
    if rank == 0:
        _append(config["ledger"], json.dumps({"kind": "restored", "generation": generation,
                                              "step": step}))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = dataset(config["dataset_size"], 16)
    per_rank = GLOBAL_BATCH // world
    accumulation = max(1, per_rank // MICRO_BATCH)
    preempt_saved = False

    def save() -> None:
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(),
                            "step": step}, Path(d) / "state.pt")
            ray.train.report({"step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0
                             else None)
        if rank == 0:
            _append(config["ledger"], json.dumps({"kind": "committed",
                                                  "generation": generation, "step": step}))

    while step < config["steps"]:
        base = (step * GLOBAL_BATCH + rank * per_rank) % (config["dataset_size"] - per_rank)
        optimizer.zero_grad()
        total = 0.0
        for m in range(accumulation):
            idx = slice(base + m * MICRO_BATCH, base + (m + 1) * MICRO_BATCH)
            loss = torch.nn.functional.mse_loss(ddp(x[idx]), y[idx]) / accumulation
            loss.backward()
            total += float(loss)
        optimizer.step()
        step += 1
        if rank == 0:
            _append(config["loss_log"], f"{step} {total!r} {generation}")
            _append(config["ledger"], json.dumps({"kind": "step", "generation": generation,
                                                  "step": step, "ids": [0] * per_rank}))
        if step % config["every"] == 0:
            save()
        elif ray.train.get_preemption_info() is not None and not preempt_saved:
            save()  # a just-in-time checkpoint ahead of the drain's deadline
            preempt_saved = True
        time.sleep(config["step_sleep"])


class RayTrainRun:
    """One TorchTrainer.fit() in a background thread, on the cluster this process is
    connected to."""

    def __init__(self, *, work: Path, repo: Path, steps: int, step_sleep: float, every: int,
                 monitor_interval_s: float | None, resource: str) -> None:
        os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchTrainer
        from ray.train.v2.api.config import ScalingConfig

        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.loss_log, self.ledger = work / "loss.log", work / "ledger.jsonl"
        self.nodes_log = work / "nodes.jsonl"
        scaling: dict[str, Any] = {"num_workers": (1, 3),
                                   "resources_per_worker": {"CPU": 1, resource: 1}}
        if monitor_interval_s is not None:
            scaling["elastic_resize_monitor_interval_s"] = monitor_interval_s
        self.trainer = TorchTrainer(
            train_fn,
            train_loop_config={"repo": str(repo), "steps": steps, "step_sleep": step_sleep,
                               "every": every, "dataset_size": 100_000,
                               "loss_log": str(self.loss_log), "ledger": str(self.ledger),
                               "nodes_log": str(self.nodes_log)},
            scaling_config=ScalingConfig(**scaling),
            run_config=RunConfig(name=f"bench-{os.getpid()}-{int(time.time())}",
                                 storage_path=str(work / "storage"),
                                 failure_config=FailureConfig(max_failures=-1)),
        )
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, daemon=True, name="ray-train-fit")

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # reported by the benchmark, which stops the run anyway
            self.error = e

    def start(self) -> None:
        self._thread.start()

    def node_of_rank(self, rank: int) -> str:
        """The Ray node running `rank` in the newest worker group."""
        rows = [json.loads(line) for line in self.nodes_log.read_text().splitlines()]
        newest = max(r["generation"] for r in rows)
        return next(r["node_id"] for r in rows if r["generation"] == newest and r["rank"] == rank)
