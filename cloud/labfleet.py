"""A spotwise fleet on the fault lab: the daemon and an S3 (moto behind the fault proxy) on the
head host, one node agent on each worker host, each advertising its own host's address.

    with Lab(["head", "w1", "w2", "w3"]) as lab:
        fleet = LabFleet(lab, workdir=tmp_path)
        fleet.start()                      # S3, daemon, one agent per worker host
        job_id = fleet.submit(spec_dict)   # through the CLI, from the test driver
        fleet.kill_daemon(); fleet.start_daemon()

Every process runs inside its host's namespace, so rendezvous, gloo and checkpoint traffic
cross the lab's bridge. Logs go to `workdir/<what>.log`. The lab's close kills everything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from spotwise.cloud.netlab import Host, Lab, kill9

REPO = Path(__file__).resolve().parents[1]
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "lab"


class FleetError(RuntimeError):
    """A fleet process did not come up (the message has the end of its log)."""


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The first match of `pattern` (group 1) in `log`; FleetError if `proc` exits or the
    deadline passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise FleetError(f"{proc.args!r} exited {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise FleetError(f"no {pattern!r} in {log} after {timeout_s}s:\n{log.read_text()[-3000:]}")


class LabFleet:
    """The processes of one fleet on a lab (head host "head", the others are workers)."""

    def __init__(self, lab: Lab, *, workdir: Path, heartbeat_s: float = 0.5, lease_s: float = 3.0,
                 seed: int = 0) -> None:
        self.lab = lab
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.head: Host = lab.hosts["head"]
        self.workers: list[Host] = [h for n, h in lab.hosts.items() if n != "head"]
        self.seed = seed
        self.s3_url = ""
        self.daemon_address = ""
        self.daemon: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self._daemon_starts = 0
        self.env = {**os.environ, **CREDENTIALS, "PYTHONUNBUFFERED": "1",
                    "SPOTWISE_DAEMON_ALLOW_INSECURE": "true",
                    "SPOTWISE_DAEMON_HEARTBEAT_INTERVAL_S": str(heartbeat_s),
                    "SPOTWISE_DAEMON_LEASE_S": str(lease_s),
                    # After a failed rank the daemon's shorter lease (2.5 heartbeats by default)
                    # takes a slow but live agent of a loaded machine for lost; the lab's faults
                    # are the ones it injects.
                    "SPOTWISE_DAEMON_FAILURE_LEASE_S": str(0.8 * lease_s),
                    "SPOTWISE_DAEMON_SETTLE_S": "1.0"}

    def start(self) -> LabFleet:
        self.start_s3()
        self.start_daemon()
        for host in self.workers:
            self.start_agent(host)
        return self

    # ----- S3

    def start_s3(self) -> str:
        log = self.workdir / "s3.log"
        proc = self.head.popen([sys.executable, "-m", "spotwise.cloud.s3_faults", "--listen",
                                f"{self.head.address}:0", "--moto", "--seed", str(self.seed)],
                               env=self.env, log_path=log)
        self.s3_url = _wait_for_line(log, r"s3 faults proxy on (http://\S+)", proc, 60)
        self.env["AWS_ENDPOINT_URL_S3"] = self.s3_url
        import boto3

        boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                     aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
                     ).create_bucket(Bucket=BUCKET)
        return self.s3_url

    @property
    def s3_port(self) -> int:
        return int(self.s3_url.rsplit(":", 1)[1])

    # ----- daemon

    def start_daemon(self) -> str:
        """Start the daemon on the head host (the same address as before after a kill)."""
        self._daemon_starts += 1
        log = self.workdir / f"daemon{self._daemon_starts}.log"
        listen = self.daemon_address or f"{self.head.address}:0"
        self.daemon = self.head.popen(
            [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", listen, "--state-dir",
             str(self.workdir / "state"), "--provider", "none", "--log-dir",
             str(self.workdir / "logs")], env=self.env, cwd=REPO, log_path=log)
        self.daemon_address = _wait_for_line(log, r"daemon serving on (\S+)", self.daemon, 90)
        return self.daemon_address

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        kill9(self.daemon.pid)
        self.daemon.wait(30)

    # ----- agents

    def start_agent(self, host: Host) -> subprocess.Popen[bytes]:
        proc = host.popen(
            [sys.executable, "-m", "spotwise.cli", "agent", "--daemon", self.daemon_address,
             "--address", host.address, "--node-id", host.name, "--provider-node", host.name,
             "--log-dir", str(self.workdir / "logs" / host.name), "--state-dir",
             str(self.workdir / "agents" / host.name), "--grace-s", "5"],
            env=self.env, cwd=REPO, log_path=self.workdir / f"agent-{host.name}.log")
        self.agents[host.name] = proc
        return proc

    def kill_agent(self, host: Host) -> None:
        proc = self.agents[host.name]
        kill9(proc.pid)
        proc.wait(30)

    def rank_pids(self, host: Host, script: str = "tiny_train.py") -> list[int]:
        """Pids of the training processes on `host`."""
        return sorted(p for p, cmd in host.processes(script).items() if "netns" not in cmd)

    # ----- jobs

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI as a user runs it, from the test driver (root namespace, via the bridge)."""
        return subprocess.run([sys.executable, "-m", "spotwise.cli", "--address",
                               self.daemon_address, *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=self.env)

    def submit(self, spec: dict[str, Any]) -> str:
        """Submit a job. Its storage credentials come with it (the spec's env): an agent never
        hands a job its own (they are stripped from the processes' environment)."""
        spec = {**spec, "env": {**CREDENTIALS, **spec.get("env", {})}}
        path = self.workdir / f"job-{len(list(self.workdir.glob('job-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(spec))
        out = self.cli("submit", str(path))
        if out.returncode != 0:
            raise FleetError(f"submit failed: {out.stderr}")
        return out.stdout.strip().splitlines()[-1]

    def client(self) -> Any:
        from spotwise.client import Client

        return Client(self.daemon_address, timeout=10)

    def wait_job(self, job_id: str, cond: Callable[[Any], bool], timeout_s: float, what: str) -> Any:
        """Poll the job until `cond(job)` holds; the daemon may be down meanwhile (retried).
        FleetError after `timeout_s`, with the job's last view."""
        from spotwise.client import SpotwiseError

        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    last = c.get(job_id)
                if cond(last):
                    return last
            except SpotwiseError:
                pass  # the daemon is restarting; ask again
            time.sleep(0.3)
        raise FleetError(f"job {job_id}: no {what} after {timeout_s}s; last seen: {last}")
