"""Recovery on Ray: spotwise's ray provider vs Ray Train v2 elastic, same cluster, same workload.

A local Ray cluster (a head and three 1-CPU worker raylets marked eligible by the custom
resource `spotwise_node`) runs the tiny workload (tests/workloads/tiny_train.py's model and
data) elastic between 1 and 3 nodes, once per system:

- spotwise: a daemon with the ray provider (an agent actor per worker raylet), the workload on
  the spotwise runtime, default daemon settings (heartbeat 0.5 s, lease 2 s);
- Ray Train v2: `TorchTrainer` with `ScalingConfig(num_workers=(1, 3))`,
  `FailureConfig(max_failures=-1)` and its own checkpointing (bench/ray_train_baseline.py),
  once with Ray's defaults and once tuned as an experienced user would: faster node health
  checks (`health_check_period_ms` 1000, `health_check_timeout_ms` 1000,
  `health_check_failure_threshold` 2) and `elastic_resize_monitor_interval_s` 5.

Each repeat, once the run trains at world size 3 and that generation has committed a
checkpoint (for both systems: a fault never lands in a generation's first save): the raylet of
the node running rank 2 is killed (`cluster.remove_node`, no notice), and the time to the first
step at world size 2 is measured; a raylet is added back and, at world 3 again, the node running
rank 2 is
drained through the GCS (reason PREEMPTION, a 30 s deadline; the bench removes it at the
deadline if it is still there, as the cloud would), and the time to the first step after the
drain at world 2 is measured. Lost steps: steps done before the fault and replayed after it.
Medians over `--repeats` (default 3).

Writes bench/results/ray_recovery.json with spotwise_removal_s, ray_train_removal_s,
ray_train_tuned_removal_s, ratio (spotwise / default Ray Train), ratio_tuned, spotwise_drain_s,
ray_train_drain_s, drain_lost_steps (spotwise), ray_train_removal_lost_steps,
ray_train_drain_lost_steps, and prints `name: value` lines. Figures are meaningful only on a
quiet machine.

    python bench/ray_recovery.py               # everything, medians of 3 (~15-25 minutes)
    python bench/ray_recovery.py --repeats 1 --skip-ray-train
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Loopback only: Ray binds the machine's outside address otherwise (read when Ray is imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from step_watch import StepWatch, until  # noqa: E402 - bench/, beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESOURCE = "spotwise_node"
GLOBAL_BATCH = 24
DRAIN_DEADLINE_S = 30
TUNED_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                       "health_check_failure_threshold": 2}
TUNED_MONITOR_INTERVAL_S = 5.0


@dataclass
class Fault:
    recovery_s: float
    lost_steps: int


@dataclass
class Runs:
    removals: list[Fault]
    drains: list[Fault]
    replaced_joins: list[str]
    """Raylets Ray declared dead while they started, each replaced by another (join)."""


def start_cluster(system_config: dict | None):
    """A head (no eligible resource) and three eligible 1-CPU worker raylets; connected."""
    import ray
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "include_dashboard": False}
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(3):
        cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
    cluster.wait_for_nodes(timeout=180)
    ray.init(address=cluster.address, namespace="spotwise-bench", log_to_driver=False)
    return cluster


def stop_cluster(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()


def drain(cluster, node_id: str) -> None:
    """What `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
    --deadline-remaining-seconds 30` sends."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.gcs_address)
    accepted, why = gcs.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "bench: spot reclaim", int(time.time() * 1000) + DRAIN_DEADLINE_S * 1000)
    if not accepted:
        raise RuntimeError(f"drain of {node_id} refused: {why}")


def remove(cluster, node_id: str) -> None:
    node = next((n for n in cluster.worker_nodes if n.node_id == node_id), None)
    if node is not None:
        cluster.remove_node(node, allow_graceful=False)


def fault(watch: StepWatch, act: Callable[[], None], *, timeout_s: float,
          after: Callable[[float], None] | None = None) -> Fault:
    """Wait for world 3 with a commit of that generation, `act`, and time the first step at
    world 2 after it."""
    until(lambda: watch.settled_at(3), timeout_s, "world 3 with a commit")
    t0 = time.monotonic()
    act()
    rec = None
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        rec = watch.first_at_world_after(t0, 2)
        if rec is not None:
            break
        if after is not None:
            after(t0)
        time.sleep(0.01)
    if rec is None:
        raise TimeoutError(f"no step at world 2 within {timeout_s:.0f}s")
    last_before = max((s for t, s, g in watch.completed if t <= rec[0] and g != rec[2]),
                      default=0)
    restored = watch.restored.get(rec[2], rec[1] - 1)
    return Fault(recovery_s=rec[0] - t0, lost_steps=max(0, last_before - restored))


