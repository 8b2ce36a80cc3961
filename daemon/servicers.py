"""JobService and AgentService: thin grpc.aio adapters over the coordinator.

They translate messages and errors and nothing more: a bad job spec becomes INVALID_ARGUMENT
with a google.rpc.BadRequest carrying one field violation per problem (grpcio-status rich
status), an unknown job NOT_FOUND, cancelling an ended job FAILED_PRECONDITION. The decisions
are the coordinator's and the controller's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from spotwise.daemon.auth import check_checkpoint_uri
from spotwise.daemon.coordinator import Coordinator, UnknownJob, job_state_from_proto
from spotwise.daemon.events import WatcherLagged
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import SpecError, validate_spec_proto

log = logging.getLogger(__name__)


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


async def _abort_unknown(context: grpc.aio.ServicerContext, job_id: str) -> None:
    await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")


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
        if not request.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "address: a node must say where its peers reach it")
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
        return self._c.report(request)
