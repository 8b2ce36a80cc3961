"""The daemon process: the gRPC server, the control loop, the fleet loop and the notice loop.

    await serve(config)              # `spotwise daemon`: runs until SIGTERM/SIGINT

    daemon = Daemon(config)          # in-process, e.g. in a test (listen on port 0)
    await daemon.start(); daemon.address; ...; await daemon.stop()

    with DaemonThread(config) as d:  # the same from synchronous code, on its own loop thread
        grpc.insecure_channel(d.address) ...

The server carries JobService, AgentService, standard health checking (spotwise.v1.JobService,
spotwise.v1.AgentService and "" report SERVING while the daemon runs, NOT_SERVING while it
stops) and server reflection. The control loop plans every `tick_s`, and at once when a handler
wakes it (a failed rank, a commit, a notice). With a provider, the fleet loop launches and
terminates nodes; with `notice_queue_url`, the notice loop drains nodes on the interruption
notices it reads from SQS; with API pricing ([daemon.pricing]), the pricing loop refreshes
prices off the event loop. Security (tokens, TLS, loopback) and the exporter: from the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spotwise.cloud.provider import Provider
from spotwise.common.exporter import MetricsExporter, start_exporter
from spotwise.config import DaemonConfig
from spotwise.daemon.auth import TokenAuthInterceptor, TokenStore
from spotwise.daemon.beats import BeatServer, start_beats
from spotwise.daemon.controller import Policy
from spotwise.daemon.coordinator import Coordinator
from spotwise.daemon.fleet import FleetLoop
from spotwise.daemon.loop import ControlLoop
from spotwise.daemon.metrics import Metrics
from spotwise.daemon.notices import NoticeLoop
from spotwise.daemon.prices import NodePricer, refresh_loop
from spotwise.daemon.servicers import AgentServicer, JobServicer, add_job_service
from spotwise.daemon.store import Store, StoreError
from spotwise.daemon.validation import MalformedRequestInterceptor
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""The largest request the daemon reads (gRPC's default, set explicitly): a larger one is
refused with RESOURCE_EXHAUSTED before any servicer runs. A job spec is a few kilobytes."""

SERVICE_NAMES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)
"""The daemon's own services (as health checking and reflection name them)."""

STOP_GRACE_S = 2.0
"""How long in-flight RPCs (e.g. WatchJob streams) get to finish when the daemon stops."""
LOOP_STOP_TIMEOUT_S = 10.0  # how long the control loop gets to finish its tick at a stop


def policy_of(config: DaemonConfig) -> Policy:
    """The controller's knobs from the daemon's config."""
    return Policy(
        lease_s=config.lease_s,
        failure_lease_s=config.effective_failure_lease_s,
        settle_s=config.settle_s,
        settle_max_s=max(3 * config.settle_s, config.settle_s),
        drain_timeout_s=config.drain_timeout_s,
        drain_margin_s=config.drain_margin_s,
        grow_checkpoint_timeout_s=config.grow_checkpoint_timeout_s,
    )


def security_of(config: DaemonConfig
                ) -> tuple[list[grpc.aio.ServerInterceptor], grpc.ServerCredentials | None]:
    """The token check and TLS credentials the config asks for.

    Raises RuntimeError, saying what to fix, if a file cannot be read or the listen address
    would serve plaintext beyond loopback (spotwise.daemon.auth.check_listen).
    """
    from spotwise.daemon import auth

    interceptors: list[grpc.aio.ServerInterceptor] = []
    credentials = None
    try:
        if config.tokens_file:
            interceptors.append(auth.TokenAuthInterceptor(auth.TokenStore.load(config.tokens_file)))
        if config.tls_cert_file:
            credentials = auth.server_credentials(
                cert_file=config.tls_cert_file,
                key_file=config.tls_key_file,
                client_ca_file=config.tls_client_ca_file or None,
                require_client_cert=config.tls_require_client_cert,
            )
        why = auth.check_listen(config.listen, credentials is not None, config.allow_insecure,
                                tokens_enabled=bool(interceptors))
    except (OSError, ValueError) as exc:
        raise RuntimeError(str(exc)) from exc
    log.log(logging.WARNING if why.startswith(auth.INSECURE_MARK) else logging.INFO,
            "listen: %s; tokens %s", why, "checked" if interceptors else "not checked")
    return interceptors, credentials


