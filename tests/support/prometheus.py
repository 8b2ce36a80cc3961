"""A real Prometheus server on loopback for tests: it scrapes the given /metrics endpoints and
answers PromQL over its HTTP API (the OS package's `prometheus`, installed by `make setup-os`)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from spotwise.cloud.local import stop_process_group
from tests.support.wait import until

BINARY = "prometheus"
SCRAPE_INTERVAL_S = 1.0


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def available() -> bool:
    return shutil.which(BINARY) is not None


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result (the series it returns); raises on a PromQL error."""
        q = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as err:  # a bad query: 400 with the reason in the body
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]["result"]

    def scraped(self, targets: int, samples: int) -> bool:
        """Every one of `targets` is up and has been scraped at least `samples` times."""
        up = self.query(f"count_over_time(up[5m]) >= {samples} and up == 1")
        return len(up) >= targets


SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "prometheus.yml"


@contextlib.contextmanager
def scraping(daemon: str, agents: Sequence[str], workdir: Path) -> Iterator[Prometheus]:
    """Run Prometheus with the shipped scrape config (deploy/grafana/prometheus.yml), its
    targets replaced by `daemon` and `agents` (host:port of /metrics endpoints), scraping every
    SCRAPE_INTERVAL_S."""
    workdir.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in shipped["scrape_configs"]}
    jobs["spotwise-daemon"]["static_configs"] = [{"targets": [daemon]}]
    jobs["spotwise-agents"]["static_configs"] = [{"targets": list(agents)}]
    shipped["global"] = {"scrape_interval": f"{SCRAPE_INTERVAL_S:g}s",
                         "evaluation_interval": f"{SCRAPE_INTERVAL_S:g}s"}
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    log = workdir / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [BINARY, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             "--web.listen-address=127.0.0.1:0"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port = until(lambda: (m := re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)',
                                             log.read_text())) and m.group(1),
                     30, "Prometheus to listen")
        url = f"http://127.0.0.1:{port}"
        # It listens before its storage is open, and answers 503 until then.
        until(lambda: _ready(url), 60, "Prometheus to be ready")
        yield Prometheus(url)
    finally:
        stop_process_group(proc)
