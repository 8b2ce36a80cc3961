"""Who may call the daemon: bearer tokens with roles, TLS credentials and listening rules.

Every call carries `authorization: Bearer <token>`. A token belongs to a principal with one
role: a `client` token may use JobService (submit, cancel, read), an `agent` token only
AgentService. Health checking and server reflection are open to anyone. No token or an unknown
one gets UNAUTHENTICATED; a known token calling outside its role gets PERMISSION_DENIED.

The daemon stores only SHA-256 hashes of tokens, one per line in a tokens file:

    # <hash>                                                                 <role>  <name>
    sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 client alice

Tokens are 256 random bits, so a fast hash is enough (a slow password hash would cost every
RPC and add nothing against guessing). Mint one with `mint_token` or from the shell:

    python -m spotwise.daemon.auth mint --role agent --name fleet --append /etc/spotwise/tokens

Server side: `TokenAuthInterceptor(TokenStore.load(path))` in `grpc.aio.server(interceptors=...)`
and `server_credentials(...)` for `add_secure_port`; servicers read `current_principal()`.
Client side: spotwise.common.credentials.channel_security (one builder for the client and the
agent, which refuses to send a token in plaintext beyond loopback).
Config checks: `check_listen` (beyond loopback, TLS and tokens unless explicitly allowed; `bind`
applies it and adds the port, with TLS when given) and `check_checkpoint_uri` (checkpoints
only under configured prefixes).
"""

from __future__ import annotations

import argparse
import contextvars
import enum
import hashlib
import logging
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio

from spotwise.common.address import is_loopback_host, split_host_port
from spotwise.common.credentials import METADATA_KEY
from spotwise.daemon.log_budget import LogBudget
from spotwise.proto.v1 import agent_pb2, jobs_pb2

log = logging.getLogger(__name__)

TOKEN_PREFIX = "swt_"
"""Minted tokens start with this, so secret scanners and people can recognise them."""

HASH_SCHEME = "sha256"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HASH_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


class Role(str, enum.Enum):
    """What a token may do."""

    CLIENT = "client"
    """Submits, cancels and reads jobs (JobService)."""
    AGENT = "agent"
    """A node agent (AgentService only); its token enrolls nodes, each then holds its own
    credential."""
    ADMIN = "admin"
    """An operator: JobService on every principal's jobs."""


@dataclass(frozen=True)
class Principal:
    """The holder of a token, as the tokens file names it."""

    name: str
    role: Role


# ---------------------------------------------------------------------------------------------
# Tokens


def hash_token(token: str) -> str:
    """The tokens-file form of a token's hash: "sha256:<64 hex digits>"."""
    return f"{HASH_SCHEME}:{hashlib.sha256(token.encode()).hexdigest()}"


@dataclass(frozen=True)
class MintedToken:
    """A new token and the line that stores its hash."""

    token: str
    """The secret: give it to the caller once; it is not stored anywhere."""
    line: str
    """What to append to the tokens file."""


