"""boto3 clients for the AWS-backed modules (ec2, pricing, sqs_events), built one way.

boto3 is imported only when a client is made, so importing spotwise.cloud costs nothing for
users of the local provider. Every client has connect and read timeouts and botocore's
"standard" retry mode (bounded attempts with exponential backoff and jitter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class AwsConfig:
    """How to reach one AWS service."""

    region: str = "us-east-1"
    """Region of the client."""
    endpoint_url: str | None = None
    """Override of the service endpoint (a moto server in tests); None for AWS itself."""
    timeout_s: float = 10.0
    """Connect and read timeout of each HTTP call."""
    max_attempts: int = 3
    """Attempts per call, first one included (botocore standard retry mode, with backoff)."""


def aws_client(service: str, config: AwsConfig) -> Any:
    """A boto3 client for `service` with the config's region, endpoint, timeouts and retries."""
    import boto3  # lazy: boto3 takes ~0.3 s to import and only AWS users need it
    from botocore.config import Config

    return boto3.session.Session().client(
        service,
        region_name=config.region,
        endpoint_url=config.endpoint_url,
        config=Config(
            connect_timeout=config.timeout_s,
            read_timeout=config.timeout_s,
            retries={"max_attempts": config.max_attempts, "mode": "standard"},
        ),
    )


def aws_call_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed AWS call raises: service errors and transport/credential errors."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ClientError ("InsufficientInstanceCapacity"), else the class name."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__
