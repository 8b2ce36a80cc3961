"""An S3 endpoint that fails on purpose: a small HTTP proxy in front of a real S3 API (moto).

Each request is, at random (seeded), answered with S3's own throttling error (503 SlowDown,
the XML body S3 sends), held without an answer for `timeout_s` and then dropped (what a client
sees as a read timeout), or forwarded to the upstream unchanged. The rates can be changed while
it runs, with a request the proxy answers itself and never forwards:

    POST /__spotwise_faults__   {"error_rate": 0.2, "timeout_rate": 0.05, "timeout_s": 3}

Run it as a program (the fault lab starts it on the head host, with moto in the same process):

    python -m spotwise.cloud.s3_faults --listen 10.213.7.2:0 --moto

prints ``s3 faults proxy on http://HOST:PORT`` once it serves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CONTROL_PATH = "/__spotwise_faults__"
_UPSTREAM_TIMEOUT_S = 60.0
_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class FaultRates:
    """What share of requests fail, and how."""

    error_rate: float = 0.0
    """Share of requests answered 503 SlowDown."""
    timeout_rate: float = 0.0
    """Share of requests held unanswered for timeout_s, then dropped."""
    timeout_s: float = 5.0
    """How long a held request waits before its connection is closed."""

    def __post_init__(self) -> None:
        for name in ("error_rate", "timeout_rate"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v!r}")
        if self.error_rate + self.timeout_rate > 1.0:
            raise ValueError("error_rate + timeout_rate must be at most 1")
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 600:
            raise ValueError(f"timeout_s must be in (0, 600], got {self.timeout_s!r}")


class FaultProxy:
    """The proxy server. `start()` serves from a thread; `close()` stops it."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1", port: int = 0,
                 rates: FaultRates | None = None, seed: int = 0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream must be http://host:port, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.rates = rates or FaultRates()
        self.counts = {"forwarded": 0, "error": 0, "timeout": 0}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _draw(self) -> str:
        with self._lock:
            r = self._rng.random()
            rates = self.rates
            kind = ("error" if r < rates.error_rate else
                    "timeout" if r < rates.error_rate + rates.timeout_rate else "forwarded")
            self.counts[kind] += 1
            return kind

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt: str, *args: object) -> None:
                log.debug("s3 proxy: " + fmt, *args)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _control(self) -> None:
                try:
                    doc = json.loads(self._body() or b"{}")
                    rates = FaultRates(**{**asdict(proxy.rates), **doc})
                except (ValueError, TypeError) as exc:
                    self._reply(400, json.dumps({"error": str(exc)}).encode())
                    return
                with proxy._lock:
                    proxy.rates = rates
                self._reply(200, json.dumps({**asdict(rates), "counts": proxy.counts}).encode())

            def _reply(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":  # a HEAD answer has no body (S3's has none either)
                    self.wfile.write(body)

            def _any(self) -> None:
                if self.path.startswith(CONTROL_PATH):
                    self._control()
                    return
                body = self._body()
                kind = proxy._draw()
                if kind == "error":
                    self._reply(503, _SLOWDOWN, {"Content-Type": "application/xml"})
                    return
                if kind == "timeout":
                    time.sleep(proxy.rates.timeout_s)
                    self.close_connection = True
                    return
                self._forward(body)

            def _forward(self, body: bytes) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=_UPSTREAM_TIMEOUT_S)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    head = self.command == "HEAD"
                    for k, v in resp.getheaders():
                        # A HEAD answer's Content-Length is the object's size: keep it.
                        if k.lower() in ("transfer-encoding", "connection") or (
                                k.lower() == "content-length" and not head):
                            continue
                        self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                except OSError as exc:  # upstream gone: the client sees a 502, as behind a LB
                    self._reply(502, str(exc).encode())
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any  # noqa: N815

        return Handler


def set_rates(proxy_url: str, **rates: float) -> dict:
    """Change a running proxy's rates (FaultRates fields); returns its answer (rates, counts).
    Raises ValueError when the proxy refuses them, OSError when it cannot be reached."""
    parts = urlsplit(proxy_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", CONTROL_PATH, body=json.dumps(rates),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200:
        raise ValueError(f"fault proxy refused {rates}: {doc.get('error')}")
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve on")
    p.add_argument("--upstream", default="", help="http://host:port of the real S3 API")
    p.add_argument("--moto", action="store_true", help="start moto on 127.0.0.1:0 as upstream")
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--timeout-rate", type=float, default=0.0)
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        p.error(f"--listen must be host:port, got {args.listen!r}")
    if bool(args.upstream) == args.moto:
        p.error("give exactly one of --upstream and --moto")
    upstream = args.upstream
    moto = None
    if args.moto:
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        moto_host, moto_port = moto.get_host_and_port()
        upstream = f"http://{moto_host}:{moto_port}"
    try:
        rates = FaultRates(args.error_rate, args.timeout_rate, args.timeout_s)
        proxy = FaultProxy(upstream, host=host, port=int(port), rates=rates, seed=args.seed)
    except ValueError as exc:
        p.error(str(exc))
    print(f"s3 faults proxy on {proxy.url} (upstream {upstream})", flush=True)
    try:
        proxy._server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.close()
        if moto is not None:
            moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
