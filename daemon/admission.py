"""What the agent protocol admits, as pure rules with their reasons (clock passed in).

- `plan_register`: what a Register does to a node: a new node joins; a known node presenting
  its credential keeps its place when it still runs its assignment (the daemon restarted under
  a running job), stays out while draining, or joins afresh (its job then sees a loss).
- `check_credential`: a node's secret against the stored hash; a node id is taken over by
  nobody else.
- `report_verdict`: whether an agent's report counts: an event of a (job, generation) that is
  not the node's current assignment is stale and changes nothing; a commit counts only from a
  member of the job's newest generation, for a path under the job's checkpoint location; an
  exit only for the node's own ranks.
- `replayed_after_restore`: the lost-step count once a generation says where it restored.

The agent handlers (`daemon.agents`) gather the facts, call these, and carry the verdicts out.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from spotwise.daemon.model import NodeState

SECRET_BYTES = 32
"""A node credential is 256 random bits."""


def new_secret() -> tuple[str, str]:
    """A fresh node credential and the hash the daemon stores of it."""
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return secret, hash_secret(secret)


def hash_secret(secret: str) -> str:
    # 256 random bits: a fast hash suffices (a slow one would cost every heartbeat stream).
    return hashlib.sha256(secret.encode()).hexdigest()


def check_credential(stored_hash: str, presented: str) -> bool:
    """Whether `presented` is the node's credential. A node stored without one (registered
    before credentials existed) cannot be taken over either: it must register anew."""
    if not stored_hash or not presented:
        return False
    return hmac.compare_digest(stored_hash, hash_secret(presented))


class RegisterAction(enum.Enum):
    NEW = "new"
    """An unknown node id (or none): the node joins."""
    KEEP = "keep"
    """The node runs its stored assignment: it keeps it."""
    STAY_OUT = "stay_out"
    """The node is draining: it never gets work again."""
    REJOIN = "rejoin"
    """The node joins afresh; if it was a member, its job sees the loss."""


@dataclass(frozen=True, kw_only=True)
class RegisterDecision:
    action: RegisterAction
    was_member: bool
    reason: str


def plan_register(*, known: bool, state: NodeState | None, assigned_job: str,
                  is_member: bool, running_job: str, running_generation: int
                  ) -> RegisterDecision:
    """What a (credentialed) Register does to the node.

    `assigned_job`/`is_member`: the node's stored job and whether it is a member of that
    job's current generation; `running_job`/`running_generation`: what the agent says it runs.
    """
    if not known:
        return RegisterDecision(action=RegisterAction.NEW, was_member=False, reason="joined")
    member = is_member and state in (NodeState.ASSIGNED, NodeState.DRAINING)
    if member and running_job == assigned_job:
        return RegisterDecision(
            action=RegisterAction.KEEP, was_member=True,
            reason=f"re-registered running generation {running_generation} of {running_job}: kept")
    if state is NodeState.DRAINING:
        return RegisterDecision(action=RegisterAction.STAY_OUT, was_member=member,
                                reason="re-registered while draining: stays out")
    if member:
        return RegisterDecision(
            action=RegisterAction.REJOIN, was_member=True,
            reason=f"re-registered without its processes (runs {running_job or 'nothing'}): "
            "rejoins, its job sees a loss")
    return RegisterDecision(action=RegisterAction.REJOIN, was_member=False,
                            reason="re-registered: joins again")


class Route(enum.Enum):
    REFUSE = "refuse"
    COMMIT = "commit"
    """A checkpoint commit of the job's newest generation."""
    ASSIGNED = "assigned"
    """An event of the node's current assignment (or a notice of a node without one)."""


@dataclass(frozen=True, kw_only=True)
class Verdict:
    route: Route
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ReportFacts:
    """What the daemon knows when a report arrives."""

    node_state: NodeState
    node_job: str
    """The job the node is assigned to ("" for none)."""
    job_generation: int
    """The newest generation of the report's job (0: no such job)."""
    job_members: tuple[str, ...]
    """Members of that generation now (node-rank order; none once the job released them)."""
    generation_members: tuple[str, ...]
    """Who that generation started with (kept after it ended: its commits still count)."""
    job_terminal: bool
    nproc_per_node: int
    checkpoint_root: str
    """The job's checkpoint location (where its commits must be), "" if unknown."""


def report_verdict(node_id: str, kind: str, job_id: str, generation: int, facts: ReportFacts, *,
                   path: str = "", rank: int = -1) -> Verdict:
    """Whether a report of `kind` for (job_id, generation) from `node_id` counts."""
    if kind == "checkpoint_committed" and generation > 0 and generation == facts.job_generation:
        # A commit is fenced by its generation, as in storage: when a job fell back to
        # PENDING its last generation's processes may still commit, and that commit is the
        # right place to restore from. But only a member may report it, and only for a path
        # under the job's own location (a foreign path would be restored by the next one).
        if node_id not in facts.generation_members:
            return Verdict(route=Route.REFUSE,
                           reason=f"node {node_id} is no member of generation {generation}")
        if path and facts.checkpoint_root and not _under(path, facts.checkpoint_root):
            return Verdict(route=Route.REFUSE,
                           reason=f"checkpoint path {path[:200]!r} is outside the job's "
                           f"location {facts.checkpoint_root}")
        return Verdict(route=Route.COMMIT)
    if facts.node_state is NodeState.LOST:
        return Verdict(route=Route.REFUSE, reason=f"node {node_id} was declared LOST")
    assigned = facts.node_job and node_id in facts.job_members and not facts.job_terminal \
        and facts.node_job == job_id
    expected = (facts.node_job, facts.job_generation) if assigned else ("", 0)
    if (job_id, generation) != expected:
        current = f"generation {expected[1]} of {expected[0]}" if expected[0] else "no assignment"
        return Verdict(route=Route.REFUSE,
                       reason=f"stale: event of generation {generation} of {job_id or 'no job'}, "
                       f"node {node_id} has {current}")
    if kind != "interruption_notice" and not expected[0]:
        return Verdict(route=Route.REFUSE, reason=f"{kind} needs an assigned job")
    if kind == "process_exited":
        rank_start = facts.job_members.index(node_id) * facts.nproc_per_node
        if not rank_start <= rank < rank_start + facts.nproc_per_node:
            return Verdict(route=Route.REFUSE,
                           reason=f"rank {rank} is not one of node {node_id}'s ranks "
                           f"{rank_start}..{rank_start + facts.nproc_per_node - 1}")
    return Verdict(route=Route.ASSIGNED)


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/")
    return path == root or path.startswith(root + "/") and "/../" not in path + "/"


def replayed_after_restore(*, step_before: int, restored_step: int, lost_total: int,
                           lost_this_generation: int) -> tuple[int, int]:
    """(lost steps of the job, of this generation) once the generation says it restored
    `restored_step`: the steps between it and where the job was are the ones it replays. The
    daemon counted from the commit it named; a newer restore (a commit whose report died with
    its node) lost fewer, an older one (the named commit was torn) more."""
    lost = max(0, step_before - restored_step) if step_before else 0
    return max(0, lost_total + lost - lost_this_generation), lost
