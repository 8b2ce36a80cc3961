"""The systemd units and example configs in deploy/: the invariants a fleet operator relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from spotwise.config import AgentConfig, DaemonConfig

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
EXAMPLES = ROOT / "deploy" / "examples"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """{section: {key: [values in order]}}: systemd's syntax, where keys may repeat."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= missing"
    assert len(values) == 1, f"[{section}] {key}= set {len(values)} times"
    return values[0]


def seconds(value: str) -> float:
    """systemd time span ("45s", "2min", "1min 30s", "90") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    assert total > 0, value
    return total


def load(name: str) -> Unit:
    return parse_unit((SYSTEMD / name).read_text())


UNITS = {
    "spotwise-daemon.service": "daemon",
    "spotwise-agent.service": "agent",
}


@pytest.mark.parametrize(("name", "role"), UNITS.items())
def test_service_lifecycle(name: str, role: str) -> None:
    unit = load(name)
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert seconds(one(unit, "Service", "WatchdogSec")) >= 10
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > 0
    assert seconds(one(unit, "Service", "TimeoutStartSec")) > 0
    # The agent (daemon) is SIGTERMed alone and stops its own children in order.
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "ExecStart") == (
        f"/opt/spotwise/.venv/bin/spotwise {role} --config /etc/spotwise/{role}.toml"
    )
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" in one(unit, "Unit", "Wants")
    assert "network-online.target" in one(unit, "Unit", "After")


@pytest.mark.parametrize("name", UNITS)
def test_service_hardening(name: str) -> None:
    unit = load(name)
    service = unit["Service"]
    dynamic = service.get("DynamicUser", ["no"])[-1] == "yes"
    user = service.get("User", [""])[-1]
    assert dynamic or (user and user != "root"), "needs a dedicated or dynamic user"
    assert one(unit, "Service", "StateDirectory") == "spotwise"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectHome") in ("yes", "read-only", "tmpfs")
    assert one(unit, "Service", "PrivateTmp") == "yes"
    # The daemon holds no capability; the agent only what run_as needs (see below).
    caps = {"daemon": "", "agent": "CAP_SETUID CAP_SETGID CAP_KILL"}[UNITS[name]]
    assert one(unit, "Service", "CapabilityBoundingSet") == caps
    assert one(unit, "Service", "AmbientCapabilities") == caps
    # Writable paths are the service's own directories only ("-": may be absent).
    writable = [p.removeprefix("-") for p in " ".join(service.get("ReadWritePaths", [])).split()]
    assert writable and all(
        p.startswith(("/var/lib/spotwise", "/var/cache/spotwise")) for p in writable
    )
    env = dict(v.split("=", 1) for v in service.get("Environment", []))
    assert env["SPOTWISE_STATE_DIR"] == "/var/lib/spotwise"


def test_daemon_has_no_devices_but_the_agent_keeps_the_gpus() -> None:
    assert one(load("spotwise-daemon.service"), "Service", "PrivateDevices") == "yes"
    agent = load("spotwise-agent.service")["Service"]
    assert "PrivateDevices" not in agent
    assert "MemoryDenyWriteExecute" not in agent  # CUDA and Triton JIT need W+X pages


AGENT_HARDENING = {
    "SystemCallArchitectures": "native",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "ProtectHostname": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "LockPersonality": "yes",
    "RestrictSUIDSGID": "yes",
    "PrivateMounts": "yes",
    "RemoveIPC": "yes",
    "DevicePolicy": "closed",
    "SystemCallErrorNumber": "EPERM",
}


def test_agent_hardening_that_cuda_and_nccl_tolerate() -> None:
    unit = load("spotwise-agent.service")
    for key, value in AGENT_HARDENING.items():
        assert one(unit, "Service", key) == value, key
    service = unit["Service"]
    # The GPUs and EFA stay reachable; nothing else beyond the pseudo devices.
    assert service["DeviceAllow"] == ["char-nvidia* rw", "char-infiniband_verbs rw", "/dev/infiniband/rdma_cm rw"]
    # A deny list (the driver's ioctls, NUMA and affinity calls stay allowed), refusing with
    # EPERM; never @resources (sched_setaffinity) or @privileged (setuid for run_as).
    filters = one(unit, "Service", "SystemCallFilter")
    assert filters.startswith("~") and "@resources" not in filters and "@privileged" not in filters
    assert {"@debug", "@mount", "@module", "@raw-io", "@reboot", "@swap", "@clock"} <= set(filters[1:].split())
    # Not these: JIT (CUDA, Triton) needs W+X memory; NCCL and torch read /proc; run_as needs
    # the host's users.
    for absent in ("MemoryDenyWriteExecute", "ProtectProc", "ProcSubset", "PrivateUsers", "PrivateNetwork"):
        assert absent not in service, absent
    # Job logs live apart from the agent's state, traversable but not listable by the job user.
    assert one(unit, "Service", "LogsDirectory") == "spotwise-jobs"
    assert one(unit, "Service", "LogsDirectoryMode") == "0711"
    assert one(unit, "Service", "StateDirectoryMode") == "0750"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(("name", "limit"), [("spotwise-agent.service", 3.0), ("spotwise-daemon.service", 2.0)])
def test_exposure_score(name: str, limit: float, tmp_path: Path) -> None:
    text = (SYSTEMD / name).read_text().replace("/opt/spotwise/.venv/bin/spotwise", "/bin/true")
    (tmp_path / name).write_text(text)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(tmp_path / name)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= limit, result.stdout


def test_agent_training_processes_find_the_spotwise_python() -> None:
    env = dict(v.split("=", 1) for v in load("spotwise-agent.service")["Service"]["Environment"])
    assert env["PATH"].split(":")[0] == "/opt/spotwise/.venv/bin"
    assert env["HOME"].startswith("/var/lib/spotwise")


def test_the_example_agent_config_runs_jobs_as_their_own_user() -> None:
    """The config that goes with the unit isolates jobs by default, where the unit expects."""
    agent = tomllib.loads((EXAMPLES / "agent.toml").read_text())["agent"]
    unit = load("spotwise-agent.service")
    assert agent["run_as"] == "spotwise-job" != one(unit, "Service", "User")
    assert agent["log_dir"] == "/var/log/" + one(unit, "Service", "LogsDirectory")
    assert "-/var/lib/spotwise-job" in one(unit, "Service", "ReadWritePaths").split()  # its home


def test_agent_stop_timeout_covers_the_grace_period() -> None:
    agent = tomllib.loads((EXAMPLES / "agent.toml").read_text())["agent"]
    grace = agent.get("grace_s", AgentConfig.model_fields["grace_s"].default)
    stop = seconds(one(load("spotwise-agent.service"), "Service", "TimeoutStopSec"))
    # SIGTERM -> grace -> SIGKILL of the processes, and then the agent's own exit, before
    # systemd SIGKILLs everything; and all of it inside a 2-minute spot notice.
    assert grace + 30 <= stop <= 120


def test_parser_handles_repeats_and_continuations() -> None:
    unit = parse_unit("[Service]\nEnvironment=A=1\nEnvironment=B=2 \\\n  C=3\n# c\n")
    assert unit == {"Service": {"Environment": ["A=1", "B=2 C=3"]}}
    assert seconds("1min 30s") == 90


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_every_directive(tmp_path: Path) -> None:
    """systemd-analyze verify warns about unknown keys and bad values (it exits 0 on those)."""
    for name in UNITS:
        # The real ExecStart binary is not installed here; everything else is verified as is.
        text = (SYSTEMD / name).read_text().replace("/opt/spotwise/.venv/bin/spotwise", "/bin/true")
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in UNITS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert result.returncode == 0 and not complaints, result.stderr


# --- example configs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model"), [("daemon.toml", DaemonConfig), ("agent.toml", AgentConfig)]
)
def test_example_configs_load(name: str, model: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key is one the config model defines (extra keys are refused) and every value valid."""
    section = name.removesuffix(".toml")
    for var in [k for k in os.environ if k.startswith("SPOTWISE_")]:
        monkeypatch.delenv(var)
    data = tomllib.loads((EXAMPLES / name).read_text())
    assert set(data) == {section}
    config = model.load(EXAMPLES / name)
    for key, value in data[section].items():
        loaded = getattr(config, key)
        assert loaded == value or str(loaded) == str(value), key
