"""The node agent: one per machine, between the daemon and the node's training processes.

It registers with the daemon, heartbeats every `heartbeat_interval_s` (told at Register), and
makes the node run what each heartbeat answer assigns:

- a new (job, generation): stop the old generation's processes (SIGTERM, grace, SIGKILL of each
  process group; see `spotwise.worker.agent.supervisor`) and start the new ones;
- `checkpoint_now`: SIGUSR1 to the processes, once per request (a request lasts as long as the
  flag stays set for the same generation);
- an empty assignment: stop everything.

It tails each process's SPOTWISE_EVENTS_FILE and forwards restored, progress and
checkpoint_committed events with ReportEvent, and each process exit as ProcessExited. While the
daemon is unreachable the processes keep running (training does not need the daemon) and the
agent retries with a bounded exponential backoff; once the daemon answers again after a silence
longer than its lease (or when it asks), the agent registers again with its current job and
generation so that a restarted daemon can reconcile.

The rendezvous store is explained in `spotwise.worker.agent.store_host`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from spotwise.common.address import split_host_port
from spotwise.common.beatwire import ACK_EVERY
from spotwise.common.credentials import channel_security
from spotwise.common.exporter import MetricsExporter, start_exporter
from spotwise.common.sdnotify import Notifier, NotifyError, start_watchdog
from spotwise.config import AgentConfig
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc
from spotwise.worker.agent import orphans
from spotwise.worker.agent.backoff import Backoff
from spotwise.worker.agent.beats import BeatChannel, BeatUnreachable
from spotwise.worker.agent.generations import Generations
from spotwise.worker.agent.job_isolation import resolve_run_as
from spotwise.worker.agent.metrics import AgentMetrics
from spotwise.worker.agent.notices import identity_from_imds, notice_loop
from spotwise.worker.agent.reports import Reporter, ReportQueue
from spotwise.worker.agent.scoped_credentials import (
    job_credential_issuer,
)
from spotwise.worker.agent.session import (
    CHANNEL_OPTIONS,
    UNKNOWN_NODE,
    Credential,
    HeartbeatStream,
    agent_token,
    heartbeat_request,
    is_transient,
    register_request,
)
from spotwise.worker.agent.store_host import StoreHost, stamp_of
from spotwise.worker.agent.supervisor import (
    Supervisor,
)
from spotwise.worker.runtime.events import EventsTail

BEAT_FALLBACK_S = 60.0
"""After the beat channel was unreachable, beat on the gRPC stream this long, then try again."""

log = logging.getLogger("spotwise.worker.agent")



class AgentError(RuntimeError):
    """The agent cannot go on (the daemon refused it, or it was unreachable for too long)."""


class Agent(Generations):
    """One node agent. `run()` until `request_stop()` or a fatal error."""

    def __init__(self, config: AgentConfig, *, max_disconnect_s: float = 600.0,
                 switch_grace_s: float = 0.5, poll_interval_s: float = 0.1,
                 token: str | None = None, notifier: Notifier | None = None) -> None:
        """`switch_grace_s`: the grace (at most config.grace_s) when a newer generation of the
        same job replaces the running one and its fence marker is written: its processes can
        commit nothing more, a holding one exits at once, and one hung in a collective with a
        lost peer would hold the recovery for as long as it waits (3 s of an 11.5 s recovery
        on Ray, bench/ray_recovery.py, when this was 3 s). `token`: the bearer
        token (default: config.token_file's content, else $SPOTWISE_AGENT_TOKEN or
        $SPOTWISE_TOKEN); TLS from config.tls_*; OSError/ValueError if a file cannot be read.
        `notifier`: systemd's notify socket (READY=1 once registered, WATCHDOG=1, STOPPING=1);
        default none."""
        self.config = config
        self.switch_grace_s = switch_grace_s
        self.log_dir = Path(config.effective_log_dir).absolute()
        self.max_disconnect_s = max_disconnect_s
        self.poll_interval_s = poll_interval_s
        token = agent_token(config, token)
        # One builder of TLS and token for the client and the agent; it refuses to send the
        # token in plaintext beyond loopback (CredentialsError, a ValueError).
        self._security = channel_security(
            config.daemon, token=token, ca_file=config.tls_ca_file or None,
            cert_file=config.tls_cert_file or None, key_file=config.tls_key_file or None,
            names=("tls_ca_file", "tls_cert_file", "tls_key_file"))
        self._run_as = resolve_run_as(config.run_as) if config.run_as else None
        self._issuer = job_credential_issuer(config)
        secret_path = (Path(config.state_dir) / "agents" / f"{config.node_id}.secret"
                       if config.node_id else None)
        self.credential = Credential(secret_path, config.node_id)
        self._held_version = 0
        self._beats: HeartbeatStream | BeatChannel | None = None
        self._grpc_beats: HeartbeatStream | None = None
        self._beat_port = 0
        self._beat_fallback_until = 0.0
        """Until then the agent beats on the gRPC stream: the beat channel was unreachable."""
        self._store_lock = asyncio.Lock()
        self._notifier = notifier or Notifier(address=None)
        self._watchdog: asyncio.Task[None] | None = None
        self._ready_sent = False
        self._metadata = self._security.metadata
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
        self._store_reset: asyncio.Future[None] | None = None
        self._checkpoint_signalled: tuple[str, int] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._reports = ReportQueue()
        self._reports_ready = asyncio.Event()
        self._stub: agent_pb2_grpc.AgentServiceStub | None = None
        self._fatal: BaseException | None = None
        self.metrics = AgentMetrics()
        self.metrics.count_processes(
            lambda: len(self.current.pids()) if self.current is not None else 0)
        self.metrics_exporter: MetricsExporter | None = None

    @property
    def node_id(self) -> str:
        return self.credential.node_id

    @property
    def pid_file(self) -> Path:
        return orphans.pid_file(self.config.state_dir,
                                self.config.provider_node or self.config.node_id)

    # ---- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop the agent: its processes get the SIGTERM/grace/SIGKILL treatment, then run()
        returns 0."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> int:
        """Serve until stopped. Returns 0 on a requested stop; raises AgentError when the
        daemon refuses the node or stays unreachable for max_disconnect_s."""
        orphans.kill_orphans(self.pid_file, self.log_dir)
        if self.config.metrics_listen:
            try:
                self.metrics_exporter = start_exporter(self.metrics, self.config.metrics_listen)
            except OSError as e:
                raise AgentError(f"cannot serve metrics on {self.config.metrics_listen}: {e}"
                                 ) from e
        self.config = await identity_from_imds(self.config)
        self.store = StoreHost(address=self.config.address)
        log.info("agent %s: store on port %d, daemon %s, log dir %s",
                 self.config.provider_node or "-", self.store.port, self.config.daemon,
                 self.log_dir)
        channel = self._security.aio_channel(options=CHANNEL_OPTIONS)
        self._stub = agent_pb2_grpc.AgentServiceStub(channel)
        self._grpc_beats = HeartbeatStream(self._stub, metadata=self._metadata,
                                           timeout_s=self.config.rpc_timeout_s)
        self._beats = self._grpc_beats
        self._reporter = Reporter(self._reports, self._reports_ready, self._stub,
                                  metadata=self._metadata, credential=self.credential,
                                  timeout_s=self.config.rpc_timeout_s,
                                  max_backoff_s=self.config.reconnect_max_backoff_s)
        tasks = [asyncio.create_task(self._reconcile_loop(), name="reconcile"),
                 asyncio.create_task(self._refresh_credentials_loop(), name="credentials"),
                 asyncio.create_task(self._watch_loop(), name="watch"),
                 asyncio.create_task(self._reporter.run(), name="report")]
        if self.config.imds_endpoint:
            tasks.append(asyncio.create_task(notice_loop(
                self.config, self.metrics, stopped=self._stop.is_set, sleep=self._sleep,
                on_notice=self._on_notice), name="imds"))
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
            await self._reporter.flush(timeout_s=2.0)
            if self._beats is not None:
                self._beats.close()
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

    def _on_notice(self, n: Any) -> None:
        job_id, generation = self._desired_key or ("", 0)
        log.warning("agent %s: interruption notice %s (deadline %s) for job %s g%d",
                    self.node_id, n.action, n.deadline or "unknown", job_id or "-", generation)
        # Tagged with the assignment the daemon gave, which is what it checks against.
        self._reports.add(agent_pb2.ReportEventRequest(
            job_id=job_id, generation=generation, time=n.notice_time or time.time(),
            interruption_notice=agent_pb2.InterruptionNotice(action=n.action,
                                                             deadline=n.deadline)))
        self._reports_ready.set()

    def _register_request(self) -> agent_pb2.RegisterRequest:
        return register_request(self.config, self.credential,
                                store_port=self.store.port if self.store else 0,
                                running=self.current.spec if self.current else None,
                                log_dir=self.log_dir)

    async def _register(self, disconnected_since: float) -> None:
        """Register (again), retrying transient failures with backoff until max_disconnect_s.
        A daemon that does not accept this node's credential (it lost its state, or the node
        was configured with an id another node holds) gets a registration as a new node."""
        backoff = Backoff(max_s=self.config.reconnect_max_backoff_s)
        while not self._stop.is_set():
            try:
                resp = await self._stub.Register(self._register_request(),
                                                 timeout=self.config.rpc_timeout_s,
                                                 metadata=self._metadata)
            except aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.PERMISSION_DENIED and self.credential.node_id:
                    log.warning("agent %s: the daemon refused this node's credential (%s); "
                                "registering as a new node", self.node_id, e.details())
                    self.credential.forget()
                    continue
                if not is_transient(e):
                    raise AgentError(f"daemon {self.config.daemon} refused Register: "
                                     f"{e.code().name}: {e.details()}") from e
                self._check_disconnect(disconnected_since, e)
                await self._sleep(backoff.next())
                continue
            self.credential.update(resp.node_id, resp.node_secret)
            self.heartbeat_interval_s = resp.heartbeat_interval_s or self.heartbeat_interval_s
            self.lease_s = resp.lease_s or self.lease_s
            if self._beats is not None:
                self._beats.close()  # the next beat opens a stream as this registration
            self._beat_port = resp.beat_port
            self._beats = self._beat_transport(resp.beat_port)
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

    def _beat_transport(self, beat_port: int) -> HeartbeatStream | BeatChannel | None:
        """The beat channel when the daemon has one and it was not unreachable lately, else
        the gRPC Heartbeats stream."""
        if not beat_port or time.monotonic() < self._beat_fallback_until:
            return self._grpc_beats
        host = split_host_port(self.config.daemon)[0].strip("[]")
        return BeatChannel(host, beat_port, ssl_context=self._security.ssl_context,
                           token=self._security.token, timeout_s=self.config.rpc_timeout_s,
                           silence_s=max(2.0, 3 * ACK_EVERY * self.heartbeat_interval_s))

    def _heartbeat_request(self) -> agent_pb2.HeartbeatRequest:
        return heartbeat_request(self.credential, self._held_version, self.current,
                                 self._start_failed)

    async def _heartbeat_loop(self) -> None:
        await self._register(time.monotonic())
        backoff = Backoff(max_s=self.config.reconnect_max_backoff_s)
        last_ok = time.monotonic()
        failed = False
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                resp = await self._beats.beat(self._heartbeat_request())
            except BeatUnreachable as e:
                log.warning("agent %s: %s; beating on the gRPC stream for %.0fs", self.node_id,
                            e.details(), BEAT_FALLBACK_S)
                self._beat_fallback_until = time.monotonic() + BEAT_FALLBACK_S
                self._beats = self._grpc_beats
                continue
            except aio.AioRpcError as e:
                if e.code() in UNKNOWN_NODE or e.code() is grpc.StatusCode.PERMISSION_DENIED:
                    await self._register(time.monotonic())
                    continue
                if not is_transient(e):
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
            if resp.HasField("assignment"):
                self._held_version = resp.assignment_version
                self._apply(resp.assignment)
            await self._sleep(max(0.0, self.heartbeat_interval_s - (time.monotonic() - t0)),
                              wake=getattr(self._beats, "news", None))
            if (self._beats is self._grpc_beats and self._beat_port
                    and time.monotonic() >= self._beat_fallback_until):
                # Try the channel again, on the port the daemon serves it on now (a restarted
                # daemon may have another): its Register answer names it.
                await self._register(time.monotonic())

    async def _sleep(self, seconds: float, *, wake: asyncio.Event | None = None) -> None:
        """Sleep, but wake at once when the agent is asked to stop (or `wake` is set: the
        beat channel brought news)."""
        waits = [asyncio.ensure_future(self._stop.wait())]
        if wake is not None:
            waits.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

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
                # Rebinding the port can take a moment: in a thread, off the heartbeat path.
                self._store_stamp = stamp
                self._store_reset = asyncio.ensure_future(self._reset_store(stamp))
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

def _key_str(key: tuple[str, int] | None) -> str:
    return f"{key[0]} g{key[1]}" if key else "nothing"

