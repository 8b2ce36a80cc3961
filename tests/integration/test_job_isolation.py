"""A job's processes find none of the agent's credentials, and as `run_as` cannot read its files.

Real training processes started by the Supervisor (the agent's process starter): one reports its
environment, one (as a throwaway user made with useradd) tries to read the agent's token file
and state directory and its own events file's folder.
"""

import grp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from spotwise.worker.agent.job_isolation import (
    JobUser,
    is_agent_secret,
    job_environment,
    resolve_run_as,
)
from spotwise.worker.agent.supervisor import LaunchSpec, Supervisor, log_path
from tests.support.wait import until

SECRETS = {
    "SPOTWISE_AGENT_TOKEN": "agent-token-secret",
    "SPOTWISE_TOKEN": "client-token-secret",
    "SPOTWISE_AGENT_TOKEN_FILE": "/etc/spotwise/agent.token",
    "SPOTWISE_AGENT_NODE_SECRET": "node-secret",
    "SPOTWISE_DAEMON_TOKENS_FILE": "/etc/spotwise/tokens",
    "AWS_ACCESS_KEY_ID": "AKIAINSTANCEROLE",
    "AWS_SECRET_ACCESS_KEY": "instance-secret-key",
    "AWS_SESSION_TOKEN": "instance-session-token",
    "AWS_SHARED_CREDENTIALS_FILE": "/var/lib/spotwise/.aws/credentials",
    "CREDENTIALS_DIRECTORY": "/run/credentials/spotwise-agent.service",
    "NOTIFY_SOCKET": "/run/systemd/notify",
}

REPORT = (
    "import json, os, sys\n"
    "out = {'env': dict(os.environ), 'uid': os.getuid(), 'groups': os.getgroups()}\n"
    "for name, path in [('token', sys.argv[1]), ('state', sys.argv[2])]:\n"
    "    try:\n"
    "        (open(path).read() if name == 'token' else os.listdir(path))\n"
    "        out[name] = 'read'\n"
    "    except OSError as e:\n"
    "        out[name] = type(e).__name__\n"
    "try:\n"
    "    open(os.environ['SPOTWISE_EVENTS_FILE'], 'a').write('{}\\n')\n"
    "    out['events'] = 'written'\n"
    "except OSError as e:\n"
    "    out['events'] = type(e).__name__\n"
    "log = os.path.join(os.path.dirname(os.environ['SPOTWISE_EVENTS_FILE']), 'rank0.log')\n"
    "try:\n"
    "    os.rename(log, log + '.moved')\n"
    "    os.rename(log + '.moved', log)\n"
    "    out['rename_agent_file'] = 'renamed'\n"
    "except OSError as e:\n"
    "    out['rename_agent_file'] = type(e).__name__\n"
    "cap = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapAmb'))]\n"
    "out['caps'] = [l.split()[1] for l in cap]\n"
    "print('REPORT ' + json.dumps(out), flush=True)\n"
)


def _spec(python, token, state):
    return LaunchSpec(
        job_id=f"job-{uuid.uuid4().hex[:6]}", generation=1,
        entrypoint=(python, "-c", REPORT, str(token), str(state)),
        world_size=1, node_rank=0, num_nodes=1, rank_start=0, nproc=1,
        master_addr="127.0.0.1", master_port=1, spec_env={"USER_SETTING": "kept"},
    )


