"""From an assignment to the processes' launch: the LaunchSpec, and the generation's fence
marker that the agent writes before it stops the old generation."""

from __future__ import annotations

import asyncio
import logging
import os

from spotwise.proto.v1 import agent_pb2
from spotwise.worker.agent.supervisor import LaunchSpec
from spotwise.worker.runtime.checkpoint import write_fence
from spotwise.worker.runtime.storage import StorageError, filesystem, job_uri, parse_uri

log = logging.getLogger("spotwise.worker.agent")

EXIT_START_FAILED = 127
"""Exit code reported for a rank whose process could not be started at all."""


def fence_generation(spec: LaunchSpec) -> bool:
    """Create generation `spec.generation`'s fence marker in the job's checkpoint location (the
    runtime's `generations/g-<10 digits>`, see spotwise.worker.runtime.checkpoint), if it is not there.

    The new generation's rank 0 writes it too, but only once its process is up; the agent
    writes it the moment it learns of the generation, before it SIGTERMs the old processes,
    so that their SIGTERM checkpoint (or a late async commit) is fenced instead of landing
    after the daemon chose where the new generation restores from. Returns False when the job
    has no checkpoint location. Raises StorageError/OSError/ValueError when storage fails."""
    uri = spec.checkpoint_uri
    if not uri:
        return False
    if "://" not in uri and not os.path.isabs(os.path.expanduser(uri)) and spec.working_dir:
        uri = os.path.join(spec.working_dir, uri)  # relative to where the processes run
    loc = parse_uri(uri)
    write_fence(filesystem(loc), loc, spec.generation)
    return True


def launch_spec(a: agent_pb2.Assignment) -> LaunchSpec:
    """The LaunchSpec of an assignment (ValueError if it is inconsistent)."""
    spec = a.spec
    ck = spec.checkpoint
    return LaunchSpec(
        job_id=a.job_id, generation=a.generation, entrypoint=tuple(spec.entrypoint),
        working_dir=spec.working_dir, spec_env=dict(spec.env), world_size=a.world_size,
        node_rank=a.node_rank, num_nodes=a.num_nodes, rank_start=a.rank_start,
        nproc=a.nproc or spec.nproc_per_node, master_addr=a.master_addr,
        master_port=a.master_port, restore_step=a.restore_step,
        checkpoint_uri=job_uri(ck.uri, a.job_id) if ck.uri else "",
        checkpoint_every=ck.every_steps, checkpoint_keep=ck.keep,
        global_batch_size=spec.global_batch_size)


async def fence_assignment(a: agent_pb2.Assignment, *, timeout_s: float) -> bool:
    """fence_generation for an assignment, bounded; True when the marker is in place. A
    failure is logged, not fatal (the new generation's rank 0 writes the marker too)."""
    try:
        spec = launch_spec(a)
        return await asyncio.wait_for(asyncio.to_thread(fence_generation, spec), timeout_s)
    except (StorageError, OSError, ValueError, asyncio.TimeoutError) as e:
        log.warning("job %s g%d: cannot write the fence marker: %s", a.job_id, a.generation, e)
        return False


def start_failed(spec: LaunchSpec) -> list[agent_pb2.ProcessStatus]:
    """What the node reports of a generation whose processes could not be started."""
    return [agent_pb2.ProcessStatus(local_rank=i, rank=spec.rank_start + i, pid=0, running=False,
                                    exit_code=EXIT_START_FAILED) for i in range(spec.nproc)]
