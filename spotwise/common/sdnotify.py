"""systemd's service notification protocol (sd_notify) without libsystemd.

A `Type=notify` unit passes the service an `AF_UNIX` datagram socket in `$NOTIFY_SOCKET`
(a path, or an abstract socket written with a leading "@"); the service sends newline-separated
`KEY=VALUE` assignments to it: `READY=1` once it serves, `STATUS=...` for `systemctl status`,
`WATCHDOG=1` to keep the watchdog from killing it, `STOPPING=1` when it begins to shut down.
Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op, so the daemon and the agent call
these unconditionally.

Use:

    notifier = Notifier.from_env()
    ... bind the port, load the state ...
    notifier.ready(status="serving on 10.0.0.5:7450")
    watchdog = start_watchdog(notifier)          # None when systemd set no watchdog
    ... on SIGTERM:
    notifier.stopping(status="draining")
    if watchdog: watchdog.cancel()

Children (training processes) should not inherit the socket: pass `child_environment(env)`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

NOTIFY_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
"""The variables systemd sets for the main process only."""

SEND_TIMEOUT_S = 1.0
"""How long a send may block when systemd's receive queue is full."""


class NotifyError(OSError):
    """A notification could not be sent to $NOTIFY_SOCKET (systemd gone or queue full)."""


def socket_address(notify_socket: str) -> str | bytes:
    """Turn a $NOTIFY_SOCKET value into an address for `socket.sendto`.

    "@name" is an abstract socket (a leading NUL byte on Linux); anything else must be an
    absolute path. Raises ValueError for other forms (e.g. systemd's "vsock:" sockets, which
    this module does not speak).
    """
    if notify_socket.startswith("@"):
        return b"\0" + notify_socket[1:].encode()
    if notify_socket.startswith("/"):
        return notify_socket
    raise ValueError(f"unsupported NOTIFY_SOCKET {notify_socket!r}: want a path or @abstract")


def format_message(*assignments: str, status: str | None = None) -> bytes:
    """Join KEY=VALUE assignments (and STATUS=) into one notification datagram.

    A newline inside a value would start a new assignment, so values must not contain one.
    """
    lines = list(assignments)
    if status is not None:
        lines.append(f"STATUS={status}")
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"bad notification assignment {line!r}")
    return ("\n".join(lines) + "\n").encode()


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled advises.

    None when no watchdog applies to this process: WATCHDOG_USEC unset or not a positive
    integer, or WATCHDOG_PID set to another process (systemd sets it to the main PID; a child
    that inherited the environment must not ping on its parent's behalf).
    """
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) <= 0:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid is not None and watchdog_pid.strip() != str(pid):
        return None
    return int(usec) / 1e6 / 2


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without NOTIFY_SOCKET and the watchdog variables, for subprocesses."""
    return {k: v for k, v in env.items() if k not in NOTIFY_ENV_KEYS}


@dataclass(frozen=True, kw_only=True)
class Notifier:
    """Sends notifications to systemd, or does nothing when not run by a Type=notify unit."""

    address: str | bytes | None
    """Where to send ($NOTIFY_SOCKET, resolved); None means notifications are off."""
    watchdog_interval_s: float | None = None
    """Seconds between WATCHDOG=1 pings; None when systemd set no watchdog for this process."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID (os.environ by default).

        An unsupported NOTIFY_SOCKET form is logged and leaves notifications off rather than
        failing the service start.
        """
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | bytes | None = None
        if raw:
            try:
                address = socket_address(raw)
            except ValueError as e:
                log.warning("sd_notify disabled: %s", e)
        return cls(address=address, watchdog_interval_s=watchdog_interval(env, pid))

    @property
    def enabled(self) -> bool:
        """True when notifications go somewhere."""
        return self.address is not None

    def send(self, *assignments: str, status: str | None = None) -> bool:
        """Send one datagram; returns False (and sends nothing) when notifications are off.

        Raises NotifyError when the socket exists in the environment but the send fails.
        """
        if self.address is None:
            return False
        message = format_message(*assignments, status=status)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT_S)
            try:
                sock.sendto(message, self.address)
            except OSError as e:
                raise NotifyError(e.errno, f"sd_notify to {self.address!r} failed: {e}") from e
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup is complete (the port is bound and the state loaded)."""
        return self.send("READY=1", status=status)

    def status(self, text: str) -> bool:
        """STATUS=...: a one-line description shown by `systemctl status`."""
        return self.send(status=text)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive; systemd restarts it if these stop for WatchdogSec."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: a graceful shutdown has begun."""
        return self.send("STOPPING=1", status=status)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time to start or stop (e.g. a long drain)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


async def run_watchdog(notifier: Notifier, interval_s: float) -> None:
    """Send WATCHDOG=1 every `interval_s` seconds until cancelled.

    Runs on the event loop on purpose: if the loop stalls, the pings stop and systemd restarts
    the service, which is the point of the watchdog. A failed send is logged and retried at
    the next tick (the loop is bounded by its cancellation).
    """
    while True:
        try:
            notifier.watchdog()
        except NotifyError as e:
            log.warning("watchdog ping failed: %s", e)
        await asyncio.sleep(interval_s)


def start_watchdog(notifier: Notifier) -> asyncio.Task[None] | None:
    """Start `run_watchdog` as a task on the running loop; None when no watchdog applies.

    The caller cancels the task when it stops (after sending STOPPING=1).
    """
    if not notifier.enabled or notifier.watchdog_interval_s is None:
        return None
    return asyncio.get_running_loop().create_task(
        run_watchdog(notifier, notifier.watchdog_interval_s), name="sd-watchdog"
    )
