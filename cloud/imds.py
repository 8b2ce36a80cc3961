"""Interruption notices from the EC2 instance metadata service (IMDSv2), as AWS documents it.

The session flow: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` returns
a token; every ``GET`` carries it in ``X-aws-ec2-metadata-token``. A 401 means the token expired
or is unknown: we fetch a new one and retry the request once. Every HTTP call has a 2 s timeout.

Two paths carry notices:

- ``/latest/meta-data/spot/instance-action``: ``{"action": "terminate|stop|hibernate",
  "time": "2026-11-21T23:40:00Z"}`` about two minutes before the instance goes away, 404 when
  there is none.
- ``/latest/meta-data/events/recommendations/rebalance``: ``{"noticeTime": "..."}`` when the
  instance is at elevated risk of interruption, 404 when there is none.

`NoticePoller` polls both every 1-5 s and hands out each notice once. A malformed body is
logged and ignored: a bad answer from the metadata service must never take the agent down.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
INSTANCE_ACTION_PATH = "/latest/meta-data/spot/instance-action"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
INSTANCE_ACTIONS = ("terminate", "stop", "hibernate")
MAX_TOKEN_TTL_S = 21600


class ImdsError(RuntimeError):
    """A call to the metadata service failed (unreachable, timed out, or an unexpected status)."""


@dataclass(frozen=True, kw_only=True)
class ImdsConfig:
    """Where and how to reach the metadata service."""

    endpoint: str = DEFAULT_ENDPOINT
    """Base URL of the metadata service; a FakeImds URL in tests and the demo."""
    timeout_s: float = 2.0
    """Timeout of every HTTP call."""
    token_ttl_s: int = MAX_TOKEN_TTL_S
    """Lifetime asked for each session token (1 to 21600 s)."""
    poll_interval_s: float = 2.0
    """How often NoticePoller asks (1 to 5 s)."""

    def __post_init__(self) -> None:
        if not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"imds endpoint must be an http(s) URL, got {self.endpoint!r}")
        if not 1 <= self.token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be in 1..{MAX_TOKEN_TTL_S}, got {self.token_ttl_s}")
        if not 1.0 <= self.poll_interval_s <= 5.0:
            raise ValueError(f"poll_interval_s must be in 1..5 s, got {self.poll_interval_s}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True, kw_only=True)
class Notice:
    """One interruption notice as the agent reports it (maps to InterruptionNotice in the proto)."""

    action: str
    """"terminate", "stop", "hibernate" (from spot/instance-action) or "rebalance"."""
    deadline: float
    """Unix seconds when the instance goes away; 0.0 when unknown (a rebalance recommendation)."""
    notice_time: float
    """Unix seconds the cloud stamped on the notice (the action time for instance-action)."""
    source: str = "imds"
    """Where it came from: "imds" or "sqs"."""
    raw: str = ""
    """The body as received, for the log."""

    def lead_s(self, now: float) -> float | None:
        """Seconds left until the deadline (negative when it is late); None without a deadline."""
        return self.deadline - now if self.deadline else None

    @property
    def key(self) -> tuple[str, str, float]:
        """Identity for de-duplication: the same action at the same time is the same notice."""
        return (self.source, self.action, self.deadline if self.deadline else self.notice_time)


def parse_rfc3339(value: str) -> float:
    """Unix seconds of an RFC 3339 timestamp such as "2026-11-21T23:40:00Z"; ValueError if bad."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    text = value.strip()
    if text[-1] in "zZ":
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        # IMDS always sends UTC with "Z"; treat a naive stamp as UTC rather than local time.
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def format_rfc3339(unix_s: float) -> str:
    """The form IMDS uses: second precision, UTC, "Z"."""
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_instance_action(body: str) -> Notice:
    """A Notice from a spot/instance-action body; ValueError if malformed."""
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"instance-action is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("instance-action is not a JSON object")
    action = doc.get("action")
    if action not in INSTANCE_ACTIONS:
        raise ValueError(f"instance-action has unknown action {action!r}")
    deadline = parse_rfc3339(doc.get("time"))  # type: ignore[arg-type]
    return Notice(action=action, deadline=deadline, notice_time=deadline, raw=body)


def parse_rebalance(body: str) -> Notice:
    """A Notice from an events/recommendations/rebalance body; ValueError if malformed."""
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"rebalance recommendation is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError("rebalance recommendation is not a JSON object")
    notice_time = parse_rfc3339(doc.get("noticeTime"))  # type: ignore[arg-type]
    return Notice(action="rebalance", deadline=0.0, notice_time=notice_time, raw=body)


