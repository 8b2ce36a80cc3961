"""`spotwise demo --provider ray`: the demo on a local Ray cluster that it starts itself.

A Ray head and `--nodes` worker raylets (real raylets, `ray.cluster_utils.Cluster`), each
worker marked eligible by the custom resource `spotwise_node`; a `spotwise daemon --provider
ray` subprocess connected to that cluster as a Ray driver, which places one agent actor per
worker raylet; the example language model elastic between 1 and `--nodes` nodes. Once it trains
on every node with a commit, the demo does to the cluster what a spot fleet does to it:

1. drains one member through Ray (GCS DrainNode, reason PREEMPTION, a deadline), as an
   autoscaler does ahead of a reclaim: the job checkpoints and shrinks without losing a step;
2. kills another member's raylet without notice: the job goes on from its last commit;
3. adds a raylet: it gets an agent and the job grows back.

The same live view and summary as the local demo. Everything the demo started (the daemon,
the agents, the raylets) is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live

from spotwise.client import Client, SpotwiseError, is_terminal, state_name
from spotwise.cloud.local import stop_process_group
from spotwise.demo import (
    EXIT_FAILED,
    EXIT_OK,
    Timeline,
    _find_script,
    _render,
    _Result,
    _spec,
    _start_daemon,
    _summary,
    _Watcher,
    observe,
)
from spotwise.live import LiveView

RESOURCE = "spotwise_node"
"""The custom resource that marks the demo's worker raylets eligible."""
DRAIN_DEADLINE_S = 30
"""How far ahead the demo's drain announces the node's end (an EC2 notice gives 120 s)."""


def _daemon_config(path: Path, gcs_address: str, namespace: str, work_dir: Path) -> Path:
    path.write_text(
        "[daemon]\n"
        'provider = "ray"\n'
        "fleet_interval_s = 1.0\n"
        "grace_s = 5.0\n"
        "drain_margin_s = 2.0\n"
        "[daemon.ray]\n"
        f'address = "{gcs_address}"\n'
        f'namespace = "{namespace}"\n'
        f'resource = "{RESOURCE}"\n'
        f'work_dir = "{work_dir}"\n'
        'instance_type = "g4dn.xlarge"\n'
    )
    return path


def _drain(gcs_address: str, node_id: str, deadline_s: int) -> tuple[bool, str]:
    """What `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
    --deadline-remaining-seconds N` sends."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=gcs_address)
    return gcs.drain_node(node_id,
                          autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                          "spotwise demo: spot reclaim", int(time.time() * 1000) + deadline_s * 1000)


def run_ray(args: argparse.Namespace) -> int:
    """Run the Ray demo; 0 when the job SUCCEEDED through the drain, the kill and the join."""
    console = Console()
    try:
        script = _find_script(args.script)
        if not 2 <= args.nodes <= 3:
            raise ValueError("--nodes must be 2 or 3 with --provider ray (one is drained, "
                             "one killed)")
    except ValueError as e:
        console.print(f"spotwise demo: {e}", highlight=False)
        return 2
    # Loopback only (Ray reads this at import): the demo's cluster stays on this machine.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        console.print("spotwise demo: --provider ray needs Ray (pip install 'spotwise[ray]')")
        return 2
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="spotwise-demo-ray-"))).absolute()
    if args.state_dir is not None and state_dir.exists():
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    plain = args.plain or not console.is_terminal
    timeline = Timeline(plain=plain, console=console)
    wall0 = time.monotonic()
    console.print(f"spotwise demo (Ray): state, logs and checkpoints in {state_dir}")

    cluster = None
    daemon = None
    client: Client | None = None
    live: Live | None = None
    result = _Result()
    try:
        try:
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": 1, "include_dashboard": False})
            for _ in range(args.nodes):
                cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
        except Exception as e:  # Ray raises bare Exceptions for a raylet that does not start
            raise RuntimeError(f"the local Ray cluster did not start: {e}") from e
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, namespace="spotwise-demo-driver", log_to_driver=False)
        timeline.add(f"Ray cluster at {cluster.address}: a head and {args.nodes} worker "
                     f"raylets with {RESOURCE}=1")
        config = _daemon_config(state_dir / "daemon.toml", cluster.gcs_address,
                                f"spotwise-demo-{os.getpid()}", state_dir / "nodes")
        env = dict(os.environ, SPOTWISE_STATE_DIR=str(state_dir))
        daemon, address = _start_daemon(state_dir, state_dir / "daemon.log", env,
                                        provider_args=("--config", str(config)))
        timeline.add(f"daemon (provider ray) serving on {address}")
        client = Client(address, timeout=10)
        job_id = client.submit(_spec(script, args, state_dir / "checkpoints"))
        timeline.add(f"submitted {script.name} as {job_id}: nodes 1..{args.nodes}, "
                     f"{args.steps} steps")
        view = LiveView(job_id)
        _Watcher(client, job_id, view).start()
        if not plain:
            live = Live(_render(view, timeline, args.steps), console=console,
                        refresh_per_second=4, transient=False)
            live.start()
        result = _drive(client, cluster, job_id, view, timeline, args, live)
    except (RuntimeError, SpotwiseError) as e:
        result.note = str(e)
    finally:
        if live is not None:
            live.stop()
        if client is not None:
            client.close()
        if daemon is not None:
            stop_process_group(daemon)
        _remove_agents(f"spotwise-demo-{os.getpid()}")
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    _summary(console, result, time.monotonic() - wall0)
    ok = result.job is not None and state_name(result.job.state) == "SUCCEEDED"
    return EXIT_OK if ok else EXIT_FAILED


def _remove_agents(namespace: str) -> None:
    """Kill the daemon's agent actors (the daemon leaves them for a restart to adopt)."""
    import ray

    if not ray.is_initialized():
        return
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == namespace:
            try:
                ray.kill(ray.get_actor(a["name"], namespace=namespace))
            except ValueError:
                pass  # gone meanwhile


