"""What a job's processes cannot take from the agent: its credentials, its user, its files.

Submitting a job is running code on the fleet, by design; the agent that runs it holds the
fleet's credentials (its token, its node secret, the instance's AWS role) and must not hand them
over. Three things keep them apart:

- `job_environment`: the child environment without the agent's own secrets (its token and
  anything configured as SPOTWISE_AGENT_*, AWS credentials and where to find them, systemd's
  credential and notify sockets);
- `JobUser`: with `run_as` configured the processes run as a separate unprivileged user, with
  no supplementary group of the agent, so the agent's token files (0640 root:<agent group>)
  and state directory (0750) are closed to them;
- `prepare_generation_dir`: the generation's log folder is the only agent-owned place the job
  can write (its events file), group-owned by the job user's group;
- `drop_ambient_capabilities`: what the agent holds to switch users is never inherited.

Storage credentials scoped to the job's own checkpoint prefix come from
`spotwise.worker.agent.scoped_credentials`; the deployment keeps the job user from the instance
metadata service (cloud-init's iptables owner rule), so the instance role stays the agent's.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Names a training process must never see: the agent's and the CLI's tokens, AWS credentials and
# the files and endpoints they come from, systemd's credentials directory and notify socket.
SECRET_NAMES = frozenset({
    "SPOTWISE_TOKEN",
    "SPOTWISE_TOKEN_FILE",
    "SPOTWISE_KEY_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
})
# Every setting of the agent and of the daemon (SPOTWISE_AGENT_TOKEN, SPOTWISE_AGENT_TOKEN_FILE,
# SPOTWISE_DAEMON_TOKENS_FILE, ...): a job needs none of them.
SECRET_PREFIXES = ("SPOTWISE_AGENT_", "SPOTWISE_DAEMON_")


def is_agent_secret(name: str) -> bool:
    """Whether a variable of the agent's environment is kept from its training processes."""
    return name in SECRET_NAMES or name.startswith(SECRET_PREFIXES)


def job_environment(agent_env: Mapping[str, str], *, user: JobUser | None = None) -> dict[str, str]:
    """The base environment of a training process: `agent_env` without the agent's secrets,
    and with `user`'s HOME, USER and LOGNAME (and a cache folder of its own) when it runs as
    one. AWS_REGION and AWS_ENDPOINT_URL* stay: they say where, not who."""
    env = {k: v for k, v in agent_env.items() if not is_agent_secret(k)}
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, XDG_CACHE_HOME=f"{user.home}/.cache")
    return env


@dataclass(frozen=True, kw_only=True)
class JobUser:
    """The unprivileged user training processes run as (AgentConfig.run_as)."""

    name: str
    """Login name."""
    uid: int
    """Its uid (never 0)."""
    gid: int
    """Its primary group; the generation's log folder is group-owned by it."""
    home: str
    """Its home directory (HOME of the processes)."""

    def popen_kwargs(self) -> dict[str, object]:
        """Popen's user, group and extra_groups: the user, its own group, and no other group,
        so nothing of the agent's groups (which can read the token file) carries over."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def resolve_run_as(name: str) -> JobUser:
    """Look `name` up in the user database. ValueError when it does not exist or is root, or
    when it is the user the agent itself runs as (that would isolate nothing)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"run_as user {name!r} does not exist on this node (create it, e.g. useradd --system)") from None
    if pw.pw_uid == 0:
        raise ValueError(f"run_as user {name!r} is root; training processes must run unprivileged")
    if pw.pw_uid == os.geteuid():
        raise ValueError(f"run_as user {name!r} is the agent's own user; name a separate one")
    agent_groups = {os.getegid(), *os.getgroups()} - {0}
    member_of = {g.gr_gid for g in grp.getgrall() if name in g.gr_mem} | {pw.pw_gid}
    shared = sorted(grp.getgrgid(g).gr_name for g in member_of & agent_groups if g != pw.pw_gid)
    if shared:
        # A group the agent's files may be readable by; Popen drops it, but say so.
        log.warning("run_as user %s is also in the agent's group(s) %s; its processes run without them", name, ",".join(shared))
    return JobUser(name=name, uid=pw.pw_uid, gid=pw.pw_gid, home=pw.pw_dir)


def prepare_generation_dir(gen_dir: Path, user: JobUser | None) -> None:
    """Make the generation's log folder writable by the job (its events files) and nothing
    above it: group `user`'s group, mode 1770. Sticky, so the job cannot rename or replace
    what the agent keeps there (its rank logs, its credentials folder) with a link to the
    agent's own files. The agent reads what the job writes as a member of that group (the
    deployment adds it); no setgid bit, which the unit's RestrictSUIDSGID= refuses. Without a
    user the folder stays the agent's. OSError when the agent may not chown (it must be root,
    a member of the group, or hold CAP_CHOWN)."""
    gen_dir.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    # The folders above (log_dir/<job>) only need to be traversable by the job user.
    for parent in (gen_dir.parent, gen_dir.parent.parent):
        mode = parent.stat().st_mode & 0o777
        if mode & 0o001 == 0:
            os.chmod(parent, mode | 0o711)
    os.chown(gen_dir, -1, user.gid)
    os.chmod(gen_dir, 0o1770)


_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


def drop_ambient_capabilities() -> None:
    """Clear this process's ambient capability set (Linux), keeping its permitted and effective
    ones.

    A non-root agent that may switch users (CAP_SETUID, CAP_SETGID, CAP_KILL from systemd's
    AmbientCapabilities=) would otherwise pass those capabilities on to every program it
    starts: ambient capabilities survive execve and a switch between two non-root uids. After
    this, what the agent starts holds no capability at all. Idempotent; a no-op elsewhere.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        # EINVAL: a kernel before 4.3, which has no ambient capabilities to pass on.
        if err != 22:
            raise OSError(err, f"cannot clear ambient capabilities: {os.strerror(err)}")
