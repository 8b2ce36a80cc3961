"""Property-based fuzzing (hypothesis) of every RPC of a real in-process daemon, and of job specs.

Every request message of JobService and AgentService is generated field by field from its
descriptor: arbitrary values of each type (odd unicode, NUL, newlines, huge and extreme numbers,
NaN and infinities, unknown enum values, missing or empty sub-messages, oneofs), with ids drawn
often from the jobs, nodes and generations the daemon really knows so that the calls reach the
code behind the lookups. Properties:

- every call is answered within a timeout (no hang), with OK or a code that means bad input:
  INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION (or PERMISSION_DENIED, ABORTED for a node's
  identity); never UNKNOWN or INTERNAL (an exception
  escaping a servicer) nor anything else;
- the daemon stays healthy: health says SERVING, ListJobs answers, and nothing was logged at
  ERROR (a failed control-loop tick, a failed transaction, an exception in a handler);
- job specs as YAML files (generated documents and arbitrary text) are either a JobSpec or a
  SpecError naming fields, never another exception, and each valid one is accepted by the daemon.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import descriptor as pd
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotwise.config import DaemonConfig
from spotwise.daemon.server import MAX_REQUEST_BYTES, DaemonThread
from spotwise.daemon.validation import MAX_SPEC_BYTES
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec, SpecError, validate_spec_proto

REPO = Path(__file__).resolve().parents[2]
CALL_TIMEOUT_S = 10.0
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
           grpc.StatusCode.ABORTED}
"""PERMISSION_DENIED: a call naming a known node without its credential. ABORTED: a Register
naming the instance or provider node of another live node (agents retry it)."""


def allowed(request: Message | bytes) -> set[grpc.StatusCode]:
    """ALLOWED, and RESOURCE_EXHAUSTED for a request over the daemon's size limit (strings of
    100,000 characters in several fields add up past 4 MiB)."""
    size = len(request) if isinstance(request, bytes) else request.ByteSize()
    return ALLOWED | ({grpc.StatusCode.RESOURCE_EXHAUSTED} if size > MAX_REQUEST_BYTES else set())
# SPOTWISE_FUZZ_EXAMPLES=2000 for a longer hunt than the suite's ~10 s.
FUZZ = settings(max_examples=int(os.environ.get("SPOTWISE_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=False, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

ODD = ["", " ", "\x00", "\n", "\r\n", "\t", "\u202e", "\ufeff", "\U0001f600", "e\u0301",
       "\u0000x\u0000", "../../etc/passwd", "%s%n", "' OR 1=1 --", "null", "-1", "NaN",
       "x" * 100_000, "\u4e2d\u6587", "\U0010ffff"]
BIG = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1]


class ErrorLog(logging.Handler):
    """Collects every record at ERROR or above (from the daemon, grpc, anything)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [f"{r.name}: {r.getMessage()}\n{self.format(r) if r.exc_info else ''}"
               for r in self.records]
        self.records.clear()
        return out


class Fuzzed:
    """The daemon under test, its stubs and the ids it knows."""

    def __init__(self, daemon: DaemonThread, errors: ErrorLog, tmp: Path) -> None:
        self.daemon = daemon
        self.tmp = tmp
        self.errors = errors
        self.channel = grpc.insecure_channel(daemon.address)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.agents = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.secret = ""

    def known_job_ids(self) -> list[str]:
        return [j.id for j in self.jobs.ListJobs(jobs_pb2.ListJobsRequest(),
                                                 timeout=CALL_TIMEOUT_S).jobs]

    def assert_healthy(self) -> None:
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT_S)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        self.jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=CALL_TIMEOUT_S)
        # One control-loop tick, run on the daemon's loop: it must not fail on what was stored.
        self.daemon.call(lambda: self.daemon.daemon.coordinator.tick())
        errors = self.errors.take()
        assert not errors, "\n".join(errors)


def _valid_spec(tmp: Path, *, min_nodes: int = 1) -> jobs_pb2.JobSpec:
    return JobSpec.model_validate({
        "name": "fuzz", "entrypoint": ["python", "-c", "import time; time.sleep(600)"],
        "working_dir": str(REPO), "nodes": {"min": min_nodes, "max": min_nodes},
        "checkpoint": {"uri": str(tmp / "ckpt")}, "global_batch_size": 8,
    }).to_proto()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    tmp = tmp_path_factory.mktemp("fuzz")
    errors = ErrorLog()
    root = logging.getLogger()
    root.addHandler(errors)
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp / "state", lease_s=30.0,
                          settle_s=0.0)
    with DaemonThread(config) as daemon:
        f = Fuzzed(daemon, errors, tmp)
        # Something real to aim at: a job that can run on one node, one that never runs, a node.
        f.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=_valid_spec(tmp)), timeout=CALL_TIMEOUT_S)
        f.jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=_valid_spec(tmp, min_nodes=9)),
                         timeout=CALL_TIMEOUT_S)
        f.secret = f.agents.Register(
            agent_pb2.RegisterRequest(node_id="fuzz-node", address="127.0.0.1", store_port=1,
                                      slots=1), timeout=CALL_TIMEOUT_S).node_secret
        try:
            yield f
            f.assert_healthy()
        finally:
            f.channel.close()
            root.removeHandler(errors)


# ---- messages from descriptors --------------------------------------------------------------

_INT_RANGES = {
    pd.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pd.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pd.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    pd.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pd.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pd.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    pd.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pd.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    pd.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    pd.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _text(ids: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=40), st.sampled_from(ODD), st.sampled_from(ids))


