"""The Python client for the daemon's JobService (what `spotwise` the CLI uses too).

    import spotwise
    with spotwise.Client("127.0.0.1:7450") as client:
        job_id = client.submit(spotwise.JobSpec.from_yaml("job.yaml"))
        for event in client.watch(job_id):
            print(event.kind, event.message)

Calls are synchronous and each has a deadline (`timeout`, default 10 s) except `watch`, which
streams until the job ends. gRPC failures surface as typed exceptions, all subclasses of
SpotwiseError: DaemonUnavailable, JobNotFound, InvalidSpec, PermissionDenied, WatchInterrupted,
ClientConfigError, RequestFailed.
Results are the proto messages of spotwise.v1 (Job, JobEvent, CostReport).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from spotwise.common.credentials import CredentialsError, channel_security
from spotwise.proto.v1 import jobs_pb2, jobs_pb2_grpc
from spotwise.spec import JobSpec, validate_spec_dict

DEFAULT_ADDRESS = "127.0.0.1:7450"
DEFAULT_TIMEOUT_S = 10.0

JobState = jobs_pb2.JobState
TERMINAL_STATES = frozenset(
    {
        jobs_pb2.JOB_STATE_SUCCEEDED,
        jobs_pb2.JOB_STATE_FAILED,
        jobs_pb2.JOB_STATE_CANCELLED,
        jobs_pb2.JOB_STATE_BUDGET_EXHAUSTED,
    }
)


def state_name(state: int) -> str:
    """'RUNNING' for JOB_STATE_RUNNING; 'UNKNOWN(9)' for a value this client does not know."""
    try:
        return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")
    except ValueError:
        return f"UNKNOWN({state})"


def parse_state(name: str) -> int:
    """The JobState for 'running', 'RUNNING' or 'JOB_STATE_RUNNING'; ValueError otherwise."""
    key = name.strip().upper().replace("-", "_")
    if not key.startswith("JOB_STATE_"):
        key = "JOB_STATE_" + key
    try:
        value = jobs_pb2.JobState.Value(key)
    except ValueError:
        known = ", ".join(
            n.removeprefix("JOB_STATE_").lower()
            for n in jobs_pb2.JobState.keys()
            if n != "JOB_STATE_UNSPECIFIED"
        )
        raise ValueError(f"unknown job state {name!r} (known: {known})") from None
    return value


def is_terminal(state: int) -> bool:
    """True for SUCCEEDED, FAILED, CANCELLED and BUDGET_EXHAUSTED."""
    return state in TERMINAL_STATES


LIST_PAGE_SIZE = 500
"""Jobs per ListJobs call when the client lists them all."""


class SpotwiseError(Exception):
    """A call to the daemon failed. `code` is the gRPC status code, when there was one."""

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class DaemonUnavailable(SpotwiseError):
    """The daemon could not be reached or did not answer in time."""


class JobNotFound(SpotwiseError, LookupError):
    """The daemon has no job with this id."""

    def __init__(self, job_id: str, message: str = "") -> None:
        super().__init__(message or f"no job {job_id!r}", code=grpc.StatusCode.NOT_FOUND)
        self.job_id = job_id


class InvalidSpec(SpotwiseError, ValueError):
    """The daemon refused a job spec (or a request); `violations` lists (field, description)."""

    def __init__(self, violations: list[tuple[str, str]], message: str = "") -> None:
        self.violations = list(violations)
        text = "; ".join(f"{f}: {d}" if f else d for f, d in self.violations)
        super().__init__(
            message or f"invalid job spec: {text}", code=grpc.StatusCode.INVALID_ARGUMENT
        )


class PermissionDenied(SpotwiseError):
    """The daemon refused the call's credentials (no token, a wrong token or a wrong role)."""


class WatchInterrupted(SpotwiseError):
    """The daemon ended a watch stream early (this watcher fell behind); watch again."""


class ClientConfigError(SpotwiseError, ValueError):
    """The client's own settings are unusable (an unreadable certificate, a bad timeout)."""


class RequestFailed(SpotwiseError):
    """Any other failed call; the message carries the daemon's status and details."""


def violations_from_error(err: grpc.RpcError) -> list[tuple[str, str]]:
    """The field violations of an INVALID_ARGUMENT error.

    Read from the rich status (google.rpc.BadRequest in the status details, as
    grpcio-status's `rpc_status.to_status` sends them); without one, the whole details string
    is one violation with an empty field.
    """
    violations: list[tuple[str, str]] = []
    try:
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)  # type: ignore[arg-type]
    except (ImportError, ValueError, AttributeError):
        # ValueError: the rich status disagrees with the call's code/message (a broken
        # server); AttributeError: the error is not a Call. Either way use the plain details.
        status = None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend((v.field, v.description) for v in bad.field_violations)
    if not violations:
        details = _details(err)
        violations.append(("", details or "invalid request"))
    return violations


def _details(err: grpc.RpcError) -> str:
    try:
        return str(err.details() or "")  # type: ignore[attr-defined]
    except AttributeError:
        return ""