def mint_token(role: Role | str, name: str) -> MintedToken:
    """Make a random token for `name` with `role`. ValueError for a bad role or name."""
    role = Role(role)
    if not _NAME_RE.match(name):
        raise ValueError(f"token name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return MintedToken(token=token, line=f"{hash_token(token)} {role.value} {name}")


def parse_tokens(lines: Iterable[str], source: str = "<tokens>") -> dict[str, Principal]:
    """Parse tokens-file lines into {hash: principal}.

    Blank lines and lines starting with '#' are skipped. Raises ValueError naming the line for
    a malformed line, an unknown role or a hash listed twice.
    """
    principals: dict[str, Principal] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{source}:{number}"
        if len(parts) != 3:
            raise ValueError(f"{where}: want '<sha256:hex> <role> <name>', got {len(parts)} fields")
        digest, role, name = parts
        if not _HASH_RE.match(digest):
            raise ValueError(f"{where}: hash must be sha256:<64 lower-case hex digits>")
        try:
            parsed_role = Role(role)
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise ValueError(f"{where}: unknown role {role!r} (known: {known})") from None
        if not _NAME_RE.match(name):
            raise ValueError(f"{where}: bad token name {name!r}")
        if digest in principals:
            raise ValueError(f"{where}: this hash is already listed")
        principals[digest] = Principal(name=name, role=parsed_role)
    return principals


class TokenStore:
    """The known token hashes. `reload()` re-reads the file (e.g. on SIGHUP)."""

    def __init__(self, principals: Mapping[str, Principal], path: Path | None = None) -> None:
        self._principals = dict(principals)
        self.path = path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenStore:
        """Read a tokens file. OSError if unreadable, ValueError if malformed."""
        path = Path(path)
        with path.open(encoding="utf-8") as f:
            return cls(parse_tokens(f, source=str(path)), path=path)

    def reload(self) -> None:
        """Re-read the file this store was loaded from; on error the old tokens stay."""
        if self.path is None:
            raise ValueError("this token store was not loaded from a file")
        self._principals = TokenStore.load(self.path)._principals

    def authenticate(self, token: str) -> Principal | None:
        """The principal for a token, or None when it is unknown."""
        return self._principals.get(hash_token(token))

    def __len__(self) -> int:
        return len(self._principals)


def token_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in call metadata; None when absent.

    Returns "" (never a valid token) when the header is malformed or repeated, so that such
    a call counts as a bad token rather than as no token.
    """
    values = [v for k, v in (metadata or ()) if k.lower() == METADATA_KEY]
    if not values:
        return None
    if len(values) > 1 or not isinstance(values[0], str):
        return ""
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return token.strip()


# ---------------------------------------------------------------------------------------------
# Access policy: a pure decision per call


def _service_name(module: object, name: str) -> str:
    return module.DESCRIPTOR.services_by_name[name].full_name  # type: ignore[attr-defined]


JOB_SERVICE = _service_name(jobs_pb2, "JobService")
AGENT_SERVICE = _service_name(agent_pb2, "AgentService")
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


@dataclass(frozen=True, kw_only=True)
class AccessPolicy:
    """Which services are open and which role may call which service."""

    open_services: frozenset[str] = OPEN_SERVICES
    """Callable without a token (health checking and reflection)."""
    role_services: Mapping[Role, frozenset[str]] = field(
        default_factory=lambda: {
            Role.CLIENT: frozenset({JOB_SERVICE}),
            Role.AGENT: frozenset({AGENT_SERVICE}),
            Role.ADMIN: frozenset({JOB_SERVICE}),
        }
    )
    """For each role, the services its tokens may call; everything else is denied."""


@dataclass(frozen=True)
class AccessDecision:
    """Whether one call may proceed, and why."""

    allowed: bool
    code: grpc.StatusCode
    """OK when allowed; UNAUTHENTICATED or PERMISSION_DENIED otherwise."""
    reason: str
    principal: Principal | None = None


def service_of(method: str) -> str:
    """ "spotwise.v1.JobService" for "/spotwise.v1.JobService/SubmitJob"."""
    return method.lstrip("/").partition("/")[0]


def decide_access(
    method: str, token: str | None, store: TokenStore, policy: AccessPolicy
) -> AccessDecision:
    """Decide whether a call to `method` ("/pkg.Service/Method") carrying `token` may proceed.

    Open services pass whatever the token; otherwise a missing or unknown token is
    UNAUTHENTICATED and a known one outside its role's services is PERMISSION_DENIED.
    """
    service = service_of(method)
    if service in policy.open_services:
        return AccessDecision(True, grpc.StatusCode.OK, f"{service} is open")
    if token is None:
        return AccessDecision(False, grpc.StatusCode.UNAUTHENTICATED, "no bearer token")
    principal = store.authenticate(token) if token else None
    if principal is None:
        return AccessDecision(False, grpc.StatusCode.UNAUTHENTICATED, "unknown or malformed token")
    if service in policy.role_services.get(principal.role, frozenset()):
        return AccessDecision(
            True, grpc.StatusCode.OK, f"{principal.role.value} may call {service}", principal
        )
    return AccessDecision(
        False,
        grpc.StatusCode.PERMISSION_DENIED,
        f"role {principal.role.value} may not call {service}",
        principal,
    )


# ---------------------------------------------------------------------------------------------
# Server interceptor

_current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "spotwise_principal", default=None
)


def current_principal() -> Principal | None:
    """The caller of the RPC being handled (None on open services or without auth).

    Valid inside async servicer methods: the interceptor runs in the same task as the handler.
    """
    return _current_principal.get()


def _denial_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that only aborts with `code`."""

    async def abort(_request: object, context: aio.ServicerContext) -> None:
        await context.abort(code, details)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(aio.ServerInterceptor):
    """Checks every call's bearer token against a TokenStore and an AccessPolicy.

    Denials are logged with the method and reason (never the token), at most
    `denial_log_lines` per minute (the rest are counted in one summary line: see LogBudget),
    and answered without reaching the servicer; unknown methods stay UNIMPLEMENTED.
    """

    def __init__(self, store: TokenStore, policy: AccessPolicy | None = None, *,
                 denial_log_lines: int = 20) -> None:
        self.store = store
        self.policy = policy or AccessPolicy()
        self.denials = LogBudget(log, what="denied calls", lines=denial_log_lines)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        token = token_from_metadata(handler_call_details.invocation_metadata)
        decision = decide_access(method, token, self.store, self.policy)
        if decision.allowed:
            _current_principal.set(decision.principal)
            return await continuation(handler_call_details)
        who = decision.principal.name if decision.principal else "-"
        self.denials.log(
            logging.WARNING,
            "denied %s: %s (%s, principal=%s)", method, decision.reason, decision.code.name, who,
        )
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _denial_handler(handler, decision.code, decision.reason)


# ---------------------------------------------------------------------------------------------
# Credentials


def _read(path: str | os.PathLike[str]) -> bytes:
    return Path(path).read_bytes()


def server_credentials(
    *,
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    client_ca_file: str | os.PathLike[str] | None = None,
    require_client_cert: bool = False,
) -> grpc.ServerCredentials:
    """TLS credentials for `server.add_secure_port`.

    With `require_client_cert` (mutual TLS), a client must present a certificate signed by
    `client_ca_file`, or the handshake fails. ValueError if mTLS is asked without a CA;
    OSError if a file cannot be read.
    """
    if require_client_cert and client_ca_file is None:
        raise ValueError("mutual TLS needs client_ca_file to verify client certificates")
    return grpc.ssl_server_credentials(
        [(_read(key_file), _read(cert_file))],
        root_certificates=_read(client_ca_file) if client_ca_file else None,
        require_client_auth=require_client_cert,
    )


# ---------------------------------------------------------------------------------------------
# Configuration rules


INSECURE_MARK = "INSECURE"
"""Starts the reason `check_listen` gives for a listen address it allows only because of the
insecure flag; whoever logs the reason logs it at WARNING."""


def check_listen(address: str, tls_enabled: bool, insecure_flag: bool, *, tokens_enabled: bool = False) -> str:
    """Refuse to serve beyond loopback without both TLS and tokens; returns the reason the
    address is allowed.

    Loopback addresses and unix sockets are always allowed; any other address (including
    0.0.0.0 and [::]) needs TLS and a token check: without TLS tokens travel in clear, and
    without tokens anyone who reaches the port may submit a job, which is running code on every
    node. `insecure_flag` is the explicit opt-out; the reason then starts with INSECURE_MARK
    and names what is missing. Raises ValueError with the fix when refused.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return f"{address} is a local socket"
    host, _ = split_host_port(address)
    if is_loopback_host(host):
        return f"{address} is loopback"
    missing = [what for what, on in (("TLS", tls_enabled), ("tokens", tokens_enabled)) if not on]
    if not missing:
        return f"{address} is beyond loopback, with TLS and tokens"
    lacking = " and ".join(missing)
    if insecure_flag:
        return (
            f"{INSECURE_MARK}: {address} is beyond loopback WITHOUT {lacking} (allow_insecure is set): "
            + ("tokens travel in clear; " if not tls_enabled else "")
            + ("anyone who reaches the port may submit a job and run code on every node" if not tokens_enabled
               else "anyone on the path can read and replay them")
        )
    fixes = []
    if not tls_enabled:
        fixes.append("a TLS certificate and key")
    if not tokens_enabled:
        fixes.append("a tokens file")
    raise ValueError(
        f"refusing to listen on {address} without {lacking}: it is reachable beyond this machine. "
        f"Configure {' and '.join(fixes)}, listen on 127.0.0.1, or set allow_insecure "
        "if you really mean it"
    )


# ---------------------------------------------------------------------------------------------
# Binding the server


@dataclass(frozen=True, kw_only=True)
class ServerTls:
    """The daemon's TLS files."""

    cert_file: Path
    """PEM certificate chain of the daemon (its SANs must name the addresses clients dial)."""
    key_file: Path
    """PEM private key of that certificate."""
    client_ca_file: Path | None = None
    """CA that signs client certificates; needed for mutual TLS."""
    require_client_cert: bool = False
    """Mutual TLS: refuse callers without a certificate signed by client_ca_file."""


def bind(
    server: aio.Server, address: str, *, tls: ServerTls | None, allow_insecure: bool = False,
    tokens_enabled: bool = False,
) -> int:
    """Add a listening port to `server` under the listening rules; returns the bound port.

    Raises ValueError (before binding anything) when `check_listen` refuses the address, OSError
    when a TLS file cannot be read, RuntimeError when the address cannot be bound.
    """
    reason = check_listen(address, tls_enabled=tls is not None, insecure_flag=allow_insecure,
                          tokens_enabled=tokens_enabled)
    if tls is None:
        port = server.add_insecure_port(address)
    else:
        creds = server_credentials(
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            client_ca_file=tls.client_ca_file,
            require_client_cert=tls.require_client_cert,
        )
        port = server.add_secure_port(address, creds)
    if not port:
        raise RuntimeError(f"could not bind {address}")
    level = logging.WARNING if reason.startswith(INSECURE_MARK) else logging.INFO
    mtls = " (mutual TLS)" if tls is not None and tls.require_client_cert else ""
    log.log(level, "listening on port %d: %s%s", port, reason, mtls)
    return port


# ---------------------------------------------------------------------------------------------
# Command line: python -m spotwise.daemon.auth mint --role client --name alice


def main(argv: Sequence[str] | None = None) -> int:
    """Mint a token: print it once, and print (or append) the line for the tokens file."""
    parser = argparse.ArgumentParser(prog="python -m spotwise.daemon.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    mint = sub.add_parser("mint", help="make a new token")
    mint.add_argument("--role", required=True, choices=[r.value for r in Role])
    mint.add_argument("--name", required=True, help="who holds it (shown in logs)")
    mint.add_argument(
        "--append", metavar="TOKENS_FILE", help="append the hash line to this file (mode 0600)"
    )
    args = parser.parse_args(argv)
    try:
        minted = mint_token(args.role, args.name)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.append:
        fd = os.open(args.append, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(minted.line + "\n")
        print(f"appended the hash to {args.append}", file=sys.stderr)
    else:
        print(f"# add to the tokens file:\n{minted.line}", file=sys.stderr)
    print(minted.token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
