"""How the client and the node agent reach the daemon: TLS and the bearer token, built once.

`channel_security` is the one place that turns an address, a token and TLS files into channel
credentials and call metadata, for both the client (`spotwise.Client`, the CLI) and the agent.
It refuses, before anything is sent, to put a token on a plaintext channel to anything but
loopback: anyone on the path could read it and, with a client token, run code on the fleet.

The address rules come from `spotwise.common.address`, as the daemon's listening rule
(spotwise.daemon.auth.check_listen) does, so that both agree on what loopback is.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from spotwise.common.address import is_loopback_host, split_host_port

METADATA_KEY = "authorization"
"""The metadata key that carries `Bearer <token>` (gRPC metadata keys are lower case)."""


class CredentialsError(ValueError):
    """The TLS files or the token cannot be used as given (one line saying what to fix)."""


def is_local_address(address: str) -> bool:
    """Whether a dial target stays on this machine: a unix socket or a loopback host:port.
    A malformed address counts as not local (gRPC will refuse it anyway)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    try:
        host, _ = split_host_port(address)
    except ValueError:
        return False
    return is_loopback_host(host)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`."""
    return ((METADATA_KEY, f"Bearer {token}"),)


@dataclass(frozen=True)
class ChannelSecurity:
    """What a channel to the daemon needs: TLS credentials (None: plaintext, loopback only
    when a token is sent) and the metadata every call must carry."""

    address: str
    """host:port of the daemon."""
    credentials: grpc.ChannelCredentials | None
    """TLS credentials; None for a plaintext channel."""
    metadata: tuple[tuple[str, str], ...]
    """The bearer token's metadata (empty without a token); pass it on every call."""
    ssl_context: ssl.SSLContext | None = None
    """The same TLS for a connection that is not gRPC's (the beat channel); None: plaintext."""

    @property
    def token(self) -> str:
        """The bearer token ("" without one)."""
        for key, value in self.metadata:
            if key == METADATA_KEY and value.startswith("Bearer "):
                return value[len("Bearer "):]
        return ""

    @property
    def tls(self) -> bool:
        return self.credentials is not None

    def channel(self, options: list[tuple[str, object]] | None = None) -> grpc.Channel:
        """A synchronous channel (the client's)."""
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self.credentials, options=options)

    def aio_channel(self, options: list[tuple[str, object]] | None = None) -> aio.Channel:
        """An asyncio channel (the agent's)."""
        if self.credentials is None:
            return aio.insecure_channel(self.address, options=options)
        return aio.secure_channel(self.address, self.credentials, options=options)


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def channel_security(
    address: str,
    *,
    token: str | None,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
    names: tuple[str, str, str] = ("the CA file", "the certificate file", "the key file"),
) -> ChannelSecurity:
    """TLS and token for a channel to `address`.

    `ca_file` switches to TLS and verifies the daemon against it; `cert_file` and `key_file`
    (both or neither, and only with TLS) add a client certificate for mutual TLS. `names` are
    how the caller's settings call the three files, for the error messages. Raises
    CredentialsError when a file cannot be read, the pair is incomplete, or a token would go
    in plaintext beyond loopback.
    """
    ca_name, cert_name, key_name = names
    if bool(cert_file) != bool(key_file):
        raise CredentialsError(f"a client certificate needs both {cert_name} and {key_name}")
    if not ca_file and cert_file:
        raise CredentialsError(f"a client certificate needs TLS: set {ca_name} too")
    if token and not ca_file and not is_local_address(address):
        raise CredentialsError(
            f"refusing to send a token in plaintext to {address}: set {ca_name} to use TLS, "
            "or dial the daemon on a loopback address"
        )
    credentials = context = None
    if ca_file:
        ca = _read(ca_file, ca_name)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=_read(key_file, key_name) if key_file else None,
            certificate_chain=_read(cert_file, cert_name) if cert_file else None,
        )
        try:
            context = ssl.create_default_context(cadata=ca.decode(errors="replace"))
        except ssl.SSLError as exc:
            raise CredentialsError(f"{ca_name} {ca_file} holds no usable CA: {exc}") from None
        if cert_file and key_file:
            try:
                context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
            except (OSError, ssl.SSLError) as exc:
                raise CredentialsError(f"cannot load {cert_name} {cert_file} with {key_name} "
                                       f"{key_file}: {exc}") from None
    return ChannelSecurity(address=address, credentials=credentials,
                           metadata=bearer_metadata(token) if token else (), ssl_context=context)
