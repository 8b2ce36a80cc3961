"""Conversions between the daemon's records and the wire (spotwise.v1 messages).

`job_proto` is the one place a Job message is built: with its spec for GetJob and ListJobs
(env values redacted: they may hold a user's secrets, and only the job's nodes need them), and
without it for the figures an event carries. `assignments_for` builds what each member of a
job runs; `AssignmentCache` holds the committed ones and answers heartbeats in O(1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from spotwise.daemon import controller
from spotwise.daemon.model import JobState, NodeView
from spotwise.daemon.state import JobRecord, NodeRecord
from spotwise.daemon.store import EventRow
from spotwise.proto.v1 import agent_pb2, jobs_pb2

REDACTED = "<redacted>"
"""What JobService answers show instead of an env value."""


def job_state_proto(state: JobState) -> int:
    return jobs_pb2.JobState.Value(f"JOB_STATE_{state.value}")


def job_state_from_proto(value: int) -> JobState:
    return JobState(jobs_pb2.JobState.Name(value).removeprefix("JOB_STATE_"))


def redacted_spec(spec: jobs_pb2.JobSpec) -> jobs_pb2.JobSpec:
    """The spec with every env value replaced (the keys stay, so a user can see what is set)."""
    if not spec.env:
        return spec
    out = jobs_pb2.JobSpec()
    out.CopyFrom(spec)
    for key in out.env:
        out.env[key] = REDACTED
    return out


def job_proto(job: JobRecord, nodes: Mapping[str, NodeRecord], *, with_spec: bool = True
              ) -> jobs_pb2.Job:
    """The job as JobService shows it (spec with env redacted), or its figures alone."""
    r = job.row
    out = jobs_pb2.Job(
        id=r.id,
        state=job_state_proto(job.state),
        generation=r.generation,
        world_size=r.world_size,
        step=r.step,
        last_checkpoint_step=max(r.last_checkpoint_step, 0),
        last_checkpoint_path=r.last_checkpoint_path,
        samples_per_second=r.samples_per_second,
        loss=r.loss,
        cost_usd=r.cost_usd,
        message=r.message,
        created_at=r.created_at,
        updated_at=r.updated_at,
        node_ids=list(job.members),
        lost_steps=r.lost_steps,
        provider_nodes=[nodes[m].row.provider_node if m in nodes else "" for m in job.members],
        owner=r.owner,
        last_checkpoint_at=r.last_checkpoint_at,
        checkpoint_failures=r.checkpoint_failures,
        last_checkpoint_error=r.last_checkpoint_error,
        on_demand_usd=r.on_demand_usd,
    )
    if with_spec:
        out.spec.CopyFrom(redacted_spec(job.spec))
    return out


def event_proto(row: EventRow) -> jobs_pb2.JobEvent:
    job = jobs_pb2.Job.FromString(row.job) if row.job else jobs_pb2.Job(id=row.job_id)
    return jobs_pb2.JobEvent(job_id=row.job_id, time=row.time, kind=row.kind,
                             generation=row.generation, message=row.message, job=job)


def assignments_for(job: JobRecord, nodes: Mapping[str, NodeRecord], *,
                    checkpoint_now: bool) -> dict[str, agent_pb2.Assignment]:
    """What each member of the job's current generation runs (O(members), once per change)."""
    if job.state.terminal or not job.members or job.members[0] not in nodes:
        return {}
    nproc = job.spec.nproc_per_node
    master = nodes[job.members[0]].row
    out = {}
    for rank, node_id in enumerate(job.members):
        out[node_id] = agent_pb2.Assignment(
            job_id=job.row.id,
            generation=job.row.generation,
            spec=job.spec,
            world_size=len(job.members) * nproc,
            node_rank=rank,
            num_nodes=len(job.members),
            rank_start=rank * nproc,
            nproc=nproc,
            master_addr=master.address,
            master_port=master.store_port,
            restore_step=job.restore_step,
            checkpoint_now=checkpoint_now,
            lost_steps=job.row.lost_steps,
            cost_usd=job.row.cost_usd,
            reason=job.generation_reason,
        )
    return out


def compute_assignments(jobs: Mapping[str, JobRecord], nodes: Mapping[str, NodeRecord],
                        member_views: Callable[[JobRecord], Mapping[str, NodeView]],
                        job_ids: set[str], node_ids: set[str]) -> dict[str, agent_pb2.Assignment]:
    """New assignments for every member of `job_ids` and for each of `node_ids`: an empty
    Assignment (run nothing) for a node that is no member of a live job."""
    targets = set(node_ids)
    for job_id in job_ids:
        if job_id in jobs:
            targets.update(jobs[job_id].members)
    by_node: dict[str, agent_pb2.Assignment] = {}
    for job_id in {nodes[n].row.job_id for n in targets if n in nodes} | set(job_ids):
        job = jobs.get(job_id)
        if job is not None:
            drain = controller.checkpoint_now(job.view(), member_views(job))
            by_node.update(assignments_for(job, nodes, checkpoint_now=drain))
    empty = agent_pb2.Assignment()
    return {n: by_node.get(n, empty) for n in targets}


class AssignmentCache:
    """The committed assignment of every node, with a version that changes with it.

    Versions start at the daemon's start time in microseconds, so that an agent holding a
    version from an earlier daemon process never matches a new one by accident.
    """

    def __init__(self) -> None:
        self._next = int(time.time() * 1e6)
        self._by_node: dict[str, tuple[int, agent_pb2.Assignment]] = {}
        self._empty = agent_pb2.Assignment()
        self.on_change: Callable[[list[str]], None] | None = None
        """Called with the nodes whose assignment changed (the beat channel pushes them)."""

    def install(self, assignments: Mapping[str, agent_pb2.Assignment]) -> list[str]:
        """Take in committed assignments; the nodes whose assignment changed."""
        changed = []
        for node_id, a in assignments.items():
            old = self._by_node.get(node_id)
            if old is not None and old[1] == a:
                continue
            self._next += 1
            self._by_node[node_id] = (self._next, a)
            changed.append(node_id)
        if changed and self.on_change is not None:
            self.on_change(changed)
        return changed

    def get(self, node_id: str) -> tuple[int, agent_pb2.Assignment]:
        return self._by_node.get(node_id, (0, self._empty))

    def answer(self, node_id: str, held_version: int) -> agent_pb2.HeartbeatResponse:
        """The heartbeat answer: the version, and the assignment when the agent's differs."""
        version, a = self.get(node_id)
        if held_version == version:
            return agent_pb2.HeartbeatResponse(assignment_version=version)
        return agent_pb2.HeartbeatResponse(assignment_version=version, assignment=a)
