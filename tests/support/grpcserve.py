"""A JobService on a real grpc.aio server on loopback (port 0), and a client stub of it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from grpc import aio

from spotwise.proto.v1 import jobs_pb2_grpc


@contextlib.asynccontextmanager
async def job_service(add: Callable[[aio.Server], None], *,
                      interceptors: Sequence[aio.ServerInterceptor] = ()
                      ) -> AsyncIterator[jobs_pb2_grpc.JobServiceStub]:
    """Serve what `add` puts on the server (with `interceptors`) and yield a stub of it; the
    server stops on the way out."""
    server = aio.server(interceptors=list(interceptors))
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield jobs_pb2_grpc.JobServiceStub(channel)
    finally:
        await server.stop(grace=None)


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    """The status a call ends with (OK when it answers)."""
    try:
        await call
    except aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK
