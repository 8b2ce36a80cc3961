"""S3 credentials for one job's processes, good for that job's checkpoint prefix and nothing else.

The instance role of an agent can reach every job's checkpoints (it writes their fence
markers); a job that used it could read another job's weights or plant a checkpoint in its
folder. So the agent assumes the fleet's job role (STS AssumeRole) with a session policy that
narrows it to `s3://<bucket>/<prefix>/<job_id>/` (the effective permissions are the
intersection of the role's policy and the session policy), and hands the job only those
temporary credentials, through a credential_process file that botocore re-reads before they
expire (the agent rewrites it, see `refresh_due`). The deployment keeps the job user away from
the instance metadata service, so these are the only AWS credentials a job can find.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spotwise.worker.runtime.storage import parse_uri

log = logging.getLogger(__name__)

# STS: role session names are 2-64 characters of [\w+=,.@-].
_SESSION_NAME_BAD = re.compile(r"[^\w+=,.@-]")
# botocore refreshes credential_process credentials 15 minutes before they expire (its
# advisory window); the agent rewrites the file well before that.
REFRESH_MARGIN = timedelta(minutes=20)


class ScopeError(ValueError):
    """The job's checkpoint location is not the job's own folder under the fleet's prefix."""


@dataclass(frozen=True, kw_only=True)
class S3Scope:
    """The one place a job's credentials reach."""

    bucket: str
    """The checkpoint bucket."""
    prefix: str
    """Key prefix of the job's own folder, without a trailing slash: <base prefix>/<job id>."""


def job_scope(checkpoint_uri: str, *, job_id: str, base_prefix: str) -> S3Scope:
    """The scope of job `job_id` whose checkpoints are at `checkpoint_uri`.

    `base_prefix` is the fleet's checkpoint prefix (s3://bucket/prefix). The job's URI must be
    its own folder under it, `<base_prefix>/<job_id>` (or a folder below that): a job whose URI
    names another job's folder gets no credentials. Raises ScopeError saying why.
    """
    if not job_id or _SESSION_NAME_BAD.search(job_id) or job_id in (".", ".."):
        raise ScopeError(f"job id {job_id!r} cannot name a checkpoint folder")
    loc, base = parse_uri(checkpoint_uri), parse_uri(base_prefix)
    if loc.scheme != "s3" or base.scheme != "s3":
        raise ScopeError(f"scoped credentials are for s3:// checkpoints, not {checkpoint_uri!r}")
    own = f"{base.root.rstrip('/')}/{job_id}"
    root = loc.root.rstrip("/")
    if ".." in root.split("/") or not (root == own or root.startswith(own + "/")):
        raise ScopeError(f"job {job_id}: checkpoint URI {checkpoint_uri!r} is not the job's own folder s3://{own}")
    bucket, _, prefix = own.partition("/")
    return S3Scope(bucket=bucket, prefix=prefix)


