"""Ray's drains as interruption notices (flow 6 on Ray).

A Ray node is drained through the GCS (DrainNode: `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`, or an autoscaler ahead of a spot
reclaim): Ray stops scheduling onto it and records the deadline after which the node will be
killed. An idle node exits at once; a node with a spotwise agent holds on (the agent holds its
resources) until the agent is removed, which the daemon does once the job has drained.

`RayDrainReader.receive` has the shape of the SQS notice reader's (a bounded long poll that
returns new notices), so the daemon's NoticeLoop drives it: it polls the GCS's drain table
every `poll_s` and returns a notice, keyed by the Ray node id (the agent's instance id), the
first time it sees a node draining. Ray's drain table does not carry the reason; only
preemption-like drains reach a busy node (the raylet refuses an idle-termination drain of a node
that runs something), so every drain of an agent's node is treated as a reclaim.
"""

from __future__ import annotations

import logging
import time

from spotwise.cloud.ray import RayProvider
from spotwise.cloud.sqs_events import CloudNotice

log = logging.getLogger(__name__)

ACTION = "terminate"
"""The notice action of a drain: the node goes away at the deadline, like a spot reclaim."""


class RayDrainReader:
    """Reads new drains from Ray's GCS. Raises ProviderError when the GCS does not answer."""

    def __init__(self, provider: RayProvider, *, poll_s: float = 0.5) -> None:
        self.provider = provider
        self.poll_s = poll_s
        self._seen: dict[str, float] = {}

    def poll_once(self) -> list[CloudNotice]:
        """The drains not reported before (a drain that ended and comes again is new)."""
        drains = self.provider.draining()
        now = time.time()
        new = []
        for node_id, deadline in sorted(drains.items()):
            if node_id in self._seen:
                continue
            self._seen[node_id] = deadline
            log.warning("ray: node %s is draining%s", node_id,
                        f", gone in {deadline - now:.0f}s" if deadline else " (no deadline)")
            new.append(CloudNotice(event_id=f"ray-drain-{node_id}-{int(deadline * 1000)}",
                                   instance_id=node_id, action=ACTION, deadline=deadline,
                                   event_time=now, region=""))
        for node_id in set(self._seen) - set(drains):
            del self._seen[node_id]
        return new

    def receive(self, wait_time_s: float = 10.0) -> list[CloudNotice]:
        """New drains, waiting up to `wait_time_s` for one (a long poll)."""
        deadline = time.monotonic() + wait_time_s
        while True:
            notices = self.poll_once()
            left = deadline - time.monotonic()
            if notices or left <= 0:
                return notices
            time.sleep(min(self.poll_s, left))

