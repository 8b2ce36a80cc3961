"""The agent's rendezvous store: one TCPStore port for the agent's life, fresh contents per
generation, and the stamp other nodes wait for.

The rendezvous store. The agent hosts a torch.distributed.TCPStore server for its whole life
and reports its port at Register; when the node is node rank 0 of a generation, that store is
the generation's rendezvous endpoint (torchrun's "agent store", TORCHELASTIC_USE_AGENT_STORE).
torch >= 2.x no longer prefixes the keys of each restart (`_create_c10d_store` says "we create
a new TCPStore for every retry"), so keys of generation g would be read by the processes of
g+1 (gloo would connect to dead peers). The agent therefore replaces its store server with a
fresh one *on the same port* the moment it sees a new generation; the swap also cuts off the
store connections of the old generation's processes. A node of rank > 0 starts its processes
only once node rank 0's store carries the new generation's stamp (`STAMP_KEY`), so that none
of them can rendezvous on the previous generation's store.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from spotwise.worker.agent.backoff import Backoff
from spotwise.worker.agent.store_server import store_server

STAMP_KEY = "spotwise/generation"
"""Key in the agent's store naming the (job, generation) the fresh store was made for."""


class StoreHost:
    """The agent's TCPStore server: one port for the agent's life, fresh contents per generation."""

    def __init__(self, *, address: str = "127.0.0.1", timeout_s: float = 30.0) -> None:
        """`address`: the one the agent advertises; the store listens there only (not on
        every interface, as a plain TCPStore server would)."""
        self.address = address
        self._timeout = timedelta(seconds=timeout_s)
        self._store = self._make(0)
        self.port: int = self._store.port

    def _make(self, port: int) -> Any:
        return store_server(self.address, port, timeout=self._timeout)

    def reset(self, stamp: str, *, attempts: int = 20) -> None:
        """Replace the server by an empty one on the same port, stamped with `stamp`.
        Raises RuntimeError if the port cannot be bound again within `attempts` tries."""
        old = self._store
        self._store = None
        del old  # the only reference: this stops the old server and drops its clients
        backoff = Backoff(initial_s=0.01, max_s=0.2)
        for attempt in range(attempts):
            try:
                self._store = self._make(self.port)
                break
            except (RuntimeError, OSError) as e:  # DistNetworkError, EADDRINUSE: not free yet
                if attempt == attempts - 1:
                    raise RuntimeError(f"cannot rebind store port {self.port}: {e}") from e
                time.sleep(backoff.next())
        self._store.set(STAMP_KEY, stamp)

    def close(self) -> None:
        self._store = None


def stamp_of(job_id: str, generation: int) -> str:
    return f"{job_id}:{generation}"


def wait_for_stamp(host: str, port: int, stamp: str, *, timeout_s: float) -> bool:
    """Block until the store at host:port carries `stamp` (node rank 0 made it fresh for this
    generation); False after `timeout_s`. Each try uses a new short-lived client, because the
    server may be swapped under a connected one."""
    from torch.distributed import TCPStore

    deadline = time.monotonic() + timeout_s
    backoff = Backoff(initial_s=0.05, max_s=0.5)
    while time.monotonic() < deadline:
        try:
            client = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=2))
            if client.check([STAMP_KEY]) and client.get(STAMP_KEY).decode() == stamp:
                return True
        except RuntimeError:
            pass  # store not up, or swapped under us: try again
        time.sleep(backoff.next())
    return False