def make_provider(config: DaemonConfig) -> Provider | None:
    """The provider the config names; None for "none" (agents register on their own)."""
    if config.provider == "local":
        from spotwise.cloud.local import LocalProvider

        # Training entrypoints say "python": make it this interpreter (the one with torch and
        # spotwise) even when the daemon was started without activating its virtualenv.
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return LocalProvider(
            log_dir=config.effective_log_dir,
            grace_s=config.grace_s,
            max_nodes=config.local_max_nodes,
            env=env,
            instance_type=config.local_instance_type,
            price_per_hour=config.local_price_per_hour,
        )
    if config.provider == "ec2":
        from spotwise.cloud.ec2 import Ec2Provider

        return Ec2Provider(config.ec2.ec2_config())
    if config.provider == "ray":
        from spotwise.cloud.ray import RayProvider

        return RayProvider(config.ray.ray_config(grace_s=config.grace_s))
    return None


def make_pricer(config: DaemonConfig) -> NodePricer:
    """Node prices as [daemon.pricing] says: the price book (spot price history, Pricing API,
    cached, the offline table as fallback), or the offline table only."""
    p = config.pricing
    if config.pricing_offline:
        return NodePricer(refresh_s=p.refresh_s, unpriced_usd_per_hour=p.unpriced_usd_per_hour)
    from spotwise.cloud.pricing import PriceBook, PricingConfig

    book = PriceBook(PricingConfig(
        region=p.region or config.ec2.region,
        pricing_region=p.pricing_region,
        ec2_endpoint_url=p.ec2_endpoint_url or config.ec2.endpoint_url or None,
        pricing_endpoint_url=p.pricing_endpoint_url or None,
        on_demand_max_age_s=p.on_demand_max_age_s,
        spot_max_age_s=p.spot_max_age_s,
        timeout_s=p.timeout_s,
    ))
    return NodePricer(book, refresh_s=p.refresh_s, unpriced_usd_per_hour=p.unpriced_usd_per_hour)


