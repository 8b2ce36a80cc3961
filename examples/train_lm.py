"""A small decoder-only transformer language model trained with the spotwise runtime.

The corpus needs no download: the Python standard library's own source files, read as bytes
(a 256-token vocabulary). Runs as it is under torchrun or a spotwise agent:

    torchrun --nproc-per-node=2 examples/train_lm.py --steps 100
    SPOTWISE_CHECKPOINT_URI=/tmp/lm SPOTWISE_CHECKPOINT_EVERY=20 torchrun --nproc-per-node=2 examples/train_lm.py

Kill it and start it again (at any world size that divides the global batch): it resumes from
the newest committed checkpoint with the same data position.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spotwise.worker.runtime import Runtime, run_main
from spotwise.worker.runtime.tracking import MLflowTracker


def load_corpus(max_bytes: int) -> torch.Tensor:
    """The first `max_bytes` of the standard library's top-level modules, in name order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    raw = b"\n".join(chunks)[:max_bytes]
    if len(raw) < 1024:
        raise ValueError(f"the standard library at {stdlib} has too little source to train on")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LanguageModel(nn.Module):
    def __init__(self, *, vocab: int = 256, dim: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in all")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per step at any world size (default: $SPOTWISE_GLOBAL_BATCH_SIZE or 24)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-bytes", type=int, default=2_000_000)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--step-sleep", type=float, default=0.0, help="sleep after each step (demos)")
    p.add_argument("--mlflow-uri", default=None,
                   help="log to this MLflow tracking store (e.g. sqlite:///mlflow.db): one run "
                        "for the job across generations, each step once it is committed")
    p.add_argument("--mlflow-experiment", default="spotwise", help="MLflow experiment name")
    args = p.parse_args()
    logging.basicConfig(level=os.environ.get("SPOTWISE_LOG_LEVEL", "WARNING"))
    global_batch = args.global_batch_size or int(os.environ.get("SPOTWISE_GLOBAL_BATCH_SIZE") or 24)

    torch.manual_seed(args.seed)
    rt = Runtime.from_env(global_batch_size=global_batch, micro_batch_size=args.micro_batch_size, seed=args.seed)
    corpus = load_corpus(args.corpus_bytes)
    n_samples = (len(corpus) - 1) // args.seq_len

    def sample(ids) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.as_tensor(ids) * args.seq_len
        window = corpus[starts[:, None] + torch.arange(args.seq_len + 1)]
        return window[:, :-1].to(rt.device), window[:, 1:].to(rt.device)

    model = LanguageModel(dim=args.dim, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    model = rt.shard(model, blocks=model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = rt.restore(model, optimizer, scheduler)
    tracker = (MLflowTracker.from_env(rt, tracking_uri=args.mlflow_uri,
                                      experiment=args.mlflow_experiment, params=vars(args))
               if args.mlflow_uri else None)
    if rt.rank == 0:
        print(
            f"generation {rt.generation}: world {rt.world_size}, "
            f"{'resumed at step ' + str(start) if start else 'fresh start'}, "
            f"{n_samples} sequences of {args.seq_len} bytes, global batch {global_batch} "
            f"({rt.plan.accumulation_steps} micro-steps of {args.micro_batch_size} per rank)",
            flush=True,
        )
    sampler = rt.sampler(n_samples)

    def loss_of(ids) -> torch.Tensor:
        inputs, targets = sample(ids)
        logits = model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    while rt.step < args.steps:
        loss = rt.train_step(sampler, loss_of, max_grad_norm=1.0)
        if tracker is not None:  # it records the loss itself; anything else goes here
            tracker.log({"lr": scheduler.get_last_lr()[0]})
        if rt.rank == 0 and (rt.step % args.log_every == 0 or rt.step == args.steps):
            print(f"step {rt.step} loss {loss:.4f} world {rt.world_size} generation {rt.generation}", flush=True)
        if args.step_sleep:
            time.sleep(args.step_sleep)
    rt.finish()
    if tracker is not None:
        tracker.finish()


if __name__ == "__main__":
    run_main(main)
