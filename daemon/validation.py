"""Bad input stopped at the edge: malformed bytes, and the field rules of agents' requests.

A request whose bytes do not parse is INVALID_ARGUMENT (`MalformedRequestInterceptor`); a bad
job spec is INVALID_ARGUMENT with a google.rpc.BadRequest carrying one field violation per
problem (`bad_request_status`); an agent's Register or ReportEvent with values the store or
its peers cannot take is refused with the fields named (`register_violations`,
`report_violations`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status

from spotwise.proto.v1 import agent_pb2
from spotwise.spec import SpecError

log = logging.getLogger("spotwise.daemon.servicers")

MAX_SPEC_BYTES = 64 * 1024
"""The largest job spec the daemon takes (serialized): a spec is a few kilobytes."""


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
    if len(req.node_secret) > MAX_ID_CHARS:
        problems.append(f"node_secret: at most {MAX_ID_CHARS} characters")
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
    elif kind == "checkpoint_failed":
        numbers = [("step", req.checkpoint_failed.step)]
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
