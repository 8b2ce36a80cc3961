"""Interruption notices from an SQS queue fed by EventBridge (aws-node-termination-handler's
queue mode), for the daemon: it sees every node's notice even when an agent cannot report.

Handled detail-types and their bodies (EventBridge envelopes, possibly wrapped in an SNS
notification):

- "EC2 Spot Instance Interruption Warning": ``detail = {"instance-id": "i-...",
  "instance-action": "terminate|stop|hibernate"}``; the instance goes away two minutes after
  the event's ``time``.
- "EC2 Instance Rebalance Recommendation": ``detail = {"instance-id": "i-..."}``; no deadline.

The instance id comes from ``detail`` or, failing that, from the ``resources`` ARN, which AWS
writes in the zone form ``arn:aws:ec2:us-east-1a:instance/i-...`` (no account) as well as the
usual ``arn:aws:ec2:us-east-1:123456789012:instance/i-...``. A missing ``account`` is fine.

Every received message is deleted once handled: parsed ones, duplicates (same event id, as SQS
delivers at least once), other event types, and malformed bodies (logged). A message whose
delete fails comes back after its visibility timeout and is then dropped as a duplicate.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from spotwise.cloud.aws import AwsConfig, aws_call_errors, aws_client, error_code
from spotwise.cloud.imds import INSTANCE_ACTIONS, parse_rfc3339

log = logging.getLogger(__name__)

SPOT_WARNING = "EC2 Spot Instance Interruption Warning"
REBALANCE = "EC2 Instance Rebalance Recommendation"
SPOT_NOTICE_LEAD_S = 120.0
_INSTANCE_ARN = re.compile(r"^arn:aws[a-z-]*:ec2:[a-z0-9-]*:(?:\d{12})?:?instance/(i-[0-9a-f]+)$")


class SqsEventsError(RuntimeError):
    """Receiving from or deleting on the queue failed."""


@dataclass(frozen=True, kw_only=True)
class CloudNotice:
    """An interruption notice for one instance, as read from the queue."""

    event_id: str
    """EventBridge's event id (the de-duplication key)."""
    instance_id: str
    action: str
    """"terminate", "stop", "hibernate" or "rebalance"."""
    deadline: float
    """Unix seconds when the instance goes away (event time + 120 s); 0.0 for a rebalance."""
    event_time: float
    """Unix seconds of the event."""
    region: str = ""


def instance_id_from_arn(arn: str) -> str | None:
    """``i-...`` from an instance ARN in either the region/account or the zone form."""
    match = _INSTANCE_ARN.match(arn.strip()) if isinstance(arn, str) else None
    return match.group(1) if match else None


def parse_event(body: str) -> CloudNotice | None:
    """A CloudNotice from an SQS message body; None for an event of another type.

    Raises ValueError for a malformed body (not JSON, no id/time, no instance id, bad action).
    """
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if isinstance(doc, dict) and doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        return parse_event(doc["Message"])  # delivered through SNS
    if not isinstance(doc, dict):
        raise ValueError("event is not a JSON object")
    detail_type = doc.get("detail-type")
    if detail_type not in (SPOT_WARNING, REBALANCE):
        return None
    event_id = doc.get("id")
    if not isinstance(event_id, str) or not event_id:
        raise ValueError("event has no id")
    event_time = parse_rfc3339(doc.get("time"))  # type: ignore[arg-type]
    detail = doc.get("detail") if isinstance(doc.get("detail"), dict) else {}
    instance_id = detail.get("instance-id")
    if not (isinstance(instance_id, str) and instance_id.startswith("i-")):
        resources = doc.get("resources") if isinstance(doc.get("resources"), list) else []
        ids = [i for i in (instance_id_from_arn(r) for r in resources) if i]
        if not ids:
            raise ValueError(f"{detail_type} names no instance (detail or resources)")
        instance_id = ids[0]
    if detail_type == SPOT_WARNING:
        action = detail.get("instance-action", "terminate")
        if action not in INSTANCE_ACTIONS:
            raise ValueError(f"unknown instance-action {action!r}")
        deadline = event_time + SPOT_NOTICE_LEAD_S
    else:
        action, deadline = "rebalance", 0.0
    return CloudNotice(event_id=event_id, instance_id=instance_id, action=action, deadline=deadline,
                       event_time=event_time, region=str(doc.get("region", "")))