def _spec_field(field: str) -> str:
    if field == "spec":
        return ""
    return field.removeprefix("spec.")


def _short_reason(details: str) -> str:
    # grpc's text is "failed to connect to all addresses; last error: UNKNOWN: ipv4:...:
    # Failed to connect to remote host: Connection refused": keep the last clause.
    reason = details.rsplit(": ", 1)[-1].strip(" ]") if details else ""
    return reason.lower() or "unavailable"


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    try:
        return err.code()  # type: ignore[attr-defined]
    except AttributeError:
        return None


class Client:
    """A synchronous connection to one spotwise daemon.

    `address` is host:port (default: $SPOTWISE_ADDRESS or 127.0.0.1:7450). `timeout` bounds
    every unary call, in seconds. `token` (default: $SPOTWISE_TOKEN) is sent with every call as
    `authorization: Bearer <token>`. `ca_file` (default: $SPOTWISE_CA_FILE), a PEM CA
    certificate, switches the channel to TLS and verifies the daemon against it; `cert_file`
    and `key_file` (default: $SPOTWISE_CERT_FILE, $SPOTWISE_KEY_FILE) add a client
    certificate for mutual TLS. An unreadable file raises ClientConfigError, and so does a token
    that would travel in plaintext beyond loopback (no CA file for a remote daemon). Close the client
    (or use it as a context manager) to release the channel.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ClientConfigError(f"timeout must be positive, got {timeout}")
        self.address = address or os.environ.get("SPOTWISE_ADDRESS") or DEFAULT_ADDRESS
        self.timeout = timeout
        token = token if token is not None else os.environ.get("SPOTWISE_TOKEN") or None
        try:
            security = channel_security(
                self.address,
                token=token,
                ca_file=ca_file or os.environ.get("SPOTWISE_CA_FILE") or None,
                cert_file=cert_file or os.environ.get("SPOTWISE_CERT_FILE") or None,
                key_file=key_file or os.environ.get("SPOTWISE_KEY_FILE") or None,
                names=("SPOTWISE_CA_FILE", "SPOTWISE_CERT_FILE", "SPOTWISE_KEY_FILE"),
            )
        except CredentialsError as exc:
            raise ClientConfigError(str(exc)) from None
        self.tls = security.tls
        self._metadata = security.metadata
        self._channel = security.channel()
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    # ---- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight fail with DaemonUnavailable."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls --------------------------------------------------------------------------

    def submit(self, spec: JobSpec | jobs_pb2.JobSpec | dict[str, Any]) -> str:
        """Submit a job; returns its id.

        A JobSpec or dict is validated here first (SpecError, a ValueError, lists every
        problem without a round trip); a proto is sent as is. The daemon validates again and
        answers a bad spec with InvalidSpec.
        """
        if isinstance(spec, dict):
            spec = validate_spec_dict(spec)
        message = spec.to_proto() if isinstance(spec, JobSpec) else spec
        response = self._unary(
            self._stub.SubmitJob, jobs_pb2.SubmitJobRequest(spec=message), spec_call=True
        )
        return str(response.job_id)

    def get(self, job_id: str) -> jobs_pb2.Job:
        """The job as the daemon knows it now. Raises JobNotFound."""
        return self._unary(self._stub.GetJob, jobs_pb2.GetJobRequest(job_id=job_id), job_id=job_id)

    def list(self, states: Iterable[int | str] = ()) -> list[jobs_pb2.Job]:
        """Every job the caller may see, or those in one of `states` (JobState values or names
        like 'running'), oldest first: the daemon answers in pages, fetched here one by one."""
        wanted = [parse_state(s) if isinstance(s, str) else int(s) for s in states]
        jobs: list[jobs_pb2.Job] = []
        token = ""
        while True:
            response = self._unary(self._stub.ListJobs, jobs_pb2.ListJobsRequest(
                states=wanted, page_size=LIST_PAGE_SIZE, page_token=token))
            jobs.extend(response.jobs)
            token = response.next_page_token
            if not token:
                return jobs

    def cancel(self, job_id: str) -> jobs_pb2.Job:
        """Ask the daemon to stop the job; returns the job after the request. Raises JobNotFound."""
        return self._unary(
            self._stub.CancelJob, jobs_pb2.CancelJobRequest(job_id=job_id), job_id=job_id
        )

    def cost(self, job_id: str) -> jobs_pb2.CostReport:
        """Money spent, the current rate, the projection and the savings. Raises JobNotFound."""
        return self._unary(self._stub.GetCost, jobs_pb2.GetCostRequest(job_id=job_id), job_id=job_id)

    def watch(self, job_id: str, *, replay: bool = True) -> Iterator[jobs_pb2.JobEvent]:
        """Yield the job's events as they happen, ending after the job reaches a final state.

        With `replay`, the events recorded so far come first. The stream has no deadline; a
        lost connection raises DaemonUnavailable, a watcher the daemon dropped for falling
        behind WatchInterrupted (call again with replay=False to resume in either case).
        Closing the iterator cancels the stream.
        """
        call = self._stub.WatchJob(
            jobs_pb2.WatchJobRequest(job_id=job_id, replay=replay), metadata=self._metadata
        )
        try:
            for event in call:
                yield event
                if event.HasField("job") and is_terminal(event.job.state):
                    return
        except grpc.RpcError as err:
            if _code(err) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise WatchInterrupted(_details(err) or "watch interrupted", code=_code(err)) from None
            raise self._translate(err, job_id=job_id) from None
        finally:
            call.cancel()

    def history(self, job_id: str, *, quiet_s: float = 1.0,
                timeout: float = 60.0) -> list[jobs_pb2.JobEvent]:
        """The events recorded for the job so far, oldest first (a replaying watch).

        The stream of an ended job ends after its replay; that of a running job never does,
        so the read stops once no event came for `quiet_s` (the replay streams without
        pauses), or after `timeout` seconds in all (then what arrived is returned). Raises
        JobNotFound, DaemonUnavailable, WatchInterrupted.
        """
        if quiet_s <= 0 or timeout <= 0:
            raise ValueError(f"quiet_s and timeout must be positive, got {quiet_s}, {timeout}")
        call = self._stub.WatchJob(
            jobs_pb2.WatchJobRequest(job_id=job_id, replay=True), metadata=self._metadata
        )
        inbox: queue.Queue[jobs_pb2.JobEvent | BaseException | None] = queue.Queue()

        def read() -> None:
            try:
                for event in call:
                    inbox.put(event)
                inbox.put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                inbox.put(err)

        reader = threading.Thread(target=read, name=f"history-{job_id}", daemon=True)
        reader.start()
        events: list[jobs_pb2.JobEvent] = []
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    item = inbox.get(timeout=min(quiet_s, left))
                except queue.Empty:
                    break  # quiet: the replay is over
                if item is None:
                    break
                if isinstance(item, grpc.RpcError):
                    if _code(item) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise WatchInterrupted(_details(item) or "watch interrupted",
                                               code=_code(item)) from None
                    raise self._translate(item, job_id=job_id) from None
                if isinstance(item, BaseException):
                    raise item
                events.append(item)
        finally:
            call.cancel()
            reader.join(timeout=5.0)
        return events

    def wait(self, job_id: str, *, timeout: float | None = None) -> jobs_pb2.Job:
        """Block until the job is in a final state and return it.

        `timeout` (seconds, None = forever) bounds the wait; on expiry raises TimeoutError.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if is_terminal(job.state):
                return job
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {job_id} still {state_name(job.state)} after {timeout}s")
            # Sleep on the event stream rather than polling: any event re-checks the state.
            call = self._stub.WatchJob(
                jobs_pb2.WatchJobRequest(job_id=job_id, replay=False),
                metadata=self._metadata,
                timeout=min(remaining, 30.0) if remaining is not None else 30.0,
            )
            try:
                for event in call:
                    if event.HasField("job") and is_terminal(event.job.state):
                        return event.job
            except grpc.RpcError as err:
                if _code(err) != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise self._translate(err, job_id=job_id) from None
            finally:
                call.cancel()

    # ---- plumbing -----------------------------------------------------------------------

    def _unary(self, method: Any, request: Any, *, job_id: str = "", spec_call: bool = False) -> Any:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._translate(err, job_id=job_id, spec_call=spec_call) from None

    def _translate(
        self, err: grpc.RpcError, *, job_id: str = "", spec_call: bool = False
    ) -> SpotwiseError:
        code = _code(err)
        details = _details(err)
        if code == grpc.StatusCode.UNAVAILABLE:
            hint = " (a TLS handshake failure? check SPOTWISE_CA_FILE)" if self.tls else ""
            return DaemonUnavailable(
                f"cannot reach the spotwise daemon at {self.address} ({_short_reason(details)})"
                f"{hint};"
                " is `spotwise daemon` running there? (see --address / SPOTWISE_ADDRESS)",
                code=code,
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DaemonUnavailable(
                f"the spotwise daemon at {self.address} did not answer within {self.timeout:g}s",
                code=code,
            )
        if code == grpc.StatusCode.NOT_FOUND and job_id:
            return JobNotFound(job_id, details or f"no job {job_id!r}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            violations = violations_from_error(err)
            if spec_call:
                # The daemon names fields of the request (spec.nodes.max); report them as the
                # spec's own paths (nodes.max), the same as a client-side SpecError.
                return InvalidSpec([(_spec_field(f), d) for f, d in violations])
            text = "; ".join(f"{f}: {d}" if f else d for f, d in violations)
            return InvalidSpec(violations, message=f"invalid request: {text}")
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return PermissionDenied(
                f"the daemon at {self.address} refused the call: {details or code.name}"
                " (check SPOTWISE_TOKEN)",
                code=code,
            )
        if code == grpc.StatusCode.FAILED_PRECONDITION and details:
            return RequestFailed(details, code=code)
        name = code.name if code is not None else "UNKNOWN"
        return RequestFailed(f"daemon call failed: {name}: {details or 'no details'}", code=code)