def deadline_remover(cluster, node_id: str) -> Callable[[float], None]:
    """Removes the drained node at its deadline (the cloud's reclaim), once."""
    done: list[bool] = []

    def after(t0: float) -> None:
        if not done and time.monotonic() - t0 >= DRAIN_DEADLINE_S:
            done.append(True)
            remove(cluster, node_id)
    return after


def join(cluster, watch: StepWatch, timeout_s: float, replaced: list[str]) -> None:
    """Add a raylet and wait for world 3. A raylet that Ray's GCS declares dead while it starts
    (on this 2-core machine it has marked a fresh raylet dead for missed heartbeats) is replaced
    once, as a cloud replaces an instance that failed to boot, and counted in the JSON."""
    import ray

    for attempt in (1, 2):
        node = cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
        try:
            until(lambda: watch.world_now() == 3, timeout_s / 2 if attempt == 1 else timeout_s,
                  "world 3 after the join")
            return
        except TimeoutError:
            alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
            if attempt == 2 or alive.get(node.node_id, True):
                raise
            replaced.append(node.node_id)
            print(f"  Ray declared the added raylet {node.node_id[:8]} dead; adding another",
                  flush=True)


def cycle(cluster, watch: StepWatch, node_of_rank2: Callable[[], str], repeats: int,
          timeout_s: float) -> Runs:
    runs = Runs(removals=[], drains=[], replaced_joins=[])
    for i in range(repeats):
        victim = node_of_rank2()
        runs.removals.append(fault(watch, lambda v=victim: remove(cluster, v),
                                   timeout_s=timeout_s))
        print(f"  removal {i + 1}: {runs.removals[-1]}", flush=True)
        join(cluster, watch, timeout_s, runs.replaced_joins)
        victim = node_of_rank2()
        runs.drains.append(fault(watch, lambda v=victim: drain(cluster, v), timeout_s=timeout_s,
                                 after=deadline_remover(cluster, victim)))
        print(f"  drain {i + 1}: {runs.drains[-1]}", flush=True)
        remove(cluster, victim)
        if i + 1 < repeats:
            join(cluster, watch, timeout_s, runs.replaced_joins)
    return runs


# ---- spotwise -------------------------------------------------------------------------------

def bench_spotwise(work: Path, args: argparse.Namespace) -> Runs:
    from spotwise.client import Client
    from spotwise.cloud.ray import RayProvider
    from spotwise.config import DaemonConfig
    from spotwise.daemon.server import DaemonThread

    cluster = start_cluster(None)
    watch = StepWatch(work / "loss.log", work / "ledger.jsonl")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=work / "state", provider="ray",
                          grace_s=5.0, fleet_interval_s=1.0,
                          ray={"resource": RESOURCE, "namespace": namespace,
                               "work_dir": str(work / "nodes")})
    d = DaemonThread(config, provider=RayProvider(config.ray.ray_config(grace_s=5.0)),
                     timeout_s=60).start()
    client = Client(d.address, timeout=10)
    try:
        job_id = client.submit({
            "name": "bench-ray-recovery",
            "entrypoint": ["python", "tests/workloads/tiny_train.py", "--steps", str(args.steps),
                           "--global-batch-size", str(GLOBAL_BATCH), "--micro-batch-size", "2",
                           "--dataset-size", "100000", "--step-sleep", str(args.step_sleep),
                           "--ledger", str(watch.ledger), "--loss-log", str(watch.loss_log)],
            "working_dir": str(REPO), "nodes": {"min": 1, "max": 3}, "nproc_per_node": 1,
            "checkpoint": {"uri": str(work / "ck"), "every_steps": args.every, "keep": 3},
            "global_batch_size": GLOBAL_BATCH, "max_failures": 100,
        })
        watch.start()

        def node_of_rank2() -> str:
            job = until(lambda: (j := client.get(job_id)).world_size == 3 and j, args.timeout_s,
                        "world 3")
            return job.provider_nodes[2]

        runs = cycle(cluster, watch, node_of_rank2, args.repeats, args.timeout_s)
        client.cancel(job_id)
        return runs
    finally:
        watch.stop()
        client.close()
        d.daemon.provider.shutdown()  # type: ignore[union-attr]
        d.stop()
        stop_cluster(cluster)


# ---- Ray Train ------------------------------------------------------------------------------