def _drive(client: Client, cluster, job_id: str, view: LiveView, timeline: Timeline,
           args: argparse.Namespace, live: Live | None) -> _Result:
    """Poll the job; drain, kill and add raylets in turn, each once the previous one's effect
    shows; until the job ends."""
    result = _Result()
    deadline = time.monotonic() + args.timeout_s
    phase, t_phase, gen_phase, last_gen = "wait", 0.0, 0, 0
    target = ""
    while time.monotonic() < deadline:
        job = observe(client, job_id, view, timeline, last_gen)
        if job is None:
            continue
        last_gen = job.generation
        now = time.monotonic()
        running = state_name(job.state) == "RUNNING"
        members = list(job.provider_nodes)
        if phase == "wait" and running and job.world_size == args.nodes \
                and job.last_checkpoint_step > 0:
            target = members[-1]
            accepted, why = _drain(cluster.gcs_address, target, DRAIN_DEADLINE_S)
            timeline.add(f"drained raylet {target[:8]} through Ray (PREEMPTION, gone in "
                         f"{DRAIN_DEADLINE_S}s): " + ("accepted" if accepted else why))
            result.noticed += 1
            phase, t_phase, gen_phase = "drain", now, job.generation
        elif phase == "drain" and job.generation > gen_phase and running:
            timeline.add(f"drained {target[:8]} {now - t_phase:.1f}s after Ray's drain: world "
                         f"{job.world_size} from step {job.last_checkpoint_step}, lost steps "
                         f"{job.lost_steps}")
            result.drains.append(f"{now - t_phase:.1f}s")
            result.killed_with_notice += 1
            phase = "drained"
        elif phase == "drained" and running and job.step > job.last_checkpoint_step \
                and len(members) >= 2:
            target = members[-1]
            node = next((n for n in cluster.worker_nodes if n.node_id == target), None)
            if node is not None:
                cluster.remove_node(node, allow_graceful=False)
                timeline.add(f"killed raylet {target[:8]} without notice")
                result.killed_without_notice += 1
                phase, t_phase, gen_phase = "kill", now, job.generation
        elif phase == "kill" and job.generation > gen_phase and running \
                and job.step > job.last_checkpoint_step:
            timeline.add(f"training again at world {job.world_size} {now - t_phase:.1f}s after "
                         f"the kill (from the last commit, lost steps {job.lost_steps})")
            result.recoveries.append(f"{now - t_phase:.1f}s")
            cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
            timeline.add("a new raylet joined the cluster")
            result.added += 1
            phase, t_phase, gen_phase = "add", time.monotonic(), job.generation
            size_before = job.world_size
        elif phase == "add" and job.world_size > size_before:
            timeline.add(f"back at world {job.world_size} {now - t_phase:.1f}s after the new "
                         "raylet came")
            result.regrows.append(f"{now - t_phase:.1f}s")
            phase = "done"
        if live is not None:
            live.update(_render(view, timeline, args.steps))
        if is_terminal(job.state):
            result.job = job
            timeline.add(f"job {state_name(job.state)}: {job.message}")
            if phase != "done":
                timeline.add("the job finished before the demo's faults were all done")
            if live is not None:
                live.update(_render(view, timeline, args.steps))
            return result
        time.sleep(0.25)
    result.note = f"gave up after {args.timeout_s:.0f}s"
    try:
        result.job = client.cancel(job_id)
    except SpotwiseError:
        pass
    return result
