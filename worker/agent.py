"""The node agent: one per machine, between the daemon and the node's training processes.

It registers with the daemon, heartbeats every `heartbeat_interval_s` (told at Register), and
makes the node run what each heartbeat answer assigns:

- a new (job, generation): stop the old generation's processes (SIGTERM, grace, SIGKILL of each
  process group; see `spotwise.worker.supervisor`) and start the new ones;
- `checkpoint_now`: SIGUSR1 to the processes, once per request (a request lasts as long as the
  flag stays set for the same generation);
- an empty assignment: stop everything.

It tails each process's SPOTWISE_EVENTS_FILE and forwards restored, progress and
checkpoint_committed events with ReportEvent, and each process exit as ProcessExited. While the
daemon is unreachable the processes keep running (training does not need the daemon) and the
agent retries with a bounded exponential backoff; once the daemon answers again after a silence
longer than its lease (or when it asks), the agent registers again with its current job and
generation so that a restarted daemon can reconcile.

The rendezvous store. The agent hosts a torch.distributed.TCPStore server for its whole life
and reports its port at Register; when the node is node rank 0 of a generation, that store is
the generation's rendezvous endpoint (torchrun's "agent store", TORCHELASTIC_USE_AGENT_STORE).
torch >= 2.x no longer prefixes the keys of each restart (`_create_c10d_store` says "we create
a new TCPStore for every retry"), so keys of generation g would be read by the processes of
g+1 (gloo would connect to dead peers). The agent therefore replaces its store server with a
fresh one *on the same port* the moment it sees a new generation; the swap also cuts off the
store connections of the old generation's processes. A node of rank > 0 starts its processes
only once node rank 0's store carries the new generation's stamp (`STAMP_KEY`), so that none
of them can rendezvous on the previous generation's store.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from spotwise.config import AgentConfig, ConfigError
from spotwise.daemon.metrics import MetricsExporter, start_exporter
from spotwise.daemon.sdnotify import Notifier, NotifyError, child_environment, start_watchdog
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc
from spotwise.worker.checkpoint import write_fence
from spotwise.worker.events import EventsTail
from spotwise.worker.metrics import AgentMetrics, exit_outcome
from spotwise.worker.storage import (
    StorageError,
    filesystem,
    job_uri,
    parse_uri,
)
from spotwise.worker.supervisor import LaunchSpec, Supervisor, SupervisorError

log = logging.getLogger(__name__)

STAMP_KEY = "spotwise/generation"
"""Key in the agent's store naming the (job, generation) the fresh store was made for."""

# Codes that mean "the daemon is not there right now": retry. Anything else is a real refusal.
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED})
# Codes that mean "the daemon does not know this node": register again.
_UNKNOWN_NODE = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})

EXIT_START_FAILED = 127
"""Exit code reported for a rank whose process could not be started at all."""


class AgentError(RuntimeError):
    """The agent cannot go on (the daemon refused it, or it was unreachable for too long)."""


@dataclass(kw_only=True)
class Backoff:
    """Bounded exponential backoff: initial_s, doubling, capped at max_s."""

    initial_s: float = 0.1
    """First delay."""
    max_s: float = 5.0
    """Largest delay."""
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._next = self.initial_s if self._next == 0 else min(self._next * 2, self.max_s)
        return self._next

    def reset(self) -> None:
        self._next = 0.0


class StoreHost:
    """The agent's TCPStore server: one port for the agent's life, fresh contents per generation."""

    def __init__(self, *, timeout_s: float = 30.0) -> None:
        from torch.distributed import TCPStore  # torch is heavy; import when an agent starts

        self._tcpstore = TCPStore
        self._timeout = timedelta(seconds=timeout_s)
        self._store = self._make(0)
        self.port: int = self._store.port

    def _make(self, port: int) -> Any:
        return self._tcpstore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                              multi_tenant=True, timeout=self._timeout)

    def reset(self, stamp: str, *, attempts: int = 20) -> None:
        """Replace the server by an empty one on the same port, stamped with `stamp`.
        Raises RuntimeError if the port cannot be bound again within `attempts` tries."""
        old = self._store
        self._store = None
        del old  # the only reference: this stops the old server and drops its clients
        backoff = Backoff(initial_s=0.01, max_s=0.2)
        for attempt in range(attempts):
            try:
                self._store = self._make(self.port)
                break
            except RuntimeError as e:  # DistNetworkError: port not free yet
                if attempt == attempts - 1:
                    raise RuntimeError(f"cannot rebind store port {self.port}: {e}") from e
                time.sleep(backoff.next())
        self._store.set(STAMP_KEY, stamp)

    def close(self) -> None:
        self._store = None


