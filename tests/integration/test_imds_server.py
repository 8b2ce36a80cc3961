"""The IMDSv2 client and notice poller against the fake metadata server over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from spotwise.cloud.fake_imds import FakeImds
from spotwise.cloud.imds import (
    INSTANCE_ACTION_PATH,
    REBALANCE_PATH,
    TOKEN_PATH,
    ImdsClient,
    ImdsConfig,
    ImdsError,
    NoticePoller,
    parse_rfc3339,
)


class Clock:
    """A clock the test moves by hand (shared by the fake server and the client)."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock):
    with FakeImds(clock=clock) as server:
        yield server


def client_for(fake: FakeImds, clock: Clock | None = None, **kwargs) -> ImdsClient:
    config = ImdsConfig(endpoint=fake.url, poll_interval_s=1.0, **kwargs)
    return ImdsClient(config, clock=clock) if clock else ImdsClient(config)


def test_token_flow_and_404_when_no_notice(fake: FakeImds) -> None:
    client = client_for(fake)
    assert client.instance_action() is None
    assert client.rebalance() is None
    assert client.metadata("instance-id") == "i-0fa4e0000000000001"
    assert client.metadata("placement/availability-zone") == "us-east-1a"
    # One token for all four GETs, and every GET carried it (no 401s).
    assert fake.count("PUT", TOKEN_PATH, 200) == 1
    assert fake.count("GET", INSTANCE_ACTION_PATH, 404) == 1
    assert fake.count("GET", REBALANCE_PATH, 404) == 1
    assert not any(status == 401 for _, _, status in fake.requests)


def test_fake_enforces_the_wire_format(fake: FakeImds) -> None:
    """IMDSv2 as AWS documents it: no token -> 401, PUT without a TTL -> 400."""
    def status(req: urllib.request.Request) -> int:
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status(urllib.request.Request(fake.url + INSTANCE_ACTION_PATH)) == 401
    assert status(urllib.request.Request(fake.url + TOKEN_PATH, method="PUT", data=b"")) == 400
    bad_ttl = {"X-aws-ec2-metadata-token-ttl-seconds": "21601"}
    assert status(urllib.request.Request(fake.url + TOKEN_PATH, method="PUT", data=b"", headers=bad_ttl)) == 400
    assert status(urllib.request.Request(fake.url + INSTANCE_ACTION_PATH,
                                         headers={"X-aws-ec2-metadata-token": "forged"})) == 401


def test_new_token_on_401_after_expiry(fake: FakeImds, clock: Clock) -> None:
    client = client_for(fake, token_ttl_s=60)
    assert client.instance_action() is None
    assert client.tokens_fetched == 1
    # The server forgets tokens (as after expiry) while the client still thinks its token is good.
    fake.expire_tokens()
    assert client.instance_action() is None
    assert client.tokens_fetched == 2
    assert fake.count("GET", INSTANCE_ACTION_PATH, 401) == 1
    # Server-side TTL: move the clock past the TTL; the client refreshes on its 401 again.
    clock.now += 61
    assert client.rebalance() is None
    assert client.tokens_fetched == 3


def test_client_renews_its_token_before_ttl_runs_out(fake: FakeImds, clock: Clock) -> None:
    client = client_for(fake, clock, token_ttl_s=100)
    client.instance_action()
    clock.now += 80  # past ttl - 30 s: the client renews without waiting for a 401
    client.instance_action()
    assert client.tokens_fetched == 2
    assert fake.count("GET", INSTANCE_ACTION_PATH, 401) == 0


