"""Checkpoint storage: a checked fsspec URI and the few operations checkpoints need.

Any fsspec URI works in principle; spotwise accepts a local path, ``file://`` and ``s3://``, the
ones it is tested on. S3 endpoints and credentials come from the standard AWS settings
(``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, an instance profile, ...), as boto3 reads them.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

from spotwise.common.uri import StorageURI, job_uri, parse_uri

__all__ = ["AlreadyExists", "StorageError", "StorageURI", "check_reachable", "filesystem",
           "job_uri", "parse_uri", "storage_options", "write_create_only"]

# Bounded network calls: a storage call never waits forever (DESIGN: every storage call has a
# timeout). botocore retries with its own bounded backoff.
S3_CONFIG = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 5, "mode": "standard"},
}


class StorageError(RuntimeError):
    """A storage call failed (missing bucket, no permission, unreachable endpoint)."""


class AlreadyExists(StorageError):
    """A create-only write found the object already there."""


def filesystem(loc: StorageURI) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a location, with bounded timeouts."""
    if loc.scheme == "s3":
        return fsspec.filesystem("s3", config_kwargs=S3_CONFIG, skip_instance_cache=True)
    return fsspec.filesystem("file")


def storage_options(loc: StorageURI) -> dict[str, Any]:
    """Keyword arguments for DCP's fsspec reader and writer (passed on to fsspec)."""
    return {"config_kwargs": S3_CONFIG} if loc.scheme == "s3" else {}


def check_reachable(fs: fsspec.AbstractFileSystem, loc: StorageURI) -> None:
    """Fail early, with a clear message, when the bucket is missing or cannot be reached."""
    if loc.scheme != "s3":
        return
    bucket = loc.bucket
    try:
        exists = fs.exists(bucket)
    except Exception as exc:  # s3fs raises many kinds (PermissionError, ClientError, OSError)
        raise StorageError(f"cannot reach S3 bucket {bucket!r} for {loc.uri}: {exc}") from exc
    if not exists:
        raise StorageError(f"S3 bucket {bucket!r} does not exist (checkpoint URI {loc.uri})")


def write_create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write an object that must not exist yet; raises AlreadyExists if it does.

    S3 uses a conditional PUT (If-None-Match: *), so two writers racing for the same key cannot
    both succeed, and the object appears whole. Local files are written aside, then hard-linked
    into place (link fails if the name exists): a reader never sees a partial file under the
    name, which the fencing rule relies on (a listed manifest is a complete one).
    """
    if _is_local(fs):
        _write_local_create_only(path, data)
        return
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError as exc:
        raise AlreadyExists(f"{path} already exists") from exc
    except OSError as exc:
        # s3fs reports a failed precondition as an OSError carrying the 412 status.
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            raise AlreadyExists(f"{path} already exists") from exc
        raise


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "file" in (protocol if isinstance(protocol, tuple | list) else (protocol,))


def _write_local_create_only(path: str, data: bytes) -> None:
    if os.path.exists(path):  # cheap early answer; os.link below is the real test
        raise AlreadyExists(f"{path} already exists")
    tmp = f"{path}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise AlreadyExists(f"{path} already exists") from exc
    finally:
        os.unlink(tmp)