def stamp_of(job_id: str, generation: int) -> str:
    return f"{job_id}:{generation}"


def wait_for_stamp(host: str, port: int, stamp: str, *, timeout_s: float) -> bool:
    """Block until the store at host:port carries `stamp` (node rank 0 made it fresh for this
    generation); False after `timeout_s`. Each try uses a new short-lived client, because the
    server may be swapped under a connected one."""
    from torch.distributed import TCPStore

    deadline = time.monotonic() + timeout_s
    backoff = Backoff(initial_s=0.05, max_s=0.5)
    while time.monotonic() < deadline:
        try:
            client = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=2))
            if client.check([STAMP_KEY]) and client.get(STAMP_KEY).decode() == stamp:
                return True
        except RuntimeError:
            pass  # store not up, or swapped under us: try again
        time.sleep(backoff.next())
    return False


def fence_generation(spec: LaunchSpec) -> bool:
    """Create generation `spec.generation`'s fence marker in the job's checkpoint location (the
    runtime's `generations/g-<10 digits>`, see spotwise.worker.checkpoint), if it is not there.

    The new generation's rank 0 writes it too, but only once its process is up; the agent
    writes it the moment it learns of the generation, before it SIGTERMs the old processes,
    so that their SIGTERM checkpoint (or a late async commit) is fenced instead of landing
    after the daemon chose where the new generation restores from. Returns False when the job
    has no checkpoint location. Raises StorageError/OSError/ValueError when storage fails."""
    uri = spec.checkpoint_uri
    if not uri:
        return False
    if "://" not in uri and not os.path.isabs(os.path.expanduser(uri)) and spec.working_dir:
        uri = os.path.join(spec.working_dir, uri)  # relative to where the processes run
    loc = parse_uri(uri)
    write_fence(filesystem(loc), loc, spec.generation)
    return True


def launch_spec(a: agent_pb2.Assignment) -> LaunchSpec:
    """The LaunchSpec of an assignment (ValueError if it is inconsistent)."""
    spec = a.spec
    ck = spec.checkpoint
    return LaunchSpec(
        job_id=a.job_id, generation=a.generation, entrypoint=tuple(spec.entrypoint),
        working_dir=spec.working_dir, spec_env=dict(spec.env), world_size=a.world_size,
        node_rank=a.node_rank, num_nodes=a.num_nodes, rank_start=a.rank_start,
        nproc=a.nproc or spec.nproc_per_node, master_addr=a.master_addr,
        master_port=a.master_port, restore_step=a.restore_step,
        checkpoint_uri=job_uri(ck.uri, a.job_id) if ck.uri else "",
        checkpoint_every=ck.every_steps, checkpoint_keep=ck.keep,
        global_batch_size=spec.global_batch_size)


def event_report(event: dict[str, Any], *, rank: int) -> agent_pb2.ReportEventRequest | None:
    """The ReportEvent for one runtime event line (rank 0's restore, progress and commits),
    or None for events the daemon is not told: finished and fenced are logged only."""
    kind = event.get("event")
    t = float(event.get("time") or time.time())
    if kind == "restored" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, restored=agent_pb2.Restored(
            step=int(event["step"]), world_size=int(event.get("world_size", 0))))
    if kind == "progress" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, progress=agent_pb2.Progress(
            step=int(event["step"]), loss=float(event.get("loss", math.nan)),
            samples_per_second=float(event.get("samples_per_second", 0.0)),
            world_size=int(event.get("world_size", 0))))
    if kind == "checkpoint_failed" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, checkpoint_failed=agent_pb2.CheckpointFailed(
            step=int(event["step"]), reason=str(event.get("reason", ""))[:1000]))
    if kind == "checkpoint_committed" and rank == 0:
        return agent_pb2.ReportEventRequest(time=t, checkpoint_committed=agent_pb2.CheckpointCommitted(
            step=int(event["step"]), path=str(event.get("path", "")),
            bytes=int(event.get("bytes", 0)), cursor=int(event.get("cursor", 0))))
    return None


