"""Pure parts of spotwise.daemon.auth: tokens, the access decision, listening and URI rules."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import grpc
import pytest

from spotwise.common.uri import check_checkpoint_uri
from spotwise.daemon.auth import (
    AGENT_SERVICE,
    JOB_SERVICE,
    AccessPolicy,
    Principal,
    Role,
    TokenStore,
    check_listen,
    decide_access,
    hash_token,
    is_loopback_host,
    main,
    mint_token,
    parse_tokens,
    split_host_port,
    token_from_metadata,
)

# --- tokens ---------------------------------------------------------------------------------


def test_minted_token_round_trips_through_the_tokens_file() -> None:
    minted = mint_token("client", "alice")
    assert minted.token.startswith("swt_") and len(minted.token) > 40
    assert minted.token not in minted.line  # only the hash is stored
    digest = hashlib.sha256(minted.token.encode()).hexdigest()
    assert minted.line == f"sha256:{digest} client alice"
    store = TokenStore(parse_tokens(["# comment", "", minted.line]))
    assert store.authenticate(minted.token) == Principal("alice", Role.CLIENT)
    assert store.authenticate(minted.token + "x") is None
    assert mint_token(Role.AGENT, "a").token != mint_token(Role.AGENT, "a").token


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sha256:abc client alice", "64"),
        (f"{hash_token('t')} root alice", "unknown role"),
        (f"{hash_token('t')} client", "fields"),
        (f"{hash_token('t')} client al ice", "fields"),
        (f"{hash_token('t')} client al/ice", "bad token name"),
        (f"md5:{'0' * 64} client alice", "sha256"),
    ],
)
def test_malformed_tokens_file_lines_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_tokens(["# header", line], source="tokens")
    assert "tokens:2" in str(err.value)


def test_duplicate_hash_is_refused() -> None:
    line = mint_token("client", "a").line
    with pytest.raises(ValueError, match="already listed"):
        parse_tokens([line, line])


def test_bad_mint_arguments() -> None:
    with pytest.raises(ValueError):
        mint_token("root", "alice")
    with pytest.raises(ValueError):
        mint_token("client", "has space")


def test_reload_keeps_old_tokens_when_the_file_is_broken(tmp_path: Path) -> None:
    minted = mint_token("agent", "fleet")
    path = tmp_path / "tokens"
    path.write_text(minted.line + "\n")
    store = TokenStore.load(path)
    path.write_text("garbage\n")
    with pytest.raises(ValueError):
        store.reload()
    assert store.authenticate(minted.token) == Principal("fleet", Role.AGENT)


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("x-other", "1"),), None),
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("authorization", "Basic abc"),), ""),
        ((("authorization", "abc"),), ""),
        ((("authorization", "Bearer "),), ""),
        ((("authorization", "Bearer a"), ("authorization", "Bearer b")), ""),
        ((("authorization", b"Bearer abc"),), ""),
    ],
)
def test_token_from_metadata(metadata: tuple, token: str | None) -> None:
    assert token_from_metadata(metadata) == token


# --- access decision ---------------------------------------------------------------------------


def test_access_decision_table() -> None:
    client, agent = mint_token("client", "alice"), mint_token("agent", "fleet")
    store = TokenStore(parse_tokens([client.line, agent.line]))
    policy = AccessPolicy()
    job, node = f"/{JOB_SERVICE}/SubmitJob", f"/{AGENT_SERVICE}/Heartbeat"
    health = "/grpc.health.v1.Health/Check"
    other = "/some.Other/Method"
    ok, unauth, denied = (
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    )
    table = {
        (job, None): unauth,
        (job, "nope"): unauth,
        (job, ""): unauth,
        (job, client.token): ok,
        (job, agent.token): denied,
        (node, None): unauth,
        (node, client.token): denied,
        (node, agent.token): ok,
        (health, None): ok,
        (health, "nope"): ok,
        (other, client.token): denied,
        (other, None): unauth,
    }
    for (method, token), code in table.items():
        decision = decide_access(method, token, store, policy)
        assert decision.code == code, (method, token, decision)
        assert decision.allowed == (code == ok)
        assert decision.reason
    assert decide_access(job, client.token, store, policy).principal == Principal(
        "alice", Role.CLIENT
    )


def test_service_names_come_from_the_protos() -> None:
    assert JOB_SERVICE == "spotwise.v1.JobService"
    assert AGENT_SERVICE == "spotwise.v1.AgentService"


# --- listening ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1:7450",
        "127.0.0.2:0",
        "localhost:7450",
        "[::1]:7450",
        "[::ffff:127.0.0.1]:1",
        "unix:/run/spotwise.sock",
        "unix-abstract:spotwise",
    ],
)
def test_loopback_is_always_allowed(address: str) -> None:
    assert check_listen(address, tls_enabled=False, insecure_flag=False)


@pytest.mark.parametrize(
    "address", ["0.0.0.0:7450", "[::]:7450", "10.0.3.4:7450", ":7450", "head.internal:7450"]
)
def test_beyond_loopback_needs_tls_and_tokens_or_the_insecure_flag(address: str) -> None:
    with pytest.raises(ValueError, match="without TLS and tokens"):
        check_listen(address, tls_enabled=False, insecure_flag=False)
    with pytest.raises(ValueError, match="without TLS: .* Configure a TLS certificate and key,"):
        check_listen(address, tls_enabled=False, insecure_flag=False, tokens_enabled=True)
    # TLS alone is not enough: anyone who reaches the port could submit a job.
    with pytest.raises(ValueError, match="without tokens: .* Configure a tokens file,"):
        check_listen(address, tls_enabled=True, insecure_flag=False)
    assert "with TLS and tokens" in check_listen(address, tls_enabled=True, insecure_flag=False, tokens_enabled=True)
    loud = check_listen(address, tls_enabled=True, insecure_flag=True)
    assert loud.startswith("INSECURE") and "WITHOUT tokens" in loud and "run code on every node" in loud
    assert "WITHOUT TLS and tokens" in check_listen(address, tls_enabled=False, insecure_flag=True)


@pytest.mark.parametrize("address", ["7450", "host:", "host:99999", "::1:7450", "h:p"])
def test_malformed_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        check_listen(address, tls_enabled=True, insecure_flag=True)


def test_split_host_port_and_loopback() -> None:
    assert split_host_port("[::1]:7450") == ("::1", 7450)
    assert split_host_port(":80") == ("", 80)
    assert is_loopback_host("LOCALHOST.")
    assert not is_loopback_host("")
    assert not is_loopback_host("localhost.evil.com")


# --- checkpoint URIs ---------------------------------------------------------------------------

PREFIXES = ["s3://ckpt-bucket/spotwise", "/data/checkpoints/", "file:///mnt/ckpt"]


@pytest.mark.parametrize(
    "uri",
    [
        "s3://ckpt-bucket/spotwise",
        "s3://ckpt-bucket/spotwise/job-1",
        "S3://ckpt-bucket/spotwise//job-1/",
        "s3://ckpt-bucket/spotwise/./job-1",
        "/data/checkpoints/run",
        "file:///data/checkpoints/run",
        "file://localhost/data/checkpoints/run",
        "/mnt/ckpt/x",
    ],
)
def test_uris_under_a_prefix_are_allowed(uri: str) -> None:
    check_checkpoint_uri(uri, PREFIXES)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://ckpt-bucket/spotwise-other/job",
        "s3://ckpt-bucket/other",
        "s3://other-bucket/spotwise/job",
        "gs://ckpt-bucket/spotwise/job",
        "s3://ckpt-bucket/spotwise/../secrets",
        "/data/checkpoints/../../etc",
        "/data/checkpointsX",
        "/home/me/ckpt",
        "relative/ckpt",
        "file://otherhost/data/checkpoints/x",
        "",
    ],
)
def test_uris_outside_every_prefix_are_refused(uri: str) -> None:
    with pytest.raises(ValueError):
        check_checkpoint_uri(uri, PREFIXES)


def test_no_prefixes_means_unrestricted() -> None:
    check_checkpoint_uri("relative/ckpt", [])
    check_checkpoint_uri("s3://anything/at/all", ())


# --- command line ------------------------------------------------------------------------------


def test_cli_mint_prints_the_token_and_appends_the_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens"
    assert main(["mint", "--role", "agent", "--name", "fleet", "--append", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store = TokenStore.load(path)
    assert store.authenticate(token) == Principal("fleet", Role.AGENT)
    assert main(["mint", "--role", "client", "--name", "alice"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().startswith("swt_")
    assert hash_token(captured.out.strip()) in captured.err
    assert main(["mint", "--role", "client", "--name", "bad name"]) == 2