def bench_ray_train(work: Path, args: argparse.Namespace, *, tuned: bool) -> Runs:
    from ray_train_baseline import RayTrainRun  # bench/, beside this script

    cluster = start_cluster(TUNED_SYSTEM_CONFIG if tuned else None)
    try:
        run = RayTrainRun(work=work, repo=REPO, steps=args.steps, step_sleep=args.step_sleep,
                          every=args.every,
                          monitor_interval_s=TUNED_MONITOR_INTERVAL_S if tuned else None,
                          resource=RESOURCE)
        watch = StepWatch(run.loss_log, run.ledger)
        watch.start()
        run.start()

        def node_of_rank2() -> str:
            until(lambda: watch.world_now() == 3, args.timeout_s, "world 3")
            return run.node_of_rank(2)

        try:
            return cycle(cluster, watch, node_of_rank2, args.repeats, args.timeout_s)
        finally:
            watch.stop()
            if run.error is not None:
                print(f"  Ray Train's fit() ended: {run.error}", flush=True)
    finally:
        stop_cluster(cluster)


def median(faults: list[Fault], attr: str) -> float:
    return round(statistics.median(getattr(f, attr) for f in faults), 3)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="removals and drains per system")
    p.add_argument("--steps", type=int, default=100_000, help="workload steps (never reached)")
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--skip-ray-train", action="store_true")
    p.add_argument("--skip-spotwise", action="store_true",
                   help="only the Ray Train baselines (the spotwise keys are then null)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray_recovery.json")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (ledger, loss log, checkpoints, the agents' "
                        "logs) and write the daemon's log there (daemon.log)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    prefix = "spotwise-bench-ray-"
    work = (contextlib.nullcontext(tempfile.mkdtemp(prefix=prefix)) if args.keep
            else tempfile.TemporaryDirectory(prefix=prefix))
    with work as tmp:
        if args.keep:
            handler = logging.FileHandler(Path(tmp) / "daemon.log")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s"))
            logging.getLogger("spotwise").addHandler(handler)
            logging.getLogger("spotwise").setLevel(logging.INFO)
            print(f"work directory kept: {tmp}", flush=True)
        sw = None
        if not args.skip_spotwise:
            print("spotwise on Ray", flush=True)
            sw = bench_spotwise(Path(tmp) / "spotwise", args)
        rt: Runs | None = None
        rt_tuned: Runs | None = None
        if not args.skip_ray_train:
            print("Ray Train v2, Ray's defaults", flush=True)
            rt = bench_ray_train(Path(tmp) / "ray-train", args, tuned=False)
            print("Ray Train v2, tuned", flush=True)
            rt_tuned = bench_ray_train(Path(tmp) / "ray-train-tuned", args, tuned=True)

    def med(runs: Runs | None, kind: str, attr: str = "recovery_s") -> float | None:
        return median(getattr(runs, kind), attr) if runs is not None else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    sw_removal = med(sw, "removals")
    result = {
        "spotwise_removal_s": sw_removal,
        "ray_train_removal_s": med(rt, "removals"),
        "ray_train_tuned_removal_s": med(rt_tuned, "removals"),
        "ratio": ratio(sw_removal, med(rt, "removals")),
        "ratio_tuned": ratio(sw_removal, med(rt_tuned, "removals")),
        "spotwise_drain_s": med(sw, "drains"),
        "ray_train_drain_s": med(rt, "drains"),
        "drain_lost_steps": max(f.lost_steps for f in sw.drains) if sw is not None else None,
        "spotwise_removal_lost_steps": med(sw, "removals", "lost_steps"),
        "ray_train_removal_lost_steps": med(rt, "removals", "lost_steps"),
        "ray_train_drain_lost_steps": med(rt, "drains", "lost_steps"),
        "ray_train_tuned_drain_s": med(rt_tuned, "drains"),
        "replaced_joins": {name: len(runs.replaced_joins) for name, runs in
                           (("spotwise", sw), ("ray_train", rt), ("ray_train_tuned", rt_tuned))
                           if runs is not None},
        "setup": {"ray": "2.60.0", "worker_nodes": 3, "cpus_per_node": 1,
                  "repeats": args.repeats, "step_sleep_s": args.step_sleep,
                  "checkpoint_every": args.every, "drain_deadline_s": DRAIN_DEADLINE_S,
                  "removed": "the raylet of the node running rank 2",
                  "ray_train": "TorchTrainer, ScalingConfig(num_workers=(1, 3)), "
                               "FailureConfig(max_failures=-1)",
                  "ray_train_tuned": {**TUNED_SYSTEM_CONFIG,
                                      "elastic_resize_monitor_interval_s":
                                          TUNED_MONITOR_INTERVAL_S}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        if key != "setup":
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
