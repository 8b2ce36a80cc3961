"""JobService and AgentService: thin grpc.aio adapters over the coordinator.

They translate messages and errors, check who may see what, and nothing more: a bad job spec
becomes INVALID_ARGUMENT with field violations (`daemon.validation`), an unknown job (or
another principal's) NOT_FOUND, cancelling an ended job FAILED_PRECONDITION, a node call
without the node's credential PERMISSION_DENIED. Submit, Cancel and Register answer after
their write commits (`ControlLoop.flush`); heartbeats and reports never wait for the disk.

Tenancy: a job belongs to the principal whose token submitted it; a client token sees, watches
and cancels its own jobs, an admin token all. `env` values are redacted in every answer.
Bounds: at most `max_watchers_per_principal` WatchJob streams per principal, at most
`max_calls` Submit and Cancel calls waiting for their write at once (the other unary calls
answer from memory without waiting), one heartbeat connection per node on either transport
(a new one replaces the old), each live event is serialized once for all its watchers, and a
ListJobs page stays under `MAX_PAGE_BYTES`.
"""

from __future__ import annotations

import base64
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc

from spotwise.common.uri import check_checkpoint_uri
from spotwise.daemon import auth
from spotwise.daemon.agents import MachineClaimed, NodeCredentialError
from spotwise.daemon.coordinator import Coordinator, UnknownJob, Unpriced
from spotwise.daemon.events import WatcherLagged
from spotwise.daemon.loop import ControlLoop
from spotwise.daemon.state import JobRecord
from spotwise.daemon.store import EventRow
from spotwise.daemon.validation import (
    MAX_SPEC_BYTES,
    bad_request_status,
    echo,
    register_violations,
    report_violations,
)
from spotwise.daemon.wire import event_proto, job_state_from_proto
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import SpecError, validate_spec_proto

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_PAGE_BYTES = 1 << 20
"""A ListJobs page holds fewer jobs when they would take more than this (always at least one).
A client takes at most 4 MiB in one message by default, and a job's spec may be 64 KiB: one
principal's 65 largest jobs would otherwise break the listing of everyone who sees them."""


def _principal() -> auth.Principal | None:
    return auth.current_principal()


def visible(job: JobRecord, who: auth.Principal | None) -> bool:
    """Whether `who` may see the job: its owner, an admin, or anyone without tokens."""
    if who is None or who.role is auth.Role.ADMIN:
        return True
    return job.row.owner == who.name


def event_bytes(row: EventRow) -> bytes:
    """The event as sent to watchers, serialized once however many watch it."""
    if row.wire is None:
        row.wire = event_proto(row).SerializeToString()
    return row.wire


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """What job clients call (the CLI, the SDK)."""

    def __init__(self, coordinator: Coordinator, loop: ControlLoop | None = None, *,
                 checkpoint_prefixes: tuple[str, ...] | list[str] = (),
                 max_watchers_per_principal: int = 64, max_calls: int = 256) -> None:
        self._c = coordinator
        self._loop = loop
        self._prefixes = tuple(checkpoint_prefixes)
        self.max_watchers = max_watchers_per_principal
        self.max_calls = max_calls
        self._watchers: Counter[str] = Counter()
        self._calls = 0

    async def _committed(self) -> None:
        if self._loop is not None:
            await self._loop.flush()
        else:
            self._c.commit()

    async def _job(self, job_id: str, context: grpc.aio.ServicerContext) -> JobRecord:
        """The job if the caller may see it; NOT_FOUND otherwise (the same answer for another
        principal's job, so ids do not leak)."""
        job = self._c.jobs.get(job_id)
        if job is None or not visible(job, _principal()):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {echo(job_id)}")
        return job  # type: ignore[return-value]

    async def _enter(self, context: grpc.aio.ServicerContext) -> None:
        if self._calls >= self.max_calls:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the daemon is serving {self._calls} calls; try again")
        self._calls += 1

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.SubmitJobResponse:
        size = request.spec.ByteSize()
        if size > MAX_SPEC_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"spec: {size} bytes is more than the {MAX_SPEC_BYTES} allowed")
        try:
            spec = validate_spec_proto(request.spec)
            if self._prefixes:
                try:
                    check_checkpoint_uri(spec.checkpoint.uri, self._prefixes)
                except ValueError as exc:
                    raise SpecError([("checkpoint.uri", str(exc))]) from None
        except SpecError as exc:
            log.info("refused a job spec: %s", exc)
            await context.abort_with_status(bad_request_status(exc))
        who = _principal()
        await self._enter(context)
        try:
            job = self._c.submit(spec.to_proto(), owner=who.name if who else "")
            await self._committed()
        except Unpriced as exc:
            log.info("refused a job spec: %s", exc)
            await context.abort_with_status(bad_request_status(SpecError([("budget_usd",
                                                                          str(exc))])))
        finally:
            self._calls -= 1
        return jobs_pb2.SubmitJobResponse(job_id=job.row.id)

    async def GetJob(self, request: jobs_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        return self._c.job_proto(await self._job(request.job_id, context))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.ListJobsResponse:
        try:
            wanted = {job_state_from_proto(s) for s in request.states}
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"states: unknown job state in {list(request.states)}")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        after: tuple[float, str] | None = None
        if request.page_token:
            try:
                created, _, job_id = base64.urlsafe_b64decode(
                    request.page_token.encode()).decode().partition(" ")
                after = (float(created), job_id)
            except (ValueError, UnicodeDecodeError):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "page_token: not a token this daemon gave")
        who = _principal()
        jobs = sorted((j for j in self._c.jobs.values()
                       if visible(j, who) and (not wanted or j.state in wanted)
                       and (after is None or (j.row.created_at, j.row.id) > after)),
                      key=lambda j: (j.row.created_at, j.row.id))
        page: list[jobs_pb2.Job] = []
        used = 0
        for j in jobs[:size]:
            proto = self._c.job_proto(j)
            used += proto.ByteSize()
            if page and used > MAX_PAGE_BYTES:
                break
            page.append(proto)
        token = ""
        if len(jobs) > len(page):
            last = jobs[len(page) - 1].row
            token = base64.urlsafe_b64encode(f"{last.created_at!r} {last.id}".encode()).decode()
        return jobs_pb2.ListJobsResponse(jobs=page, next_page_token=token)

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        job = await self._job(request.job_id, context)
        who = _principal()
        await self._enter(context)  # before the cancel: a refused call changes nothing
        try:
            try:
                self._c.cancel(job.row.id, by=who.name if who else "")
            except UnknownJob:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {echo(request.job_id)}")
            except ValueError as exc:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            await self._committed()
        finally:
            self._calls -= 1
        return self._c.job_proto(job)

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        job = await self._job(request.job_id, context)
        who = _principal()
        name = who.name if who else ""
        if self._watchers[name] >= self.max_watchers:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self._watchers[name]} watch streams already open for "
                                f"{name or 'this daemon'} (at most {self.max_watchers})")
        self._watchers[name] += 1
        try:
            stream = self._c.events.watch(job.row.id, replay=request.replay,
                                          ended=lambda: job.state.terminal)
            async for row in stream:
                yield event_bytes(row)
        except WatcherLagged as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        finally:
            self._watchers[name] -= 1

    async def GetCost(self, request: jobs_pb2.GetCostRequest,
                      context: grpc.aio.ServicerContext) -> jobs_pb2.CostReport:
        return self._c.cost_report(await self._job(request.job_id, context))


