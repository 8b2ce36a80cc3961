"""A real S3 API over HTTP on loopback (moto's threaded server), for checkpoint tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3() -> Iterator[dict[str, str]]:
    """Start moto on 127.0.0.1:0; yields the environment that points boto3 and s3fs at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    finally:
        server.stop()


def make_bucket(env: dict[str, str], name: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL_S3"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    ).create_bucket(Bucket=name)
