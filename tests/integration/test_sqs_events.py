"""Reading EventBridge interruption events from a real SQS queue (a moto server on port 0)."""

from __future__ import annotations

import json
import time

import boto3
import pytest

from spotwise.cloud.imds import parse_rfc3339
from spotwise.cloud.sqs_events import (
    REBALANCE,
    SPOT_WARNING,
    SqsEventsConfig,
    SqsNoticeReader,
    instance_id_from_arn,
    parse_event,
)


def spot_warning(event_id: str, instance_id: str, *, action: str = "terminate", account: bool = True,
                 zone_arn: bool = True, detail_id: bool = True) -> dict:
    """An event in the shape EventBridge delivers (AWS's documented example)."""
    arn = (f"arn:aws:ec2:us-east-1a:instance/{instance_id}" if zone_arn
           else f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}")
    event = {
        "version": "0", "id": event_id, "detail-type": SPOT_WARNING, "source": "aws.ec2",
        "account": "123456789012", "time": "2026-11-21T23:40:00Z", "region": "us-east-1",
        "resources": [arn],
        "detail": {"instance-action": action},
    }
    if detail_id:
        event["detail"]["instance-id"] = instance_id
    if not account:
        del event["account"]
    return event


def rebalance(event_id: str, instance_id: str) -> dict:
    return {
        "version": "0", "id": event_id, "detail-type": REBALANCE, "source": "aws.ec2",
        "account": "123456789012", "time": "2026-11-21T23:41:00Z", "region": "us-east-1",
        "resources": [f"arn:aws:ec2:us-east-1b:instance/{instance_id}"],
        "detail": {"instance-id": instance_id},
    }


# ---- parsing (pure) ----------------------------------------------------------------------

def test_arn_forms() -> None:
    assert instance_id_from_arn("arn:aws:ec2:us-east-1a:instance/i-0b662ef9931388ba0") == "i-0b662ef9931388ba0"
    assert instance_id_from_arn("arn:aws:ec2:us-east-1:123456789012:instance/i-0abc") == "i-0abc"
    assert instance_id_from_arn("arn:aws:ec2:us-east-1:123456789012:volume/vol-1") is None
    assert instance_id_from_arn("garbage") is None


def test_parse_spot_warning_and_rebalance() -> None:
    n = parse_event(json.dumps(spot_warning("e1", "i-0abc", action="stop")))
    assert n is not None and (n.instance_id, n.action, n.event_id) == ("i-0abc", "stop", "e1")
    assert n.deadline == parse_rfc3339("2026-11-21T23:40:00Z") + 120
    r = parse_event(json.dumps(rebalance("e2", "i-0def")))
    assert r is not None and (r.action, r.deadline, r.instance_id) == ("rebalance", 0.0, "i-0def")
    # no account field, instance only in a zone-form ARN
    z = parse_event(json.dumps(spot_warning("e3", "i-0123", account=False, detail_id=False)))
    assert z is not None and z.instance_id == "i-0123"
    # wrapped in an SNS notification
    sns = {"Type": "Notification", "MessageId": "m", "Message": json.dumps(spot_warning("e4", "i-0456"))}
    assert parse_event(json.dumps(sns)).instance_id == "i-0456"  # type: ignore[union-attr]
    # other EC2 events are not notices
    other = spot_warning("e5", "i-0789")
    other["detail-type"] = "EC2 Instance State-change Notification"
    assert parse_event(json.dumps(other)) is None


@pytest.mark.parametrize("body", [
    "{", "[]", json.dumps({"detail-type": SPOT_WARNING, "time": "2026-11-21T23:40:00Z", "detail": {}}),
    json.dumps({**spot_warning("x", "i-0abc"), "time": "later"}),
    json.dumps({**spot_warning("x", "i-0abc", detail_id=False), "resources": []}),
    json.dumps({**spot_warning("x", "i-0abc"), "detail": {"instance-id": "i-0abc", "instance-action": "melt"}}),
])
def test_malformed_events_are_value_errors(body: str) -> None:
    with pytest.raises(ValueError):
        parse_event(body)


# ---- against a real queue ----------------------------------------------------------------

@pytest.fixture
def queue(moto_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    sqs = boto3.client("sqs", region_name="us-east-1", endpoint_url=moto_url)
    url = sqs.create_queue(QueueName=f"nth-{request.node.name[:60]}")["QueueUrl"]
    return sqs, url


def reader_for(moto_url: str, url: str, **kw) -> SqsNoticeReader:
    return SqsNoticeReader(SqsEventsConfig(queue_url=url, endpoint_url=moto_url, wait_time_s=1, **kw))


def drain(reader: SqsNoticeReader, want: int, timeout_s: float = 10.0) -> list:
    """Receive until `want` notices arrived or the deadline passes."""
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(reader.receive())
    return got


def queue_depth(sqs, url: str) -> int:
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_reads_notices_deletes_them_and_drops_duplicates(moto_url: str, queue) -> None:
    sqs, url = queue
    first = spot_warning("ev-1", "i-0aaa", account=False)
    for body in (first, first, rebalance("ev-2", "i-0bbb"), first):  # at-least-once delivery
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))
    reader = reader_for(moto_url, url)
    got = drain(reader, 2)
    # a short extra poll shows nothing more arrives
    got.extend(reader.receive(wait_time_s=0))
    assert sorted((n.instance_id, n.action) for n in got) == [("i-0aaa", "terminate"), ("i-0bbb", "rebalance")]
    assert reader.duplicates == 2
    assert queue_depth(sqs, url) == 0
    # the same event delivered again later is still a duplicate
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(first))
    assert drain(reader, 1, timeout_s=2.5) == []
    assert reader.duplicates == 3 and queue_depth(sqs, url) == 0


def test_malformed_and_foreign_messages_are_deleted_not_fatal(moto_url: str, queue) -> None:
    sqs, url = queue
    other = spot_warning("ev-9", "i-0ccc")
    other["detail-type"] = "EC2 Instance State-change Notification"
    for body in ("not json at all", json.dumps({"detail-type": SPOT_WARNING}), json.dumps(other),
                 json.dumps(spot_warning("ev-10", "i-0ddd", zone_arn=True, detail_id=False))):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    reader = reader_for(moto_url, url)
    got = drain(reader, 1)
    got.extend(reader.receive(wait_time_s=0))
    assert [n.instance_id for n in got] == ["i-0ddd"]
    assert reader.malformed == 2
    assert queue_depth(sqs, url) == 0


def test_long_poll_waits_then_returns_empty(moto_url: str, queue) -> None:
    _, url = queue
    reader = reader_for(moto_url, url)
    started = time.monotonic()
    assert reader.receive(wait_time_s=1) == []
    assert 0.8 < time.monotonic() - started < 5  # it did wait (long poll), and not forever


def test_config_bounds() -> None:
    with pytest.raises(ValueError):
        SqsEventsConfig(queue_url="q", wait_time_s=21)
    with pytest.raises(ValueError):
        SqsEventsConfig(queue_url="q", max_messages=11)
