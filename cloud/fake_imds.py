"""A fake EC2 instance metadata service (IMDSv2) for tests and the demo.

It speaks the wire format of the real one (moto does not implement these paths):

- ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600`` answers a
  token (400 without a valid TTL header);
- every ``GET /latest/...`` needs a live token in ``X-aws-ec2-metadata-token`` (401 when it is
  missing, unknown or expired);
- ``/latest/meta-data/spot/instance-action`` answers ``{"action": ..., "time": RFC 3339}`` once
  an instance-action is due, 404 before; ``/latest/meta-data/events/recommendations/rebalance``
  answers ``{"noticeTime": ...}`` likewise; a few identity items (instance-id, instance-type,
  placement/availability-zone, instance-life-cycle) answer plain text.

It is scripted in process (`FakeImds.schedule_instance_action`, `schedule_rebalance`,
`set_raw`, `clear`, `expire_tokens`) or, from another process, by ``POST /_fake/<verb>`` with a
JSON body of the same keyword arguments. Standalone::

    python -m spotwise.cloud.fake_imds --port 0 [--instance-action-after 10 --lead 120]

prints its URL on the first line of stdout and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from spotwise.cloud.imds import (
    INSTANCE_ACTION_PATH,
    INSTANCE_ACTIONS,
    MAX_TOKEN_TTL_S,
    REBALANCE_PATH,
    TOKEN_HEADER,
    TOKEN_PATH,
    TTL_HEADER,
    format_rfc3339,
)


@dataclass
class _Scripted:
    """A body that becomes visible at `visible_at` (clock seconds)."""

    visible_at: float
    body: str
    status: int = 200


class FakeImds:
    """A metadata server on 127.0.0.1 in a background thread. Use as a context manager."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
        instance_id: str = "i-0fa4e0000000000001",
        instance_type: str = "g4dn.xlarge",
        zone: str = "us-east-1a",
        lifecycle: str = "spot",
    ):
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._scripted: dict[str, list[_Scripted]] = {}
        self._identity = {
            "/latest/meta-data/instance-id": instance_id,
            "/latest/meta-data/instance-type": instance_type,
            "/latest/meta-data/placement/availability-zone": zone,
            "/latest/meta-data/instance-life-cycle": lifecycle,
        }
        self.requests: list[tuple[str, str, int]] = []
        """(method, path, status) of every request served, in order."""
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeImds:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-imds", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeImds:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- scripting -------------------------------------------------------------------------

    def _visible_at(self, at: float | None, after_s: float | None) -> float:
        if at is not None and after_s is not None:
            raise ValueError("give at or after_s, not both")
        if at is not None:
            return at
        return self.clock() + (after_s or 0.0)

    def schedule_instance_action(
        self,
        action: str = "terminate",
        *,
        at: float | None = None,
        after_s: float | None = None,
        lead_s: float = 120.0,
    ) -> float:
        """Make spot/instance-action answer from `at` (or `after_s` from now) on, with the
        action time `lead_s` later. Replaces any earlier instance-action. Returns that time."""
        if action not in INSTANCE_ACTIONS:
            raise ValueError(f"action must be one of {INSTANCE_ACTIONS}, got {action!r}")
        visible = self._visible_at(at, after_s)
        deadline = visible + lead_s
        body = json.dumps({"action": action, "time": format_rfc3339(deadline)})
        with self._lock:
            self._scripted[INSTANCE_ACTION_PATH] = [_Scripted(visible, body)]
        return deadline

    def schedule_rebalance(self, *, at: float | None = None, after_s: float | None = None) -> float:
        """Make the rebalance recommendation answer from `at` (or `after_s` from now) on."""
        visible = self._visible_at(at, after_s)
        body = json.dumps({"noticeTime": format_rfc3339(visible)})
        with self._lock:
            self._scripted[REBALANCE_PATH] = [_Scripted(visible, body)]
        return visible

    def set_raw(
        self,
        path: str,
        body: str,
        *,
        status: int = 200,
        at: float | None = None,
        after_s: float | None = None,
        append: bool = False,
    ) -> None:
        """Answer `path` with exactly `body` (malformed JSON, odd actions) from `at` on. With
        `append`, the newest visible entry wins, so a script can change a body over time."""
        entry = _Scripted(self._visible_at(at, after_s), body, status)
        with self._lock:
            if append:
                self._scripted.setdefault(path, []).append(entry)
            else:
                self._scripted[path] = [entry]

    def clear(self, path: str | None = None) -> None:
        """Remove scripted answers (for `path`, or all): the notice paths answer 404 again."""
        with self._lock:
            if path is None:
                self._scripted.clear()
            else:
                self._scripted.pop(path, None)

    def expire_tokens(self) -> None:
        """Forget every issued token, as if they had expired: the next GET gets a 401."""
        with self._lock:
            self._tokens.clear()

    def count(self, method: str, path: str, status: int | None = None) -> int:
        """How many requests matched (for tests)."""
        with self._lock:
            return sum(
                1 for m, p, s in self.requests if m == method and p == path and (status is None or s == status)
            )

    # ---- serving ---------------------------------------------------------------------------

    def _issue_token(self, ttl_header: str | None) -> tuple[int, str]:
        try:
            ttl = int(ttl_header) if ttl_header is not None else 0
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TOKEN_TTL_S:
            return 400, ""
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self.clock() + ttl
        return 200, token

    def _token_ok(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and self.clock() < expires

    def _answer_get(self, path: str) -> tuple[int, str]:
        now = self.clock()
        with self._lock:
            entries = [e for e in self._scripted.get(path, []) if e.visible_at <= now]
        if entries:
            latest = max(entries, key=lambda e: e.visible_at)
            return latest.status, latest.body
        if path in self._identity:
            return 200, self._identity[path]
        return 404, ""

    def _control(self, verb: str, args: dict) -> tuple[int, str]:
        actions = {
            "instance-action": self.schedule_instance_action,
            "rebalance": self.schedule_rebalance,
            "raw": self.set_raw,
            "clear": self.clear,
            "expire-tokens": self.expire_tokens,
        }
        if verb not in actions:
            return 404, json.dumps({"error": f"unknown control verb {verb!r}"})
        try:
            result = actions[verb](**args)
        except (TypeError, ValueError) as exc:
            return 400, json.dumps({"error": str(exc)})
        return 200, json.dumps({"ok": True, "result": result})

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
                pass  # tests read fake.requests; stderr noise helps nobody

            def _send(self, status: int, body: str, content_type: str = "text/plain") -> None:
                data = body.encode()
                with fake._lock:
                    fake.requests.append((self.command, self.path, status))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                self._drain()
                if self.path != TOKEN_PATH:
                    self._send(404, "")
                    return
                status, token = fake._issue_token(self.headers.get(TTL_HEADER))
                self._send(status, token)

            def do_GET(self) -> None:  # noqa: N802
                if not self.path.startswith("/latest/"):
                    self._send(404, "")
                    return
                if not fake._token_ok(self.headers.get(TOKEN_HEADER)):
                    self._send(401, "")
                    return
                status, body = fake._answer_get(self.path)
                ctype = "application/json" if body.startswith("{") else "text/plain"
                self._send(status, body if status == 200 else "", ctype)

            def do_POST(self) -> None:  # noqa: N802
                raw = self._drain()
                if not self.path.startswith("/_fake/"):
                    self._send(404, "")
                    return
                try:
                    args = json.loads(raw or "{}")
                    if not isinstance(args, dict):
                        raise ValueError("body must be a JSON object")
                except ValueError as exc:
                    self._send(400, json.dumps({"error": str(exc)}), "application/json")
                    return
                status, body = fake._control(self.path[len("/_fake/"):], args)
                self._send(status, body, "application/json")

            def _drain(self) -> str:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length).decode() if length else ""

        return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spotwise.cloud.fake_imds", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    parser.add_argument("--instance-id", default="i-0fa4e0000000000001")
    parser.add_argument("--instance-type", default="g4dn.xlarge")
    parser.add_argument("--zone", default="us-east-1a")
    parser.add_argument("--instance-action-after", type=float, default=None,
                        help="seconds from start until spot/instance-action appears")
    parser.add_argument("--action", default="terminate", choices=INSTANCE_ACTIONS)
    parser.add_argument("--lead", type=float, default=120.0, help="seconds from the notice to its action time")
    parser.add_argument("--rebalance-after", type=float, default=None,
                        help="seconds from start until a rebalance recommendation appears")
    args = parser.parse_args(argv)

    fake = FakeImds(host=args.host, port=args.port, instance_id=args.instance_id,
                    instance_type=args.instance_type, zone=args.zone)
    if args.instance_action_after is not None:
        fake.schedule_instance_action(args.action, after_s=args.instance_action_after, lead_s=args.lead)
    if args.rebalance_after is not None:
        fake.schedule_rebalance(after_s=args.rebalance_after)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    fake.start()
    print(fake.url, flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
