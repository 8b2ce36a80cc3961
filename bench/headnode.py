"""A head node for the benchmark: a real `spotwise daemon` process with TLS and tokens on, and
what can be read of it from outside (CPU time, memory, the size of its database).

    head = HeadNode.start(directory, settings)      # raises RuntimeError if it does not serve
    head.address, head.credentials
    head.cpu_s(); head.rss_bytes(); head.db_size()
    head.stop()                                     # SIGTERM, then SIGKILL after a grace

The daemon listens on 127.0.0.1:0 and logs "daemon serving on HOST:PORT" once bound: that
line, read from its log, is how the harness learns the port (no port is picked in advance,
so two runs on one machine cannot collide). The daemon's environment is scrubbed of
SPOTWISE_* variables, which would otherwise override the config file.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pki import Credentials, make_credentials

from spotwise.cloud.local import stop_process_group

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
START_TIMEOUT_S = 60.0
"""Longest wait for the daemon's "serving" line."""
STOP_GRACE_S = 10.0
"""SIGTERM-to-SIGKILL grace when the daemon stops."""
_SERVING = re.compile(r"daemon serving on (\S+)")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, kw_only=True)
class DaemonSettings:
    """What the benchmark's daemon runs with (written into its TOML config)."""

    heartbeat_interval_s: float = 0.5
    """How often agents beat (the daemon's default, told to agents at Register)."""
    lease_s: float = 2.0
    """A node silent this long is LOST (the daemon's default)."""
    log_level: str = "INFO"
    """The daemon's log level: INFO, as a head node runs it."""
    admins: int = 0
    """Admin tokens to mint besides the client and agent ones."""
    extra_toml: str = ""
    """More [daemon] lines (settings the run changes from the defaults, e.g. watcher caps)."""


@dataclass(frozen=True)
class DbSize:
    """The daemon's database at one moment."""

    file_bytes: int
    """spotwise.db plus spotwise.db-wal on disk."""
    logical_bytes: int
    """Pages in use (page_count - freelist_count) x page_size, WAL content included. Growth is
    measured on this: the WAL file is recycled at its high-water size, so its size says
    little about how fast the database grows."""


def _die_with_parent() -> None:
    # The daemon runs in its own session (a Ctrl-C of the harness must not reach it before the
    # harness stops it in order), so it would outlive a harness killed with SIGKILL; this asks
    # the kernel to SIGTERM it when the harness dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process `pid` has used (/proc/<pid>/stat utime+stime)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class HeadNode:
    """One daemon process in `directory` (state, config, credentials and log)."""

    def __init__(self, directory: Path, credentials: Credentials, proc: subprocess.Popen[bytes],
                 log_path: Path) -> None:
        self.directory = directory
        self.credentials = credentials
        self.proc = proc
        self.log_path = log_path
        self.db_path = directory / "state" / "spotwise.db"
        self.address = ""

    @classmethod
    def start(cls, directory: Path, settings: DaemonSettings) -> HeadNode:
        """Start the daemon and wait until it serves. RuntimeError (with its log's tail) if it
        exits or does not serve within START_TIMEOUT_S; it is stopped then."""
        credentials = make_credentials(directory / "pki", admins=settings.admins)
        config = directory / "daemon.toml"
        config.write_text(
            "[daemon]\n"
            'listen = "127.0.0.1:0"\n'
            f'state_dir = "{directory / "state"}"\n'
            'provider = "none"\n'
            f"heartbeat_interval_s = {settings.heartbeat_interval_s}\n"
            f"lease_s = {settings.lease_s}\n"
            f'tls_cert_file = "{credentials.server_cert}"\n'
            f'tls_key_file = "{credentials.server_key}"\n'
            f'tokens_file = "{credentials.tokens_file}"\n' + settings.extra_toml,
            encoding="utf-8",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTWISE_")}
        log_path = directory / "daemon.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "spotwise.cli", "daemon", "--config", str(config),
                 "--log-level", settings.log_level],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        head = cls(directory, credentials, proc, log_path)
        try:
            head.address = head._wait_serving()
        except BaseException:
            head.stop()
            raise
        return head

    def _wait_serving(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.05
        while time.monotonic() < deadline:
            match = _SERVING.search(self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.proc.returncode}): {self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise RuntimeError(f"the daemon did not serve within {START_TIMEOUT_S}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def cpu_s(self) -> float:
        """CPU seconds the daemon has used."""
        return cpu_seconds(self.proc.pid)

    def rss_bytes(self) -> int:
        """The daemon's resident memory now (/proc/<pid>/statm)."""
        return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * PAGE_BYTES

    def peak_rss_bytes(self) -> int:
        """The most resident memory the daemon has had (VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def db_size(self) -> DbSize:
        """The database's size on disk and in use (read with a reader's connection, which WAL
        lets run beside the daemon's writer without blocking it)."""
        files = sum(p.stat().st_size for p in (self.db_path, Path(f"{self.db_path}-wal"))
                    if p.exists())
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5.0)
        try:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
        finally:
            conn.close()
        return DbSize(file_bytes=files, logical_bytes=(pages - free) * size)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the daemon (SIGTERM to its process group, SIGKILL after STOP_GRACE_S)."""
        if self.proc.poll() is None:
            stop_process_group(self.proc, grace_s=STOP_GRACE_S)