class ImdsClient:
    """IMDSv2 session client. Thread-safe; one per agent.

    `get` returns the body, or None on 404. It raises ImdsError when the service cannot be
    reached within the timeout or answers with another unexpected status.
    """

    def __init__(self, config: ImdsConfig | None = None, *, clock: Callable[[], float] = time.monotonic):
        self.config = config or ImdsConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expires = 0.0
        # Never through a proxy: IMDS is link-local, and AWS warns that a proxy in the path
        # would see (and could reuse) the session token.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.tokens_fetched = 0
        """How many tokens this client has asked for (tests check the 401 refresh with it)."""

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
        url = self.config.endpoint.rstrip("/") + path
        req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
        try:
            with self._opener.open(req, timeout=self.config.timeout_s) as resp:
                return resp.status, resp.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            body = exc.read().decode("utf-8", errors="replace") if exc.fp else ""
            return exc.code, body
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            raise ImdsError(f"imds {method} {url} failed: {exc}") from exc

    def _fresh_token(self) -> str:
        status, body = self._request(
            "PUT", TOKEN_PATH, {TTL_HEADER: str(self.config.token_ttl_s)}
        )
        if status != 200 or not body:
            raise ImdsError(f"imds PUT {TOKEN_PATH} answered {status}: {body[:200]!r}")
        self.tokens_fetched += 1
        self._token = body.strip()
        # Renew a little early so a token never expires between our check and the GET.
        self._token_expires = self._clock() + max(1.0, self.config.token_ttl_s - 30.0)
        return self._token

    def _current_token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._token_expires:
                return self._fresh_token()
            return self._token

    def _drop_token(self, stale: str) -> None:
        with self._lock:
            if self._token == stale:
                self._token = None

    def get(self, path: str) -> str | None:
        """GET a metadata path with a session token; None on 404. Retries once on a 401."""
        for attempt in (1, 2):
            token = self._current_token()
            status, body = self._request("GET", path, {TOKEN_HEADER: token})
            if status == 200:
                return body
            if status == 404:
                return None
            if status == 401 and attempt == 1:
                log.info("imds token refused (401), fetching a new one", extra={"path": path})
                self._drop_token(token)
                continue
            raise ImdsError(f"imds GET {path} answered {status}: {body[:200]!r}")
        raise AssertionError("unreachable")

    def instance_action(self) -> Notice | None:
        """The pending spot instance-action, or None (none pending, or a malformed body)."""
        body = self.get(INSTANCE_ACTION_PATH)
        if body is None:
            return None
        try:
            return parse_instance_action(body)
        except ValueError as exc:
            log.warning("ignoring malformed spot/instance-action %r: %s", body[:200], exc)
            return None

    def rebalance(self) -> Notice | None:
        """The rebalance recommendation, or None (none, or a malformed body)."""
        body = self.get(REBALANCE_PATH)
        if body is None:
            return None
        try:
            return parse_rebalance(body)
        except ValueError as exc:
            log.warning("ignoring malformed rebalance recommendation %r: %s", body[:200], exc)
            return None

    def metadata(self, name: str) -> str | None:
        """A plain meta-data item, e.g. "instance-id", "instance-type",
        "placement/availability-zone", "instance-life-cycle"; None if absent."""
        return self.get(f"/latest/meta-data/{name}")


class NoticePoller:
    """Polls both notice paths and returns each distinct notice once.

    A notice stays visible at IMDS until the instance is gone, so the same body comes back on
    every poll: the poller remembers what it handed out (by action and time) and drops repeats.
    A changed notice (for example "stop" replaced by "terminate", or a new time) is new.
    """

    def __init__(self, client: ImdsClient):
        self.client = client
        self._seen: set[tuple[str, str, float]] = set()
        self.errors = 0
        """Polls that failed to reach IMDS (logged and retried at the next interval)."""

    def poll_once(self) -> list[Notice]:
        """New notices since the last poll; [] when none or when IMDS is unreachable."""
        found: list[Notice] = []
        for fetch in (self.client.instance_action, self.client.rebalance):
            try:
                notice = fetch()
            except ImdsError as exc:
                self.errors += 1
                log.warning("imds poll failed: %s", exc)
                continue
            if notice is not None and notice.key not in self._seen:
                self._seen.add(notice.key)
                found.append(notice)
        return found

    def notices(self, stop: threading.Event) -> Iterator[Notice]:
        """Yield new notices until `stop` is set, polling every config.poll_interval_s.

        The wait between polls is `stop.wait`, so setting `stop` ends the loop within one
        interval plus one HTTP timeout per path.
        """
        interval = self.client.config.poll_interval_s
        while not stop.is_set():
            started = time.monotonic()
            yield from self.poll_once()
            stop.wait(max(0.0, interval - (time.monotonic() - started)))
