"""The ray provider asks Ray's autoscaler for nodes, and withdraws the request.

A real autoscaling cluster: Ray's `AutoscalingCluster` (the fake multi-node provider, whose
"instances" are real raylets on this machine, started by Ray's autoscaler) with a head that has
no eligible resource and a worker type that has it, min 0. Two things of it are replaced here:
its base config (example.yaml, which the Ray 2.60 wheel does not ship; the same values
inline), and `start`/`shutdown`, which run `ray stop --force` (every Ray process of the
machine) and bind the fixed port 6379: the head starts the same way on free ports and is
stopped by pid.
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


# python/ray/autoscaler/_private/fake_multi_node/example.yaml of Ray 2.60, less its node types.
_BASE_CONFIG = {
    "cluster_name": "fake_multinode", "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1, "docker": {}, "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
    "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
    "rsync_filter": [],
}


class _AutoscalingCluster(AutoscalingCluster):
    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                         **config_kwargs):
        config = json.loads(json.dumps(_BASE_CONFIG))
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {
            "resources": head_resources, "node_config": {}, "max_workers": 0}
        config.update(config_kwargs)
        return config


@pytest.fixture
def autoscaling_cluster() -> Iterator[str]:
    """The GCS address of a running autoscaling cluster (no eligible node yet)."""
    spec = _AutoscalingCluster(
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
        # `ray start` records its cluster for `address="auto"`; that cluster is gone now.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()


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
