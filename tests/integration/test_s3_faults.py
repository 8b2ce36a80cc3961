"""The S3 fault proxy in front of a real moto server: it forwards faithfully, answers 503
SlowDown and holds requests at the rates it is given, changes rates while running, and refuses
bad rates."""

from __future__ import annotations

import time

import boto3
import botocore.config
import botocore.exceptions
import pytest

from spotwise.cloud.s3_faults import FaultProxy, FaultRates, set_rates
from tests.support.s3 import CREDENTIALS, moto_s3


@pytest.fixture
def proxy():
    with moto_s3() as env:
        p = FaultProxy(env["AWS_ENDPOINT_URL_S3"], seed=7).start()
        try:
            yield p
        finally:
            p.close()


def _client(url: str, attempts: int = 1, read_timeout: float = 5):
    cfg = botocore.config.Config(retries={"max_attempts": attempts, "mode": "standard"},
                                 read_timeout=read_timeout, connect_timeout=2)
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=cfg,
                        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


@pytest.mark.slow
def test_forwards_then_fails_at_the_rates_given(proxy: FaultProxy) -> None:
    s3 = _client(proxy.url)
    s3.create_bucket(Bucket="bkt")
    s3.put_object(Bucket="bkt", Key="k", Body=b"hello")
    assert s3.get_object(Bucket="bkt", Key="k")["Body"].read() == b"hello"
    assert s3.head_object(Bucket="bkt", Key="k")["ContentLength"] == 5
    part = s3.get_object(Bucket="bkt", Key="k", Range="bytes=1-3")
    assert part["Body"].read() == b"ell" and part["ResponseMetadata"]["HTTPStatusCode"] == 206

    set_rates(proxy.url, error_rate=1.0)
    with pytest.raises(botocore.exceptions.ClientError, match="SlowDown"):
        s3.get_object(Bucket="bkt", Key="k")

    answer = set_rates(proxy.url, error_rate=0.5)
    assert answer["error_rate"] == 0.5
    codes = []
    for _ in range(40):
        try:
            s3.head_object(Bucket="bkt", Key="k")
            codes.append(200)
        except botocore.exceptions.ClientError as exc:
            codes.append(int(exc.response["ResponseMetadata"]["HTTPStatusCode"]))
    assert set(codes) == {200, 503} and 8 <= codes.count(503) <= 32

    set_rates(proxy.url, error_rate=0.0, timeout_rate=1.0, timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        _client(proxy.url, read_timeout=1).get_object(Bucket="bkt", Key="k")
    assert time.monotonic() - t0 < 5


def test_bad_rates_are_refused_and_change_nothing(proxy: FaultProxy) -> None:
    with pytest.raises(ValueError, match="error_rate must be between 0 and 1"):
        set_rates(proxy.url, error_rate=2.0)
    with pytest.raises(ValueError, match="at most 1"):
        set_rates(proxy.url, error_rate=0.6, timeout_rate=0.6)
    assert proxy.rates == FaultRates()
