"""`spotwise agent` as systemd runs it (Type=notify): a real agent process with NOTIFY_SOCKET and
WATCHDOG_USEC pointing at a real unix datagram socket standing in for systemd, against a real
in-process daemon.

READY=1 comes once the node is registered, WATCHDOG=1 at half of WATCHDOG_USEC, and STOPPING=1
on SIGTERM, after which the agent stops its training processes gracefully (they get SIGTERM)
and exits 0. Training processes do not inherit the notify socket. With TLS and a token file the
agent registers over TLS; a wrong token keeps it from ever being READY.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.client import Client
from spotwise.cloud.local import processes_with_env
from spotwise.config import DaemonConfig
from spotwise.daemon.auth import Role, mint_token
from spotwise.daemon.server import DaemonThread
from tests.integration.test_cli import _tls_material
from tests.support.wait import until as _until

REPO = Path(__file__).resolve().parents[2]

# Sleeps until SIGTERM, then records that it was asked to stop and exits 143 (as the runtime).
TRAINER = ("import pathlib, signal, sys, time\n"
           "def stop(*_):\n"
           "    pathlib.Path(sys.argv[1]).write_text('terminated')\n"
           "    sys.exit(143)\n"
           "signal.signal(signal.SIGTERM, stop)\n"
           "pathlib.Path(sys.argv[1]).write_text('started')\n"
           "time.sleep(600)\n")


class FakeSystemd:
    def __init__(self) -> None:
        self.name = f"spotwise-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name.encode())

    def receive(self, timeout_s: float) -> dict[str, str]:
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout_s}s") from None
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    s = FakeSystemd()
    try:
        yield s
    finally:
        s.sock.close()


def _start_agent(tmp: Path, address: str, systemd: FakeSystemd,
                 extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp / f"agent-{uuid.uuid4().hex[:6]}.log"
    env = dict(os.environ, NOTIFY_SOCKET="@" + systemd.name, WATCHDOG_USEC="400000",
               **(extra_env or {}))
    for key in ("SPOTWISE_TOKEN", "SPOTWISE_AGENT_TOKEN"):
        env.pop(key, None)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", "agent", "--daemon", address,
             "--state-dir", str(tmp / "agent-state"), "--log-dir", str(tmp / "logs"),
             "--provider-node", "sd-1", "--grace-s", "10", "--max-disconnect-s", "30"],
            env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    return proc, log


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _job_pid(job_id: str) -> int | None:
    return next(iter(processes_with_env("SPOTWISE_JOB_ID", job_id)), None)


@pytest.mark.slow
def test_ready_watchdog_stopping_and_a_graceful_stop(tmp_path: Path,
                                                     systemd: FakeSystemd) -> None:
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "daemon")
    with DaemonThread(config) as daemon, Client(daemon.address, timeout=10) as client:
        marker = tmp_path / "trainer-stopped"
        job_id = client.submit({
            "name": "sd", "entrypoint": ["python", "-c", TRAINER, str(marker)],
            "working_dir": str(REPO), "nodes": {"min": 1, "max": 1},
            "checkpoint": {"uri": str(tmp_path / "ckpt")}, "global_batch_size": 8,
        })
        agent, log = _start_agent(tmp_path, daemon.address, systemd)
        trainer = None
        try:
            ready = systemd.receive(timeout_s=60)
            assert ready.get("READY") == "1", (ready, log.read_text())
            # READY means registered: the daemon knows the node already.
            nodes = daemon.call(lambda: [n.row.provider_node
                                         for n in daemon.daemon.coordinator.nodes.values()])
            assert nodes == ["sd-1"]
            for _ in range(2):
                assert systemd.receive(timeout_s=10) == {"WATCHDOG": "1"}

            trainer = _until(lambda: _job_pid(job_id), 60, "the training process")
            _until(lambda: marker.exists(), 60, "the training process to handle SIGTERM")
            environ = Path(f"/proc/{trainer}/environ").read_bytes().split(b"\0")
            names = {e.split(b"=", 1)[0] for e in environ}
            assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC", b"WATCHDOG_PID"}
            assert f"SPOTWISE_JOB_ID={job_id}".encode() in environ

            agent.send_signal(signal.SIGTERM)
            while (msg := systemd.receive(timeout_s=10)) == {"WATCHDOG": "1"}:
                pass
            assert msg.get("STOPPING") == "1", msg
            assert agent.wait(timeout=30) == 0, log.read_text()
            # The processes were stopped gracefully (SIGTERM, not SIGKILL) and are gone.
            assert marker.read_text() == "terminated"
            assert _job_pid(job_id) is None
            # Nothing after STOPPING (no watchdog ping from a stopped agent).
            with pytest.raises(AssertionError):
                systemd.receive(timeout_s=0.5)
        finally:
            _kill(agent)
            if trainer is not None and _job_pid(job_id) == trainer:
                os.killpg(trainer, signal.SIGKILL)


@pytest.mark.slow
def test_tls_and_token_file(tmp_path: Path, systemd: FakeSystemd) -> None:
    ca, cert, key = _tls_material(tmp_path)
    agent_token, client_token = mint_token(Role.AGENT, "fleet"), mint_token(Role.CLIENT, "alice")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{agent_token.line}\n{client_token.line}\n")
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "daemon",
                          tls_cert_file=str(cert), tls_key_file=str(key),
                          tokens_file=str(tokens))
    good, bad = tmp_path / "agent.token", tmp_path / "client.token"
    good.write_text(agent_token.token + "\n")
    bad.write_text(client_token.token + "\n")
    with DaemonThread(config) as daemon:
        # A token of the wrong role: refused, the agent exits 1 and never says READY.
        agent, log = _start_agent(tmp_path, daemon.address, systemd, {
            "SPOTWISE_AGENT_TLS_CA_FILE": str(ca), "SPOTWISE_AGENT_TOKEN_FILE": str(bad)})
        try:
            assert agent.wait(timeout=60) == 1, log.read_text()
            assert "PERMISSION_DENIED" in log.read_text()
            msg = systemd.receive(timeout_s=5)
            assert "READY" not in msg and msg.get("STOPPING") == "1", msg
        finally:
            _kill(agent)
        # The agent's token over TLS: registered, READY.
        agent, log = _start_agent(tmp_path, daemon.address, systemd, {
            "SPOTWISE_AGENT_TLS_CA_FILE": str(ca), "SPOTWISE_AGENT_TOKEN_FILE": str(good)})
        try:
            assert systemd.receive(timeout_s=60).get("READY") == "1", log.read_text()
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=30) == 0, log.read_text()
        finally:
            _kill(agent)
        # A token file that cannot be read: a one-line error, exit 2.
        agent, log = _start_agent(tmp_path, daemon.address, systemd, {
            "SPOTWISE_AGENT_TOKEN_FILE": str(tmp_path / "missing.token")})
        try:
            assert agent.wait(timeout=60) == 2, log.read_text()
            assert "missing.token" in log.read_text()
        finally:
            _kill(agent)
