"""Asynchronous DCP checkpoints that reshard on restore and exist only once committed.

Layout under the checkpoint URI::

    data/step-0000000120-g3/                   DCP files of step 120 written by generation 3
    manifests/step-0000000120-g0000000003.json the commit: rank 0 writes it create-only, last
    generations/g-0000000004                   fence markers: one per generation that started

A checkpoint without a visible manifest does not exist. The manifest lists every data file with
its size, so a torn checkpoint (a shard missing or truncated) is never restored. A manifest is
written create-only and its key carries the generation (the fencing token): whether it is
visible is decided by the fence markers alone, by a rule that no pause, partition or crash of
the committer can get around (see `spotwise.worker.runtime.fencing`, whose docstring gives the argument).
Storage, not the daemon, decides the restore point: the newest visible valid commit.

An asynchronous save is two futures, as in torchtitan: staging (a copy of the state into CPU
memory, which blocks training briefly) and upload (run by DCP in a background process or thread).
The previous upload is always waited on before the next save and at close. Pruning after a
commit is a third future on a thread of its own (a dozen storage calls, 0.19 s of a 0.25 s commit
on loopback S3, that rank 0 would spend in a step while the other ranks wait), waited on likewise.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from spotwise.worker.runtime.commits import Commits
from spotwise.worker.runtime.dcp_reader import LocalReader, RemoteReader
from spotwise.worker.runtime.dcp_safety import refusal_in
from spotwise.worker.runtime.fencing import (
    FenceError,
    list_manifests,
    manifest_name,
    newest_generation,
    read_fences,
    visible,
    write_fence,
)
from spotwise.worker.runtime.manifest import (
    CheckpointError,
    Manifest,
    data_dir_name,
    describe,
)
from spotwise.worker.runtime.storage import (
    AlreadyExists,
    StorageError,
    StorageURI,
    check_reachable,
    filesystem,
    parse_uri,
    storage_options,
    write_create_only,
)

log = logging.getLogger("spotwise.checkpoint")

AsyncMode = Literal["process", "thread", "sync"]


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Where and how often to checkpoint."""

    uri: str
    """fsspec URI of the job's checkpoints: a local path, file:///path or s3://bucket/prefix."""
    every_steps: int = 0
    """Save every N optimizer steps; 0 saves only on request (emergency) and at the end."""
    keep: int = 3
    """Keep the newest K committed checkpoints; older ones are deleted after a newer commit."""
    async_mode: AsyncMode = "process"
    """"process" (upload in a background process, no GIL contention), "thread", or "sync"."""
    io_threads: int = 2
    """Writer threads per rank (one file each)."""
    upload_timeout_s: float = 900.0
    """How long a pending upload may take before it is abandoned as failed."""
    writer_nice: int = 19
    """Niceness of the background writer process (async_mode "process"): the upload takes the
    CPU time training leaves idle rather than slowing the steps (measured by bench/checkpoint.py:
    uploads still finish within a few steps). 0 leaves it as it is."""

    def __post_init__(self) -> None:
        parse_uri(self.uri)
        if self.every_steps < 0:
            raise ValueError(f"checkpoint every_steps must be >= 0, got {self.every_steps}")
        if self.keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {self.keep}")
        if self.async_mode not in ("process", "thread", "sync"):
            raise ValueError(f"checkpoint async_mode must be process, thread or sync, got {self.async_mode!r}")


@dataclass
class _Pending:
    step: int
    cursor: int
    data: str
    started: float
    upload: Future


