"""Checkpoint storage: a checked fsspec URI and the few operations checkpoints need.

Any fsspec URI works in principle; spotwise accepts a local path, ``file://`` and ``s3://``, the
ones it is tested on. S3 endpoints and credentials come from the standard AWS settings
(``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``, an instance profile, ...), as boto3 reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fsspec

SCHEMES = ("", "file", "s3")
# S3's bucket naming rules (the common subset: lowercase, digits, dots and hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
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


@dataclass(frozen=True)
class StorageURI:
    """A validated checkpoint location."""

    uri: str
    """The URI as the user gave it."""
    scheme: str
    """"file" or "s3"."""
    root: str
    """The location in the filesystem's own terms: an absolute path, or bucket/prefix."""

    @property
    def bucket(self) -> str | None:
        return self.root.split("/", 1)[0] if self.scheme == "s3" else None

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url(self, path: str) -> str:
        """The full URI of a path inside this filesystem (what DCP's fsspec writer takes)."""
        return f"s3://{path}" if self.scheme == "s3" else path


def parse_uri(uri: str) -> StorageURI:
    """Check a checkpoint URI; raises ValueError saying what is wrong with it."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("checkpoint URI is empty; give a local path, file:///path or s3://bucket/prefix")
    if uri != uri.strip() or any(c in uri for c in "\n\r\t\0"):
        raise ValueError(f"checkpoint URI {uri!r} contains whitespace or control characters")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    # A Windows-style "C:\..." would parse as scheme "c"; it is not a supported URI either.
    if scheme not in SCHEMES:
        raise ValueError(
            f"checkpoint URI {uri!r} has unsupported scheme {parts.scheme!r}; "
            "use a local path, file:///path or s3://bucket/prefix"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"checkpoint URI {uri!r} must not have a query or fragment")
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise ValueError(f"checkpoint URI {uri!r} names no bucket; expected s3://bucket/prefix")
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(f"checkpoint URI {uri!r}: {bucket!r} is not a valid S3 bucket name")
        prefix = parts.path.strip("/")
        if "//" in prefix:
            raise ValueError(f"checkpoint URI {uri!r} has an empty path segment")
        return StorageURI(uri=uri, scheme="s3", root=f"{bucket}/{prefix}" if prefix else bucket)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"checkpoint URI {uri!r}: file:// URIs take no host (file:///abs/path)")
        path = parts.path
    else:
        path = uri
    if not path:
        raise ValueError(f"checkpoint URI {uri!r} has no path")
    return StorageURI(uri=uri, scheme="file", root=os.path.abspath(os.path.expanduser(path)))


def job_uri(uri: str, job_id: str) -> str:
    """A job's own location under the spec's checkpoint URI: ``<uri>/<job_id>``.

    Generations, steps and fence markers count per job; two jobs (or the same spec submitted
    twice) sharing one location would fence or overwrite each other.
    """
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ValueError(f"job id {job_id!r} cannot name a checkpoint directory")
    return f"{uri.rstrip('/')}/{job_id}"


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
