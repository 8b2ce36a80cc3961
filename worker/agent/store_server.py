"""A rendezvous TCPStore server that listens on one address only: the one the agent advertises.

`TCPStore(host, port, is_master=True)` ignores `host` and listens on every interface. On a
node with several (a public and a private one, or the fault lab's namespaces) the store must be
reachable exactly where the agent said its peers reach it, and nowhere else: the control plane
is closed by default. So the agent binds the listening socket itself and hands its descriptor to
the store (`master_listen_fd`, supported by both store backends).

SO_REUSEADDR lets `StoreHost.reset` bind the same port again right after the previous server
closed it (its accepted connections may linger in TIME_WAIT).
"""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

from spotwise.worker.agent.netif import resolve_ip

_BACKLOG = 512  # every rank of a large generation connects at once


def listening_socket(address: str, port: int) -> socket.socket:
    """A TCP socket bound to (`address`, `port`) and listening; port 0 picks a free one.
    Raises OSError (EADDRINUSE, EADDRNOTAVAIL: the address is not this host's)."""
    ip = resolve_ip(address)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def store_server(address: str, port: int, *, timeout: timedelta) -> Any:
    """A TCPStore server (multi-tenant, not waiting for workers) listening on `address`:`port`
    only; its `.port` is the bound port. Raises OSError when the address cannot be bound, and
    RuntimeError (torch's DistNetworkError) when the store cannot start on it."""
    from torch.distributed import TCPStore  # torch is heavy; import when an agent starts

    sock = listening_socket(address, port)
    bound = sock.getsockname()[1]
    # The store owns the descriptor from here on and closes it. If the store fails to start
    # we do not close it ourselves: whether torch already did is not documented, and closing
    # a number that was reused meanwhile would break an unrelated descriptor.
    fd = sock.detach()
    return TCPStore(resolve_ip(address), bound, is_master=True, wait_for_workers=False,
                    multi_tenant=True, master_listen_fd=fd, timeout=timeout)
