"""JobService and AgentService: thin grpc.aio adapters over the coordinator.

They translate messages and errors and nothing more: a bad job spec becomes INVALID_ARGUMENT
with a google.rpc.BadRequest carrying one field violation per problem (grpcio-status rich
status), an unknown job NOT_FOUND, cancelling an ended job FAILED_PRECONDITION. The decisions
are the coordinator's and the controller's. Bytes that do not parse as the request message are
INVALID_ARGUMENT too (`MalformedRequestInterceptor`), before any servicer runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from spotwise.daemon.auth import check_checkpoint_uri
from spotwise.daemon.coordinator import Coordinator, UnknownJob, job_state_from_proto
from spotwise.daemon.events import WatcherLagged
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import SpecError, validate_spec_proto

log = logging.getLogger(__name__)


class _Malformed:
    """What the lenient deserializer hands on for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class MalformedRequestInterceptor(aio.ServerInterceptor):
    """A request whose bytes do not parse as its message is answered INVALID_ARGUMENT naming
    the parse error, with one WARNING line. (Left to gRPC, a parse error is logged at ERROR
    with a traceback per request and answered UNKNOWN, as if the daemon had a bug.)
    Install it last, so that it wraps the servicers' own handlers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as e:  # DecodeError, or whatever a deserializer raises
                return _Malformed(f"{type(e).__name__}: {e}")

        async def refuse(request: _Malformed, context: aio.ServicerContext) -> None:
            log.warning("refused %s: malformed request (%s)", method, request.error)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"malformed request: {request.error}")

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                result = inner_stream(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:
                    await result

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=lenient,
                response_serializer=handler.response_serializer)

        inner = handler.unary_unary

        async def unary_unary(request: Any, context: aio.ServicerContext) -> Any:
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=lenient,
            response_serializer=handler.response_serializer)


def bad_request_status(error: SpecError) -> grpc.Status:
    """INVALID_ARGUMENT carrying a BadRequest with one field violation per problem."""
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f"spec.{f}" if f else "spec",
                                                        description=d)
            for f, d in error.violations
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad)
    return rpc_status.to_status(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error), details=[detail])
    )


MAX_ECHO_CHARS = 200
"""At most this much of a caller's value is quoted back in an error message: the message
travels in a trailer, and gRPC answers RESOURCE_EXHAUSTED instead when trailers exceed ~8 KiB."""


def echo(value: str) -> str:
    """repr of a caller's value for an error message, cut to MAX_ECHO_CHARS."""
    if len(value) <= MAX_ECHO_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHO_CHARS]!r}... ({len(value)} characters)"


async def _abort_unknown(context: grpc.aio.ServicerContext, job_id: str) -> None:
    await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {echo(job_id)}")


MAX_ID_CHARS = 256
"""Longest node, instance, zone, job or provider id an agent may send."""

NODE_LIFECYCLES = ("", "spot", "on-demand")
"""RegisterRequest.lifecycle values ("" = spot)."""


def _printable(value: str) -> bool:
    return all(c.isprintable() and not c.isspace() for c in value)


def register_violations(req: agent_pb2.RegisterRequest) -> list[str]:
    """What is wrong with a RegisterRequest, one "field: why" per problem (empty when fine).

    Values the store or the controller cannot take (a NaN price is NULL to SQLite) or that
    peers could not use (a port beyond 65535) are refused here rather than failing later.
    """
    problems = []
    if not req.address:
        problems.append("address: a node must say where its peers reach it")
    elif len(req.address) > MAX_ID_CHARS or not _printable(req.address):
        problems.append(f"address: not a host name or IP address: {echo(req.address)}")
    if req.store_port > 65535:
        problems.append(f"store_port: {req.store_port} is not a TCP port")
    if not (math.isfinite(req.price_per_hour) and req.price_per_hour >= 0):
        problems.append(f"price_per_hour: must be a finite number >= 0, got {req.price_per_hour}")
    if req.lifecycle not in NODE_LIFECYCLES:
        problems.append(f"lifecycle: must be spot or on-demand, got {echo(req.lifecycle)}")
    for name in ("node_id", "instance_id", "instance_type", "zone", "current_job_id",
                 "provider_node"):
        value = getattr(req, name)
        if len(value) > MAX_ID_CHARS or not _printable(value):
            problems.append(f"{name}: at most {MAX_ID_CHARS} printable characters without "
                            f"spaces, got {echo(value)}")
    if len(req.log_dir) > 4096 or "\0" in req.log_dir:
        problems.append("log_dir: at most 4096 characters, no NUL")
    return problems


