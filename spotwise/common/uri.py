"""Checkpoint URIs: the one parser every part uses (job spec, daemon, agent, runtime).

    check_uri("s3://bucket/prefix")          # the spec's check: ValueError saying what is wrong
    loc = parse_uri("/data/ckpt")             # StorageURI(scheme="file", root="/data/ckpt")
    job_uri(spec_uri, "job-1")                # the job's own location: <uri>/job-1
    check_checkpoint_uri(uri, prefixes)       # the daemon's rule: only under configured prefixes

Pure string work: no fsspec, no network (the runtime's storage.py does the I/O).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

# S3 bucket naming rules (general purpose buckets): 3-63 of [a-z0-9.-], alphanumeric at both ends.
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME_TYPO = re.compile(r"^(s3|s3a|file|gs|gcs|hdfs|https?|az|abfs):", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_uri(uri: str) -> str:
    """Return `uri` if it names a place checkpoints can go, else raise ValueError saying why.

    Accepted: a local path ("runs/ckpt", "/data/ckpt"), "file:///absolute/path" and
    "s3://bucket" or "s3://bucket/prefix". The job spec, the daemon and the runtime all check
    URIs here, so a job is never refused only at its first checkpoint.
    """
    if not uri or not uri.strip():
        raise ValueError("must not be empty")
    if uri != uri.strip():
        raise ValueError("must not start or end with whitespace")
    if _CONTROL.search(uri):
        raise ValueError("must not contain control characters")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("", "file", "s3"):
        if "://" not in uri and _SCHEME_TYPO.match(uri):
            raise ValueError(f"malformed URI {uri!r}: a scheme needs '://' (e.g. s3://bucket/prefix)")
        raise ValueError(
            f"unsupported URI scheme {parts.scheme!r} in {uri!r}: use a local path, "
            "file:///path or s3://bucket/prefix"
        )
    if "://" not in uri and scheme == "s3":
        raise ValueError(f"malformed URI {uri!r}: a scheme needs '://' (e.g. s3://bucket/prefix)")
    if parts.query or parts.fragment or "?" in uri or "#" in uri:
        raise ValueError(f"malformed URI {uri!r}: '?' and '#' are not allowed")
    if scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not bucket:
            raise ValueError(f"malformed URI {uri!r}: no bucket (expected s3://bucket/prefix)")
        if not _S3_BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(
                f"malformed URI {uri!r}: {bucket!r} is not a valid S3 bucket name "
                "(3-63 lowercase letters, digits, '.' or '-')"
            )
        if "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
            raise ValueError(f"malformed URI {uri!r}: the prefix has an empty or relative segment")
        return uri
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"malformed URI {uri!r}: file:// takes no host; write file:///absolute/path "
                "or a plain path"
            )
        if not parts.path:
            raise ValueError(f"malformed URI {uri!r}: no path")
    return uri


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
    """Check a checkpoint URI (`check_uri`); raises ValueError saying what is wrong with it."""
    try:
        check_uri(uri)
    except ValueError as exc:
        raise ValueError(f"checkpoint URI {uri!r}: {exc}") from None
    parts = urlsplit(uri)
    if parts.scheme.lower() == "s3":
        prefix = parts.path.strip("/")
        root = f"{parts.netloc}/{prefix}" if prefix else parts.netloc
        return StorageURI(uri=uri, scheme="s3", root=root)
    path = parts.path if parts.scheme.lower() == "file" else uri
    return StorageURI(uri=uri, scheme="file", root=os.path.abspath(os.path.expanduser(path)))


def job_uri(uri: str, job_id: str) -> str:
    """A job's own location under the spec's checkpoint URI: ``<uri>/<job_id>``.

    Generations, steps and fence markers count per job; two jobs (or the same spec submitted
    twice) sharing one location would fence or overwrite each other.
    """
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ValueError(f"job id {job_id!r} cannot name a checkpoint directory")
    return f"{uri.rstrip('/')}/{job_id}"


def _normalize_location(uri: str) -> tuple[str, str]:
    """(scheme, location) with "." and empty segments dropped; ValueError on "..".

    A bare path is scheme "file"; "file://localhost/x" and "file:///x" are both "/x".
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "file", uri
    scheme = scheme.lower()
    if scheme == "file" and sep:
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise ValueError(f"file URI {uri!r} names a remote host")
        rest = slash + path
    segments = rest.split("/")
    if ".." in segments:
        raise ValueError(f"checkpoint URI {uri!r} must not contain '..'")
    kept = [s for s in segments if s not in ("", ".")]
    absolute = scheme == "file" and rest.startswith("/")
    return scheme, ("/" if absolute else "") + "/".join(kept)


def check_checkpoint_uri(uri: str, allowed_prefixes: Sequence[str]) -> None:
    """Refuse a checkpoint URI outside every allowed prefix (ValueError naming them).

    An empty `allowed_prefixes` allows any URI. Prefixes match whole path segments:
    "s3://b/ckpt" allows "s3://b/ckpt/job1" but not "s3://b/ckpt-other". Relative local paths
    are refused when prefixes are configured, since what they point at depends on the node's
    working directory.
    """
    if not allowed_prefixes:
        return
    if not uri.strip():
        raise ValueError("checkpoint URI is empty")
    scheme, location = _normalize_location(uri.strip())
    if scheme == "file" and not location.startswith("/"):
        raise ValueError(f"checkpoint path {uri!r} must be absolute")
    for prefix in allowed_prefixes:
        p_scheme, p_location = _normalize_location(prefix.strip())
        if p_scheme != scheme:
            continue
        if location == p_location or location.startswith(p_location.rstrip("/") + "/"):
            return
    allowed = ", ".join(allowed_prefixes)
    raise ValueError(f"checkpoint URI {uri!r} is outside the allowed prefixes ({allowed})")
