"""Token roles and TLS on a real grpc.aio server (port 0) with the real spotwise services.

The servicers here answer every method with an empty response and record the principal the
interceptor handed them: what is under test is who gets through, not what the daemon does.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from spotwise.common.credentials import (
    ChannelSecurity,
    CredentialsError,
    bearer_metadata,
    channel_security,
)
from spotwise.daemon.auth import (
    AGENT_SERVICE,
    JOB_SERVICE,
    Principal,
    Role,
    ServerTls,
    TokenAuthInterceptor,
    TokenStore,
    bind,
    current_principal,
    mint_token,
    parse_tokens,
    server_credentials,
)
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc

TIMEOUT_S = 10.0


# --- servicers that answer everything and remember who called ---------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Principal | None]] = []

    def record(self, method: str) -> None:
        self.calls.append((method, current_principal()))


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder

    async def SubmitJob(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("SubmitJob")
        return jobs_pb2.SubmitJobResponse(job_id="j1")

    async def GetJob(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("GetJob")
        return jobs_pb2.Job()

    async def ListJobs(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("ListJobs")
        return jobs_pb2.ListJobsResponse()

    async def CancelJob(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("CancelJob")
        return jobs_pb2.Job()

    async def WatchJob(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("WatchJob")
        yield jobs_pb2.JobEvent(kind="state")

    async def GetCost(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("GetCost")
        return jobs_pb2.CostReport()


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, recorder: Recorder) -> None:
        self.r = recorder

    async def Register(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("Register")
        return agent_pb2.RegisterResponse(node_id="n1")

    async def Heartbeat(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("Heartbeat")
        return agent_pb2.HeartbeatResponse()

    async def ReportEvent(self, request, context):  # noqa: ANN001, ANN201, N802
        self.r.record("ReportEvent")
        return agent_pb2.ReportEventResponse(accepted=True)

    async def Heartbeats(self, request_iterator, context):  # noqa: ANN001, ANN201, N802
        self.r.record("Heartbeats")
        async for _ in request_iterator:
            yield agent_pb2.HeartbeatResponse()


# --- every method of every service, called generically ----------------------------------------


@dataclass(frozen=True)
class Method:
    path: str
    request: object
    response_type: type
    kind: str  # "unary", "server_stream", "bidi"


def spotwise_methods() -> list[Method]:
    methods = []
    for module, service in ((jobs_pb2, "JobService"), (agent_pb2, "AgentService")):
        desc = module.DESCRIPTOR.services_by_name[service]
        for m in desc.methods:
            request_cls = getattr(module, m.input_type.name, None) or getattr(
                jobs_pb2, m.input_type.name
            )
            response_cls = getattr(module, m.output_type.name, None) or getattr(
                jobs_pb2, m.output_type.name
            )
            kind = ("bidi" if m.client_streaming else
                    "server_stream" if m.server_streaming else "unary")
            methods.append(Method(f"/{desc.full_name}/{m.name}", request_cls(), response_cls, kind))
    return methods


OPEN_METHODS = [
    Method(
        "/grpc.health.v1.Health/Check",
        health_pb2.HealthCheckRequest(),
        health_pb2.HealthCheckResponse,
        "unary",
    ),
    Method(
        "/grpc.health.v1.Health/Watch",
        health_pb2.HealthCheckRequest(),
        health_pb2.HealthCheckResponse,
        "server_stream",
    ),
    Method(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionResponse,
        "bidi",
    ),
]


async def call(channel: aio.Channel, method: Method, metadata: tuple = ()) -> grpc.StatusCode:
    """Call once; the status code (reading only the first message of a stream)."""
    ser = type(method.request).SerializeToString
    de = method.response_type.FromString
    try:
        if method.kind == "unary":
            rpc = channel.unary_unary(method.path, ser, de)
            await rpc(method.request, metadata=metadata, timeout=TIMEOUT_S)
        elif method.kind == "server_stream":
            stream = channel.unary_stream(method.path, ser, de)(
                method.request, metadata=metadata, timeout=TIMEOUT_S
            )
            await stream.read()
            stream.cancel()
        else:
            for attempt in range(1, 4):
                stream = channel.stream_stream(method.path, ser, de)(
                    metadata=metadata, timeout=TIMEOUT_S
                )
                try:
                    await stream.write(method.request)
                    break
                except aio.AioRpcError as e:
                    # The server ended the call (a denial) while this write was in flight:
                    # grpc's client then reports its own INTERNAL ("Internal error from Core")
                    # instead of the server's status. Call again to read the server's.
                    if e.code() is not grpc.StatusCode.INTERNAL or attempt == 3:
                        raise
            await stream.read()
            stream.cancel()
    except aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# --- server ----------------------------------------------------------------------------------


@dataclass
class Tokens:
    client: str
    agent: str
    store: TokenStore


@pytest.fixture
def tokens() -> Tokens:
    client = mint_token(Role.CLIENT, "alice")
    agent = mint_token(Role.AGENT, "fleet")
    store = TokenStore(parse_tokens([client.line, agent.line]))
    return Tokens(client=client.token, agent=agent.token, store=store)


async def start_server(
    store: TokenStore, recorder: Recorder, creds: grpc.ServerCredentials | None = None
) -> tuple[aio.Server, int]:
    server = aio.server(interceptors=[TokenAuthInterceptor(store)])
    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(recorder), server)
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(recorder), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(
        (JOB_SERVICE, AGENT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", creds)
    assert port > 0
    await server.start()
    return server, port


def expected(method: Method, caller: str) -> grpc.StatusCode:
    if method in OPEN_METHODS:
        return grpc.StatusCode.OK
    if caller in ("none", "bad", "malformed"):
        return grpc.StatusCode.UNAUTHENTICATED
    service = method.path.split("/")[1]
    allowed = {"client": JOB_SERVICE, "agent": AGENT_SERVICE}[caller]
    return grpc.StatusCode.OK if service == allowed else grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("caller", ["none", "bad", "malformed", "client", "agent"])
def test_every_method_against_every_caller(caller: str, tokens: Tokens) -> None:
    methods = spotwise_methods() + OPEN_METHODS
    assert len(methods) == 13  # 6 JobService + 4 AgentService + 3 open

    async def run() -> None:
        recorder = Recorder()
        server, port = await start_server(tokens.store, recorder)
        try:
            metadata: tuple = ()
            if caller == "bad":
                metadata = bearer_metadata(mint_token(Role.CLIENT, "nobody").token)
            elif caller == "malformed":
                metadata = (("authorization", tokens.client),)  # no "Bearer " scheme
            elif caller in ("client", "agent"):
                metadata = channel_security(f"127.0.0.1:{port}", token=getattr(tokens, caller)).metadata
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                got = {m.path: await call(channel, m, metadata) for m in methods}
        finally:
            await server.stop(grace=None)
        want = {m.path: expected(m, caller) for m in methods}
        assert got == want
        # Denied calls never reached a servicer; allowed ones saw the caller's principal.
        reached = {name for name, _ in recorder.calls}
        allowed_spotwise = {
            m.path.rsplit("/", 1)[1]
            for m in spotwise_methods()
            if want[m.path] == grpc.StatusCode.OK
        }
        assert reached == allowed_spotwise
        if caller in ("client", "agent"):
            assert allowed_spotwise
            name = {"client": "alice", "agent": "fleet"}[caller]
            assert all(p == Principal(name, Role(caller)) for _, p in recorder.calls)

    asyncio.run(run())


def test_tokens_file_reload_revokes(tmp_path: Path) -> None:
    alice = mint_token(Role.CLIENT, "alice")
    path = tmp_path / "tokens"
    path.write_text(alice.line + "\n")
    store = TokenStore.load(path)
    method = spotwise_methods()[1]  # GetJob

    async def run() -> None:
        server, port = await start_server(store, Recorder())
        try:
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                meta = bearer_metadata(alice.token)
                assert await call(channel, method, meta) == grpc.StatusCode.OK
                path.write_text("# revoked\n")
                store.reload()
                assert await call(channel, method, meta) == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(grace=None)

    asyncio.run(run())


# --- TLS with a CA made in the test -------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def make_ca(directory: Path, cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def make_leaf(
    directory: Path,
    cn: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca[1], hashes.SHA256())
    cert_path, key_path = directory / f"{cn}.crt", directory / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca(tmp_path, "spotwise-ca")
    server_cert, server_key = make_leaf(tmp_path, "daemon", ca, server=True)
    client_cert, client_key = make_leaf(tmp_path, "laptop", ca, server=False)
    rogue = make_ca(tmp_path, "rogue-ca")
    rogue_cert, rogue_key = make_leaf(tmp_path, "intruder", rogue, server=False)
    return Pki(
        ca=tmp_path / "spotwise-ca.crt",
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        rogue_ca=tmp_path / "rogue-ca.crt",
        rogue_cert=rogue_cert,
        rogue_key=rogue_key,
    )


LIST_JOBS = Method(
    f"/{JOB_SERVICE}/ListJobs", jobs_pb2.ListJobsRequest(), jobs_pb2.ListJobsResponse, "unary"
)
HEALTH = OPEN_METHODS[0]


def tls_to(port: int, token: str | None, **files: Path) -> ChannelSecurity:
    return channel_security(f"127.0.0.1:{port}", token=token, **files)


async def call_over_tls(security: ChannelSecurity, method: Method) -> grpc.StatusCode:
    async with security.aio_channel() as channel:
        return await call(channel, method, security.metadata)


def test_tls_with_token(pki: Pki, tokens: Tokens) -> None:
    creds = server_credentials(cert_file=pki.server_cert, key_file=pki.server_key)

    async def run() -> None:
        server, port = await start_server(tokens.store, Recorder(), creds)
        try:
            ok = tls_to(port, tokens.client, ca_file=pki.ca)
            assert await call_over_tls(ok, LIST_JOBS) == grpc.StatusCode.OK
            wrong_role = tls_to(port, tokens.agent, ca_file=pki.ca)
            assert (
                await call_over_tls(wrong_role, LIST_JOBS)
                == grpc.StatusCode.PERMISSION_DENIED
            )
            no_token = tls_to(port, None, ca_file=pki.ca)
            assert await call_over_tls(no_token, LIST_JOBS) == grpc.StatusCode.UNAUTHENTICATED
            assert await call_over_tls(no_token, HEALTH) == grpc.StatusCode.OK
            # A client that does not trust our CA refuses the daemon's certificate.
            untrusting = tls_to(port, tokens.client, ca_file=pki.rogue_ca)
            assert await call_over_tls(untrusting, LIST_JOBS) == grpc.StatusCode.UNAVAILABLE
            # Plaintext to a TLS port gets nowhere.
            async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                code = await call(channel, LIST_JOBS, bearer_metadata(tokens.client))
                assert code == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(grace=None)

    asyncio.run(run())


def test_mutual_tls_refuses_clients_without_our_certificate(pki: Pki, tokens: Tokens) -> None:
    creds = server_credentials(
        cert_file=pki.server_cert,
        key_file=pki.server_key,
        client_ca_file=pki.ca,
        require_client_cert=True,
    )

    async def run() -> None:
        server, port = await start_server(tokens.store, Recorder(), creds)
        try:
            with_cert = tls_to(port, tokens.client, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
            )
            assert await call_over_tls(with_cert, LIST_JOBS) == grpc.StatusCode.OK
            # Even the open health service needs the client certificate under mTLS.
            no_cert = tls_to(port, tokens.client, ca_file=pki.ca)
            assert await call_over_tls(no_cert, LIST_JOBS) == grpc.StatusCode.UNAVAILABLE
            assert await call_over_tls(no_cert, HEALTH) == grpc.StatusCode.UNAVAILABLE
            rogue = tls_to(port, tokens.client, ca_file=pki.ca, cert_file=pki.rogue_cert, key_file=pki.rogue_key
            )
            assert await call_over_tls(rogue, LIST_JOBS) == grpc.StatusCode.UNAVAILABLE
            # A certificate is not a token: the role check still applies.
            cert_no_token = tls_to(port, None, ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key
            )
            code = await call_over_tls(cert_no_token, LIST_JOBS)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(grace=None)

    asyncio.run(run())


def test_credential_argument_errors(pki: Pki) -> None:
    with pytest.raises(ValueError, match="client_ca_file"):
        server_credentials(
            cert_file=pki.server_cert, key_file=pki.server_key, require_client_cert=True
        )
    with pytest.raises(CredentialsError, match="both"):
        channel_security("127.0.0.1:1", token=None, ca_file=pki.ca, cert_file=pki.client_cert)
    with pytest.raises(OSError):
        server_credentials(cert_file=pki.server_cert, key_file=pki.server_key.with_suffix(".nope"))


def test_bind_applies_the_listening_rules(pki: Pki, tokens: Tokens) -> None:
    async def run() -> None:
        server = aio.server(interceptors=[TokenAuthInterceptor(tokens.store)])
        jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServicer(Recorder()), server)
        # Plaintext beyond loopback is refused before anything is bound.
        with pytest.raises(ValueError, match="without TLS"):
            bind(server, "0.0.0.0:0", tls=None)
        tls = ServerTls(cert_file=pki.server_cert, key_file=pki.server_key)
        port = bind(server, "127.0.0.1:0", tls=tls)
        await server.start()
        try:
            creds = tls_to(port, tokens.client, ca_file=pki.ca)
            assert await call_over_tls(creds, LIST_JOBS) == grpc.StatusCode.OK
        finally:
            await server.stop(grace=None)
        with pytest.raises(OSError):
            bind(
                aio.server(),
                "127.0.0.1:0",
                tls=ServerTls(cert_file=pki.server_cert, key_file=pki.server_key.with_name("nope")),
            )

    asyncio.run(run())