MAX_STORED_INT = 2**63 - 1
"""The largest integer SQLite stores: larger uint64 values are refused, not overflowed."""


def report_violations(req: agent_pb2.ReportEventRequest) -> list[str]:
    """What is wrong with a ReportEventRequest, one "field: why" per problem (empty when fine):
    numbers the store cannot hold (a uint64 beyond 2**63 - 1) or times and rates that are not
    finite. A NaN loss is allowed: a diverged run is worth reporting."""
    problems = []
    if not math.isfinite(req.time):
        problems.append(f"time: must be a finite unix time, got {req.time}")
    kind = req.WhichOneof("event")
    numbers: list[tuple[str, int]] = []
    if kind == "checkpoint_committed":
        c = req.checkpoint_committed
        numbers = [("step", c.step), ("bytes", c.bytes), ("cursor", c.cursor)]
        if len(c.path) > 4096 or "\0" in c.path:
            problems.append("checkpoint_committed.path: at most 4096 characters, no NUL")
    elif kind == "progress":
        p = req.progress
        numbers = [("step", p.step)]
        if not (math.isfinite(p.samples_per_second) and p.samples_per_second >= 0):
            problems.append("progress.samples_per_second: must be a finite number >= 0, got "
                            f"{p.samples_per_second}")
    elif kind == "interruption_notice":
        if not math.isfinite(req.interruption_notice.deadline):
            problems.append("interruption_notice.deadline: must be a finite unix time, got "
                            f"{req.interruption_notice.deadline}")
        if len(req.interruption_notice.action) > MAX_ID_CHARS:
            problems.append(f"interruption_notice.action: at most {MAX_ID_CHARS} characters")
    for name, value in numbers:
        if value > MAX_STORED_INT:
            problems.append(f"{kind}.{name}: {value} is beyond {MAX_STORED_INT}")
    return problems


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """What job clients call (the CLI, the SDK)."""

    def __init__(self, coordinator: Coordinator, *,
                 checkpoint_prefixes: Sequence[str] = ()) -> None:
        self._c = coordinator
        self._prefixes = tuple(checkpoint_prefixes)

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.SubmitJobResponse:
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
        job = self._c.submit(spec.to_proto())
        return jobs_pb2.SubmitJobResponse(job_id=job.row.id)

    async def GetJob(self, request: jobs_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        try:
            return self._c.job_proto(self._c.job(request.job_id))
        except UnknownJob:
            await _abort_unknown(context, request.job_id)
            raise AssertionError("unreachable") from None

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.ListJobsResponse:
        try:
            wanted = {job_state_from_proto(s) for s in request.states}
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"states: unknown job state in {list(request.states)}")
        jobs = sorted(self._c.jobs.values(), key=lambda j: (j.row.created_at, j.row.id))
        return jobs_pb2.ListJobsResponse(
            jobs=[self._c.job_proto(j) for j in jobs if not wanted or j.state in wanted]
        )

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        try:
            job = self._c.cancel(request.job_id)
        except UnknownJob:
            await _abort_unknown(context, request.job_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return self._c.job_proto(job)

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[jobs_pb2.JobEvent]:
        try:
            job = self._c.job(request.job_id)
        except UnknownJob:
            await _abort_unknown(context, request.job_id)
        stream = self._c.events.watch(job.row.id, replay=request.replay,
                                      ended=lambda: job.state.terminal)
        try:
            async for row in stream:
                yield self._c.event_proto(row)
        except WatcherLagged as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    async def GetCost(self, request: jobs_pb2.GetCostRequest,
                      context: grpc.aio.ServicerContext) -> jobs_pb2.CostReport:
        try:
            job = self._c.job(request.job_id)
        except UnknownJob:
            await _abort_unknown(context, request.job_id)
        return self._c.cost_report(job)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """What node agents call."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._c = coordinator

    async def Register(self, request: agent_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> agent_pb2.RegisterResponse:
        problems = register_violations(request)
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return self._c.register(request)

    async def Heartbeat(self, request: agent_pb2.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> agent_pb2.HeartbeatResponse:
        started = time.perf_counter()
        response = self._c.heartbeat(request)
        if self._c.metrics is not None:
            self._c.metrics.observe_heartbeat_latency(time.perf_counter() - started)
        return response

    async def ReportEvent(self, request: agent_pb2.ReportEventRequest,
                          context: grpc.aio.ServicerContext) -> agent_pb2.ReportEventResponse:
        problems = report_violations(request)
        if problems:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return self._c.report(request)
