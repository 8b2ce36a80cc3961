"""Parsing of IMDS notice bodies and validation of the IMDS config (pure, no server)."""

from __future__ import annotations

import pytest

from spotwise.cloud.imds import (
    ImdsConfig,
    format_rfc3339,
    parse_instance_action,
    parse_rebalance,
    parse_rfc3339,
)


def test_rfc3339_round_trip_and_forms() -> None:
    assert parse_rfc3339("1970-01-01T00:02:00Z") == 120.0
    assert parse_rfc3339("1970-01-01T00:02:00+00:00") == 120.0
    assert parse_rfc3339("1970-01-01T01:02:00+01:00") == 120.0
    assert parse_rfc3339("1970-01-01T00:02:00.500Z") == 120.5
    assert format_rfc3339(1_800_000_000) == "2027-01-15T08:00:00Z"
    assert parse_rfc3339(format_rfc3339(1_800_000_000)) == 1_800_000_000
    for bad in ("", "yesterday", "2026-13-01T00:00:00Z", None, 5):
        with pytest.raises(ValueError):
            parse_rfc3339(bad)  # type: ignore[arg-type]


def test_instance_action_as_aws_documents_it() -> None:
    notice = parse_instance_action('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert notice.action == "terminate"
    assert notice.deadline == parse_rfc3339("2017-09-18T08:22:00Z")
    assert notice.lead_s(notice.deadline - 120) == 120
    assert notice.lead_s(notice.deadline + 5) == -5  # a late notice says so
    for action in ("stop", "hibernate"):
        assert parse_instance_action(f'{{"action": "{action}", "time": "2017-09-18T08:22:00Z"}}').action == action


@pytest.mark.parametrize(
    "body",
    [
        "",
        "not json",
        "[]",
        '{"action": "explode", "time": "2017-09-18T08:22:00Z"}',
        '{"action": "terminate"}',
        '{"action": "terminate", "time": "soon"}',
        '{"time": "2017-09-18T08:22:00Z"}',
    ],
)
def test_malformed_instance_action_is_value_error(body: str) -> None:
    with pytest.raises(ValueError):
        parse_instance_action(body)


def test_rebalance_notice_has_no_deadline() -> None:
    notice = parse_rebalance('{"noticeTime": "2020-10-27T08:22:00Z"}')
    assert notice.action == "rebalance"
    assert notice.deadline == 0.0 and notice.lead_s(0.0) is None
    assert notice.notice_time == parse_rfc3339("2020-10-27T08:22:00Z")
    with pytest.raises(ValueError):
        parse_rebalance('{"noticeTime": 12}')
    with pytest.raises(ValueError):
        parse_rebalance("{")


def test_same_notice_has_same_key_and_a_changed_one_does_not() -> None:
    a = parse_instance_action('{"action": "stop", "time": "2017-09-18T08:22:00Z"}')
    b = parse_instance_action('{"action": "stop", "time": "2017-09-18T08:22:00Z"}')
    c = parse_instance_action('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert a.key == b.key != c.key


def test_config_validates_interval_ttl_and_endpoint() -> None:
    assert ImdsConfig().endpoint == "http://169.254.169.254"
    assert ImdsConfig().timeout_s == 2.0
    for kwargs in ({"poll_interval_s": 0.5}, {"poll_interval_s": 6}, {"token_ttl_s": 0},
                   {"token_ttl_s": 21601}, {"endpoint": "169.254.169.254"}, {"timeout_s": 0}):
        with pytest.raises(ValueError):
            ImdsConfig(**kwargs)