class Daemon:
    """The coordinator daemon, startable in-process (tests) or by `serve`.

    `start()` opens the store (reloading the state), binds `config.listen` and starts the
    loops; `stop()` undoes it. Raises RuntimeError if it cannot serve (the address cannot be
    bound, or the security settings refuse it).

    Security comes from the config (tokens_file, tls_*) unless `interceptors` or
    `server_credentials` are given, which then replace it.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        provider: Provider | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.provider = provider
        self._interceptors = None if interceptors is None else tuple(interceptors)
        self._credentials = server_credentials
        self._clock = clock
        self.metrics: Metrics | None = None
        self.token_store: TokenStore | None = None
        self.metrics_exporter: MetricsExporter | None = None
        self.store: Store | None = None
        self.coordinator: Coordinator | None = None
        self.loop: ControlLoop | None = None
        self.port = 0
        self.beats: BeatServer | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        """host:port clients and agents dial (the bound port, when listen asked for 0)."""
        host = self.config.listen.rpartition(":")[0]
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        config = self.config
        if self._interceptors is None and self._credentials is None:
            interceptors, credentials = security_of(config)
        else:
            interceptors, credentials = list(self._interceptors or ()), self._credentials
        self.token_store = next((i.store for i in interceptors
                                 if isinstance(i, TokenAuthInterceptor)), None)
        self.metrics = Metrics()
        if config.metrics_listen:
            try:
                self.metrics_exporter = start_exporter(self.metrics, config.metrics_listen)
            except OSError as exc:
                raise RuntimeError(f"cannot serve metrics on {config.metrics_listen}: {exc}"
                                   ) from exc
        try:
            self.store = Store(config.db_path)
        except (OSError, sqlite3.Error, StoreError) as exc:
            self._close_opened()
            raise RuntimeError(f"cannot open the state database {config.db_path}: {exc}") from exc
        self.coordinator = Coordinator(
            self.store,
            policy=policy_of(config),
            heartbeat_interval_s=config.heartbeat_interval_s,
            restart_grace_s=config.restart_grace_s,
            accounting_interval_s=config.accounting_interval_s,
            metrics=self.metrics,
            pricer=make_pricer(config),
            default_instance_types=tuple(config.ec2.instance_types) if config.provider == "ec2" else (),
            agent_prices=config.agent_prices,
            provider_price=self.provider.node_price if self.provider is not None else None,
            provider_prices_all=self.provider is not None and bool(self.provider.fleet_price()),
            teardown_s=config.budget_teardown_s,
            autocommit=False,
            clock=self._clock,
        )
        self.loop = ControlLoop(self.coordinator, tick_s=config.tick_s, clock=self._clock)
        # Innermost: the malformed-request check wraps the servicers' own handlers.
        interceptors = [*interceptors, MalformedRequestInterceptor()]
        # No SO_REUSEPORT: a second daemon on the same port must fail, not share its traffic.
        server = grpc.aio.server(interceptors=interceptors,
                                 options=[("grpc.so_reuseport", 0),
                                          ("grpc.max_receive_message_length",
                                           MAX_REQUEST_BYTES)])
        add_job_service(JobServicer(
            self.coordinator, self.loop, checkpoint_prefixes=config.checkpoint_prefixes,
            max_watchers_per_principal=config.max_watchers_per_principal), server)
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(self.coordinator, self.loop), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if credentials is not None:
                port = server.add_secure_port(config.listen, credentials)
            else:
                port = server.add_insecure_port(config.listen)
        except RuntimeError:
            port = 0
        if not port:
            self._close_opened()
            raise RuntimeError(f"cannot listen on {config.listen}")
        self.port = port
        await server.start()
        self._server = server
        try:
            self.beats = await start_beats(self.coordinator, config, tokens=self.token_store,
                                           clock=self._clock)
        except RuntimeError:
            await server.stop(0)
            self._server = None
            self._close_opened()
            raise
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._stop.clear()
        self._tasks = [asyncio.create_task(self.loop.run(self._stop), name="control-loop")]
        if self.provider is not None:
            daemon_address = config.advertise_address or self.address
            if self.provider.name == "ec2" and daemon_address.startswith(("127.", "localhost")):
                log.warning("ec2 provider: new instances' agents will dial %s, a loopback address; "
                            "set advertise_address", daemon_address)
            fleet = FleetLoop(
                self.provider,
                self.coordinator,
                daemon_address=daemon_address,
                interval_s=config.fleet_interval_s,
                timeout_s=config.provider_timeout_s,
                max_nodes=config.local_max_nodes if config.provider == "local" else 0,
            )
            self._tasks.append(asyncio.create_task(fleet.run(self._stop), name="fleet-loop"))
        if config.notice_queue_url:
            self._tasks.append(asyncio.create_task(
                self._notice_loop().run(self._stop), name="notice-loop"))
        if self.provider is not None and self.provider.name == "ray":
            # Ray's drains (DrainNode with a deadline) are interruption notices.
            from spotwise.cloud.provider import ProviderError
            from spotwise.cloud.ray_drain import RayDrainReader

            reader = RayDrainReader(self.provider, poll_s=config.ray.drain_poll_s)  # type: ignore[arg-type]
            self._tasks.append(asyncio.create_task(NoticeLoop(
                reader, self.coordinator, wait_time_s=5, errors=(ProviderError,)
            ).run(self._stop), name="ray-drain-loop"))
        if self.coordinator.pricer.book is not None:
            self._tasks.append(asyncio.create_task(refresh_loop(
                self.coordinator.pricer, self._stop,
                timeout_s=config.pricing.timeout_s * 10), name="pricing-loop"))
        loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
        log.info("daemon serving on %s (state %s, provider %s, %s loop)", self.address,
                 config.db_path, self.provider.name if self.provider else "none", loop)

    def _notice_loop(self) -> NoticeLoop:
        from spotwise.cloud.sqs_events import SqsEventsConfig, SqsNoticeReader

        config = self.config
        assert self.coordinator is not None
        reader = SqsNoticeReader(SqsEventsConfig(
            queue_url=config.notice_queue_url,
            region=config.notice_queue_region,
            endpoint_url=config.notice_queue_endpoint_url or None,
            wait_time_s=config.notice_queue_wait_s,
        ))
        return NoticeLoop(reader, self.coordinator, wait_time_s=config.notice_queue_wait_s)

    async def mark_not_serving(self) -> None:
        """Turn every health status NOT_SERVING for good (the first step of a stop)."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop serving and the loops; the nodes keep running (a restarted daemon reconciles)."""
        self._stop.set()
        await self.mark_not_serving()
        if self.beats is not None:
            await self.beats.stop()
            self.beats = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._tasks:  # the control loop ends after its tick: a batch it writes commits
            await asyncio.wait(self._tasks[:1], timeout=LOOP_STOP_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self.coordinator is not None and self.store is not None:
            # What handlers staged since the last tick (an accepted report, say) is stored
            # before the daemon goes: a graceful stop forgets nothing it answered.
            try:
                self.coordinator.commit()
            except Exception:  # the store is gone or full; the restart reconciles from agents
                log.exception("the last changes could not be stored at shutdown")
        if self.provider is not None:
            self.provider.close()
        self._close_opened()

    def _close_opened(self) -> None:
        """Close the metrics exporter and the store, if open (a stop, or a refused start)."""
        if self.metrics_exporter is not None:
            self.metrics_exporter.close()
            self.metrics_exporter = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def reload_tokens(self) -> bool:
        """Re-read the tokens file (SIGHUP): added tokens work and removed ones stop working
        from the next call. On an unreadable or malformed file the old tokens stay; returns
        whether the new file took effect."""
        if self.token_store is None or self.token_store.path is None:
            log.info("reload: no tokens file to re-read")
            return False
        try:
            self.token_store.reload()
        except (OSError, ValueError) as exc:
            log.error("reload: kept the old tokens: %s", exc)
            return False
        log.info("reload: %d tokens from %s", len(self.token_store), self.token_store.path)
        return True

    async def wait_stopped(self) -> None:
        """Wait until `stop()` is called."""
        await self._stop.wait()


async def serve(config: DaemonConfig) -> None:
    """Run the daemon until SIGTERM or SIGINT (what `spotwise daemon` calls)."""
    from spotwise.common.sdnotify import Notifier, NotifyError, start_watchdog

    daemon = Daemon(config, provider=make_provider(config))
    await daemon.start()
    notifier = Notifier.from_env()
    notifier.ready(status=f"serving on {daemon.address}")
    watchdog = start_watchdog(notifier)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_tokens)
    try:
        await stopping.wait()
    finally:
        log.info("daemon stopping")
        # Health turns NOT_SERVING before anything else, so that load balancers and watchers
        # move away while in-flight calls still finish.
        await daemon.mark_not_serving()
        with contextlib.suppress(NotifyError):
            notifier.stopping(status="stopping")
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await daemon.stop()


