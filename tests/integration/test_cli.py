"""The `spotwise` CLI as a user runs it: a real subprocess, real files, a real daemon.

Errors must be one line on stderr with exit 2 (bad input) or 1 (run-time failure), never a
traceback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.cloud.local import stop_process_group

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "jobs" / "tiny.yaml"
CLI_TIMEOUT_S = 60


@pytest.fixture
def refused_address() -> Iterator[str]:
    """host:port where nothing listens: a socket bound but not listening holds the port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@pytest.fixture
def cli_env(tmp_path: Path, refused_address: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SPOTWISE_ADDRESS=refused_address,
        SPOTWISE_STATE_DIR=str(tmp_path / "state"),
        HOME=str(tmp_path / "home"),
    )
    env.pop("SPOTWISE_LOG_DIR", None)
    env.pop("SPOTWISE_TOKEN", None)
    return env


def run_cli(
    *args: str, env: dict[str, str], module: str = "spotwise.cli", timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("spotwise: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---- without a daemon --------------------------------------------------------------------


def test_help_works_for_every_command(cli_env: dict[str, str]) -> None:
    proc = run_cli("--help", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    for command in ("submit", "jobs", "status", "watch", "logs", "cancel", "cost", "report",
                    "daemon", "agent", "demo"):
        assert command in proc.stdout
    proc = run_cli("submit", "--help", env=cli_env, module="spotwise")
    assert proc.returncode == 0 and "--follow" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "required: COMMAND"),
        (("launch",), "invalid choice: 'launch'"),
        (("submit",), "required: JOB.yaml"),
        (("status",), "required: JOB"),
        (("jobs", "--state", "sleeping"), "unknown job state 'sleeping'"),
        (("status", "../etc"), "is not a job id"),
        (("report", "../etc"), "is not a job id"),
        (("--timeout", "0", "jobs"), "--timeout must be positive"),
        (("--timeout", "soon", "jobs"), "invalid float value"),
        (("submit", "no-such.yaml"), "no-such.yaml: no such file"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    cli_env: dict[str, str], args: tuple[str, ...], needle: str
) -> None:
    assert_one_line_error(run_cli(*args, env=cli_env), 2, needle)


def test_bad_spec_is_refused_client_side_naming_each_field(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "entrypoint: [python, train.py]\n"
        "nodes: {min: 2, max: 1}\n"
        "checkpoint: {uri: 's3://Not_A_Bucket/x', every_steps: 0}\n"
        "global_batch_size: 8\n"
        "gpus: 8\n"
    )
    # The daemon address refuses connections: exit 2 (not 1) shows nothing was sent.
    line = assert_one_line_error(
        run_cli("submit", str(spec), env=cli_env),
        2,
        str(spec),
        "4 problems",
        "nodes.max",
        "checkpoint.uri",
        "checkpoint.every_steps",
        "gpus: unknown field",
    )
    assert "cannot reach" not in line


def test_bad_yaml_names_the_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\nentrypoint: [python\n")
    assert_one_line_error(run_cli("submit", str(spec), env=cli_env), 2, "invalid YAML: line")


def test_dry_run_prints_the_validated_spec(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli("submit", "--dry-run", str(TINY), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "normalized.yaml"
    out.write_text(proc.stdout)
    from spotwise.spec import JobSpec

    # Printed with working_dir resolved, it loads back to the same spec from anywhere.
    assert JobSpec.from_yaml(out) == JobSpec.from_yaml(TINY)


@pytest.mark.parametrize(
    "args",
    [("jobs",), ("status", "j-1"), ("cancel", "j-1"), ("cost", "j-1"), ("watch", "j-1")],
)
def test_unreachable_daemon_exits_1_with_one_line(
    cli_env: dict[str, str], refused_address: str, args: tuple[str, ...]
) -> None:
    assert_one_line_error(
        run_cli(*args, env=cli_env), 1, f"cannot reach the spotwise daemon at {refused_address}"
    )


def test_address_option_wins_over_the_environment(
    cli_env: dict[str, str], refused_address: str
) -> None:
    env = dict(cli_env, SPOTWISE_ADDRESS="127.0.0.1:9")
    # Accepted before and after the command name.
    for args in (("--address", refused_address, "jobs"), ("jobs", "--address", refused_address)):
        assert_one_line_error(run_cli(*args, env=env), 1, refused_address)


def test_submit_to_unreachable_daemon_exits_1(cli_env: dict[str, str], refused_address: str) -> None:
    assert_one_line_error(run_cli("submit", str(TINY), env=cli_env), 1, refused_address)


def _write_logs(log_dir: Path, job_id: str) -> None:
    for gen, rank, text in [
        (10, 0, "g10 r0\n"),
        (1, 1, "g1 r1\n"),
        (0, 0, "g0 r0 line1\ng0 r0 line2\n"),
        (1, 0, "g1 r0\n"),
    ]:
        path = log_dir / job_id / f"g{gen}" / f"rank{rank}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    # Not logs: the runtime's event files and stray names are skipped.
    (log_dir / job_id / "g1" / "rank0.events.jsonl").write_text('{"event": "progress"}\n')
    (log_dir / job_id / "notes").mkdir()


def test_logs_prints_every_file_oldest_generation_first(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    log_dir = tmp_path / "logs"
    _write_logs(log_dir, "job-1")
    proc = run_cli("logs", "job-1", "--log-dir", str(log_dir), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    headers = [line for line in proc.stdout.splitlines() if line.startswith("==> ")]
    assert [h.split(":")[0] for h in headers] == [
        "==> generation 0, rank 0",
        "==> generation 1, rank 0",
        "==> generation 1, rank 1",
        "==> generation 10, rank 0",
    ]
    body = [line for line in proc.stdout.splitlines() if line and not line.startswith("==> ")]
    assert body == ["g0 r0 line1", "g0 r0 line2", "g1 r0", "g1 r1", "g10 r0"]
    assert "progress" not in proc.stdout


def test_logs_default_dir_is_under_the_state_dir(cli_env: dict[str, str], tmp_path: Path) -> None:
    _write_logs(tmp_path / "state" / "logs", "job-2")
    proc = run_cli("logs", "job-2", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "g10 r0" in proc.stdout


def test_logs_of_unknown_job_exits_1(cli_env: dict[str, str], tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("logs", "nope", "--log-dir", str(tmp_path), env=cli_env), 1, "no logs for job nope"
    )


def test_daemon_bad_config_exits_2(cli_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text("[daemon]\nlease_s = 0.1\nheartbeat_interval_s = 0.5\nflavour = 1\n")
    assert_one_line_error(
        run_cli("daemon", "--config", str(config), env=cli_env), 2, str(config), "flavour"
    )
    assert_one_line_error(
        run_cli("daemon", "--listen", "nowhere", env=cli_env), 2, "listen must be host:port"
    )


# ---- against a real daemon ---------------------------------------------------------------


class DaemonProcess:
    """`spotwise daemon` as a subprocess on port 0; its address comes from its sd_notify
    READY message (STATUS=serving on HOST:PORT), as systemd would see it."""

    def __init__(
        self,
        state_dir: Path,
        *,
        provider: str = "none",
        extra_env: dict[str, str],
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.state_dir = state_dir
        self.log_dir = state_dir / "logs"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"spotwise-test-{os.getpid()}-{id(self)}"
        self.notify.bind(b"\0" + name.encode())
        env = dict(extra_env, NOTIFY_SOCKET=f"@{name}", SPOTWISE_LOG_LEVEL="WARNING")
        self.stderr_path = state_dir.parent / "daemon.stderr"
        self._stderr = self.stderr_path.open("ab")
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", "daemon", "--listen", listen,
             "--state-dir", str(state_dir), "--provider", provider],
            env=env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.address = self._wait_ready(timeout_s=60.0)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: {self.stderr_path.read_text()}"
                )
            self.notify.settimeout(0.2)
            try:
                data = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            if fields.get("READY") == "1":
                return fields["STATUS"].removeprefix("serving on ").strip()
        raise AssertionError(f"daemon not ready in {timeout_s}s: {self.stderr_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_process_group(self.proc)
        self.notify.close()
        self._stderr.close()


@pytest.fixture
def daemon(tmp_path: Path, cli_env: dict[str, str]) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path / "daemon-state", extra_env=cli_env)
    try:
        yield proc
    finally:
        proc.stop()
    # A clean SIGTERM stop, as systemd would do it.
    assert proc.proc.returncode == 0, proc.stderr_path.read_text()


@pytest.fixture
def denv(cli_env: dict[str, str], daemon: DaemonProcess) -> dict[str, str]:
    return dict(cli_env, SPOTWISE_ADDRESS=daemon.address)


def _submit(env: dict[str, str], spec: Path = TINY) -> str:
    proc = run_cli("submit", str(spec), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    return lines[0]


def test_submit_status_jobs_cost_cancel_through_the_daemon(denv: dict[str, str]) -> None:
    job_id = _submit(denv)
    # No provider and no agents: the job waits for nodes.
    status = run_cli("status", job_id, env=denv)
    assert status.returncode == 0, status.stderr
    assert "job:" in status.stdout and job_id in status.stdout
    assert "state:" in status.stdout and "PENDING" in status.stdout
    assert "tests/workloads/tiny_train.py" in status.stdout

    as_json = run_cli("status", job_id, "--json", env=denv)
    job = json.loads(as_json.stdout)
    assert job["id"] == job_id and job["spec"]["name"] == "tiny"
    assert job["spec"]["nodes"] == {"min": 1, "max": 3}
    assert job["spec"]["working_dir"] == str(REPO)

    other = _submit(denv)
    listing = run_cli("jobs", env=denv)
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()
    assert rows[0].split()[:3] == ["ID", "NAME", "STATE"]
    assert {row.split()[0] for row in rows[1:]} == {job_id, other}

    cost = run_cli("cost", job_id, env=denv)
    assert cost.returncode == 0, cost.stderr
    assert "spent:" in cost.stdout and "$0.0000" in cost.stdout
    assert "savings:" in cost.stdout and "on-demand equivalent:" in cost.stdout

    cancel = run_cli("cancel", job_id, env=denv)
    assert cancel.returncode == 0, cancel.stderr
    assert job_id in cancel.stdout
    assert "CANCELLED" in run_cli("status", job_id, env=denv).stdout
    # The filter sees it; the other job is still pending.
    cancelled = json.loads(run_cli("jobs", "--state", "cancelled", "--json", env=denv).stdout)
    assert [j["id"] for j in cancelled["jobs"]] == [job_id]
    # Cancelling again is refused by the daemon: a one-line run-time error.
    assert_one_line_error(run_cli("cancel", job_id, env=denv), 1)
    # Watching an ended job prints where it ended and exits 1 (it did not succeed).
    watch = run_cli("watch", job_id, env=denv)
    assert watch.returncode == 1, watch.stderr
    assert f"job {job_id} CANCELLED" in watch.stdout


def test_unknown_job_exits_1(denv: dict[str, str]) -> None:
    for command in ("status", "cancel", "cost", "watch"):
        assert_one_line_error(run_cli(command, "j-nope", env=denv), 1, "no job 'j-nope'")


def test_follow_ends_with_exit_1_when_the_job_is_cancelled(denv: dict[str, str]) -> None:
    follow = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "submit", str(TINY), "--follow"],
        env=denv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert follow.stdout is not None
        job_id = follow.stdout.readline().strip()
        assert job_id, follow.stderr.read() if follow.stderr else ""
        assert run_cli("cancel", job_id, env=denv).returncode == 0
        out, err = follow.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if follow.poll() is None:
            os.killpg(follow.pid, signal.SIGKILL)
            follow.wait(timeout=10)
    assert follow.returncode == 1, (out, err)
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith(f"job {job_id} CANCELLED")


def test_sdk_reports_every_violation_and_stores_nothing(daemon: DaemonProcess) -> None:
    from spotwise import Client, InvalidSpec, JobNotFound
    from spotwise.proto.v1 import jobs_pb2

    with Client(daemon.address, timeout=10) as client:
        bad = jobs_pb2.JobSpec(
            entrypoint=[],
            nodes=jobs_pb2.NodeRange(min=2, max=1),
            nproc_per_node=1,
            checkpoint=jobs_pb2.CheckpointSpec(uri="s3://", every_steps=1, keep=1),
            global_batch_size=4,
            market="bargain",
        )
        with pytest.raises(InvalidSpec) as info:
            client.submit(bad)
        fields = sorted(field for field, _ in info.value.violations)
        assert fields == ["checkpoint.uri", "entrypoint", "market", "nodes.max"]
        assert client.list() == []
        with pytest.raises(JobNotFound):
            client.get("j-missing")

        job_id = client.submit(JobSpecFromTiny())
        assert [job.id for job in client.list()] == [job_id]
        assert client.get(job_id).spec.name == "tiny"
        client.cancel(job_id)
        final = client.wait(job_id, timeout=30)
        assert final.state == jobs_pb2.JOB_STATE_CANCELLED
        events = list(client.watch(job_id, replay=True))
        assert events and events[-1].job.state == jobs_pb2.JOB_STATE_CANCELLED


def JobSpecFromTiny():  # noqa: N802 - reads as the value it returns
    from spotwise.spec import JobSpec

    return JobSpec.from_yaml(TINY)


def _tiny_spec(tmp_path: Path, *, steps: int) -> Path:
    spec = tmp_path / "tiny-run.yaml"
    spec.write_text(
        f"""\
name: tiny-run
entrypoint: [python, tests/workloads/tiny_train.py, --steps, {steps}, --global-batch-size, 8,
             --micro-batch-size, 2, --step-sleep, 0.05]
working_dir: {REPO}
nodes: {{min: 1, max: 1}}
checkpoint: {{uri: {tmp_path / "ckpt"}, every_steps: 5, keep: 2}}
global_batch_size: 8
"""
    )
    return spec


@pytest.mark.slow
def test_submit_follow_runs_a_job_to_success_on_a_local_agent(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = dict(cli_env, SPOTWISE_DAEMON_LOCAL_MAX_NODES="1", SPOTWISE_DAEMON_GRACE_S="5")
    daemon = DaemonProcess(tmp_path / "daemon-state", provider="local", extra_env=env)
    env["SPOTWISE_ADDRESS"] = daemon.address
    env["SPOTWISE_LOG_DIR"] = str(daemon.log_dir)
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", *args], env=env, cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        started.append(proc)
        return proc

    try:
        follow = start("submit", str(_tiny_spec(tmp_path, steps=20)), "--follow")
        assert follow.stdout is not None
        job_id = follow.stdout.readline().strip()
        # Logs followed while the job runs, from before its first process starts.
        live_logs = start("logs", job_id, "--follow")
        rest, err = follow.communicate(timeout=240)
        assert follow.returncode == 0, (rest, err)
        lines = rest.strip().splitlines()
        assert lines[-1].startswith(f"job {job_id} SUCCEEDED: step 20")
        assert any(" checkpoint " in line for line in lines), rest
        live_out, live_err = live_logs.communicate(timeout=60)
        assert live_logs.returncode == 0, live_err

        # The same job seen afterwards: watch exits 0 (it succeeded), logs shows its files.
        watch = run_cli("watch", job_id, "--plain", env=env)
        assert watch.returncode == 0 and "SUCCEEDED" in watch.stdout, watch.stderr
        logs = run_cli("logs", job_id, env=env)
        assert logs.returncode == 0, logs.stderr
        assert "==> generation " in logs.stdout and "rank 0" in logs.stdout
        # What was followed live is what the files hold at the end.
        assert live_out == logs.stdout
        follow_logs = run_cli("logs", job_id, "--follow", env=env)
        assert follow_logs.returncode == 0 and follow_logs.stdout == logs.stdout
        cost = run_cli("cost", job_id, "--json", env=env)
        assert json.loads(cost.stdout)["job_id"] == job_id
        # With the job over, the local fleet stops its agent (found by the test's private log
        # dir on their command lines); nothing of the job is left running.
        leftovers = _wait_gone(str(daemon.log_dir), timeout_s=60)
        assert leftovers == [], "agents or training processes outlived the job"
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=10)
        daemon.stop()
        for pid in _pids_mentioning(str(daemon.log_dir)):
            os.kill(pid, signal.SIGKILL)


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (e.g. a test's private log dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _wait_gone(text: str, *, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        pids = _pids_mentioning(text)
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


@pytest.mark.slow
def test_watch_survives_a_daemon_restart(tmp_path: Path, cli_env: dict[str, str]) -> None:
    first = DaemonProcess(tmp_path / "daemon-state", extra_env=cli_env)
    env = dict(cli_env, SPOTWISE_ADDRESS=first.address)
    second = None
    watch = None
    try:
        job_id = _submit(env)
        watch = subprocess.Popen(
            [sys.executable, "-m", "spotwise.cli", "watch", job_id],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert watch.stdout is not None
        assert "PENDING" in watch.stdout.readline()  # streaming from the first daemon
        first.stop()
        assert first.proc.returncode == 0
        # The same address and state, as after a systemd restart or an upgrade.
        second = DaemonProcess(tmp_path / "daemon-state", extra_env=cli_env, listen=first.address)
        assert run_cli("cancel", job_id, env=env).returncode == 0
        out, err = watch.communicate(timeout=CLI_TIMEOUT_S)
        assert watch.returncode == 1, (out, err)
        assert out.strip().splitlines()[-1].startswith(f"job {job_id} CANCELLED")
        assert "lost the daemon, retrying" in err and "Traceback" not in err
    finally:
        if watch is not None and watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait(timeout=10)
        first.stop()
        if second is not None:
            second.stop()


def _tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spotwise test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@pytest.mark.slow
def test_tls_and_tokens_from_the_environment(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from spotwise.daemon.auth import mint_token

    ca, cert, key = _tls_material(tmp_path)
    client_token, agent_token = mint_token("client", "alice"), mint_token("agent", "fleet")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{client_token.line}\n{agent_token.line}\n")
    daemon_env = dict(
        cli_env,
        SPOTWISE_DAEMON_TLS_CERT_FILE=str(cert),
        SPOTWISE_DAEMON_TLS_KEY_FILE=str(key),
        SPOTWISE_DAEMON_TOKENS_FILE=str(tokens),
    )
    daemon = DaemonProcess(tmp_path / "daemon-state", extra_env=daemon_env)
    try:
        env = dict(cli_env, SPOTWISE_ADDRESS=daemon.address, SPOTWISE_CA_FILE=str(ca),
                   SPOTWISE_TOKEN=client_token.token)
        ok = run_cli("jobs", "--json", env=env)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"jobs": []}
        job_id = _submit(env)
        assert "PENDING" in run_cli("status", job_id, env=env).stdout

        no_token = dict(env)
        del no_token["SPOTWISE_TOKEN"]
        assert_one_line_error(run_cli("jobs", env=no_token), 1, "refused the call")
        wrong_role = dict(env, SPOTWISE_TOKEN=agent_token.token)
        assert_one_line_error(run_cli("status", job_id, env=wrong_role), 1, "refused the call")
        plaintext = dict(env)
        del plaintext["SPOTWISE_CA_FILE"]
        assert_one_line_error(run_cli("jobs", env=plaintext), 1, "cannot reach")
        missing_ca = dict(env, SPOTWISE_CA_FILE=str(tmp_path / "nope.crt"))
        assert_one_line_error(run_cli("jobs", env=missing_ca), 2, "cannot read SPOTWISE_CA_FILE")
    finally:
        daemon.stop()


def test_ctrl_c_stops_following_not_the_job(denv: dict[str, str]) -> None:
    job_id = _submit(denv)
    # As a terminal starts it: Ctrl-C's signal handled by default. A test run started in the
    # background of a non-interactive shell (`make test &`) ignores SIGINT, and a child would
    # inherit that and never see the Ctrl-C.
    watch = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cli", "watch", job_id, "--plain"],
        env=denv, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert watch.stdout is not None
        assert "PENDING" in watch.stdout.readline()
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGKILL)
            watch.wait(timeout=10)
    assert watch.returncode == 130
    assert f"stopped following job {job_id}; it keeps running" in err
    assert "Traceback" not in err
    assert "PENDING" in run_cli("status", job_id, env=denv).stdout