class Checkpointer:
    """Saves, commits, prunes and restores one job's checkpoints from one rank.

    Every rank of the generation constructs one with the same config and calls save/restore
    collectively; rank 0 alone writes manifests, fence markers and deletions.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        *,
        rank: int,
        world_size: int,
        generation: int,
        device: torch.device,
        on_commit: Callable[[Manifest], None] | None = None,
        on_fenced: Callable[[int, str], None] | None = None,
        on_failed: Callable[[int, str], None] | None = None,
    ) -> None:
        self.config = config
        self.loc: StorageURI = parse_uri(config.uri)
        self.rank = rank
        self.world_size = world_size
        self.generation = generation
        self.device = device
        self.on_commit = on_commit
        self.on_fenced = on_fenced
        self.on_failed = on_failed
        self.commits = Commits(filesystem(self.loc), self.loc)
        self._pending: _Pending | None = None
        self._pruner: ThreadPoolExecutor | None = None
        self._pruning: Future | None = None
        self._reniced = config.writer_nice == 0 or config.async_mode != "process"
        self._stager: DefaultStager | None = None
        self._pg = None
        self.last_saved_step = -1
        self.last_committed: Manifest | None = None
        if rank == 0:
            check_reachable(self.fs, self.loc)
            self.fs.makedirs(self.loc.join("manifests"), exist_ok=True)
            write_fence(self.fs, self.loc, generation)
        if config.async_mode == "thread" and dist.is_initialized():
            # The upload thread runs collectives; a group of its own keeps them from
            # interleaving with the training loop's on the default group.
            self._pg = dist.new_group(backend="gloo")

    @property
    def fs(self):
        """The checkpoint location's filesystem (shared with `commits`)."""
        return self.commits.fs

    @fs.setter
    def fs(self, fs) -> None:  # tests wrap it to pause or fail storage calls
        self.commits.fs = fs

    # ----- paths

    def _manifest_path(self, step: int) -> str:
        return self.loc.join("manifests", manifest_name(step, self.generation))

    def _data_dir(self, step: int) -> str:
        return data_dir_name(step, self.generation)

    # ----- saving

    def _stager_for_mode(self) -> DefaultStager:
        if self._stager is None:
            cuda = self.device.type == "cuda"
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    # The background process reads the staged copy through shared memory
                    # instead of receiving it pickled through a pipe.
                    use_shared_memory=self.config.async_mode == "process",
                    use_async_staging=False,
                    # On GPU every device-to-host copy is queued at once, then one synchronize
                    # (DCP's, before stage() returns): no launch-and-wait per tensor. The copies
                    # land in pinned buffers DCP keeps per source storage and reuses at each save.
                    use_non_blocking_copy=cuda,
                )
            )
        return self._stager

    def _writer(self, data_url: str):
        if self.loc.scheme == "s3":
            # s3 objects have no fileno to fsync; an upload is durable once it completes.
            return FsspecWriter(
                data_url,
                thread_count=self.config.io_threads,
                sync_files=False,
                overwrite=False,
                **storage_options(self.loc),
            )
        return dcp.FileSystemWriter(data_url, thread_count=self.config.io_threads, overwrite=False)

    def _reader(self, data_url: str):
        if self.loc.scheme == "s3":
            return RemoteReader(data_url, **storage_options(self.loc))
        return LocalReader(data_url)

    @property
    def pending_step(self) -> int | None:
        return self._pending.step if self._pending else None

    def save(self, step: int, state: dict[str, Any], *, cursor: int, blocking: bool) -> bool:
        """Save `state` as step `step` (collective). Returns False if nothing was saved.

        Nothing is saved when the step is already saved; a blocking save also returns False
        (on rank 0) when it failed or its commit was refused. Failures are logged, not raised:
        a checkpoint that could not be written leaves the last commit as the restore point.

        With blocking=False the call returns once the state is staged; the upload goes on in
        the background and is committed by a later poll(). With blocking=True (or async_mode
        "sync") it returns after the commit.
        """
        if step <= self.last_saved_step:
            return False
        self.wait()
        data = self._data_dir(step)
        data_url = self.loc.url(self.loc.join(data))
        started = time.time()
        if blocking or self.config.async_mode == "sync":
            done: Future = Future()
            try:
                dcp.save(state, storage_writer=self._writer(data_url))
                done.set_result(None)
            # DCP's CheckpointException is a BaseException; as with an async upload, a failed
            # save is logged and leaves the step uncommitted.
            except (Exception, CheckpointException) as exc:
                done.set_exception(exc)
            self._pending = _Pending(step, cursor, data, started, done)
        else:
            kind = (
                AsyncCheckpointerType.PROCESS
                if self.config.async_mode == "process"
                else AsyncCheckpointerType.THREAD
            )
            response = dcp.async_save(
                state,
                storage_writer=self._writer(data_url),
                async_checkpointer_type=kind,
                async_stager=self._stager_for_mode(),
                process_group=self._pg,
            )
            upload = getattr(response, "upload_completion", response)
            staging = getattr(response, "staging_completion", None)
            if staging is not None:
                # Training may change the parameters at the next step: the copy must be done.
                staging.result(timeout=self.config.upload_timeout_s)
            self._pending = _Pending(step, cursor, data, started, upload)
            if not self._reniced:
                self._renice_writer()
        self.last_saved_step = step
        if blocking or self.config.async_mode == "sync":
            return self.wait() is not None or self.rank != 0
        return True

    def _renice_writer(self) -> None:
        """Lower the priority of DCP's writer process once it exists.

        DCP spawns it lazily from its own executor thread and keeps it in a module global; there
        is no public handle, so if that private name moves we only lose the renice (logged once).
        """
        from torch.distributed.checkpoint import _async_process_executor as executor

        proc = getattr(getattr(executor, "_CHECKPOINT_PROCESS", None), "_save_process", None)
        pid = getattr(proc, "pid", None)
        if pid is None:
            if not hasattr(executor, "_CHECKPOINT_PROCESS"):
                log.warning("cannot find DCP's writer process; it runs at normal priority")
                self._reniced = True
            return
        try:
            os.setpriority(os.PRIO_PROCESS, pid, self.config.writer_nice)
        except OSError as exc:  # it may already be gone; nothing depends on its priority
            log.warning("could not renice checkpoint writer %d: %s", pid, exc)
        self._reniced = True

    def poll(self) -> Manifest | None:
        """Commit the pending save if its upload has finished. Cheap; call at every step."""
        if not self._reniced:
            self._renice_writer()
        if self._pending is None or not self._pending.upload.done():
            return None
        return self._finish()

    def wait(self) -> Manifest | None:
        """Block until the pending save (if any) is committed and the last commit pruned."""
        try:
            return None if self._pending is None else self._finish()
        finally:
            self._wait_pruned()

    def _finish(self) -> Manifest | None:
        pending, self._pending = self._pending, None
        assert pending is not None
        try:
            pending.upload.result(timeout=self.config.upload_timeout_s)
        except TimeoutError:
            self._failed(pending.step, f"upload timed out after {self.config.upload_timeout_s:g}s")
            return None
        except (Exception, CheckpointException) as exc:  # any failure: the step is not committed
            self._failed(pending.step, f"upload failed: {describe(exc)}")
            return None
        if self.rank != 0:
            return None
        try:
            return self._commit(pending)
        except (OSError, StorageError, FenceError) as exc:
            # Storage refused the commit (S3 503s past botocore's retries, a partition): the
            # step stays uncommitted and training goes on from the last commit.
            self._failed(pending.step, f"commit failed: {describe(exc)}")
            return None

    def _failed(self, step: int, reason: str) -> None:
        log.error("checkpoint step %d not committed: %s", step, reason)
        if self.on_failed:
            self.on_failed(step, reason)

    def _commit(self, p: _Pending) -> Manifest | None:
        """Rank 0: write the manifest (create-only) once every rank's data is written.

        DCP's coordinator writes `.metadata` only after gathering every rank's write results,
        so a finished upload on rank 0 means every rank's files are complete.
        """
        newer = self._newest_fence()
        if newer > self.generation:
            reason = f"generation {newer} exists; generation {self.generation} may not commit"
            log.warning("checkpoint step %d refused: %s", p.step, reason)
            if self.on_fenced:
                self.on_fenced(p.step, reason)
            return None
        data_path = self.loc.join(p.data)
        files = self.commits.list_files(data_path)
        if ".metadata" not in files:
            self._failed(p.step, "no .metadata after the upload")
            return None
        manifest = Manifest(
            step=p.step,
            generation=self.generation,
            world_size=self.world_size,
            cursor=p.cursor,
            data=p.data,
            files=files,
            bytes=sum(files.values()),
            time=time.time(),
            save_seconds=time.time() - p.started,
        )
        try:
            write_create_only(self.fs, self._manifest_path(p.step), manifest.to_json())
        except AlreadyExists:
            log.warning("checkpoint step %d is already committed; this commit is refused", p.step)
            if self.on_fenced:
                self.on_fenced(p.step, f"step {p.step} is already committed")
            return None
        # The manifest is written; whether it counts was decided by the fences (see fencing).
        # This check only chooses what to report, and may be optimistic: a fence writer may be
        # between its listing and its write. The restored event is the authority.
        fences = read_fences(self.fs, self.loc, above=self.generation)
        if not visible(p.step, self.generation, fences):
            newer = max(f.generation for f in fences)
            reason = f"generation {newer} was fenced before this commit landed; it is not visible"
            log.warning("checkpoint step %d refused: %s", p.step, reason)
            if self.on_fenced:
                self.on_fenced(p.step, reason)
            return None
        self.last_committed = manifest
        log.info("committed checkpoint step %d (%d bytes, %.2fs)", p.step, manifest.bytes, manifest.save_seconds)
        if self.on_commit:
            self.on_commit(manifest)
        self._prune_later()
        return manifest

    def _prune_later(self) -> None:
        """Prune on the pruning thread (see the module docstring); one prune at a time."""
        self._wait_pruned()
        if self._pruner is None:
            self._pruner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spotwise-prune")
        self._pruning = self._pruner.submit(self._prune)

    def _wait_pruned(self) -> None:
        pruning, self._pruning = self._pruning, None
        try:
            if pruning is not None:
                pruning.result(timeout=self.config.upload_timeout_s)
        except TimeoutError:  # storage hung past its own timeouts: extra files stay for now
            log.warning("pruning old checkpoints did not finish in %gs", self.config.upload_timeout_s)

    def _newest_fence(self) -> int:
        return newest_generation(self.fs, self.loc)

    def _prune(self) -> None:
        """Delete committed checkpoints beyond the newest `keep`, and abandoned data below them."""
        try:
            if self._newest_fence() > self.generation:
                return  # the job moved on; what to keep is the newer generation's business
            listed = self.commits.visible_manifests()
            committed = [m for _path, m in listed]
            for path, m in listed[: -self.config.keep]:
                # Manifest first: from then on the data is no checkpoint, whatever remains of it.
                self.fs.rm(path)
                self.fs.rm(self.loc.join(m.data), recursive=True)
            if not committed:
                return
            kept = {m.data for m in committed[-self.config.keep :]}
            oldest_kept = committed[-self.config.keep :][0].step
            visible_paths = {path for path, _m in listed}
            for path, step, _gen in list_manifests(self.fs, self.loc):
                # Fenced manifests (never visible) below the kept ones: garbage.
                if path not in visible_paths and step < oldest_kept:
                    self.fs.rm(path)
            data_root = self.loc.join("data")
            self.fs.invalidate_cache(data_root)
            for path in self.fs.ls(data_root, detail=False):
                name = "data/" + os.path.basename(path.rstrip("/"))
                step = _parse_step(name)
                if name not in kept and step is not None and step < oldest_kept:
                    self.fs.rm(path, recursive=True)
        except (OSError, StorageError, CheckpointError, FenceError) as exc:
            # Pruning is housekeeping; a failure leaves extra files, never a broken checkpoint.
            log.warning("pruning old checkpoints failed: %s", exc)

    # ----- restoring (storage decides: see spotwise.worker.runtime.commits)

    def committed(self) -> list[Manifest]:
        """See Commits.committed."""
        return self.commits.committed()

    def read_manifest(self, path: str) -> Manifest:
        return self.commits.read_manifest(path)

    def validate(self, m: Manifest) -> None:
        """See Commits.validate."""
        self.commits.validate(m)

    def choose(self, step: int | None) -> Manifest | None:
        """See Commits.choose."""
        return self.commits.choose(step)

    def load(self, state: dict[str, Any], manifest: Manifest) -> None:
        """Load `manifest`'s data into `state` in place (collective); DCP reshards as needed."""
        url = self.loc.url(self.loc.join(manifest.data))
        failure = None
        reader = self._reader(url)
        try:
            # Each rank plans its own reads from the metadata (no_dist): a load needs no global
            # plan, and exchanging one costs time per stored chunk, which a reshard multiplies.
            with warnings.catch_warnings():  # DCP warns that no_dist means one process
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=reader, no_dist=True)
        except (Exception, CheckpointException) as exc:  # DCP wraps each rank's failure
            failure = exc
        if dist.is_initialized():
            # ...so the ranks agree on the outcome here instead.
            failed = torch.tensor([0.0 if failure is None else 1.0])
            dist.all_reduce(failed)
            if failure is None and failed.item() > 0:
                raise CheckpointError(f"checkpoint step {manifest.step} at {url} is unreadable on another rank")
        if failure is not None:
            refusal = reader.refused or refusal_in(failure)
            if refusal is not None:  # one line naming the file, not DCP's per-rank wrapping
                raise CheckpointError(str(refusal)) from None
            raise CheckpointError(f"checkpoint step {manifest.step} at {url} is unreadable: {describe(failure)}") from failure
        self.last_saved_step = manifest.step
        self.last_committed = manifest

    def close(self) -> None:
        """Wait for the pending upload, commit it, release staging memory."""
        try:
            self.wait()
        finally:
            if self._pruner is not None:
                self._pruner.shutdown(wait=False)  # wait() above waited for its one task
                self._pruner = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None


def _parse_step(name: str) -> int | None:
    base = os.path.basename(name)
    if not base.startswith("step-"):
        return None
    digits = base[5:15]
    return int(digits) if digits.isdigit() else None