def _run(sup):
    sup.start()
    try:
        until(lambda: (sup.poll(), not sup.running)[1], 60, "the job process to exit")
    finally:
        sup.stop_blocking(1.0)
    assert sup.processes[0].exit_code == 0, log_path(sup.log_dir, sup.spec, 0).read_text()
    text = log_path(sup.log_dir, sup.spec, 0).read_text()
    line = next(x for x in text.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.fixture
def agent_files():
    """An agent's layout in a folder every user can traverse (like /etc and /var/lib): a token
    file 0640 and a state directory 0750, owned by the agent (root here)."""
    base = Path(tempfile.mkdtemp(prefix="spotwise-iso-"))
    os.chmod(base, 0o711)
    token = base / "agent.token"
    token.write_text("agent-token-secret\n")
    os.chmod(token, 0o640)
    state = base / "state"
    state.mkdir(mode=0o750)
    (state / "node.secret").write_text("node-secret")
    logs = base / "logs"
    logs.mkdir(mode=0o711)
    yield token, state, logs
    shutil.rmtree(base)


def test_secret_names_are_recognised():
    assert all(is_agent_secret(k) for k in SECRETS)
    for kept in ("PATH", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "SPOTWISE_LOCAL_NODE", "CUDA_VISIBLE_DEVICES"):
        assert not is_agent_secret(kept), kept


def test_a_jobs_process_finds_no_agent_credential_in_its_environment(agent_files):
    token, state, logs = agent_files
    base_env = {**os.environ, **SECRETS, "AWS_REGION": "us-east-1"}
    report = _run(Supervisor(_spec(sys.executable, token, state), log_dir=logs, base_env=base_env))
    env = report["env"]
    leaked = sorted(k for k in env if k in SECRETS or any(v in env[k] for v in SECRETS.values()))
    assert leaked == []
    assert env["USER_SETTING"] == "kept" and env["AWS_REGION"] == "us-east-1" and env["RANK"] == "0"


def test_storage_credentials_given_to_the_job_win_over_its_spec(agent_files):
    token, state, logs = agent_files
    spec = _spec(sys.executable, token, state)
    spec = LaunchSpec(**{**spec.__dict__, "spec_env": {"AWS_CONFIG_FILE": "/elsewhere"}})
    report = _run(Supervisor(spec, log_dir=logs, base_env={**os.environ, **SECRETS},
                             storage_env={"AWS_CONFIG_FILE": "/scoped/aws-config"}))
    assert report["env"]["AWS_CONFIG_FILE"] == "/scoped/aws-config"


@pytest.fixture
def throwaway_user():
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create a throwaway user")
    name = f"swjob{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, timeout=30)
        try:
            grp.getgrnam(name)
            subprocess.run(["groupdel", name], check=False, timeout=30)
        except KeyError:
            pass


def test_with_run_as_the_job_cannot_read_the_token_file_or_the_state(agent_files, throwaway_user):
    token, state, logs = agent_files
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
    user = resolve_run_as(throwaway_user)
    sup = Supervisor(_spec(python, token, state), log_dir=logs, base_env={**os.environ, **SECRETS}, run_as=user)
    report = _run(sup)
    assert report["uid"] == user.uid and set(report["groups"]) <= {user.gid}
    assert report["token"] == "PermissionError"
    assert report["state"] == "PermissionError"
    # Its own events file is the one agent-owned place it may write, and the agent reads it.
    assert report["events"] == "written"
    assert sup.processes[0].events_path.read_text() == "{}\n"
    assert report["caps"] == ["0000000000000000"] * 3
    # Sticky generation folder: what the agent keeps there cannot be swapped for a link.
    assert report["rename_agent_file"] == "PermissionError"
    assert sup.processes[0].events_path.parent.stat().st_mode & 0o7777 == 0o1770
    env = report["env"]
    assert env["HOME"] == user.home and env["USER"] == throwaway_user
    assert not [k for k in env if k in SECRETS]


def test_run_as_refuses_root_and_unknown_users():
    with pytest.raises(ValueError, match="is root"):
        resolve_run_as("root")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_run_as(f"nobody-{uuid.uuid4().hex[:6]}")


def test_job_environment_sets_the_users_home():
    user = JobUser(name="j", uid=1234, gid=1234, home="/home/j")
    env = job_environment({"HOME": "/var/lib/spotwise", "SPOTWISE_AGENT_TOKEN": "x", "PATH": "/bin"}, user=user)
    assert env == {"HOME": "/home/j", "USER": "j", "LOGNAME": "j", "XDG_CACHE_HOME": "/home/j/.cache", "PATH": "/bin"}


AMBIENT = (
    "import subprocess, sys\n"
    "from spotwise.worker.agent.job_isolation import drop_ambient_capabilities\n"
    "def child():\n"
    "    out = subprocess.run(['grep', 'CapAmb', '/proc/self/status'], capture_output=True, text=True, timeout=30)\n"
    "    return out.stdout.split()[1]\n"
    "before = child()\n"
    "drop_ambient_capabilities()\n"
    "print(before, child())\n"
)


def test_ambient_capabilities_of_the_agent_do_not_reach_what_it_starts():
    # The deployed agent holds CAP_SETUID, CAP_SETGID and CAP_KILL as ambient capabilities
    # (systemd's AmbientCapabilities=); here setpriv gives this process CAP_KILL the same way.
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs setpriv and root to hand out an ambient capability")
    out = subprocess.run([setpriv, "--inh-caps=+kill", "--ambient-caps=+kill", sys.executable, "-c", AMBIENT],
                         capture_output=True, text=True, timeout=60, check=True)
    before, after = out.stdout.split()
    assert int(before, 16) == 1 << 5  # CAP_KILL would have passed on
    assert int(after, 16) == 0


def test_the_agent_never_follows_a_link_or_blocks_on_a_fifo_the_job_left_as_its_events(tmp_path, caplog):
    from spotwise.worker.runtime.events import EventsTail

    secret = tmp_path / "node.secret"
    secret.write_text('{"kind": "secret", "value": "node-secret"}\n')
    link = tmp_path / "rank0.events.jsonl"
    link.symlink_to(secret)
    assert EventsTail(link).read() == []
    assert "node-secret" not in caplog.text
    fifo = tmp_path / "rank1.events.jsonl"
    os.mkfifo(fifo)
    assert EventsTail(fifo).read() == []  # returns at once instead of waiting for a writer


def test_credentials_are_never_written_through_a_planted_link(tmp_path):
    from datetime import UTC, datetime

    from spotwise.worker.agent.scoped_credentials import ScopedCredentials, write_credentials

    creds = ScopedCredentials(access_key_id="a", secret_access_key="b", session_token="c",
                              expiration=datetime(2030, 1, 1, tzinfo=UTC))
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "aws").symlink_to(state)
    with pytest.raises(OSError):
        write_credentials(tmp_path / "gen" / "aws", creds)
    assert list(state.iterdir()) == [] and state.stat().st_mode & 0o777 == 0o750


