"""The instance metadata service (IMDSv2) from the agent's side: the node's identity at start,
and the spot interruption and rebalance notices it polls for (flow 6)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from spotwise.config import AgentConfig
from spotwise.worker.agent.metrics import AgentMetrics

log = logging.getLogger("spotwise.worker.agent")


def imds_client(config: AgentConfig) -> Any:
    from spotwise.cloud.imds import ImdsClient, ImdsConfig

    interval = min(max(config.imds_poll_s, 1.0), 5.0)
    return ImdsClient(ImdsConfig(endpoint=config.imds_endpoint, poll_interval_s=interval))


async def identity_from_imds(config: AgentConfig) -> AgentConfig:
    """`config` with instance id, type, zone and lifecycle that it leaves empty filled from
    IMDS (when an endpoint is configured); a metadata service that does not answer is logged
    and the fields stay empty."""
    if not config.imds_endpoint:
        return config
    from spotwise.cloud.imds import ImdsError

    client = imds_client(config)
    wanted = {"instance_id": "instance-id", "instance_type": "instance-type",
              "zone": "placement/availability-zone", "lifecycle": "instance-life-cycle"}
    found: dict[str, str] = {}
    for attr, name in wanted.items():
        if getattr(config, attr) and attr != "lifecycle":
            continue
        try:
            value = await asyncio.wait_for(asyncio.to_thread(client.metadata, name), 10)
        except (ImdsError, asyncio.TimeoutError) as e:
            log.warning("agent: cannot read %s from IMDS %s: %s", name, config.imds_endpoint, e)
            return config
        if value:
            found[attr] = value.strip()
    if found.get("lifecycle") not in ("spot", "on-demand"):
        # IMDS says "spot" or "on-demand" (older instances: "scheduled"); keep the config's.
        found.pop("lifecycle", None)
    if not found:
        return config
    log.info("agent: identity from IMDS: %s", found)
    return config.model_copy(update=found)


async def notice_loop(config: AgentConfig, metrics: AgentMetrics, *,
                      stopped: Callable[[], bool], sleep: Callable[[float], Awaitable[None]],
                      on_notice: Callable[[Any], None]) -> None:
    """Poll IMDS for notices until `stopped()`; `on_notice(n)` once per notice."""
    from spotwise.cloud.imds import NoticePoller

    client = imds_client(config)
    poller = NoticePoller(client)
    interval = client.config.poll_interval_s
    while not stopped():
        t0 = time.monotonic()
        errors = poller.errors
        try:
            # Two HTTP calls of at most timeout_s each (plus a token refresh).
            notices = await asyncio.wait_for(asyncio.to_thread(poller.poll_once),
                                             timeout=6 * client.config.timeout_s)
        except asyncio.TimeoutError:
            notices = []
            metrics.imds_errors.inc()
        metrics.imds_errors.inc(max(0, poller.errors - errors))
        for n in notices:
            metrics.notices.labels(n.action).inc()
            on_notice(n)
        await sleep(max(0.0, interval - (time.monotonic() - t0)))
