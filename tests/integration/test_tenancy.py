"""Clients are isolated: a job belongs to the token that submitted it, env values never leave
the daemon in an answer, lists page, and watch streams and specs are bounded. Against a real
daemon with a tokens file; each attack asserts it fails and that nothing changed."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from spotwise.config import DaemonConfig
from spotwise.daemon import servicers
from spotwise.daemon.auth import Role, mint_token
from spotwise.daemon.controller import Policy
from spotwise.daemon.coordinator import Coordinator
from spotwise.daemon.server import DaemonThread
from spotwise.daemon.store import Store
from spotwise.proto.v1 import jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec
from tests.support.grpcserve import code_of, job_service
from tests.support.wait import until

RPC_TIMEOUT_S = 10.0


class Fleet:
    def __init__(self, daemon: DaemonThread, tokens: dict[str, str]) -> None:
        self.daemon = daemon
        self.tokens = tokens
        self.channel = grpc.insecure_channel(daemon.address)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)

    def meta(self, who: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.tokens[who]}"),)

    def submit(self, who: str, **kw: object) -> str:
        spec: dict[str, object] = {"entrypoint": ["python", "t.py"],
                                   "checkpoint": {"uri": "/tmp/ck"}, "global_batch_size": 4,
                                   "nodes": {"min": 1, "max": 1}}
        spec.update(kw)
        return self.jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(spec=JobSpec.model_validate(spec).to_proto()),
            metadata=self.meta(who), timeout=RPC_TIMEOUT_S).job_id

    def code(self, method: str, request: object, who: str) -> grpc.StatusCode:
        try:
            result = getattr(self.jobs, method)(request, metadata=self.meta(who),
                                                timeout=RPC_TIMEOUT_S)
            if method == "WatchJob":
                next(result)
                result.cancel()
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    minted = {"alice": mint_token(Role.CLIENT, "alice"), "bob": mint_token(Role.CLIENT, "bob"),
              "ops": mint_token(Role.ADMIN, "ops"), "ops2": mint_token(Role.ADMIN, "ops2")}
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("".join(m.line + "\n" for m in minted.values()))
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state",
                          tokens_file=str(tokens_file), max_watchers_per_principal=2,
                          tick_s=0.05)
    with DaemonThread(config) as d:
        f = Fleet(d, {k: m.token for k, m in minted.items()})
        try:
            yield f
        finally:
            f.channel.close()


def test_a_client_sees_watches_and_cancels_only_its_own_jobs(
        fleet: Fleet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="spotwise.daemon.coordinator")
    job_id = fleet.submit("alice", env={"WANDB_API_KEY": "s3cr3t"})
    for method, request in (("GetJob", jobs_pb2.GetJobRequest(job_id=job_id)),
                            ("WatchJob", jobs_pb2.WatchJobRequest(job_id=job_id, replay=True)),
                            ("GetCost", jobs_pb2.GetCostRequest(job_id=job_id)),
                            ("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id))):
        # The same answer as for a job that does not exist: ids do not leak.
        assert fleet.code(method, request, "bob") is grpc.StatusCode.NOT_FOUND, method
    assert not fleet.jobs.ListJobs(jobs_pb2.ListJobsRequest(), metadata=fleet.meta("bob"),
                                   timeout=RPC_TIMEOUT_S).jobs
    mine = fleet.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=fleet.meta("alice"),
                             timeout=RPC_TIMEOUT_S)
    assert mine.state == jobs_pb2.JOB_STATE_PENDING  # bob's cancel changed nothing
    assert mine.owner == "alice"
    assert dict(mine.spec.env) == {"WANDB_API_KEY": "<redacted>"}  # not even to its owner
    listed = fleet.jobs.ListJobs(jobs_pb2.ListJobsRequest(), metadata=fleet.meta("ops"),
                                 timeout=RPC_TIMEOUT_S).jobs
    assert [j.id for j in listed] == [job_id] and listed[0].spec.env["WANDB_API_KEY"] == "<redacted>"
    stored = fleet.daemon.daemon.store.jobs()[0]  # type: ignore[union-attr]
    assert stored.owner == "alice" and b"s3cr3t" in stored.spec  # the nodes still get it
    # An admin may cancel anyone's job, and the cancel names who did it.
    assert fleet.code("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id), "ops") \
        is grpc.StatusCode.OK
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job={job_id}: ")]
    assert f"job={job_id}: submitted by alice (unnamed)" in said
    assert [m for m in said if "cancelled by" in m] == [f"job={job_id}: cancelled by ops"]


def test_lists_page_and_specs_and_watchers_are_bounded(fleet: Fleet) -> None:
    ids = [fleet.submit("alice", name=f"j{k}") for k in range(5)]
    fleet.submit("bob")
    seen, token = [], ""
    while True:
        page = fleet.jobs.ListJobs(jobs_pb2.ListJobsRequest(page_size=2, page_token=token),
                                   metadata=fleet.meta("alice"), timeout=RPC_TIMEOUT_S)
        assert len(page.jobs) <= 2
        seen += [j.id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    assert fleet.code("ListJobs", jobs_pb2.ListJobsRequest(page_token="bogus!"), "alice") \
        is grpc.StatusCode.INVALID_ARGUMENT

    big = JobSpec.model_validate({"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                                  "global_batch_size": 4}).to_proto()
    big.env["BLOB"] = "x" * 70_000
    assert fleet.code("SubmitJob", jobs_pb2.SubmitJobRequest(spec=big), "alice") \
        is grpc.StatusCode.INVALID_ARGUMENT
    assert len(fleet.daemon.daemon.store.jobs()) == 6  # type: ignore[union-attr]

    streams = [fleet.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=ids[0], replay=True),
                                   metadata=fleet.meta("alice"), timeout=30) for _ in range(2)]
    try:
        for s in streams:
            next(s)  # both open
        assert fleet.code("WatchJob", jobs_pb2.WatchJobRequest(job_id=ids[0]), "alice") \
            is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another principal has its own allowance.
        assert fleet.code("WatchJob", jobs_pb2.WatchJobRequest(job_id=ids[0], replay=True),
                          "ops") is grpc.StatusCode.OK
    finally:
        for s in streams:
            s.cancel()


def test_a_live_event_is_serialized_once_however_many_watch_it(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = fleet.submit("ops")
    calls: list[str] = []
    real = servicers.event_proto

    def counting(row):  # noqa: ANN001, ANN202
        calls.append(row.kind)
        return real(row)

    monkeypatch.setattr(servicers, "event_proto", counting)
    got: list[list[str]] = [[] for _ in range(4)]
    streams = [(k, fleet.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id),
                                       metadata=fleet.meta("ops" if k < 2 else "ops2"),
                                       timeout=30)) for k in range(4)]
    readers = []
    for k, s in streams:
        t = threading.Thread(target=lambda k=k, s=s: got[k].extend(e.kind for e in s),
                             daemon=True)
        t.start()
        readers.append(t)
    until(lambda: fleet.daemon.call(
        lambda: fleet.daemon.daemon.coordinator.events.watchers(job_id)) == len(streams),
        10, "the watchers to subscribe")
    assert fleet.code("CancelJob", jobs_pb2.CancelJobRequest(job_id=job_id), "ops") \
        is grpc.StatusCode.OK
    for t in readers:
        t.join(10)
    assert all(got[k] == ["state"] for k, _ in streams)
    assert calls == ["state"]  # one cancel event, serialized once for all four watchers


def test_the_client_lists_every_page(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    import spotwise.client as client_module

    ids = [fleet.submit("alice", name=f"p{k}") for k in range(5)]
    fleet.submit("bob")
    monkeypatch.setattr(client_module, "LIST_PAGE_SIZE", 2)
    with client_module.Client(fleet.daemon.address, token=fleet.tokens["alice"]) as client:
        assert [j.id for j in client.list()] == ids  # three pages, only alice's


def test_a_page_of_the_largest_jobs_stays_within_what_a_client_takes(fleet: Fleet) -> None:
    """One principal's largest specs (60 KB of entrypoint each, which no redaction shrinks)
    must not break the listing of whoever sees them: pages are bounded in bytes as well."""
    import spotwise.client as client_module

    ids = [fleet.submit("alice", entrypoint=["python", "t.py", "y" * 60_000]) for _ in range(70)]
    with client_module.Client(fleet.daemon.address, token=fleet.tokens["ops"]) as client:
        assert [j.id for j in client.list()] == ids  # 4.2 MB in all: more than one message
    first = fleet.jobs.ListJobs(jobs_pb2.ListJobsRequest(page_size=1000),
                                metadata=fleet.meta("alice"), timeout=RPC_TIMEOUT_S)
    assert first.next_page_token and 1 <= len(first.jobs) < len(ids)
    assert first.ByteSize() <= servicers.MAX_PAGE_BYTES + 1024


def test_a_call_refused_for_the_cap_on_calls_changes_nothing(tmp_path: Path) -> None:
    """At the cap on concurrent Submit and Cancel calls (here 0) both are refused with
    RESOURCE_EXHAUSTED, and the refused cancel has not cancelled the job."""
    coordinator = Coordinator(Store(tmp_path / "db"), policy=Policy(), heartbeat_interval_s=0.5)
    spec = JobSpec.model_validate({"entrypoint": ["python", "t.py"], "checkpoint": {"uri": "/c"},
                                   "global_batch_size": 4}).to_proto()
    job = coordinator.submit(spec)
    coordinator.commit()

    async def run() -> list[grpc.StatusCode]:
        servicer = servicers.JobServicer(coordinator, max_calls=0)
        async with job_service(lambda server: servicers.add_job_service(servicer, server)) as stub:
            return [await code_of(stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.row.id),
                                                 timeout=RPC_TIMEOUT_S)),
                    await code_of(stub.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec),
                                                 timeout=RPC_TIMEOUT_S))]

    assert asyncio.run(run()) == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
    assert job.state.value == "PENDING" and list(coordinator.jobs) == [job.row.id]
    assert [j.state for j in coordinator.store.jobs()] == ["PENDING"]
