"""The `spotwise` CLI as a user runs it: a real subprocess, real files, a real daemon.

Errors must be one line on stderr with exit 2 (bad input) or 1 (run-time failure), never a
traceback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
    for command in ("submit", "jobs", "status", "watch", "logs", "cancel", "cost", "daemon",
                    "agent", "demo"):
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
    body = [line for line in proc.stdout.splitlines() if not line.startswith("==> ")]
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
