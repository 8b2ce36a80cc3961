"""`spotwise daemon` as systemd runs it: a real process with NOTIFY_SOCKET and WATCHDOG_USEC
pointing at a real unix datagram socket that stands in for systemd.

- READY=1 comes once the port is bound and the state is loaded (a job stored by an earlier life
  is readable the moment READY arrives), then WATCHDOG=1 pings;
- SIGTERM: the health service turns NOT_SERVING first (seen by a client's Watch stream), then
  STOPPING=1 arrives and the process exits 0 within the unit's TimeoutStopSec;
- SIGHUP re-reads the tokens file: an added token works, a removed one stops working.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from spotwise.daemon.auth import Role, mint_token
from spotwise.proto.v1 import jobs_pb2, jobs_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "spotwise-daemon.service"
TINY = REPO / "examples" / "jobs" / "tiny.yaml"


def timeout_stop_s() -> float:
    """TimeoutStopSec of the daemon's unit, in seconds."""
    m = re.search(r"^TimeoutStopSec=(\d+)s?$", UNIT.read_text(), re.MULTILINE)
    assert m, "the daemon unit sets TimeoutStopSec"
    return float(m.group(1))


class FakeSystemd:
    """An abstract AF_UNIX datagram socket collecting notifications, like systemd's."""

    def __init__(self) -> None:
        self.name = f"spotwise-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name.encode())

    @property
    def env_value(self) -> str:
        return "@" + self.name

    def receive(self, timeout_s: float) -> dict[str, str]:
        """One datagram as {KEY: VALUE}; fails the test after `timeout_s`."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout_s}s") from None
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def receive_until(self, key: str, timeout_s: float) -> list[dict[str, str]]:
        """Every datagram up to and including the first that sets `key`."""
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, str]] = []
        while not seen or key not in seen[-1]:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{key} not received; got {seen}"
            seen.append(self.receive(remaining))
        return seen

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """`spotwise daemon` on port 0 under a fake systemd; its address comes from READY's STATUS."""

    def __init__(self, tmp: Path, systemd: FakeSystemd, *, extra_env: dict[str, str] | None = None,
                 watchdog_usec: int = 200_000) -> None:
        env = dict(os.environ, SPOTWISE_STATE_DIR=str(tmp / "state"), HOME=str(tmp / "home"),
                   NOTIFY_SOCKET=systemd.env_value, WATCHDOG_USEC=str(watchdog_usec),
                   **(extra_env or {}))
        env.pop("SPOTWISE_TOKEN", None)
        self.stderr_path = tmp / f"daemon-{uuid.uuid4().hex[:6]}.stderr"
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", "127.0.0.1:0",
                 "--state-dir", str(tmp / "state"), "--provider", "none"],
                env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True)
        # The first notification must be READY (nothing is sent before the daemon serves).
        try:
            self.ready = systemd.receive(timeout_s=60)
        except AssertionError:
            self.kill()
            raise AssertionError(f"no READY: {self.stderr_path.read_text()}") from None
        assert self.ready.get("READY") == "1", self.ready
        # The watchdog pings come from the main process (WATCHDOG_PID unset = the main PID).
        self.address = self.ready["STATUS"].removeprefix("serving on ").strip()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    s = FakeSystemd()
    try:
        yield s
    finally:
        s.close()


def _spec() -> jobs_pb2.JobSpec:
    from spotwise.spec import JobSpec

    return JobSpec.from_yaml(TINY).to_proto()