def _scalar(field: pd.FieldDescriptor, ids: list[str]) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        lo, hi = _INT_RANGES[t]
        small = st.integers(min_value=max(lo, -3), max_value=min(hi, 70_000))
        return st.one_of(small, st.integers(lo, hi),
                         st.sampled_from([b for b in BIG if lo <= b <= hi]))
    if t in (pd.FieldDescriptor.TYPE_DOUBLE, pd.FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64
                                   if t == pd.FieldDescriptor.TYPE_DOUBLE else 32),
                         st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, math.nan, math.inf,
                                          -math.inf, 1.7e9, 1e20]))
    if t == pd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pd.FieldDescriptor.TYPE_STRING:
        return _text(ids)
    if t == pd.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == pd.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def _is_repeated(field: pd.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def messages(descriptor: pd.Descriptor, ids: list[str], depth: int = 0
             ) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with an arbitrary subset of fields set to arbitrary values."""
    cls = _message_class(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == pd.FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                key_f, val_f = field.message_type.fields_by_name["key"], \
                    field.message_type.fields_by_name["value"]
                fields[field.name] = st.dictionaries(_scalar(key_f, ids), _scalar(val_f, ids),
                                                     max_size=4)
            elif depth >= 3:
                continue
            elif _is_repeated(field):
                fields[field.name] = st.lists(messages(field.message_type, ids, depth + 1),
                                              max_size=4)
            else:
                # Missing, present but empty, or filled.
                fields[field.name] = st.one_of(
                    st.none(), st.just(_message_class(field.message_type)()),
                    messages(field.message_type, ids, depth + 1))
        elif _is_repeated(field):
            fields[field.name] = st.lists(_scalar(field, ids), max_size=6)
        else:
            fields[field.name] = _scalar(field, ids)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []
        for name in names:
            value = draw(fields[name])
            field = descriptor.fields_by_name[name]
            if value is None:
                continue
            if field.type == pd.FieldDescriptor.TYPE_MESSAGE:
                if field.message_type.GetOptions().map_entry:
                    getattr(msg, name).update(value)
                elif _is_repeated(field):
                    getattr(msg, name).extend(value)
                else:
                    getattr(msg, name).CopyFrom(value)
            elif _is_repeated(field):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        return msg

    return build()


def _message_class(descriptor: pd.Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


# ---- calling ---------------------------------------------------------------------------------

JOB_METHODS = ["SubmitJob", "GetJob", "ListJobs", "CancelJob", "WatchJob", "GetCost"]
AGENT_METHODS = ["Register", "Heartbeat", "ReportEvent"]


def _call(f: Fuzzed, service: str, method: str, request: Message) -> grpc.StatusCode:
    stub = f.jobs if service == "JobService" else f.agents
    rpc = getattr(stub, method)
    try:
        if method == "WatchJob":
            stream = rpc(request, timeout=CALL_TIMEOUT_S)
            try:
                next(stream)  # a known job answers with its replayed events at once
            except StopIteration:
                pass
            finally:
                stream.cancel()
        else:
            rpc(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.CANCELLED and method == "WatchJob":
            return grpc.StatusCode.OK  # our own cancel after the first event
        return e.code()
    return grpc.StatusCode.OK


def _short(msg: Message) -> str:
    text = repr(msg)
    return text if len(text) < 600 else text[:600] + f"... ({len(text)} chars)"


def _ids(f: Fuzzed) -> list[str]:
    return [*f.known_job_ids(), "fuzz-node", "node-0", ""]


def _request_descriptor(service: str, method: str) -> pd.Descriptor:
    module = jobs_pb2 if service == "JobService" else agent_pb2
    return module.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type


@pytest.mark.parametrize(("service", "method"),
                         [("JobService", m) for m in JOB_METHODS]
                         + [("AgentService", m) for m in AGENT_METHODS])
def test_every_rpc_survives_arbitrary_requests(fuzzed: Fuzzed, service: str, method: str) -> None:
    ids = _ids(fuzzed)

    @FUZZ
    @given(request=messages(_request_descriptor(service, method), ids))
    def run(request: Message) -> None:
        code = _call(fuzzed, service, method, request)
        assert code in allowed(request), \
            f"{service}.{method} answered {code.name} to {_short(request)}"
        errors = fuzzed.errors.take()
        assert not errors, "\n".join(errors)

    run()
    fuzzed.assert_healthy()


def _raw_bytes() -> st.SearchStrategy[bytes]:
    """Bytes that are not a well-formed message: random, truncated or corrupted encodings."""
    valid = _valid_spec(Path("/tmp")).SerializeToString()
    return st.one_of(
        st.binary(max_size=2048),
        st.integers(min_value=1, max_value=len(valid) - 1).map(lambda n: valid[:n]),
        st.tuples(st.integers(min_value=0, max_value=len(valid) - 1),
                  st.integers(min_value=0, max_value=255)).map(
            lambda p: valid[:p[0]] + bytes([p[1]]) + valid[p[0] + 1:]),
        # A field header claiming a length far past the end of the message.
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x80\x80\x80\x10x",
                         b"\xff" * 16, b"\x08" + b"\xff" * 10 + b"\x01"]),
    )


@pytest.mark.parametrize(("service", "method"),
                         [("JobService", m) for m in JOB_METHODS]
                         + [("AgentService", m) for m in AGENT_METHODS])
def test_malformed_bytes_are_refused_and_harm_nothing(fuzzed: Fuzzed, service: str,
                                                      method: str) -> None:
    """Raw bytes on the wire, below the protobuf layer: what does not parse as the request is
    INVALID_ARGUMENT before any servicer runs, and logged as a warning, not as an error; what
    happens to parse is an ordinary request and answered like one."""
    cls = _message_class(_request_descriptor(service, method))
    path = f"/spotwise.v1.{service}/{method}"
    if method == "WatchJob":
        call = fuzzed.channel.unary_stream(path, request_serializer=None,
                                           response_deserializer=None)
    else:
        call = fuzzed.channel.unary_unary(path, request_serializer=None,
                                          response_deserializer=None)

    @FUZZ
    @given(data=_raw_bytes())
    def run(data: bytes) -> None:
        try:
            cls.FromString(data)
            parses = True
        except Exception:  # DecodeError (the C parser's errors are all DecodeError)
            parses = False
        try:
            answer = call(data, timeout=CALL_TIMEOUT_S)
            if method == "WatchJob":
                try:
                    next(answer)
                except StopIteration:
                    pass
                finally:
                    answer.cancel()
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.CANCELLED and method == "WatchJob":
                code = grpc.StatusCode.OK  # our own cancel after the first event
            elif not parses:
                assert "malformed request" in (e.details() or ""), e.details()
        expected = ALLOWED if parses else {grpc.StatusCode.INVALID_ARGUMENT}
        assert code in expected, f"{service}.{method} answered {code.name} to {data[:80]!r}"
        errors = fuzzed.errors.take()
        assert not errors, "\n".join(errors)

    run()
    fuzzed.assert_healthy()


def test_an_oversized_request_is_refused_and_harms_nothing(fuzzed: Fuzzed) -> None:
    spec = _valid_spec(fuzzed.tmp)
    spec.env["BIG"] = "x" * (MAX_REQUEST_BYTES + 1)
    request = jobs_pb2.SubmitJobRequest(spec=spec)
    assert _call(fuzzed, "JobService", "SubmitJob", request) == grpc.StatusCode.RESOURCE_EXHAUSTED
    del spec.env["BIG"]
    assert _call(fuzzed, "JobService", "SubmitJob",
                 jobs_pb2.SubmitJobRequest(spec=spec)) == grpc.StatusCode.OK
    assert not fuzzed.errors.take()
    fuzzed.assert_healthy()


def test_agent_calls_about_known_nodes_and_generations(fuzzed: Fuzzed) -> None:
    """Agent calls aimed at the node the daemon knows and the generations of its jobs."""
    ids = _ids(fuzzed)
    processes = messages(agent_pb2.ProcessStatus.DESCRIPTOR, ids, depth=1)
    events = st.one_of(
        messages(agent_pb2.ProcessExited.DESCRIPTOR, ids, 1).map(
            lambda m: {"process_exited": m}),
        messages(agent_pb2.CheckpointCommitted.DESCRIPTOR, ids, 1).map(
            lambda m: {"checkpoint_committed": m}),
        messages(agent_pb2.InterruptionNotice.DESCRIPTOR, ids, 1).map(
            lambda m: {"interruption_notice": m}),
        messages(agent_pb2.Progress.DESCRIPTOR, ids, 1).map(lambda m: {"progress": m}),
    )

    @FUZZ
    @given(job_id=st.sampled_from(ids), generation=st.sampled_from([0, 1, 2, 2**64 - 1]),
           procs=st.lists(processes, max_size=3), event=events,
           time=st.floats(allow_nan=True, allow_infinity=True))
    def run(job_id: str, generation: int, procs: list[Message], event: dict[str, Message],
            time: float) -> None:
        hb = agent_pb2.HeartbeatRequest(node_id="fuzz-node", node_secret=fuzzed.secret,
                                        job_id=job_id,
                                        generation=generation, processes=procs)
        code = _call(fuzzed, "AgentService", "Heartbeat", hb)
        assert code in allowed(hb), (code, _short(hb))
        report = agent_pb2.ReportEventRequest(node_id="fuzz-node", node_secret=fuzzed.secret,
                                              job_id=job_id,
                                              generation=generation, time=time, **event)
        code = _call(fuzzed, "AgentService", "ReportEvent", report)
        assert code in allowed(report), (code, _short(report))
        errors = fuzzed.errors.take()
        assert not errors, "\n".join(errors)

    run()
    fuzzed.assert_healthy()


# ---- job specs -------------------------------------------------------------------------------

_SPEC_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
              st.text(max_size=20), st.sampled_from(ODD[:-3])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def _spec_documents(tmp: Path) -> st.SearchStrategy[dict[str, Any]]:
    """A valid spec with some fields replaced by arbitrary values, some dropped, some added."""
    base = {
        "name": "fuzz", "entrypoint": ["python", "train.py"], "working_dir": str(REPO),
        "nodes": {"min": 1, "max": 2}, "nproc_per_node": 1,
        "checkpoint": {"uri": str(tmp / "ck"), "every_steps": 5, "keep": 2},
        "global_batch_size": 8, "budget_usd": 0.0, "instance_types": [], "market": "spot",
        "max_failures": 3, "env": {"A": "1"},
    }
    keys = sorted(base) + ["nodes.min", "nodes.max", "checkpoint.uri", "checkpoint.every_steps",
                           "unknown_field"]

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        doc = yaml.safe_load(yaml.safe_dump(base))
        for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=2)):
            action = draw(st.sampled_from(["replace", "drop"]))
            head, _, tail = key.partition(".")
            target = doc
            if tail:
                if not isinstance(doc.get(head), dict):
                    continue
                target, key = doc[head], tail
            if action == "drop":
                target.pop(key, None)
            else:
                target[key] = draw(_SPEC_VALUES)
        return doc

    return build()


def test_yaml_specs_are_a_spec_or_a_spec_error(fuzzed: Fuzzed, tmp_path: Path) -> None:
    tmp: Path = fuzzed.tmp
    path = tmp_path / "spec.yaml"

    @FUZZ
    @given(doc=st.one_of(_spec_documents(tmp).map(yaml.safe_dump),
                         st.text(max_size=200), st.sampled_from(ODD[:-3])))
    def run(doc: str) -> None:
        path.write_text(doc, encoding="utf-8", errors="surrogatepass")
        try:
            spec = JobSpec.from_yaml(path)
        except SpecError as exc:
            assert exc.violations, exc
            return
        # What the client accepts, the daemon accepts (the same model on both sides), unless
        # the daemon's own checks (e.g. checkpoint prefixes) apply; none are configured here.
        code = _call(fuzzed, "JobService", "SubmitJob",
                     jobs_pb2.SubmitJobRequest(spec=spec.to_proto()))
        assert code == grpc.StatusCode.OK, (code, doc[:500])

    run()
    fuzzed.assert_healthy()


def _spliced_specs(base: jobs_pb2.JobSpec, ids: list[str]
                   ) -> st.SearchStrategy[jobs_pb2.JobSpec]:
    """`base` (valid) with one to three of its fields taken from an arbitrary JobSpec (so
    that many are valid and get scheduled, and the rest fail on one field at a time)."""
    names = [f.name for f in jobs_pb2.JobSpec.DESCRIPTOR.fields]

    @st.composite
    def build(draw: st.DrawFn) -> jobs_pb2.JobSpec:
        donor = draw(messages(jobs_pb2.JobSpec.DESCRIPTOR, ids))
        spec = jobs_pb2.JobSpec()
        spec.CopyFrom(base)
        for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
            spec.ClearField(name)
            field = jobs_pb2.JobSpec.DESCRIPTOR.fields_by_name[name]
            value = getattr(donor, name)
            if field.type == pd.FieldDescriptor.TYPE_MESSAGE and not _is_repeated(field):
                if donor.HasField(name):
                    getattr(spec, name).CopyFrom(value)
            elif field.type == pd.FieldDescriptor.TYPE_MESSAGE and \
                    field.message_type.GetOptions().map_entry:
                getattr(spec, name).update(dict(value))
            elif _is_repeated(field):
                getattr(spec, name).extend(value)
            else:
                setattr(spec, name, value)
        return spec

    return build()


def test_proto_specs_are_accepted_or_invalid_argument(fuzzed: Fuzzed) -> None:
    ids = _ids(fuzzed)
    base = _valid_spec(fuzzed.tmp)

    @FUZZ
    @given(spec=st.one_of(messages(jobs_pb2.JobSpec.DESCRIPTOR, ids), _spliced_specs(base, ids)))
    def run(spec: jobs_pb2.JobSpec) -> None:
        try:
            validate_spec_proto(spec)
            valid = spec.ByteSize() <= MAX_SPEC_BYTES  # the daemon's bound on a spec's size
        except (SpecError, ValueError):
            valid = False
        code = _call(fuzzed, "JobService", "SubmitJob", jobs_pb2.SubmitJobRequest(spec=spec))
        expected = grpc.StatusCode.OK if valid else grpc.StatusCode.INVALID_ARGUMENT
        assert code == expected, (code, _short(spec))

    run()
    fuzzed.assert_healthy()


# ---- a fuzzed fleet --------------------------------------------------------------------------

_FLEET = 4


def _fleet_ops(base: jobs_pb2.JobSpec, ids: list[str]) -> st.SearchStrategy[tuple]:
    """One step of a plausible but arbitrary fleet: mostly valid agents that take their
    assignments and report on them with arbitrary exits and events, jobs coming and going."""
    node = st.integers(0, _FLEET - 1)
    event = st.one_of(
        messages(agent_pb2.ProcessExited.DESCRIPTOR, ids, 1).map(lambda m: {"process_exited": m}),
        messages(agent_pb2.CheckpointCommitted.DESCRIPTOR, ids, 1).map(
            lambda m: {"checkpoint_committed": m}),
        messages(agent_pb2.InterruptionNotice.DESCRIPTOR, ids, 1).map(
            lambda m: {"interruption_notice": m}),
        messages(agent_pb2.Progress.DESCRIPTOR, ids, 1).map(lambda m: {"progress": m}),
    )
    return st.one_of(
        st.tuples(st.just("register"), node, st.integers(0, 9), st.sampled_from(
            [0.0, 0.5, 3.06, 1e9]), st.sampled_from(["spot", "on-demand", ""]), st.booleans()),
        st.tuples(st.just("heartbeat"), node,
                  st.lists(st.tuples(st.integers(0, 8), st.sampled_from([0, 1, 143, -9, 137])),
                           max_size=3), st.booleans()),
        st.tuples(st.just("report"), node, event, st.booleans()),
        st.tuples(st.just("submit"), _spliced_specs(base, ids)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("tick")),
    )


@pytest.mark.slow
def test_a_fuzzed_fleet_never_breaks_the_daemon(fuzzed: Fuzzed) -> None:
    ids = _ids(fuzzed)
    base = _valid_spec(fuzzed.tmp)
    assigned: dict[int, agent_pb2.Assignment] = {}
    secrets: dict[int, str] = {}
    seen = {"generations": 0}

    def check(code: grpc.StatusCode, what: object) -> None:
        assert code in ALLOWED, (code, str(what)[:600])
        errors = fuzzed.errors.take()
        assert not errors, "\n".join(errors)

    @FUZZ
    @given(ops=st.lists(_fleet_ops(base, ids), min_size=1, max_size=25))
    def run(ops: list[tuple]) -> None:
        for op in ops:
            kind = op[0]
            if kind == "register":
                _, k, slots, price, lifecycle, claim = op
                a = assigned.get(k)
                req = agent_pb2.RegisterRequest(
                    node_id=f"fleet-{k}", node_secret=secrets.get(k, ""), address="127.0.0.1",
                    store_port=20000 + k,
                    slots=slots, price_per_hour=price, lifecycle=lifecycle, zone="z",
                    instance_type="t", current_job_id=a.job_id if a and claim else "",
                    current_generation=a.generation if a and claim else 0)
                try:
                    resp = fuzzed.agents.Register(req, timeout=CALL_TIMEOUT_S)
                    secrets[k] = resp.node_secret or secrets.get(k, "")
                    check(grpc.StatusCode.OK, req)
                except grpc.RpcError as e:
                    check(e.code(), req)
            elif kind == "heartbeat":
                _, k, exits, as_assigned = op
                a = assigned.get(k)
                req = agent_pb2.HeartbeatRequest(node_id=f"fleet-{k}",
                                                 node_secret=secrets.get(k, ""))
                if a is not None and as_assigned:
                    req.job_id, req.generation = a.job_id, a.generation
                    for rank, code in exits:
                        req.processes.add(local_rank=rank, rank=a.rank_start + rank, pid=1,
                                          running=False, exit_code=code)
                try:
                    resp = fuzzed.agents.Heartbeat(req, timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as e:
                    check(e.code(), req)
                    continue
                check(grpc.StatusCode.OK, req)
                if resp.assignment.job_id:
                    assigned[k] = resp.assignment
                    seen["generations"] = max(seen["generations"], resp.assignment.generation)
                else:
                    assigned.pop(k, None)
            elif kind == "report":
                _, k, event, as_assigned = op
                a = assigned.get(k)
                req = agent_pb2.ReportEventRequest(node_id=f"fleet-{k}", time=1.7e9,
                                                   node_secret=secrets.get(k, ""), **event)
                if a is not None and as_assigned:
                    req.job_id, req.generation = a.job_id, a.generation
                check(_call(fuzzed, "AgentService", "ReportEvent", req), req)
            elif kind == "submit":
                req = jobs_pb2.SubmitJobRequest(spec=op[1])
                check(_call(fuzzed, "JobService", "SubmitJob", req), req)
            elif kind == "cancel":
                jobs = fuzzed.known_job_ids()
                req = jobs_pb2.CancelJobRequest(job_id=jobs[op[1] % len(jobs)])
                check(_call(fuzzed, "JobService", "CancelJob", req), req)
            else:
                fuzzed.daemon.call(lambda: fuzzed.daemon.daemon.coordinator.tick())
                check(grpc.StatusCode.OK, "tick")

    run()
    fuzzed.assert_healthy()
    # The fleet did get work: the fuzzing reached generations, not only refusals.
    print(f"fleet fuzzing reached generation {seen['generations']}")
    assert seen["generations"] >= 1