class DaemonThread:
    """A Daemon on its own event loop in a background thread, for synchronous callers.

    `start()` returns once the daemon serves (or raises what start raised, within
    `timeout_s`); `stop()` stops it and joins the thread. Also a context manager.
    """

    def __init__(self, config: DaemonConfig, *, timeout_s: float = 30.0, **daemon_kwargs: object
                 ) -> None:
        self.daemon = Daemon(config, **daemon_kwargs)  # type: ignore[arg-type]
        self._timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        return self.daemon.address

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.daemon.start())
        except BaseException as exc:  # handed to the starting thread, which raises it
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self.daemon.wait_stopped())
            loop.run_until_complete(self.daemon.stop())
        finally:
            loop.close()

    def start(self) -> DaemonThread:
        self._thread = threading.Thread(target=self._run, name="spotwise-daemon", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout_s):
            raise TimeoutError(f"daemon did not start within {self._timeout_s}s")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the daemon's loop thread (where the coordinator lives) and return its
        result, e.g. `d.call(lambda: d.daemon.coordinator.tick())`."""
        assert self._loop is not None

        async def run() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout_s)

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.daemon._stop.set)
            self._thread.join(self._timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"daemon did not stop within {self._timeout_s}s")
        self._thread = None

    def __enter__(self) -> DaemonThread:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
