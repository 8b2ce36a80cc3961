"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.common.sdnotify import (
    Notifier,
    NotifyError,
    child_environment,
    format_message,
    socket_address,
    start_watchdog,
    watchdog_interval,
)


class FakeSystemd:
    """A bound datagram socket that collects notifications, like systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self, timeout_s: float = 5.0) -> list[str]:
        """One datagram as its list of assignments; fails the test after `timeout_s`."""
        self.sock.settimeout(timeout_s)
        data = self.sock.recv(4096)
        assert data.endswith(b"\n")
        return data.decode().splitlines()

    def receive_until(self, assignment: str, timeout_s: float = 10.0) -> list[list[str]]:
        """Every datagram up to and including the first that holds `assignment`."""
        deadline = time.monotonic() + timeout_s
        seen: list[list[str]] = []
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{assignment} not received; got {seen}"
            seen.append(self.receive(remaining))
            if assignment in seen[-1]:
                return seen


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify")
        sock.bind(path)
        env_value = path
    else:
        name = f"spotwise-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        env_value = "@" + name
    try:
        yield FakeSystemd(sock, env_value)
    finally:
        sock.close()


def test_messages_arrive_in_order(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": systemd.env_value})
    assert notifier.enabled
    assert notifier.ready(status="serving on 127.0.0.1:7450")
    assert notifier.watchdog()
    assert notifier.status("3 jobs")
    assert notifier.stopping(status="draining")
    assert notifier.extend_timeout(12.5)
    assert systemd.receive() == ["READY=1", "STATUS=serving on 127.0.0.1:7450"]
    assert systemd.receive() == ["WATCHDOG=1"]
    assert systemd.receive() == ["STATUS=3 jobs"]
    assert systemd.receive() == ["STOPPING=1", "STATUS=draining"]
    assert systemd.receive() == ["EXTEND_TIMEOUT_USEC=12500000"]


def test_no_socket_is_a_noop() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_unsupported_socket_disables_notifications() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    with pytest.raises(ValueError):
        socket_address("relative/path")


def test_send_to_a_vanished_socket_raises(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with pytest.raises(NotifyError):
        notifier.ready()


def test_newline_in_status_is_refused() -> None:
    with pytest.raises(ValueError):
        format_message("READY=1", status="two\nlines")


def test_watchdog_interval_rules() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, pid=42) == 15.0
    # Set for another process (we inherited it): not ours to ping.
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, pid=42) is None
    assert watchdog_interval({}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, pid=42) is None


def test_child_environment_drops_notify_variables() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    assert child_environment(env) == {"PATH": "/bin"}


def test_watchdog_task_pings_at_half_the_period(systemd: FakeSystemd) -> None:
    notifier = Notifier.from_env(
        {"NOTIFY_SOCKET": systemd.env_value, "WATCHDOG_USEC": "200000"}, pid=os.getpid()
    )
    assert notifier.watchdog_interval_s == pytest.approx(0.1)

    async def run() -> None:
        task = start_watchdog(notifier)
        assert task is not None
        # Three pings take two intervals (0.2 s); allow generous slack for a loaded machine.
        started = time.monotonic()
        for _ in range(3):
            assert await asyncio.to_thread(systemd.receive, 5.0) == ["WATCHDOG=1"]
        assert time.monotonic() - started >= 0.15
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())


def test_no_watchdog_task_without_watchdog_usec(systemd: FakeSystemd) -> None:
    async def run() -> None:
        assert start_watchdog(Notifier.from_env({"NOTIFY_SOCKET": systemd.env_value})) is None
        assert start_watchdog(Notifier.from_env({"WATCHDOG_USEC": "100000"})) is None

    asyncio.run(run())


CHILD = textwrap.dedent(
    """
    import asyncio, signal
    from spotwise.common.sdnotify import Notifier, start_watchdog

    async def main():
        notifier = Notifier.from_env()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        notifier.ready(status="up")
        task = start_watchdog(notifier)
        await stop.wait()
        notifier.stopping(status="bye")
        task.cancel()

    asyncio.run(main())
    """
)


def test_service_process_ready_watchdog_stopping(systemd: FakeSystemd) -> None:
    """A real process with systemd's environment: READY, then WATCHDOG pings, then STOPPING."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env={
            **os.environ,
            "NOTIFY_SOCKET": systemd.env_value,
            "WATCHDOG_USEC": "100000",
        },
        start_new_session=True,
    )
    try:
        assert systemd.receive(timeout_s=30) == ["READY=1", "STATUS=up"]
        pings = systemd.receive_until("WATCHDOG=1")
        assert pings[-1] == ["WATCHDOG=1"]
        assert systemd.receive(timeout_s=5) == ["WATCHDOG=1"]
        proc.terminate()
        after = systemd.receive_until("STOPPING=1")
        assert after[-1] == ["STOPPING=1", "STATUS=bye"]
        assert all(msg == ["WATCHDOG=1"] for msg in after[:-1])
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)