def session_policy(scope: S3Scope, *, partition: str = "aws") -> dict[str, Any]:
    """The session policy that narrows the job role to `scope` (the statements of the fleet's
    checkpoint policy, deploy/terraform iam.tf, with the job's folder for the fleet's prefix)."""
    bucket_arn = f"arn:{partition}:s3:::{scope.bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListOwnCheckpoints",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": bucket_arn,
                "Condition": {"StringLike": {"s3:prefix": [scope.prefix, f"{scope.prefix}/*"]}},
            },
            {"Sid": "LocateBucket", "Effect": "Allow", "Action": "s3:GetBucketLocation", "Resource": bucket_arn},
            {
                "Sid": "ReadWriteOwnCheckpoints",
                "Effect": "Allow",
                "Action": [
                    "s3:GetObject",
                    "s3:PutObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                "Resource": f"{bucket_arn}/{scope.prefix}/*",
            },
        ],
    }


@dataclass(frozen=True, kw_only=True)
class ScopedCredentials:
    """Temporary credentials of one job's session."""

    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime
    """When STS stops honouring them (timezone-aware)."""

    def process_output(self) -> str:
        """What an AWS credential_process prints (botocore's format, version 1)."""
        return json.dumps({
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        })


def session_name(job_id: str, generation: int) -> str:
    """The role session name (CloudTrail shows it): spotwise-<job>-g<generation>, STS-safe."""
    return _SESSION_NAME_BAD.sub("-", f"spotwise-{job_id}-g{generation}")[:64]


def assume_job_role(sts: Any, *, role_arn: str, scope: S3Scope, job_id: str, generation: int,
                    duration_s: int = 3600, partition: str = "aws") -> ScopedCredentials:
    """Credentials of `role_arn` narrowed to `scope`, from a boto3 STS client (whose own
    timeouts and bounded retries apply). botocore's ClientError propagates when STS refuses.
    An hour is the most STS grants a session assumed from an instance role (role chaining)."""
    resp = sts.assume_role(
        RoleArn=role_arn,
        RoleSessionName=session_name(job_id, generation),
        Policy=json.dumps(session_policy(scope, partition=partition), separators=(",", ":")),
        DurationSeconds=duration_s,
        Tags=[{"Key": "spotwise-job", "Value": job_id}],
    )
    c = resp["Credentials"]
    expiration = c["Expiration"]
    if expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=UTC)
    return ScopedCredentials(
        access_key_id=c["AccessKeyId"], secret_access_key=c["SecretAccessKey"],
        session_token=c["SessionToken"], expiration=expiration,
    )


def refresh_due(creds: ScopedCredentials, now: datetime) -> bool:
    """Whether the agent should assume the role again and rewrite the file (pure)."""
    return now >= creds.expiration - REFRESH_MARGIN


def write_credentials(folder: Path, creds: ScopedCredentials, *, gid: int | None = None) -> dict[str, str]:
    """Write (or atomically replace) the job's credential files in `folder` and return the
    environment that makes botocore use them and nothing else.

    The folder and files are readable by the agent and by group `gid` (the job user's), by no
    one else.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # The folder sits in the job's writable generation folder: touch it only through a handle
    # that is not a link the job planted, so a refresh never chowns or writes the agent's files.
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if os.fstat(dir_fd).st_uid != os.geteuid():
            raise OSError(f"{folder} is not the agent's own folder")
        if gid is not None:
            os.fchown(dir_fd, -1, gid)
        os.fchmod(dir_fd, 0o750)
        creds_path, config_path = folder / "aws-credentials.json", folder / "aws-config"
        _write_private(dir_fd, creds_path.name, creds.process_output(), gid)
        cat = shutil.which("cat") or "/bin/cat"
        # credential_process credentials with an Expiration are refreshed by botocore by
        # running the process again: it reads whatever the agent last wrote.
        _write_private(dir_fd, config_path.name, f"[default]\ncredential_process = {cat} {creds_path}\n", gid)
    finally:
        os.close(dir_fd)
    return {
        "AWS_CONFIG_FILE": str(config_path),
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_PROFILE": "default",
        # Belt and braces with the deployment's firewall rule: never fall back to the instance role.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _write_private(dir_fd: int, name: str, text: str, gid: int | None) -> None:
    """Replace `name` in the folder `dir_fd` atomically (a fresh temporary file, renamed)."""
    tmp = name + ".tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, 0o640)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def sts_client(region: str | None = None) -> Any:
    """A boto3 STS client with bounded timeouts and retries (the instance role's credentials)."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"})
    return boto3.client("sts", region_name=region, config=config)


@dataclass
class _Session:
    scope: S3Scope
    folder: Path
    gid: int | None
    creds: ScopedCredentials


class JobCredentialIssuer:
    """The agent's side: one scoped session per (job, generation) it runs, kept fresh.

    `issue` before starting a generation's processes (its env goes to Supervisor's
    `storage_env`), `refresh` from the agent's loop (cheap when nothing is due), `forget` when
    the generation is stopped. Not thread-safe; STS calls block (run them off the event loop).
    """

    def __init__(self, sts: Any, *, role_arn: str, base_prefix: str, duration_s: int = 3600,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.sts = sts
        self.role_arn = role_arn
        self.base_prefix = base_prefix
        self.duration_s = duration_s
        self.clock = clock
        self._sessions: dict[tuple[str, int], _Session] = {}

    def issue(self, *, job_id: str, generation: int, checkpoint_uri: str, folder: Path,
              gid: int | None = None) -> dict[str, str]:
        """Assume the job role for this job and write its files in `folder`; returns the
        processes' storage environment. ScopeError when the job's checkpoint URI is not its
        own folder (the job then must not start: it would have no storage), botocore's
        ClientError when STS refuses."""
        scope = job_scope(checkpoint_uri, job_id=job_id, base_prefix=self.base_prefix)
        creds = self._assume(scope, job_id, generation)
        env = write_credentials(folder, creds, gid=gid)
        self._sessions[(job_id, generation)] = _Session(scope, folder, gid, creds)
        return env

    def refresh(self) -> int:
        """Re-assume and rewrite every session that is due (see refresh_due); returns how many.
        A failed STS call leaves the old credentials in place until the next call."""
        from botocore.exceptions import BotoCoreError, ClientError

        now, renewed = self.clock(), 0
        for (job_id, generation), session in self._sessions.items():
            if not refresh_due(session.creds, now):
                continue
            try:
                session.creds = self._assume(session.scope, job_id, generation)
            except (BotoCoreError, ClientError) as exc:
                # The old ones stay valid until their expiration; the next call tries again.
                log.warning("job %s g%d: cannot renew storage credentials (expire %s): %s",
                            job_id, generation, session.creds.expiration.isoformat(), exc)
                continue
            write_credentials(session.folder, session.creds, gid=session.gid)
            renewed += 1
        return renewed

    def forget(self, job_id: str, generation: int) -> None:
        """Stop refreshing a stopped generation's credentials (they expire on their own)."""
        self._sessions.pop((job_id, generation), None)

    def _assume(self, scope: S3Scope, job_id: str, generation: int) -> ScopedCredentials:
        return assume_job_role(self.sts, role_arn=self.role_arn, scope=scope, job_id=job_id,
                               generation=generation, duration_s=self.duration_s)


def job_credential_issuer(config: Any) -> JobCredentialIssuer | None:
    """The issuer an agent config asks for (`job_role_arn` set), else None. The region is the
    zone's (us-east-1a -> us-east-1), else AWS_REGION."""
    if not config.job_role_arn:
        return None
    region = config.zone[:-1] if config.zone else None
    return JobCredentialIssuer(sts_client(region), role_arn=config.job_role_arn,
                               base_prefix=config.job_checkpoint_prefix)


REFRESH_S = 60.0
"""How often the agent checks the scoped storage credentials for renewal."""


async def storage_env_for(issuer: JobCredentialIssuer | None, spec: Any, *, folder: Path,
                          gid: int | None, timeout_s: float) -> dict[str, str] | None:
    """The storage environment of a generation's processes: scoped credentials for an s3://
    checkpoint when the agent has an issuer, else None (the agent's storage settings). Raises
    ValueError (ScopeError, or STS did not answer) when the job must not start."""
    if issuer is None or not spec.checkpoint_uri.startswith("s3://"):
        return None
    import asyncio

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return await asyncio.wait_for(asyncio.to_thread(
            issuer.issue, job_id=spec.job_id, generation=spec.generation,
            checkpoint_uri=spec.checkpoint_uri, folder=folder, gid=gid), timeout_s)
    except (BotoCoreError, ClientError, OSError, asyncio.TimeoutError) as e:
        raise ValueError(f"STS did not issue them: {e}") from e


async def refresh_loop(issuer: JobCredentialIssuer | None, *, stopped: Callable[[], bool],
                       sleep: Callable[[float], Any]) -> None:
    """Keep the running generations' credentials fresh until `stopped()`."""
    import asyncio

    while issuer is not None and not stopped():
        await asyncio.to_thread(issuer.refresh)
        await sleep(REFRESH_S)