@dataclass(frozen=True, kw_only=True)
class SqsEventsConfig:
    """Which queue to read and how."""

    queue_url: str
    """URL of the queue the EventBridge rules target."""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    """SQS endpoint override (a moto server in tests)."""
    wait_time_s: int = 20
    """Long-poll wait of each receive (0..20 s)."""
    max_messages: int = 10
    """Messages per receive (1..10)."""
    remember_events: int = 10_000
    """How many event ids to remember for de-duplication."""

    def __post_init__(self) -> None:
        if not 0 <= self.wait_time_s <= 20:
            raise ValueError(f"wait_time_s must be in 0..20, got {self.wait_time_s}")
        if not 1 <= self.max_messages <= 10:
            raise ValueError(f"max_messages must be in 1..10, got {self.max_messages}")


class SqsNoticeReader:
    """Long-polls the queue and returns each notice once."""

    def __init__(self, config: SqsEventsConfig, *, client: Any = None):
        self.config = config
        self._client = client
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.malformed = 0
        """Messages dropped as malformed (for metrics and tests)."""
        self.duplicates = 0
        """Messages dropped as already seen."""

    def _sqs(self) -> Any:
        if self._client is None:
            # the read timeout must outlast the long poll
            self._client = aws_client("sqs", AwsConfig(region=self.config.region, endpoint_url=self.config.endpoint_url,
                                                       timeout_s=self.config.wait_time_s + 10.0))
        return self._client

    def _remember(self, event_id: str) -> bool:
        """True if new."""
        if event_id in self._seen:
            self._seen.move_to_end(event_id)
            return False
        self._seen[event_id] = None
        while len(self._seen) > self.config.remember_events:
            self._seen.popitem(last=False)
        return True

    def receive(self, *, wait_time_s: int | None = None) -> list[CloudNotice]:
        """One long poll (up to `wait_time_s`, default the config's): the new notices received.

        Raises SqsEventsError if the receive fails; a failed delete is logged (the message
        comes back and is dropped as a duplicate).
        """
        wait = self.config.wait_time_s if wait_time_s is None else wait_time_s
        try:
            answer = self._sqs().receive_message(
                QueueUrl=self.config.queue_url, MaxNumberOfMessages=self.config.max_messages,
                WaitTimeSeconds=wait, AttributeNames=["All"])
        except aws_call_errors() as exc:
            raise SqsEventsError(f"sqs:ReceiveMessage on {self.config.queue_url} failed "
                                 f"({error_code(exc)}: {exc})") from exc
        notices: list[CloudNotice] = []
        for message in answer.get("Messages", []):
            body = message.get("Body", "")
            try:
                notice = parse_event(body)
            except ValueError as exc:
                self.malformed += 1
                log.warning("dropping malformed queue message %s: %s; body %r",
                            message.get("MessageId"), exc, body[:300])
                notice = None
            if notice is not None:
                if self._remember(notice.event_id):
                    notices.append(notice)
                    log.info("interruption notice from the queue: %s %s deadline %.0f (event %s)",
                             notice.instance_id, notice.action, notice.deadline, notice.event_id)
                else:
                    self.duplicates += 1
            self._delete(message)
        return notices

    def _delete(self, message: dict[str, Any]) -> None:
        try:
            self._sqs().delete_message(QueueUrl=self.config.queue_url, ReceiptHandle=message["ReceiptHandle"])
        except aws_call_errors() as exc:
            log.warning("sqs:DeleteMessage of %s failed (%s); it will come back and be dropped as a duplicate",
                        message.get("MessageId"), error_code(exc))
