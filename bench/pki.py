"""The credentials a head node runs with, made for one benchmark run: a CA, the daemon's TLS
certificate (for 127.0.0.1 and localhost) and a tokens file with one client and one agent
token (spotwise.daemon.auth.mint_token, the same tokens `python -m spotwise.daemon.auth mint`
makes).

    creds = make_credentials(directory)
    creds.ca_file, creds.server_cert, creds.server_key, creds.tokens_file
    creds.client_token, creds.agent_token
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spotwise.daemon.auth import Role, mint_token

VALID_FOR = datetime.timedelta(days=2)
"""Certificates outlive any run; they are made afresh for each."""


@dataclass(frozen=True, kw_only=True)
class Credentials:
    """Where a run's TLS files and tokens are."""

    ca_file: Path
    """PEM CA certificate that agents and the client verify the daemon against."""
    server_cert: Path
    """The daemon's certificate (SANs 127.0.0.1 and localhost)."""
    server_key: Path
    """Its private key."""
    tokens_file: Path
    """The daemon's tokens file (hashes only)."""
    client_token: str
    """Role client: submits and cancels the benchmark's jobs."""
    agent_token: str
    """Role agent: every simulated agent enrolls with it, as a fleet's agents do."""
    admin_tokens: tuple[str, ...] = ()
    """Role admin, one per principal `admin-<k>` (they may watch any job)."""


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca,
                         content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, encipher_only=False,
                         decipher_only=False)


def make_credentials(directory: Path, *, admins: int = 0) -> Credentials:
    """Write a fresh CA, server certificate and tokens file into `directory` (created), with
    `admins` admin tokens besides the client and agent ones."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("spotwise-bench-ca")).issuer_name(_name("spotwise-bench-ca"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("spotwise-daemon")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client = mint_token(Role.CLIENT, "bench-client")
    agent = mint_token(Role.AGENT, "bench-fleet")
    admin = [mint_token(Role.ADMIN, f"admin-{k}") for k in range(admins)]
    creds = Credentials(
        ca_file=directory / "ca.crt", server_cert=directory / "daemon.crt",
        server_key=directory / "daemon.key", tokens_file=directory / "tokens",
        client_token=client.token, agent_token=agent.token,
        admin_tokens=tuple(a.token for a in admin),
    )
    creds.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    creds.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    creds.server_key.write_bytes(_key_pem(key))
    creds.server_key.chmod(0o600)
    creds.tokens_file.write_text("".join(f"{m.line}\n" for m in (client, agent, *admin)),
                                 encoding="utf-8")
    creds.tokens_file.chmod(0o600)
    return creds
