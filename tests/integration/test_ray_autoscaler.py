"""The ray provider asks Ray's autoscaler for nodes, and withdraws the request.

A real autoscaling cluster: Ray's own `AutoscalingCluster` config (the fake multi-node
provider, whose "instances" are real raylets on this machine) with a head that has no eligible
resource and a worker type that has it, min 0. `AutoscalingCluster.start` runs `ray stop
--force` (every Ray process of the machine) and binds the fixed port 6379, so the head is
started here the same way but on free ports, and stopped by pid.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.cloud.local import kill_with_env
from spotwise.cloud.provider import NodeRequest
from tests.support.wait import until

# Loopback only (read when Ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from ray.cluster_utils import AutoscalingCluster  # noqa: E402

from spotwise.cloud.ray import RayConfig, RayProvider  # noqa: E402

RESOURCE = "spotwise_node"
MARK = "SPOTWISE_TEST_RAY_AUTOSCALER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def autoscaling_cluster() -> Iterator[str]:
    """The GCS address of a running autoscaling cluster (no eligible node yet)."""
    spec = AutoscalingCluster(
        head_resources={"CPU": 1},
        worker_node_types={"eligible": {"resources": {"CPU": 1, RESOURCE: 1},
                                        "node_config": {}, "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=10,
    )
    port = _free_port()
    config = dict(spec._config)
    config["provider"] = {**config["provider"], "gcs_address": f"127.0.0.1:{port}"}
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f)
    mark = uuid.uuid4().hex
    env = dict(os.environ, AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1",
               **{MARK: mark})
    ray_cli = str(Path(sys.executable).parent / "ray")
    try:
        subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1",
                        f"--autoscaling-config={path}", "--include-dashboard=false",
                        f"--ray-client-server-port={_free_port()}",
                        "--disable-usage-stats"],
                       env=env, check=True, timeout=180, capture_output=True)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        kill_with_env(MARK, mark, timeout_s=30)
        os.unlink(path)


def _request() -> list:
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


@pytest.mark.slow
def test_shortfall_asks_the_autoscaler_and_a_raylet_appears(autoscaling_cluster: str,
                                                            tmp_path: Path) -> None:
    provider = RayProvider(RayConfig(address=autoscaling_cluster, resource=RESOURCE,
                                     namespace=f"sw-{uuid.uuid4().hex[:8]}",
                                     work_dir=str(tmp_path / "nodes")))
    request = NodeRequest(job_id="job-a", daemon_address="127.0.0.1:1", slots=1)
    try:
        assert not any(RESOURCE in n.resources for n in provider.nodes() if n.alive)
        assert provider.launch(request, 1) == []  # nothing eligible: one node owed
        provider.list_nodes()  # the next round asks for it
        assert _request() == [{RESOURCE: 1.0}]
        until(lambda: any(n.alive and RESOURCE in n.resources for n in provider.nodes()), 180,
              "the autoscaler to start an eligible raylet")
        placed = until(lambda: provider.launch(request, 1), 60, "an agent on the new raylet")
        assert len(placed) == 1
        provider.list_nodes()  # nothing owed any more: the request is withdrawn
        assert _request() == []
        assert [n.handle for n in provider.list_nodes()] == [placed[0].handle]
    finally:
        provider.shutdown()
        provider.close()
