"""The ray provider on a real local Ray cluster: a head and three worker raylets marked eligible
by a custom resource, a real daemon (in-process) with the ray provider, real agent actors that
run `spotwise agent`, and the tiny workload on the real runtime.

The faults are Ray's own: a worker raylet killed (cluster.remove_node), a raylet added, and a
node drained through the GCS with reason PREEMPTION and a deadline, as `ray drain-node` does.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.client import Client, state_name
from spotwise.cloud.local import kill_with_env, processes_with_env
from spotwise.cloud.ray_guard import MARKER_ENV
from spotwise.config import DaemonConfig
from spotwise.worker.runtime.ledger import verify_ledger
from tests.support.wait import until

# Loopback only: Ray otherwise binds the machine's outside address. Ray reads this when it is
# first imported, so it is set before that.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from spotwise.cloud.ray import RayProvider  # noqa: E402
from spotwise.daemon.server import DaemonThread  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESOURCE = "spotwise_node"
DATASET_SIZE = 100
GLOBAL_BATCH = 24
CLUSTER_MARK = "SPOTWISE_TEST_RAY_CLUSTER"
"""Environment marker of every process of a test's Ray cluster, for a cleanup by pid."""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    mark = uuid.uuid4().hex
    saved = os.environ.get(CLUSTER_MARK)
    os.environ[CLUSTER_MARK] = mark
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(3):
            cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, namespace="spotwise-tests", log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        kill_with_env(CLUSTER_MARK, mark, timeout_s=30)
        if saved is None:
            os.environ.pop(CLUSTER_MARK, None)
        else:
            os.environ[CLUSTER_MARK] = saved


def _worker_nodes(cluster: Cluster) -> dict[str, object]:
    return {n.node_id: n for n in cluster.worker_nodes}


def _alive_ray_nodes() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _agent_actors(namespace: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == namespace}


def _node_pids(namespace: str, node_id: str = "") -> set[int]:
    """Live processes of the agents of `namespace` (of one node, if given)."""
    if node_id:
        return set(processes_with_env(MARKER_ENV, f"{namespace}/{node_id}"))
    return set(processes_with_env(MARKER_ENV, f"{namespace}/", prefix=True))


def _no_processes(namespace: str, node_id: str = "") -> bool:
    """Whether nothing of the agents (of one node) runs; prints what does, for a failure."""
    pids = _node_pids(namespace, node_id)
    if pids and time.monotonic() - _no_processes.last_print > 5:  # type: ignore[attr-defined]
        _no_processes.last_print = time.monotonic()  # type: ignore[attr-defined]
        for pid in sorted(pids):
            try:
                print(pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200])
            except FileNotFoundError:
                pass
    return not pids


_no_processes.last_print = 0.0  # type: ignore[attr-defined]


def _daemon(tmp: Path, namespace: str, listen: str = "127.0.0.1:0") -> DaemonThread:
    config = DaemonConfig(listen=listen, state_dir=tmp / "state", fleet_interval_s=1.0,
                          grace_s=5.0, provider="ray",
                          ray={"resource": RESOURCE, "namespace": namespace,
                               "work_dir": str(tmp / "nodes"), "price_per_hour": 0.5})
    provider = RayProvider(config.ray.ray_config(grace_s=config.grace_s))
    return DaemonThread(config, provider=provider, timeout_s=60).start()


def _submit(client: Client, tmp: Path, *, steps: int, step_sleep: float,
            slow_until: Path | None = None) -> tuple[str, Path]:
    ledger = tmp / f"ledger-{uuid.uuid4().hex[:6]}.jsonl"
    args = ["python", "tests/workloads/tiny_train.py", "--steps", str(steps),
            "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2",
            "--dataset-size", str(DATASET_SIZE), "--step-sleep", str(step_sleep),
            "--ledger", str(ledger)]
    if slow_until is not None:
        args += ["--slow-until", str(slow_until)]
    spec = {"name": "ray", "entrypoint": args, "working_dir": str(REPO),
            "nodes": {"min": 1, "max": 3}, "nproc_per_node": 1,
            "checkpoint": {"uri": str(tmp / f"ck-{ledger.stem}"), "every_steps": 5, "keep": 5},
            "global_batch_size": GLOBAL_BATCH, "max_failures": 5}
    return client.submit(spec), ledger


def _drain(cluster: Cluster, node_id: str, deadline_s: int) -> None:
    """What `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
    --deadline-remaining-seconds N` sends to the GCS."""
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    accepted, why = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot reclaim (test)", int(time.time() * 1000) + deadline_s * 1000)
    assert accepted, why


def _ended(client: Client, job_id: str):
    return (j := client.get(job_id)) and state_name(j.state) in (
        "SUCCEEDED", "FAILED", "CANCELLED") and j