def test_ready_watchdog_then_not_serving_stopping_exit_0(tmp_path: Path,
                                                         systemd: FakeSystemd) -> None:
    # An earlier life stores a job and stops cleanly.
    first = Daemon(tmp_path, systemd)
    try:
        with grpc.insecure_channel(first.address) as ch:
            job_id = jobs_pb2_grpc.JobServiceStub(ch).SubmitJob(
                jobs_pb2.SubmitJobRequest(spec=_spec()), timeout=10).job_id
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=timeout_stop_s()) == 0, first.stderr()
    finally:
        first.kill()
    systemd.receive_until("STOPPING", timeout_s=10)

    daemon = Daemon(tmp_path, systemd)
    watcher: threading.Thread | None = None
    try:
        # READY means the port is bound and the state loaded: the job is there at once.
        with grpc.insecure_channel(daemon.address) as ch:
            job = jobs_pb2_grpc.JobServiceStub(ch).GetJob(
                jobs_pb2.GetJobRequest(job_id=job_id), timeout=5)
            assert job.id == job_id
        # WATCHDOG=1 at half of WATCHDOG_USEC (0.1 s): several arrive within a second or two.
        t0 = time.monotonic()
        for _ in range(3):
            msg = systemd.receive(timeout_s=10)
            assert msg == {"WATCHDOG": "1"}, msg
        assert time.monotonic() - t0 >= 0.1

        # A client watches health; on SIGTERM it must see NOT_SERVING.
        statuses: list[tuple[float, int]] = []
        channel = grpc.insecure_channel(daemon.address)
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60)

        def watch() -> None:
            try:
                for resp in stream:
                    statuses.append((time.monotonic(), resp.status))
            except grpc.RpcError:
                pass  # the server went away after NOT_SERVING

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        deadline = time.monotonic() + 10
        while not statuses and time.monotonic() < deadline:
            time.sleep(0.02)
        assert statuses and statuses[0][1] == health_pb2.HealthCheckResponse.SERVING

        sent = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        after = systemd.receive_until("STOPPING", timeout_s=timeout_stop_s())
        stopping_at = time.monotonic()
        assert all(m == {"WATCHDOG": "1"} for m in after[:-1]), after
        assert after[-1]["STOPPING"] == "1"
        assert daemon.proc.wait(timeout=timeout_stop_s()) == 0, daemon.stderr()
        assert time.monotonic() - sent < timeout_stop_s()
        watcher.join(timeout=10)
        channel.close()
        not_serving = [t for t, s in statuses if s == health_pb2.HealthCheckResponse.NOT_SERVING]
        assert not_serving, f"the watch saw no NOT_SERVING: {statuses}"
        # NOT_SERVING was published before STOPPING=1 (the watch saw it no later than systemd
        # got STOPPING, allowing for the two receivers' thread scheduling).
        assert not_serving[0] <= stopping_at + 0.5
        # No watchdog ping after STOPPING.
        with pytest.raises(AssertionError):
            systemd.receive(timeout_s=0.5)
    finally:
        daemon.kill()
        if watcher is not None:
            watcher.join(timeout=5)


def test_sighup_reloads_the_tokens_file(tmp_path: Path, systemd: FakeSystemd) -> None:
    alice = mint_token(Role.CLIENT, "alice")
    bob = mint_token(Role.CLIENT, "bob")
    tokens = tmp_path / "tokens"
    tokens.write_text(alice.line + "\n")
    daemon = Daemon(tmp_path, systemd, extra_env={"SPOTWISE_DAEMON_TOKENS_FILE": str(tokens)},
                    watchdog_usec=0)
    try:
        channel = grpc.insecure_channel(daemon.address)
        stub = jobs_pb2_grpc.JobServiceStub(channel)

        def code(token: str) -> grpc.StatusCode:
            try:
                stub.ListJobs(jobs_pb2.ListJobsRequest(), timeout=5,
                              metadata=(("authorization", f"Bearer {token}"),))
            except grpc.RpcError as e:
                return e.code()
            return grpc.StatusCode.OK

        assert code(alice.token) == grpc.StatusCode.OK
        assert code(bob.token) == grpc.StatusCode.UNAUTHENTICATED

        def after_hup(expect_alice: grpc.StatusCode, expect_bob: grpc.StatusCode) -> None:
            daemon.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (code(alice.token), code(bob.token)) != (expect_alice, expect_bob):
                assert time.monotonic() < deadline, (
                    code(alice.token), code(bob.token), daemon.stderr())
                time.sleep(0.05)

        # bob added, alice removed, in one rewrite (atomically, as an operator's tool would).
        tmp = tokens.with_suffix(".new")
        tmp.write_text(bob.line + "\n")
        os.replace(tmp, tokens)
        # Nothing changes before the signal.
        assert code(bob.token) == grpc.StatusCode.UNAUTHENTICATED
        after_hup(grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK)

        # A malformed file keeps the tokens in force (and the daemon serving).
        tokens.write_text("not a token line\n")
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "kept the old tokens" not in daemon.stderr():
            assert time.monotonic() < deadline, daemon.stderr()
            time.sleep(0.05)
        assert code(bob.token) == grpc.StatusCode.OK
        assert code(alice.token) == grpc.StatusCode.UNAUTHENTICATED

        # Both.
        tokens.write_text(f"{alice.line}\n{bob.line}\n")
        after_hup(grpc.StatusCode.OK, grpc.StatusCode.OK)
        channel.close()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=timeout_stop_s()) == 0, daemon.stderr()
    finally:
        daemon.kill()
