"""A node joining an in-process Coordinator as an agent does."""

from __future__ import annotations

from typing import Any

from spotwise.daemon.coordinator import Coordinator
from spotwise.proto.v1 import agent_pb2


def join(coord: Coordinator, **fields: Any) -> agent_pb2.RegisterResponse:
    """Register (store port 7000 and one slot unless given) and send the first beat right after,
    as an agent does: a node is made READY once it has beaten."""
    resp = coord.register(agent_pb2.RegisterRequest(**{"store_port": 7000, "slots": 1, **fields}))
    coord.heartbeat(agent_pb2.HeartbeatRequest(node_id=resp.node_id, node_secret=resp.node_secret))
    return resp
