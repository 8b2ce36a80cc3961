"""A tiny, fast training job on the spotwise runtime, for tests.

A two-block MLP regresses a fixed random linear map on a synthetic dataset. Runs under
torchrun or a spotwise agent. Faults for tests: --die-at STEP (SIGKILL itself after that step,
as a lost machine would), --save-full PATH (rank 0 writes the full, unsharded model and optimizer
state after restore or at the end, for bit-exact comparisons). --timeline PATH: every process
appends when its Python started and when its imports were done, and rank 0 when its first step
completed (bench/recovery.py reads these).
"""

from __future__ import annotations

import time

PYTHON_STARTED = time.time()  # before the heavy imports below: what they cost shows apart

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # noqa: E402

from spotwise.worker.runtime import Runtime, run_main  # noqa: E402
from spotwise.worker.runtime.tracking import MLflowTracker  # noqa: E402


def mark(path: str | None, event: str, **fields) -> None:
    """Append one timeline record (one write on an O_APPEND descriptor, so lines stay whole)."""
    if not path:
        return
    record = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyModel(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        # A reduction, not a squeeze: FSDP2 warns about views returned by a wrapped module.
        return self.head(x).sum(-1)


def dataset(size: int, dim: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, dim, generator=g)
    w = torch.randn(dim, generator=g)
    y = x @ w + 0.1 * torch.randn(size, generator=g)
    return x, y


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {"model": model_sd, "optim": optim_sd}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global-batch-size", type=int, default=24)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--dataset-size", type=int, default=100)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--slow-until", default=None,
                   help="apply --step-sleep only until this file exists (a test's faults done)")
    p.add_argument("--ledger", default=None)
    p.add_argument("--die-at", type=int, default=None, help="SIGKILL this process after this step")
    p.add_argument("--die-rank", type=int, default=None, help="only this rank dies (default: all)")
    p.add_argument("--save-full", default=None, help="rank 0 writes the full state here after restore")
    p.add_argument("--save-full-end", default=None, help="rank 0 writes the full state here at the end")
    p.add_argument("--loss-log", default=None, help="rank 0 appends 'step loss' lines here")
    p.add_argument("--mlflow-uri", default=None,
                   help="log to this MLflow tracking store (e.g. sqlite:///mlflow.db): one run "
                        "for the job across generations, each step once it is committed")
    p.add_argument("--mlflow-experiment", default="spotwise", help="MLflow experiment name")
    p.add_argument("--timeline", default=None,
                   help="append JSON lines here: python started, imports done, first step")
    args = p.parse_args()
    mark(args.timeline, "imported", python_started=PYTHON_STARTED, rank=os.environ.get("RANK"))
    logging.basicConfig(level=os.environ.get("SPOTWISE_LOG_LEVEL", "WARNING"))
    if args.ledger:
        os.environ["SPOTWISE_LEDGER"] = args.ledger

    torch.manual_seed(args.seed)
    rt = Runtime.from_env(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size, seed=args.seed)
    model = TinyModel(args.dim)
    model = rt.shard(model, blocks=model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + 0.01 * s))
    rt.restore(model, optimizer, scheduler)
    tracker = (MLflowTracker.from_env(rt, tracking_uri=args.mlflow_uri,
                                      experiment=args.mlflow_experiment, params=vars(args))
               if args.mlflow_uri else None)
    if args.save_full:
        save_full(rt, model, optimizer, args.save_full)
    x, y = dataset(args.dataset_size, args.dim)
    sampler = rt.sampler(args.dataset_size)
    def loss_of(ids):
        idx = torch.as_tensor(ids)
        return nn.functional.mse_loss(model(x[idx]), y[idx])

    if args.loss_log:
        # In end_step, before the step can be saved: a process stopped there (a SIGTERM, the
        # hold after a requested checkpoint) has logged the step its checkpoint holds, which
        # the next generation will not run again.
        def log_loss(step: int, loss: float) -> None:
            with open(args.loss_log, "a") as f:
                f.write(f"{step} {loss!r} {rt.generation}\n")

        rt.add_step_listener(log_loss)
    first = True
    while rt.step < args.steps:
        rt.train_step(sampler, loss_of)
        if first and rt.rank == 0:
            mark(args.timeline, "first_step", step=rt.step, world_size=rt.world_size,
                 generation=rt.generation)
        first = False
        if tracker is not None:  # it records the loss itself; anything else goes here
            tracker.log({"lr": scheduler.get_last_lr()[0]})
        if args.step_sleep and not (args.slow_until and os.path.exists(args.slow_until)):
            time.sleep(args.step_sleep)
        if args.die_at is not None and rt.step == args.die_at and args.die_rank in (None, rt.rank):
            os.kill(os.getpid(), signal.SIGKILL)
    if args.save_full_end:
        save_full(rt, model, optimizer, args.save_full_end)
    rt.finish()
    if tracker is not None:
        tracker.finish()


def save_full(rt: Runtime, model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    # Collective (full_state_dict gathers); only rank 0 writes.
    state = full_state(model, optimizer)
    if rt.rank == 0:
        torch.save({"step": rt.step, "cursor": rt.cursor, **state}, path)


if __name__ == "__main__":
    run_main(main)