def add_job_service(servicer: JobServicer, server: grpc.aio.Server) -> None:
    """Register JobService as the generated code does, except that WatchJob's answers are
    bytes serialized once per event (see `event_bytes`)."""

    class _Capture:
        handlers: dict[str, grpc.RpcMethodHandler] = {}

        def add_generic_rpc_handlers(self, _handlers: object) -> None:
            pass

        def add_registered_method_handlers(self, _name: str, handlers: dict) -> None:
            self.handlers = handlers

    capture = _Capture()
    jobs_pb2_grpc.add_JobServiceServicer_to_server(servicer, capture)
    handlers = dict(capture.handlers)
    handlers["WatchJob"] = grpc.unary_stream_rpc_method_handler(
        servicer.WatchJob, request_deserializer=jobs_pb2.WatchJobRequest.FromString,
        response_serializer=lambda b: b)
    service = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class _Stream:
    """A Heartbeats stream in `AgentProtocol.beating`. Retired, it is aborted at its next read
    (which finds another connection in its place)."""

    def retire(self) -> None:
        pass


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """What node agents call."""

    def __init__(self, coordinator: Coordinator, loop: ControlLoop | None = None) -> None:
        self._c = coordinator
        self._loop = loop

    async def Register(self, request: agent_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> agent_pb2.RegisterResponse:
        problems = register_violations(request)
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        try:
            response = self._c.agents.register(request, self._c.clock())
        except NodeCredentialError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except MachineClaimed as exc:
            # ABORTED: the agent retries (the machine's old node is lost at its lease's end).
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        if self._loop is not None:
            await self._loop.flush()
        else:
            self._c.commit()
        return response

    async def Heartbeat(self, request: agent_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> agent_pb2.HeartbeatResponse:
        started = time.perf_counter()
        try:
            response = self._c.heartbeat(request)
        except NodeCredentialError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        if self._c.metrics is not None:
            self._c.metrics.observe_heartbeat_latency(time.perf_counter() - started)
        return response

    async def Heartbeats(self, request_iterator: AsyncIterator[agent_pb2.HeartbeatRequest],
                         context: grpc.aio.ServicerContext) -> None:
        # context.read/write rather than an async generator over the iterator: two layers of
        # generators less per beat, which is most of what a beat costs the daemon.
        agents, metrics, clock, nodes = self._c.agents, self._c.metrics, self._c.clock, self._c.nodes
        # One heartbeat connection per node, on either transport (`AgentProtocol.bind`).
        streams, token = agents.beating, _Stream()
        perf_counter, eof = time.perf_counter, grpc.aio.EOF
        first = await context.read()
        if first is eof:
            return
        node_id = first.node_id
        if node_id not in nodes:
            await context.write(agent_pb2.HeartbeatResponse(reregister=True))
            return
        try:
            agents.authenticate(node_id, first.node_secret)
        except NodeCredentialError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        agents.bind(node_id, token)
        req = first
        try:
            while True:
                started = perf_counter()
                await context.write(agents.beat(nodes.get(node_id), req, clock()))
                if metrics is not None:
                    metrics.observe_heartbeat_latency(perf_counter() - started)
                req = await context.read()
                if req is eof:
                    return
                if streams.get(node_id) is not token:
                    await context.abort(grpc.StatusCode.ABORTED,
                                        f"a newer heartbeat connection of node {node_id} "
                                        "replaced this one")
                if req.node_id and req.node_id != node_id:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        "a heartbeat stream speaks for one node")
        finally:
            agents.unbind(node_id, token)

    async def ReportEvent(self, request: agent_pb2.ReportEventRequest,
                          context: grpc.aio.ServicerContext) -> agent_pb2.ReportEventResponse:
        problems = report_violations(request)
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        if request.node_id not in self._c.nodes:
            return agent_pb2.ReportEventResponse(accepted=False,
                                                 reason=f"unknown node {echo(request.node_id)}")
        try:
            return self._c.report(request)
        except NodeCredentialError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            raise AssertionError("unreachable") from exc
