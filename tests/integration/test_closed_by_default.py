"""Closed by default: beyond loopback the daemon wants TLS and tokens, the client and the agent
never send a token in plaintext there, and a flood of bad tokens cannot flood the log."""

import asyncio
import logging
import re
from pathlib import Path

import grpc
import pytest
from grpc import aio

from spotwise.client import Client, ClientConfigError
from spotwise.common.credentials import CredentialsError, channel_security, is_local_address
from spotwise.config import AgentConfig, DaemonConfig
from spotwise.daemon.auth import Role, TokenAuthInterceptor, TokenStore, mint_token
from spotwise.daemon.log_budget import LogBudget
from spotwise.daemon.server import DaemonThread
from spotwise.proto.v1 import jobs_pb2, jobs_pb2_grpc
from spotwise.worker.agent.node import Agent
from tests.integration.test_auth_grpc import make_ca, make_leaf
from tests.support.grpcserve import code_of, job_service


def _config(tmp_path: Path, **kw) -> DaemonConfig:
    return DaemonConfig(listen="0.0.0.0:0", state_dir=tmp_path / "state", **kw)


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    ca = make_ca(tmp_path, "spotwise-ca")
    cert, key = make_leaf(tmp_path, "head", ca, server=True)
    return {"tls_cert_file": str(cert), "tls_key_file": str(key)}


def test_tls_without_tokens_beyond_loopback_is_refused_and_nothing_is_created(tmp_path, tls_files):
    with pytest.raises(RuntimeError, match="without tokens: .* Configure a tokens file"):
        DaemonThread(_config(tmp_path, **tls_files)).start()
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_tokens_without_tls_beyond_loopback_is_refused(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(mint_token(Role.CLIENT, "alice").line + "\n")
    with pytest.raises(RuntimeError, match="without TLS: .* Configure a TLS certificate and key"):
        DaemonThread(_config(tmp_path, tokens_file=str(tokens))).start()


def test_the_beat_channel_beyond_loopback_gets_the_same_rule(tmp_path):
    """gRPC on loopback does not let the beat channel listen beyond it in plaintext; the
    refused start leaves nothing open (the gRPC port, the metrics port, the database)."""
    config = DaemonConfig(listen="127.0.0.1:0", beat_listen="0.0.0.0:0", metrics_listen="127.0.0.1:0",
                          state_dir=tmp_path / "state")
    daemon = DaemonThread(config)
    with pytest.raises(RuntimeError, match="beat channel: refusing to listen on 0.0.0.0:0 without TLS and tokens"):
        daemon.start()
    d = daemon.daemon
    assert (d._server, d.metrics_exporter, d.store) == (None, None, None)


def test_the_opt_out_starts_and_says_so_loudly(tmp_path, tls_files, caplog):
    caplog.set_level(logging.INFO, logger="spotwise")
    with DaemonThread(_config(tmp_path, allow_insecure=True, **tls_files)):
        pass
    loud = [r for r in caplog.records if "INSECURE" in r.getMessage()]
    assert loud and all(r.levelno == logging.WARNING for r in loud)
    assert "WITHOUT tokens" in loud[0].getMessage() and "run code on every node" in loud[0].getMessage()


@pytest.mark.parametrize("address", ["10.0.3.4:7450", "head.internal:7450", "0.0.0.0:7450", "[2001:db8::1]:7450"])
def test_the_client_refuses_to_send_a_token_in_plaintext_beyond_loopback(address):
    with pytest.raises(ClientConfigError, match=f"refusing to send a token in plaintext to {re.escape(address)}"):
        Client(address, token="swt_secret")
    Client(address, token="").close()  # no token, nothing to leak: allowed


@pytest.mark.parametrize("address", ["127.0.0.1:7450", "localhost:7450", "[::1]:7450", "unix:/run/spotwise.sock"])
def test_loopback_may_carry_a_token_in_plaintext(address):
    assert is_local_address(address)
    Client(address, token="swt_secret").close()


def test_with_a_ca_the_token_goes_over_tls(tmp_path):
    make_ca(tmp_path, "spotwise-ca")
    security = channel_security("10.0.3.4:7450", token="swt_secret", ca_file=tmp_path / "spotwise-ca.crt")
    assert security.tls and security.metadata == (("authorization", "Bearer swt_secret"),)


def test_the_agent_refuses_to_send_its_token_in_plaintext_beyond_loopback(tmp_path, monkeypatch):
    """The real agent, with its token from its token file or its environment: refused before
    it dials anything, naming its own setting; on loopback the same agent is built."""
    token_file = tmp_path / "agent.token"
    token_file.write_text("swt_agent\n")
    for env, kw in (({}, {"token_file": str(token_file)}), ({"SPOTWISE_AGENT_TOKEN": "swt_agent"}, {})):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = AgentConfig.load(daemon="10.0.3.4:7450", state_dir=tmp_path / "state",
                                  log_dir=tmp_path / "logs", **kw)
        with pytest.raises(CredentialsError, match="plaintext to 10.0.3.4:7450: set tls_ca_file to use TLS"):
            Agent(config)
        Agent(config.model_copy(update={"daemon": "127.0.0.1:7450"}))
    with pytest.raises(CredentialsError, match="needs both tls_cert_file and tls_key_file"):
        Agent(AgentConfig.load(daemon="127.0.0.1:1", state_dir=tmp_path / "state",
                               log_dir=tmp_path / "logs", tls_cert_file="c.pem"))


def test_log_budget_lets_a_few_through_then_summarises(caplog):
    now = [0.0]
    budget = LogBudget(logging.getLogger("spotwise.test"), what="denied calls", lines=3, window_s=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="spotwise.test")
    logged = [budget.log(logging.WARNING, "denied %d", i) for i in range(10)]
    assert logged == [True] * 3 + [False] * 7
    now[0] = 61.0
    assert budget.log(logging.WARNING, "denied %d", 10)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["denied 0", "denied 1", "denied 2", "7 more denied calls in the last 61s were not logged", "denied 10"]


def test_a_flood_of_bad_tokens_logs_a_bounded_number_of_lines(caplog):
    caplog.set_level(logging.WARNING, logger="spotwise.daemon.auth")
    interceptor = TokenAuthInterceptor(TokenStore({}), denial_log_lines=5)

    class Jobs(jobs_pb2_grpc.JobServiceServicer):
        async def ListJobs(self, request, context):
            return jobs_pb2.ListJobsResponse()

    async def run() -> list[grpc.StatusCode]:
        def add(server: aio.Server) -> None:
            jobs_pb2_grpc.add_JobServiceServicer_to_server(Jobs(), server)

        async with job_service(add, interceptors=[interceptor]) as stub:
            return [await code_of(stub.ListJobs(
                jobs_pb2.ListJobsRequest(), timeout=10,
                metadata=(("authorization", f"Bearer swt_guess{i}"),))) for i in range(200)]

    codes = asyncio.run(run())
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    denied = [r for r in caplog.records if r.getMessage().startswith("denied ")]
    assert len(denied) == 5 and interceptor.denials.suppressed == 195