@pytest.mark.slow
def test_elastic_job_through_drain_removal_growth_and_restart(
        ray_cluster: Cluster, tmp_path: Path) -> None:
    namespace = f"sw-{uuid.uuid4().hex[:8]}"
    fast = tmp_path / "faults-done"
    d = _daemon(tmp_path, namespace)
    client = Client(d.address, timeout=10)
    try:
        job_id, ledger = _submit(client, tmp_path, steps=150, step_sleep=0.3, slow_until=fast)
        # One agent per eligible node (the head has no spotwise_node: none there).
        job = until(lambda: (j := client.get(job_id)).world_size == 3 and
                    j.last_checkpoint_step >= 5 and j, 240, "world 3 with a commit")
        workers = set(_worker_nodes(ray_cluster))
        assert set(job.provider_nodes) == workers
        assert _agent_actors(namespace) == {f"spotwise-agent-{n}" for n in workers}

        # A drain through Ray with a deadline: a planned shrink, nothing lost.
        drained = job.provider_nodes[-1]
        gen = job.generation
        _drain(ray_cluster, drained, deadline_s=90)
        job = until(lambda: (j := client.get(job_id)).generation > gen and j.world_size == 2
                    and state_name(j.state) == "RUNNING" and j, 120, "world 2 after the drain")
        assert job.lost_steps == 0, job
        assert drained not in job.provider_nodes
        # Its agent is removed; the drained raylet, idle now, leaves the cluster; nothing of
        # it runs on.
        until(lambda: drained not in _alive_ray_nodes(), 60, "the drained raylet to exit")
        until(lambda: _no_processes(namespace, drained), 30, "the drained node's processes")

        # A raylet killed without notice: the job shrinks to the last node.
        victim = next(n for n in job.provider_nodes if n != job.provider_nodes[0])
        victim_pids = _node_pids(namespace, victim)
        assert victim_pids
        gen = job.generation
        ray_cluster.remove_node(_worker_nodes(ray_cluster)[victim], allow_graceful=False)
        job = until(lambda: (j := client.get(job_id)).generation > gen and j.world_size == 1
                    and state_name(j.state) == "RUNNING" and j, 120, "world 1 after the kill")
        # The node's agent and training processes do not outlive their raylet.
        until(lambda: _no_processes(namespace, victim), 30, "the killed node's processes")

        # A raylet joins: it gets an agent and the job grows.
        gen = job.generation
        ray_cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
        job = until(lambda: (j := client.get(job_id)).generation > gen and j.world_size == 2
                    and state_name(j.state) == "RUNNING" and j.step > j.last_checkpoint_step
                    and j, 180, "world 2 after the join")

        # The daemon restarts and adopts the agents by name: same generation, no restart.
        gen, members = job.generation, set(job.provider_nodes)
        client.close()
        address = d.address
        d.stop()
        d = _daemon(tmp_path, namespace, listen=address)  # where the agents call back
        client = Client(d.address, timeout=10)
        until(lambda: {n.handle for n in d.daemon.provider.list_nodes()} >= members, 60,
              "the restarted daemon to adopt the agents")
        fast.touch()
        final = until(lambda: _ended(client, job_id), 300, "the job to end")
        assert state_name(final.state) == "SUCCEEDED", final
        assert final.generation == gen, (final.generation, gen)
        assert final.step == 150
        assert final.lost_steps <= 5, final  # the raylet kill loses what followed the commit
        report = verify_ledger(str(ledger), dataset_size=DATASET_SIZE,
                               global_batch_size=GLOBAL_BATCH)
        assert report.final_step == 150
        # Priced from the config: 0.5 USD per node-hour.
        assert client.cost(job_id).spent_usd > 0
        print(f"generations {report.generations}; replayed {report.replayed_steps}; "
              f"lost {final.lost_steps}")
    finally:
        client.close()
        d.daemon.provider.shutdown()
        d.stop()
    until(lambda: not _agent_actors(namespace), 30, "every agent actor to go")
    until(lambda: _no_processes(namespace), 30, "every agent process to go")


@pytest.mark.slow
def test_cancel_leaves_no_agent_actor_and_no_process(ray_cluster: Cluster,
                                                      tmp_path: Path) -> None:
    namespace = f"sw-{uuid.uuid4().hex[:8]}"
    d = _daemon(tmp_path, namespace)
    client = Client(d.address, timeout=10)
    try:
        job_id, _ = _submit(client, tmp_path, steps=100_000, step_sleep=0.2)
        until(lambda: client.get(job_id).world_size >= 2 and
              len(processes_with_env("SPOTWISE_JOB_ID", job_id)) >= 2, 240, "world >= 2")
        assert _agent_actors(namespace)
        client.cancel(job_id)
        until(lambda: state_name(client.get(job_id).state) == "CANCELLED", 60, "CANCELLED")
        # No live job wants the nodes: the fleet removes every agent it placed.
        until(lambda: not _agent_actors(namespace), 120, "every agent actor to go")
        until(lambda: not processes_with_env("SPOTWISE_JOB_ID", job_id), 30,
              "the job's processes to exit")
        until(lambda: _no_processes(namespace), 30, "every agent process to go")
    finally:
        client.close()
        d.daemon.provider.shutdown()
        d.stop()
