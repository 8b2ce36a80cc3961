"""The training runtime: what a training script calls to survive rescales.

A script builds a Runtime from the torchrun environment plus spotwise's own settings, shards its
model, restores, and then for every optimizer step reads `micro_batches()` and calls
`end_step(loss)`. The runtime keeps the global batch fixed across world sizes, checkpoints
asynchronously every N steps, takes an emergency checkpoint on request (SIGUSR1 or
`request_checkpoint()`) and on SIGTERM (then exits 143), and reports to its agent. Under an
agent, a checkpoint it asked for is followed by a hold until the rescale it was for (`hold`).

    rt = Runtime.from_env(global_batch_size=48, micro_batch_size=4, seed=0)
    model = rt.shard(model, blocks=model.blocks)
    optimizer = torch.optim.AdamW(model.parameters())
    rt.restore(model, optimizer, scheduler)
    sampler = rt.sampler(len(dataset))
    while rt.step < total_steps:
        rt.train_step(sampler, lambda ids: loss_fn(model(inputs[ids]), targets[ids]))
    rt.finish()

`train_step` is micro_batches(), forward/backward per micro-batch, the optimizer step and
end_step(); a script that needs its own loop calls those itself.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

from spotwise.worker.runtime.batching import BatchPlan
from spotwise.worker.runtime.checkpoint import (
    Checkpointer,
    CheckpointError,
    Manifest,
    newest_generation,
)
from spotwise.worker.runtime.config import RuntimeConfig, env_int
from spotwise.worker.runtime.events import EventLog
from spotwise.worker.runtime.hold import Flags, hold
from spotwise.worker.runtime.ledger import Ledger
from spotwise.worker.runtime.sampler import GlobalSampler
from spotwise.worker.runtime.sharding import shard_model
from spotwise.worker.runtime.storage import filesystem, parse_uri

log = logging.getLogger("spotwise.runtime")

# Exit code of a process stopped on request after its emergency checkpoint (128 + SIGTERM).
EXIT_STOPPED = 143


class Runtime:
    """One training process's view of an elastic job. Collective calls must be made by all ranks."""

    def __init__(self, config: RuntimeConfig, *, global_batch_size: int, micro_batch_size: int, seed: int = 0) -> None:
        self.config = config
        self.seed = seed
        # Fail before joining anything if the sizes cannot work at this world size.
        self.plan = BatchPlan.make(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            world_size=config.world_size,
        )
        self.rank = config.rank
        self.world_size = config.world_size
        self.step = 0
        self.cursor = 0
        self.restored_from: Manifest | None = None
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._flags = Flags()
        self._requested_step = -1
        """The step saved on request (SIGUSR1): its commit says so (`requested`)."""
        self._last_progress = (time.monotonic(), 0)
        self._loss_sum = 0.0
        self._loss_n = 0
        self.last_loss = float("nan")
        self.device = self._pick_device()
        self._start_process_group()
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.generation = self._agree_generation()
        self.events = EventLog(config.events_file, generation=self.generation)
        self.ledger = Ledger(config.ledger_file) if config.ledger_file else None
        self.checkpointer: Checkpointer | None = None
        if config.checkpoint is not None:
            self.checkpointer = Checkpointer(
                config.checkpoint,
                rank=self.rank,
                world_size=self.world_size,
                generation=self.generation,
                device=self.device,
                on_commit=self._on_commit,
                on_fenced=self._on_fenced,
                on_failed=self._on_checkpoint_failed,
            )
        self._commit_listeners: list[Callable[[int], None]] = []
        self._step_listeners: list[Callable[[int, float], None]] = []
        # SIGTERM keeps its default action until here: a process still joining the group
        # (a C++ wait that defers Python handlers) must die at once when its agent stops it.
        # SIGUSR1 would kill it too, so the agent sends one only after this `ready` event.
        if self._install_signal_handlers():
            self.events.emit("ready", rank=self.rank)

    @property
    def run_id(self) -> str:
        """The job's id: the same in every generation, so a tracker continues one run with it
        (MLflow's run tag, wandb's `id=`)."""
        return self.config.job_id

    @property
    def global_step(self) -> int:
        """Optimizer steps done in the job's committed history plus this generation's: the
        step to log at (after a restore it is the restored step, so replayed steps repeat)."""
        return self.step

    def add_commit_listener(self, listener: Callable[[int], None]) -> None:
        """Call `listener(step)` on rank 0 after each checkpoint commit (in the training
        thread, inside end_step or finish), e.g. to log metrics only once they are committed."""
        self._commit_listeners.append(listener)

    def add_step_listener(self, listener: Callable[[int, float], None]) -> None:
        """Call `listener(step, loss)` on rank 0 at every end_step, once the step's loss (the
        global batch's mean; NaN when none was given) is known and before the step is saved."""
        self._step_listeners.append(listener)

    @classmethod
    def from_env(cls, *, global_batch_size: int | None = None, micro_batch_size: int, seed: int = 0, **overrides: Any) -> Runtime:
        """Build from the environment. global_batch_size defaults to SPOTWISE_GLOBAL_BATCH_SIZE."""
        config = RuntimeConfig.from_env(**overrides)
        if global_batch_size is None:
            global_batch_size = env_int(os.environ, "SPOTWISE_GLOBAL_BATCH_SIZE")
            if global_batch_size is None:
                raise ValueError("no global batch size: pass global_batch_size or set SPOTWISE_GLOBAL_BATCH_SIZE")
        return cls(config, global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, seed=seed)

    # ----- setup

    def _pick_device(self) -> torch.device:
        if torch.cuda.is_available() and self.config.backend in (None, "nccl", "cpu:gloo,cuda:nccl"):
            torch.cuda.set_device(self.config.local_rank)
            return torch.device("cuda", self.config.local_rank)
        return torch.device("cpu")

    def _start_process_group(self) -> None:
        if dist.is_initialized():
            return
        backend = self.config.backend
        if backend is None:
            # CPU collectives stay on gloo even with GPUs: async checkpoints and the per-step
            # control all-reduce use CPU tensors.
            backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ and self.world_size == 1:
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            backend=backend,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=self.config.collective_timeout_s),
        )

    def _agree_generation(self) -> int:
        """The generation is the daemon's; standalone, it is one past the newest in storage."""
        if self.config.generation is not None:
            return self.config.generation
        gen = [0]
        if self.rank == 0 and self.config.checkpoint is not None:
            loc = parse_uri(self.config.checkpoint.uri)
            gen = [newest_generation(filesystem(loc), loc) + 1]
        dist.broadcast_object_list(gen, src=0)
        return int(gen[0])

    def _install_signal_handlers(self) -> bool:
        """SIGUSR1 (checkpoint), SIGTERM (checkpoint, then exit 143) and SIGUSR2 (the agent's
        request is over: see `hold`) set flags that the next step boundary acts on. Returns
        False when they cannot be installed (not the main thread)."""

        def on_signal(signum: int, _frame: Any) -> None:
            if signum == signal.SIGUSR2:
                self._flags.resume = True
                return
            if signum == signal.SIGTERM:
                self._flags.stop = True
            else:  # a new request: an earlier one's end no longer counts
                self._flags.requested, self._flags.resume = True, False
            self._flags.checkpoint = True

        try:
            signal.signal(signal.SIGUSR1, on_signal)
            signal.signal(signal.SIGUSR2, on_signal)
            signal.signal(signal.SIGTERM, on_signal)
        except ValueError:
            log.warning("not in the main thread: SIGTERM/SIGUSR1 checkpoints disabled")
            return False
        return True

    # ----- model

    def shard(self, model: nn.Module, *, blocks: Any) -> nn.Module:
        """FSDP2-shard `model` over this generation's ranks (each of `blocks`, then the root)."""
        return shard_model(model, mesh=self.mesh, blocks=blocks, device=self.device)

    def sampler(self, dataset_size: int) -> GlobalSampler:
        return GlobalSampler(dataset_size=dataset_size, seed=self.seed)

    def _state(self) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None, "call restore() first"
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        trainer: dict[str, Any] = {
            "step": self.step,
            "cursor": self.cursor,
            "rng_cpu": torch.get_rng_state(),
        }
        if self.scheduler is not None:
            trainer["scheduler"] = self.scheduler.state_dict()
        return {"model": model_sd, "optim": optim_sd, "trainer": trainer}

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> int:
        """Restore the chosen committed checkpoint, resharded to this world size (collective).

        Returns the step to continue from (0 for a fresh start). Raises CheckpointError when the
        requested checkpoint is torn or unreadable.
        """
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        manifest = None
        if self.checkpointer is not None:
            choice: list[Any] = [None]
            if self.rank == 0:
                try:
                    choice = [self.checkpointer.choose(self.config.restore_step)]
                except CheckpointError as exc:
                    choice = [exc]
            dist.broadcast_object_list(choice, src=0)
            if isinstance(choice[0], Exception):
                raise CheckpointError(str(choice[0]))
            manifest = choice[0]
        if manifest is not None:
            state = self._state()
            self.checkpointer.load(state, manifest)
            set_state_dict(
                model,
                optimizer,
                model_state_dict=state["model"],
                optim_state_dict=state["optim"],
            )
            trainer = state["trainer"]
            self.step, self.cursor = int(trainer["step"]), int(trainer["cursor"])
            if (self.step, self.cursor) != (manifest.step, manifest.cursor):
                raise CheckpointError(
                    f"checkpoint step {manifest.step} holds step {self.step} cursor {self.cursor}, "
                    f"its manifest says cursor {manifest.cursor}"
                )
            torch.set_rng_state(trainer["rng_cpu"])
            if scheduler is not None and "scheduler" in trainer:
                scheduler.load_state_dict(trainer["scheduler"])
            self.restored_from = manifest
        self._last_progress = (time.monotonic(), self.step)
        if self.rank == 0:
            # Storage chose the restore point (see spotwise.worker.runtime.commits); this report is
            # where the generation really starts: the daemon counts lost steps from it.
            self.events.emit(
                "restored", step=self.step, world_size=self.world_size,
                requested=self.config.restore_step,
                from_generation=manifest.generation if manifest is not None else None,
            )
            if self.ledger:
                self.ledger.restored(generation=self.generation, step=self.step)
        log.info(
            "rank %d generation %d: %s at world size %d",
            self.rank,
            self.generation,
            f"restored step {self.step}" if manifest else "fresh start",
            self.world_size,
        )
        return self.step

    # ----- the step loop

    def micro_batches(self, sampler: GlobalSampler) -> list[np.ndarray]:
        """This rank's sample indices for the current step, one array per micro-step."""
        window = sampler.rank_window(
            cursor=self.cursor,
            global_batch_size=self.plan.global_batch_size,
            rank=self.rank,
            world_size=self.world_size,
        )
        if self.ledger:
            self.ledger.step(generation=self.generation, step=self.step + 1, rank=self.rank, ids=window)
        m = self.plan.micro_batch_size
        return [window[i : i + m] for i in range(0, len(window), m)]

    def request_checkpoint(self) -> None:
        """Take a checkpoint at the next step boundary (all ranks agree on which)."""
        self._flags.checkpoint = True

    def train_step(self, sampler: GlobalSampler, loss_of: Callable[[np.ndarray], torch.Tensor], *, max_grad_norm: float | None = None) -> float:
        """One optimizer step over the global batch (collective); returns its mean loss.

        `loss_of(ids)` returns the mean loss over the samples `ids` (one micro-batch). Gradients
        are accumulated over this rank's micro-steps and reduced across ranks once, at the last.
        """
        assert self.model is not None and self.optimizer is not None, "call restore() first"
        micro = self.micro_batches(sampler)
        total = 0.0
        for i, ids in enumerate(micro):
            self.model.set_requires_gradient_sync(i == len(micro) - 1)
            loss = loss_of(ids) / len(micro)
            loss.backward()
            total += float(loss.detach())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()
        self.end_step(total)
        return self.last_loss

    def end_step(self, loss: float | torch.Tensor | None = None) -> None:
        """Call after each optimizer step (collective). May save, commit, or exit with 143.

        `loss` is this rank's mean loss over its share of the batch; `last_loss` becomes the
        mean over all ranks (the global batch's), the same at any world size.
        """
        self.step += 1
        self.cursor += self.plan.global_batch_size
        # One small all-reduce per step makes every rank agree on requests that reached only
        # some of them (a signal to one node), so they save at the same step; the loss rides along.
        flags = torch.tensor(
            [float(self._flags.checkpoint), float(self._flags.stop), float(loss or 0.0),
             float(self._flags.requested)], dtype=torch.float64
        )
        dist.all_reduce(flags)
        want_checkpoint, want_stop = bool(flags[0] > 0), bool(flags[1] > 0)
        requested = bool(flags[3] > 0)
        if requested:
            self._requested_step = self.step
        want_hold = requested and not want_stop and self.config.request_hold_s > 0
        self._flags.checkpoint = self._flags.requested = False
        if loss is not None:
            self.last_loss = float(flags[2]) / self.world_size
            self._loss_sum += self.last_loss
            self._loss_n += 1
        if self.rank == 0:
            for listener in self._step_listeners:
                listener(self.step, self.last_loss if loss is not None else float("nan"))
        committed = False
        if self.checkpointer is not None:
            self.checkpointer.poll()
            every = self.checkpointer.config.every_steps
            if want_checkpoint or want_stop:
                committed = self._save(blocking=True)
            elif every and self.step % every == 0:
                self._save(blocking=False)
        self._maybe_progress(force=want_hold)
        # A stop during the hold exits below: the step is committed already.
        want_stop = want_stop or (want_hold and hold(
            self._flags, rank=self.rank, committed=committed, timeout_s=self.config.request_hold_s))
        if want_stop:
            log.info("rank %d: stop requested, exiting after step %d", self.rank, self.step)
            self._shutdown()
            sys.exit(EXIT_STOPPED)

    def _save(self, *, blocking: bool) -> bool:
        """Save this step; True when a blocking save committed (known on rank 0)."""
        assert self.checkpointer is not None
        return self.checkpointer.save(self.step, self._state(), cursor=self.cursor, blocking=blocking)

    def _maybe_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        t0, s0 = self._last_progress
        if not force and now - t0 < self.config.progress_interval_s:
            return
        if self.rank == 0 and self.step > s0:
            rate = (self.step - s0) * self.plan.global_batch_size / max(now - t0, 1e-9)
            loss = self._loss_sum / self._loss_n if self._loss_n else float("nan")
            self.events.emit(
                "progress", step=self.step, loss=loss, samples_per_second=rate, world_size=self.world_size
            )
        self._last_progress = (now, self.step)
        self._loss_sum, self._loss_n = 0.0, 0

    def _on_commit(self, manifest: Manifest) -> None:
        self.events.emit(
            "checkpoint_committed",
            step=manifest.step,
            path=f"{self.checkpointer.loc.uri.rstrip('/')}/{manifest.data}",
            bytes=manifest.bytes,
            cursor=manifest.cursor,
            requested=manifest.step == self._requested_step,
        )
        if self.ledger:
            self.ledger.committed(generation=self.generation, step=manifest.step)
        for listener in self._commit_listeners:
            listener(manifest.step)

    def _on_fenced(self, step: int, reason: str) -> None:
        self.events.emit("fenced", step=step, reason=reason)

    def _on_checkpoint_failed(self, step: int, reason: str) -> None:
        self.events.emit("checkpoint_failed", step=step, reason=reason)

    def finish(self) -> None:
        """Training is done: save and commit the final step, report, leave the group."""
        if self.checkpointer is not None:
            self._save(blocking=True)
        self._maybe_progress(force=True)
        if self.rank == 0:
            self.events.emit("finished", step=self.step)
        self._shutdown()

    def _shutdown(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.events.close()
        if self.ledger:
            self.ledger.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_main(main: Any) -> None:
    """Run a training script's main() so that bad input ends in one clear line, not a traceback.

    A bad setting (ValueError), an unusable checkpoint or unreachable storage exit with code 2
    and ``spotwise: error: <what is wrong>`` on stderr; other exceptions propagate as usual. On
    the way out the process group is destroyed and the process exits at once with the script's
    code (atexit handlers do not run).
    """
    from spotwise.worker.runtime.storage import StorageError

    code = 0
    try:
        main()
    except (ValueError, CheckpointError, StorageError) as exc:
        print(f"spotwise: error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except SystemExit as exc:  # e.g. 143 after a SIGTERM checkpoint
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold tensors then, and
    # releasing them without a live interpreter aborts the process (SIGABRT, "terminate called
    # without an active exception"), turning a finished rank into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