def test_instance_action_appears_at_its_time_and_is_deduplicated(fake: FakeImds, clock: Clock) -> None:
    deadline = fake.schedule_instance_action("terminate", after_s=10, lead_s=120)
    poller = NoticePoller(client_for(fake))
    assert poller.poll_once() == []
    clock.now += 10
    (notice,) = poller.poll_once()
    assert notice.action == "terminate"
    assert notice.deadline == deadline == clock.now + 120
    # Still visible at IMDS on every poll, but handed out once.
    assert poller.poll_once() == []
    assert poller.poll_once() == []
    # The same notice scheduled again (a duplicate) is still not new.
    fake.schedule_instance_action("terminate", at=clock.now, lead_s=120)
    assert poller.poll_once() == []
    # A changed action is a new notice.
    fake.schedule_instance_action("stop", at=clock.now, lead_s=120)
    (changed,) = poller.poll_once()
    assert changed.action == "stop"


def test_rebalance_then_instance_action(fake: FakeImds, clock: Clock) -> None:
    fake.schedule_rebalance(after_s=0)
    fake.schedule_instance_action("hibernate", after_s=5, lead_s=30)
    poller = NoticePoller(client_for(fake))
    (first,) = poller.poll_once()
    assert first.action == "rebalance" and first.deadline == 0.0
    assert first.notice_time == parse_rfc3339(json.loads(first.raw)["noticeTime"])
    clock.now += 5
    (second,) = poller.poll_once()
    assert second.action == "hibernate" and second.deadline == clock.now + 30


def test_malformed_notices_are_ignored_and_polling_goes_on(fake: FakeImds, clock: Clock) -> None:
    fake.set_raw(INSTANCE_ACTION_PATH, '{"action": "terminate", "time": ')
    fake.set_raw(REBALANCE_PATH, '{"noticeTime": "not a time"}')
    poller = NoticePoller(client_for(fake))
    assert poller.poll_once() == []
    fake.set_raw(INSTANCE_ACTION_PATH, '{"action": "vaporize", "time": "2027-01-15T08:00:00Z"}')
    assert poller.poll_once() == []
    fake.set_raw(INSTANCE_ACTION_PATH, "[1, 2]")
    assert poller.poll_once() == []
    # A good one after the garbage is still seen.
    fake.schedule_instance_action("terminate", at=clock.now, lead_s=120)
    assert [n.action for n in poller.poll_once()] == ["terminate"]
    assert poller.errors == 0


def test_unreachable_endpoint_is_imds_error_and_poller_survives() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ImdsClient(ImdsConfig(endpoint=f"http://127.0.0.1:{port}", poll_interval_s=1.0))
    with pytest.raises(ImdsError):
        client.instance_action()
    poller = NoticePoller(client)
    assert poller.poll_once() == []
    assert poller.errors == 2


def test_server_error_status_is_imds_error(fake: FakeImds) -> None:
    fake.set_raw(INSTANCE_ACTION_PATH, "boom", status=500)
    with pytest.raises(ImdsError, match="500"):
        client_for(fake).instance_action()


def test_poller_loop_yields_notice_and_stops_on_event() -> None:
    with FakeImds() as fake:  # real clock
        fake.schedule_instance_action("terminate", after_s=0.3, lead_s=120)
        poller = NoticePoller(client_for(fake))
        stop = threading.Event()
        got = []
        started = time.monotonic()
        for notice in poller.notices(stop):
            got.append(notice)
            stop.set()
        assert [n.action for n in got] == ["terminate"]
        assert time.monotonic() - started < 5


def test_standalone_server_prints_url_and_takes_control_posts() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "spotwise.cloud.fake_imds", "--port", "0", "--rebalance-after", "0"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert url.startswith("http://127.0.0.1:")
        client = ImdsClient(ImdsConfig(endpoint=url, poll_interval_s=1.0))
        assert client.rebalance() is not None
        assert client.instance_action() is None
        req = urllib.request.Request(
            url + "/_fake/instance-action", method="POST",
            data=json.dumps({"action": "stop", "after_s": 0, "lead_s": 60}).encode(),
        )
        with urllib.request.urlopen(req, timeout=2) as resp:
            deadline = json.loads(resp.read())["result"]
        notice = client.instance_action()
        assert notice is not None and notice.action == "stop" and notice.deadline == int(deadline)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