class Agent:
    """One node agent. `run()` until `request_stop()` or a fatal error."""

    def __init__(self, config: AgentConfig, *, max_disconnect_s: float = 600.0,
                 switch_grace_s: float = 3.0, poll_interval_s: float = 0.1,
                 token: str | None = None, notifier: Notifier | None = None) -> None:
        """`switch_grace_s`: the grace (at most config.grace_s) when a newer generation of the
        same job replaces the running one and its fence marker is written. `token`: the bearer
        token (default: config.token_file's content, else $SPOTWISE_AGENT_TOKEN or
        $SPOTWISE_TOKEN); TLS from config.tls_*; OSError/ValueError if a file cannot be read.
        `notifier`: systemd's notify socket (READY=1 once registered, WATCHDOG=1, STOPPING=1);
        default none."""
        self.config = config
        self.switch_grace_s = switch_grace_s
        self.log_dir = Path(config.effective_log_dir).absolute()
        self.node_id = config.node_id
        self.max_disconnect_s = max_disconnect_s
        self.poll_interval_s = poll_interval_s
        if token is None and config.token_file:
            token = read_token_file(config.token_file)
        token = token if token is not None else (
            os.environ.get("SPOTWISE_AGENT_TOKEN") or os.environ.get("SPOTWISE_TOKEN"))
        self._credentials = channel_credentials(config)
        self._notifier = notifier or Notifier(address=None)
        self._watchdog: asyncio.Task[None] | None = None
        self._ready_sent = False
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.heartbeat_interval_s = 0.5
        self.lease_s = 2.0
        self.store: StoreHost | None = None
        self.current: Supervisor | None = None
        self._start_failed: list[agent_pb2.ProcessStatus] = []
        self._stopping: list[Supervisor] = []
        self._tails: dict[Path, EventsTail] = {}
        self._desired: agent_pb2.Assignment | None = None
        self._desired_key: tuple[str, int] | None = None
        self._store_stamp = ""
        self._checkpoint_signalled: tuple[str, int] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._reports: collections.deque[agent_pb2.ReportEventRequest] = collections.deque()
        self._reports_ready = asyncio.Event()
        self._stub: agent_pb2_grpc.AgentServiceStub | None = None
        self._fatal: BaseException | None = None
        self.metrics = AgentMetrics()
        self.metrics.count_processes(
            lambda: len(self.current.pids()) if self.current is not None else 0)
        self.metrics_exporter: MetricsExporter | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop the agent: its processes get the SIGTERM/grace/SIGKILL treatment, then run()
        returns 0."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> int:
        """Serve until stopped. Returns 0 on a requested stop; raises AgentError when the
        daemon refuses the node or stays unreachable for max_disconnect_s."""
        self._kill_orphans()
        if self.config.metrics_listen:
            try:
                self.metrics_exporter = start_exporter(self.metrics, self.config.metrics_listen)
            except OSError as e:
                raise AgentError(f"cannot serve metrics on {self.config.metrics_listen}: {e}"
                                 ) from e
        await self._identity_from_imds()
        self.store = StoreHost()
        log.info("agent %s: store on port %d, daemon %s, log dir %s",
                 self.config.provider_node or "-", self.store.port, self.config.daemon,
                 self.log_dir)
        channel = (aio.secure_channel(self.config.daemon, self._credentials)
                   if self._credentials is not None else aio.insecure_channel(self.config.daemon))
        self._stub = agent_pb2_grpc.AgentServiceStub(channel)
        tasks = [asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                 asyncio.create_task(self._watch_loop(), name="watch"),
                 asyncio.create_task(self._report_loop(), name="report")]
        if self.config.imds_endpoint:
            tasks.append(asyncio.create_task(self._notice_loop(), name="imds"))
        for t in tasks:
            t.add_done_callback(self._on_task_done)
        try:
            await self._heartbeat_loop()
            if self._fatal is not None:
                raise AgentError(f"internal error: {self._fatal!r}") from self._fatal
            return 0
        finally:
            self._notify(self._notifier.stopping, status="stopping: draining processes")
            if self._watchdog is not None:
                self._watchdog.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._stop_all()
            await self._flush_reports(timeout_s=2.0)
            await channel.close()
            self.store.close()
            if self.metrics_exporter is not None:
                self.metrics_exporter.close()

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A background loop that dies stops the agent (and so its processes) rather than
        leaving a node that heartbeats but no longer follows its assignments."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("agent %s: the %s loop failed", self.node_id or "-", task.get_name(),
                  exc_info=task.exception())
        self._fatal = task.exception()
        self.request_stop()

    # ---- the instance metadata service (interruption notices) -----------------------------

    def _imds_client(self) -> Any:
        from spotwise.cloud.imds import ImdsClient, ImdsConfig

        interval = min(max(self.config.imds_poll_s, 1.0), 5.0)
        return ImdsClient(ImdsConfig(endpoint=self.config.imds_endpoint,
                                     poll_interval_s=interval))

    async def _identity_from_imds(self) -> None:
        """Fill instance id, type, zone and lifecycle that the config leaves empty from IMDS
        (when an endpoint is configured); a metadata service that does not answer is logged
        and the fields stay empty."""
        if not self.config.imds_endpoint:
            return
        from spotwise.cloud.imds import ImdsError

        client = self._imds_client()
        wanted = {"instance_id": "instance-id", "instance_type": "instance-type",
                  "zone": "placement/availability-zone", "lifecycle": "instance-life-cycle"}
        found: dict[str, str] = {}
        for attr, name in wanted.items():
            if getattr(self.config, attr) and attr != "lifecycle":
                continue
            try:
                value = await asyncio.wait_for(asyncio.to_thread(client.metadata, name), 10)
            except (ImdsError, asyncio.TimeoutError) as e:
                log.warning("agent: cannot read %s from IMDS %s: %s", name,
                            self.config.imds_endpoint, e)
                return
            if value:
                found[attr] = value.strip()
        if found.get("lifecycle") not in ("spot", "on-demand"):
            # IMDS says "spot" or "on-demand" (older instances: "scheduled"); keep the config's.
            found.pop("lifecycle", None)
        if found:
            self.config = self.config.model_copy(update=found)
            log.info("agent: identity from IMDS: %s", found)

    async def _notice_loop(self) -> None:
        """Poll IMDS for spot interruption and rebalance notices; report each one once."""
        from spotwise.cloud.imds import NoticePoller

        client = self._imds_client()
        poller = NoticePoller(client)
        interval = client.config.poll_interval_s
        while not self._stop.is_set():
            t0 = time.monotonic()
            errors = poller.errors
            try:
                # Two HTTP calls of at most timeout_s each (plus a token refresh).
                notices = await asyncio.wait_for(asyncio.to_thread(poller.poll_once),
                                                 timeout=6 * client.config.timeout_s)
            except asyncio.TimeoutError:
                notices = []
                self.metrics.imds_errors.inc()
            self.metrics.imds_errors.inc(max(0, poller.errors - errors))
            for n in notices:
                self.metrics.notices.labels(n.action).inc()
                job_id, generation = self._desired_key or ("", 0)
                log.warning("agent %s: interruption notice %s (deadline %s) for job %s g%d",
                            self.node_id, n.action, n.deadline or "unknown", job_id or "-",
                            generation)
                # Tagged with the assignment the daemon gave, which is what it checks against.
                self._reports.append(agent_pb2.ReportEventRequest(
                    job_id=job_id, generation=generation, time=n.notice_time or time.time(),
                    interruption_notice=agent_pb2.InterruptionNotice(action=n.action,
                                                                     deadline=n.deadline)))
                self._reports_ready.set()
            await self._sleep(max(0.0, interval - (time.monotonic() - t0)))

    # ---- orphans of an earlier life --------------------------------------------------------

    @property
    def pid_file(self) -> Path:
        """Where the agent lists its training processes' pids, so that an agent restarted
        after a crash can kill the ones its previous life left behind (they run in sessions
        of their own, so the agent's death does not take them along)."""
        name = self.config.provider_node or self.config.node_id or "agent"
        return Path(self.config.state_dir) / "agents" / f"{name}.pids"

    def _save_pids(self) -> None:
        pids = [p.pid for s in (self.current, *self._stopping) if s is not None
                for p in s.processes if p.running]
        path = self.pid_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, path)

    def _kill_orphans(self) -> None:
        try:
            pids = json.loads(self.pid_file.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("agent: unreadable pid file %s: %s", self.pid_file, e)
            return
        for pid in pids:
            # Guard against pid reuse: only a process that carries a spotwise job's
            # environment and writes its events under our log dir is one of ours.
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            events = next((v for v in environ if v.startswith(b"SPOTWISE_EVENTS_FILE=")), b"")
            if not events.startswith(b"SPOTWISE_EVENTS_FILE=" + bytes(self.log_dir)):
                continue
            log.warning("agent: killing pid %d (and its group), left running by an earlier "
                        "life of this agent", pid)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.pid_file.unlink(missing_ok=True)

    async def _stop_all(self) -> None:
        sups = [s for s in (self.current, *self._stopping) if s is not None]
        await asyncio.gather(*(s.stop(self.config.grace_s) for s in sups))
        for s in sups:
            self._collect(s)
        self.current = None
        self._save_pids()

    # ---- daemon calls ---------------------------------------------------------------------

    def _register_request(self) -> agent_pb2.RegisterRequest:
        c = self.config
        cur = self.current
        return agent_pb2.RegisterRequest(
            node_id=self.node_id, instance_id=c.instance_id, instance_type=c.instance_type,
            zone=c.zone, lifecycle=c.lifecycle, gpus=c.gpus, slots=c.slots, address=c.address,
            store_port=self.store.port if self.store else 0, price_per_hour=c.price_per_hour,
            current_job_id=cur.spec.job_id if cur else "",
            current_generation=cur.spec.generation if cur else 0,
            log_dir=str(self.log_dir), provider_node=c.provider_node)

    async def _register(self, disconnected_since: float) -> None:
        """Register (again), retrying transient failures with backoff until max_disconnect_s."""
        backoff = Backoff(max_s=self.config.reconnect_max_backoff_s)
        while not self._stop.is_set():
            try:
                resp = await self._stub.Register(self._register_request(),
                                                 timeout=self.config.rpc_timeout_s,
                                                 metadata=self._metadata)
            except aio.AioRpcError as e:
                if e.code() not in _TRANSIENT:
                    raise AgentError(f"daemon {self.config.daemon} refused Register: "
                                     f"{e.code().name}: {e.details()}") from e
                self._check_disconnect(disconnected_since, e)
                await self._sleep(backoff.next())
                continue
            self.node_id = resp.node_id
            self.heartbeat_interval_s = resp.heartbeat_interval_s or self.heartbeat_interval_s
            self.lease_s = resp.lease_s or self.lease_s
            cur = self.current
            log.info("agent: registered as node %s (job %s g%s), heartbeat %.2fs lease %.2fs",
                     self.node_id, cur.spec.job_id if cur else "-",
                     cur.spec.generation if cur else "-", self.heartbeat_interval_s, self.lease_s)
            if not self._ready_sent:  # the first registration: startup is complete
                self._ready_sent = True
                self._notify(self._notifier.ready,
                             status=f"node {self.node_id} registered with {self.config.daemon}")
                self._watchdog = start_watchdog(self._notifier)
            return

    def _notify(self, send: Any, **kwargs: Any) -> None:
        """Send a systemd notification; a failed send is logged, never fatal."""
        try:
            send(**kwargs)
        except NotifyError as e:
            log.warning("agent %s: %s", self.node_id or "-", e)

    def _check_disconnect(self, since: float, err: aio.AioRpcError) -> None:
        if time.monotonic() - since > self.max_disconnect_s:
            raise AgentError(f"daemon {self.config.daemon} unreachable for more than "
                             f"{self.max_disconnect_s:.0f}s: {err.code().name}: {err.details()}")

    def _heartbeat_request(self) -> agent_pb2.HeartbeatRequest:
        req = agent_pb2.HeartbeatRequest(node_id=self.node_id)
        cur = self.current
        if cur is not None:
            req.job_id, req.generation = cur.spec.job_id, cur.spec.generation
            cur.poll()
            for p in cur.processes:
                req.processes.add(local_rank=p.local_rank, rank=p.rank, pid=p.pid,
                                  running=p.running, exit_code=p.exit_code or 0)
            req.processes.extend(self._start_failed)
        return req

    async def _heartbeat_loop(self) -> None:
        await self._register(time.monotonic())
        backoff = Backoff(max_s=self.config.reconnect_max_backoff_s)
        last_ok = time.monotonic()
        failed = False
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                resp = await self._stub.Heartbeat(self._heartbeat_request(),
                                                  timeout=self.config.rpc_timeout_s,
                                                  metadata=self._metadata)
            except aio.AioRpcError as e:
                if e.code() in _UNKNOWN_NODE:
                    await self._register(time.monotonic())
                    continue
                if e.code() not in _TRANSIENT:
                    raise AgentError(f"daemon {self.config.daemon} refused Heartbeat: "
                                     f"{e.code().name}: {e.details()}") from e
                self.metrics.daemon_errors.inc()
                self._check_disconnect(last_ok, e)
                failed = True
                delay = backoff.next()
                log.warning("agent %s: heartbeat failed (%s), processes keep running; retry in "
                            "%.2fs", self.node_id, e.code().name, delay)
                await self._sleep(delay)
                continue
            self.metrics.heartbeat_seconds.observe(time.monotonic() - t0)
            silent_for = time.monotonic() - last_ok
            last_ok = time.monotonic()
            backoff.reset()
            # After a silence longer than the lease the daemon has declared this node LOST (or
            # restarted): register again with what runs here so that it can reconcile.
            lost = failed and silent_for > self.lease_s
            failed = False
            if resp.reregister or lost:
                log.info("agent %s: registering again (%s)", self.node_id,
                         "daemon asked" if resp.reregister else f"silent for {silent_for:.1f}s")
                await self._register(time.monotonic())
                continue
            self._apply(resp.assignment)
            await self._sleep(max(0.0, self.heartbeat_interval_s - (time.monotonic() - t0)))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the agent is asked to stop."""
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # ---- assignments ----------------------------------------------------------------------

    def _apply(self, a: agent_pb2.Assignment) -> None:
        key = (a.job_id, a.generation) if a.job_id else None
        if key != self._desired_key:
            log.info("agent %s: assignment %s -> %s", self.node_id, _key_str(self._desired_key),
                     _key_str(key) + (f" ranks {a.rank_start}..{a.rank_start + a.nproc - 1} of "
                                      f"{a.world_size}, node rank {a.node_rank}, rendezvous "
                                      f"{a.master_addr}:{a.master_port}, restore step "
                                      f"{a.restore_step}" if key else ""))
            # A fresh store at once: no process of the new generation may see the old keys,
            # and the old generation's processes lose the store they rendezvoused on.
            stamp = stamp_of(*key) if key else ""
            if stamp != self._store_stamp and self.store is not None:
                self.store.reset(stamp)
                self._store_stamp = stamp
            self._desired_key = key
            self._desired = a if key else None
            self._checkpoint_signalled = None
            self._wake.set()
        elif key is not None:
            self._desired = a
        cur = self.current
        if (a.checkpoint_now and key is not None and cur is not None
                and (cur.spec.job_id, cur.spec.generation) == key
                and self._checkpoint_signalled != key):
            n = cur.request_checkpoint()  # only ready runtimes; later ones when they say so
            self._checkpoint_signalled = key
            log.info("agent %s: job %s g%d: checkpoint requested, SIGUSR1 to %d process(es)",
                     self.node_id, key[0], key[1], n)
        elif not a.checkpoint_now and self._checkpoint_signalled == key:
            self._checkpoint_signalled = None  # the request is over; the next one signals again
            if cur is not None:
                cur.end_checkpoint_request()

    async def _reconcile_loop(self) -> None:
        """Make the running generation the desired one; stopping takes up to the grace period,
        so this runs beside the heartbeat loop, which keeps the lease meanwhile."""
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            cur = self.current
            cur_key = (cur.spec.job_id, cur.spec.generation) if cur else None
            if cur_key == self._desired_key:
                continue
            desired = self._desired
            fenced = desired is not None and await self._fence(desired)
            if cur is not None:
                self.current = None
                self._start_failed = []
                self._stopping.append(cur)
                # A generation that a newer one of its job replaced cannot commit anything any
                # more (the fence marker is written), so a long grace buys no checkpoint; it
                # only delays recovery when a process hangs in a collective with a lost peer.
                grace = self.config.grace_s
                if fenced and desired.job_id == cur.spec.job_id:
                    grace = min(grace, self.switch_grace_s)
                # If this task is cancelled mid-stop, `cur` stays in _stopping and run()'s
                # shutdown stops it again (stop is idempotent).
                await cur.stop(grace)
                self._stopping.remove(cur)
                self._collect(cur)
                self._save_pids()
            desired = self._desired
            if desired is None or (desired.job_id, desired.generation) != self._desired_key:
                self._wake.set()  # changed again while stopping: look again
                continue
            await self._start(desired)

    async def _fence(self, a: agent_pb2.Assignment) -> bool:
        """fence_generation for the assignment, bounded; True when the marker is in place. A
        failure is logged, not fatal (the new generation's rank 0 writes the marker too)."""
        try:
            spec = launch_spec(a)
            return await asyncio.wait_for(asyncio.to_thread(fence_generation, spec),
                                          timeout=2 * self.config.rpc_timeout_s)
        except (StorageError, OSError, ValueError, asyncio.TimeoutError) as e:
            log.warning("agent %s: job %s g%d: cannot write the fence marker: %s",
                        self.node_id, a.job_id, a.generation, e)
            return False

    async def _start(self, a: agent_pb2.Assignment) -> None:
        try:
            spec = dataclasses.replace(launch_spec(a), address=self.config.address)
        except ValueError as e:
            log.error("agent %s: bad assignment for job %s g%d: %s", self.node_id, a.job_id,
                      a.generation, e)
            return
        if spec.node_rank != 0:
            stamp = stamp_of(spec.job_id, spec.generation)
            ok = await asyncio.to_thread(wait_for_stamp, spec.master_addr, spec.master_port,
                                         stamp, timeout_s=30.0)
            if (a.job_id, a.generation) != self._desired_key:
                self._wake.set()
                return
            if not ok:
                log.warning("agent %s: job %s g%d: store %s:%d has no stamp %s after 30s; "
                            "starting anyway", self.node_id, spec.job_id, spec.generation,
                            spec.master_addr, spec.master_port, stamp)
        # Training processes must not inherit systemd's notify socket or watchdog.
        sup = Supervisor(spec, log_dir=self.log_dir, base_env=child_environment(os.environ))
        self.current = sup
        try:
            sup.start()
        except SupervisorError as e:
            log.error("agent %s: job %s g%d: %s", self.node_id, spec.job_id, spec.generation, e)
            self._start_failed = [
                agent_pb2.ProcessStatus(local_rank=i, rank=spec.rank_start + i, pid=0,
                                        running=False, exit_code=EXIT_START_FAILED)
                for i in range(spec.nproc)]
            for st in self._start_failed:
                self._queue(spec, agent_pb2.ReportEventRequest(
                    time=time.time(), process_exited=agent_pb2.ProcessExited(
                        local_rank=st.local_rank, rank=st.rank, exit_code=EXIT_START_FAILED)))
            return
        for p in sup.processes:
            self._tails[p.events_path] = EventsTail(p.events_path)
        self.metrics.generation.set(spec.generation)
        self._save_pids()

    # ---- watching processes ---------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while not self._stop.is_set():
            for sup in [s for s in (self.current, *self._stopping) if s is not None]:
                self._collect(sup, final=False)
            await self._sleep(self.poll_interval_s)

    def _collect(self, sup: Supervisor, *, final: bool = True) -> None:
        """Forward new events and exits of `sup`'s processes; `final` forgets their files."""
        for p in sup.processes:
            tail = self._tails.get(p.events_path)
            if tail is None:
                continue
            for event in tail.read():
                self._on_event(sup, p.rank, event)
            if final:
                del self._tails[p.events_path]
        for p in sup.take_exits():
            self.metrics.process_exits.labels(exit_outcome(p.exit_code)).inc()
            # Read the events written just before the exit first, so a commit precedes it.
            self._queue(sup.spec, agent_pb2.ReportEventRequest(
                time=time.time(), process_exited=agent_pb2.ProcessExited(
                    local_rank=p.local_rank, rank=p.rank, exit_code=p.exit_code)))

    def _on_event(self, sup: Supervisor, rank: int, event: dict[str, Any]) -> None:
        spec = sup.spec
        sup.note_event(rank, event)  # a `ready` runtime may now get a pending checkpoint request
        kind = event.get("event")
        if kind == "fenced":
            log.warning("agent %s: job %s g%d rank %d: commit fenced at step %s: %s",
                        self.node_id, spec.job_id, spec.generation, rank, event.get("step"),
                        event.get("reason"))
        elif kind == "restored" and rank == 0:
            log.info("agent %s: job %s g%d: restored step %s at world size %s", self.node_id,
                     spec.job_id, spec.generation, event.get("step"), event.get("world_size"))
        elif kind == "finished":
            log.info("agent %s: job %s g%d rank %d finished at step %s", self.node_id,
                     spec.job_id, spec.generation, rank, event.get("step"))
        elif kind == "checkpoint_committed" and rank == 0:
            self.metrics.checkpoints.inc()
            log.info("agent %s: job %s g%d: checkpoint committed at step %s: %s", self.node_id,
                     spec.job_id, spec.generation, event.get("step"), event.get("path"))
        try:
            req = event_report(event, rank=rank)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("agent %s: job %s g%d rank %d: bad event %r: %s", self.node_id,
                        spec.job_id, spec.generation, rank, event, e)
            return
        if req is not None:
            self._queue(spec, req)

    # ---- reports --------------------------------------------------------------------------

    def _queue(self, spec: LaunchSpec, req: agent_pb2.ReportEventRequest) -> None:
        req.job_id, req.generation = spec.job_id, spec.generation
        # Progress is a level, not an edge: a newer one replaces an unsent older one.
        if req.WhichOneof("event") == "progress":
            for i, old in enumerate(self._reports):
                if (old.WhichOneof("event") == "progress"
                        and (old.job_id, old.generation) == (req.job_id, req.generation)):
                    del self._reports[i]
                    break
        if len(self._reports) >= 10_000:
            dropped = self._reports.popleft()
            log.warning("agent %s: report queue full, dropping %s", self.node_id,
                        dropped.WhichOneof("event"))
        self._reports.append(req)
        self._reports_ready.set()

    async def _report_loop(self) -> None:
        backoff = Backoff(max_s=self.config.reconnect_max_backoff_s)
        while True:
            await self._reports_ready.wait()
            self._reports_ready.clear()
            while self._reports:
                if await self._send(self._reports[0]):
                    self._reports.popleft()
                    backoff.reset()
                else:
                    await asyncio.sleep(backoff.next())

    async def _send(self, req: agent_pb2.ReportEventRequest) -> bool:
        """Send one report; True when it is done with (accepted, refused or undeliverable)."""
        req.node_id = self.node_id
        try:
            resp = await self._stub.ReportEvent(req, timeout=self.config.rpc_timeout_s,
                                                metadata=self._metadata)
        except aio.AioRpcError as e:
            if e.code() in _TRANSIENT:
                return False
            log.warning("agent %s: ReportEvent %s refused: %s: %s", self.node_id,
                        req.WhichOneof("event"), e.code().name, e.details())
            return True
        if not resp.accepted:
            log.info("agent %s: job %s g%d: %s report refused as stale: %s", self.node_id,
                     req.job_id, req.generation, req.WhichOneof("event"), resp.reason)
        return True

    async def _flush_reports(self, *, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._reports and time.monotonic() < deadline:
            if not await self._send(self._reports[0]):
                break
            self._reports.popleft()


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace stripped). OSError if unreadable,
    ValueError if empty."""
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def channel_credentials(config: AgentConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for the daemon when config.tls_ca_file is set (with a client
    certificate when tls_cert_file is); None = plaintext. OSError if a file is unreadable."""
    if not config.tls_ca_file:
        return None
    cert = Path(config.tls_cert_file).read_bytes() if config.tls_cert_file else None
    key = Path(config.tls_key_file).read_bytes() if config.tls_key_file else None
    return grpc.ssl_channel_credentials(root_certificates=Path(config.tls_ca_file).read_bytes(),
                                        private_key=key, certificate_chain=cert)


def _key_str(key: tuple[str, int] | None) -> str:
    return f"{key[0]} g{key[1]}" if key else "nothing"


# ---- command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotwise agent`. Unset flags fall back to SPOTWISE_AGENT_* and the config
    file (see spotwise.config.AgentConfig)."""
    parser.add_argument("--daemon", help="host:port of the daemon (default 127.0.0.1:7450)")
    parser.add_argument("--config", help="TOML config file ([agent] table)")
    parser.add_argument("--slots", type=int, help="training processes this node can run")
    parser.add_argument("--address", help="host this node's peers reach it on")
    parser.add_argument("--log-dir", help="process logs: <log-dir>/<job>/g<gen>/rank<r>.log")
    parser.add_argument("--state-dir", help="the agent's state directory")
    parser.add_argument("--node-id", help="this node's id (default: the daemon assigns one)")
    parser.add_argument("--provider-node", help="the provider's handle for this node")
    parser.add_argument("--instance-type", help="cloud instance type")
    parser.add_argument("--lifecycle", choices=["spot", "on-demand"])
    parser.add_argument("--price-per-hour", type=float, help="USD per hour this node costs")
    parser.add_argument("--grace-s", type=float,
                        help="SIGTERM-to-SIGKILL grace when stopping a generation (default 30)")
    parser.add_argument("--imds-endpoint",
                        help="instance metadata service URL to poll for spot interruption "
                             "notices (on EC2: http://169.254.169.254; default: none)")
    parser.add_argument("--metrics-listen",
                        help="host:port to serve the agent's Prometheus metrics on (no "
                             "authentication: loopback or a private network; default: none)")
    parser.add_argument("--max-disconnect-s", type=float, default=600.0,
                        help="give up (stop processes, exit 1) after the daemon is unreachable "
                             "this long (default 600)")
    parser.add_argument("--switch-grace-s", type=float, default=3.0,
                        help="grace when a newer generation of the same job replaces the "
                             "running one: its checkpoints are fenced anyway (default 3)")


_FLAG_FIELDS = ("daemon", "slots", "address", "log_dir", "state_dir", "node_id", "provider_node",
                "instance_type", "lifecycle", "price_per_hour", "grace_s", "imds_endpoint",
                "metrics_listen")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """AgentConfig from the flags given, then the environment and the config file."""
    overrides = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f, None) is not None}
    return AgentConfig.load(getattr(args, "config", None), **overrides)


def run(args: argparse.Namespace) -> int:
    """`spotwise agent`: 0 when stopped by SIGTERM/SIGINT, 1 when the daemon refused the node
    or stayed unreachable, 2 for a bad configuration."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"spotwise agent: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = Agent(config, max_disconnect_s=args.max_disconnect_s,
                      switch_grace_s=args.switch_grace_s, notifier=Notifier.from_env())
    except (OSError, ValueError) as e:
        print(f"spotwise agent: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        try:
            return await agent.run()
        except AgentError as e:
            log.error("agent %s: %s", agent.node_id or config.provider_node or "-", e)
            return 1

    return asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotwise agent")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