FIREWALL = Path(__file__).resolve().parents[2] / "deploy/terraform/modules/spotwise/templates/job-firewall.sh"

# Run in a network namespace of its own, after job-firewall.sh: listen where the metadata
# service and the container credentials endpoint live (and on an ordinary address, a peer's),
# then connect to each as the job user and as root.
REACH = (
    "import json, socket, subprocess, sys\n"
    "python, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "hosts = {'imds': '169.254.169.254', 'ecs': '169.254.170.2', 'peer': '10.200.0.1'}\n"
    "if len(sys.argv) > 4: hosts['imds6'] = 'fd00:ec2::254'\n"
    "listening = []\n"
    "for host in hosts.values():\n"
    "    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)\n"
    "    s.bind((host, 80)); s.listen(8); listening.append(s)\n"
    "probe = ('import socket, sys\\n'\n"
    "         'try:\\n'\n"
    "         '    socket.create_connection((sys.argv[1], 80), timeout=5).close(); print(\"reached\")\\n'\n"
    "         'except OSError as e:\\n'\n"
    "         '    print(type(e).__name__)\\n')\n"
    "def reach(host, **user):\n"
    "    return subprocess.run([python, '-c', probe, host], capture_output=True, text=True,\n"
    "                          timeout=30, **user).stdout.strip()\n"
    "job = {'user': uid, 'group': gid, 'extra_groups': []}\n"
    "out = {f'job {k}': reach(h, **job) for k, h in hosts.items()}\n"
    "out.update({f'root {k}': reach(h) for k, h in hosts.items()})\n"
    "print('REACH ' + json.dumps(out))\n"
)


def test_the_job_user_cannot_reach_the_metadata_service(throwaway_user):
    """deploy's job-firewall.sh, run as the agent unit runs it (twice: it is idempotent), in a
    network namespace of its own: the job user's connections to the instance metadata service
    (IPv4 and IPv6) and the container credentials endpoint are rejected; its peers and root
    still reach everything."""
    from spotwise.cloud.netlab import missing_tools

    missing = missing_tools() + [t for t in ("unshare",) if shutil.which(t) is None]
    if missing:
        pytest.fail(f"running as root but {', '.join(missing)} missing: run `make setup-lab`")
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")
    user = resolve_run_as(throwaway_user)
    ipv6 = os.path.exists("/proc/net/if_inet6")
    setup = ["ip link set lo up"] + [f"ip addr add {a}/32 dev lo" for a in ("169.254.169.254", "169.254.170.2", "10.200.0.1")]
    if ipv6:
        setup.append("ip -6 addr add fd00:ec2::254/128 dev lo nodad")
    script = " && ".join([
        "set -e", *setup, f"bash {FIREWALL} {user.name} >/dev/null", f"bash {FIREWALL} {user.name}",
        "echo RULES; iptables -S OUTPUT; ip6tables -S OUTPUT 2>/dev/null || true",
        f"{sys.executable} -c \"$REACH\" {python} {user.uid} {user.gid} {'v6' if ipv6 else ''}",
    ])
    res = subprocess.run(["unshare", "--net", "--", "bash", "-c", script], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "REACH": REACH})
    assert res.returncode == 0, res.stderr
    assert f"{user.name} cannot reach the instance metadata service" in res.stdout
    rules = [line for line in res.stdout.splitlines() if "--uid-owner" in line]
    wanted = {"169.254.169.254/32", "169.254.170.2/32"} | ({"fd00:ec2::254/128"} if ipv6 else set())
    assert sorted(r.split(" -d ")[1].split()[0] for r in rules) == sorted(wanted)  # once each
    reach = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("REACH "))[6:])
    refused = {k for k, v in reach.items() if v != "reached"}
    assert refused == {f"job {k}" for k in ("imds", "ecs", *(["imds6"] if ipv6 else []))}, reach
    assert {reach[k] for k in refused} == {"ConnectionRefusedError"}
