"""host:port addresses: the one parser (daemon listen and advertise addresses, the agent's
daemon address, metrics endpoints, launched agents' user data) and the loopback rule."""

from __future__ import annotations

import ipaddress


def split_host_port(address: str) -> tuple[str, int]:
    """("::1", 7450) for "[::1]:7450"; ("", 7450) for ":7450". ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {address!r} must be host:port (port 0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"address {address!r}: write IPv6 hosts in brackets, e.g. [::1]:7450")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IP literals; False for wildcards and other names.

    Host names other than localhost are not resolved (this is a pure check) and so count as
    beyond loopback.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(mapped is not None and mapped.is_loopback)


def check_host_port(value: str, what: str = "address") -> str:
    """`value` if it is host:port with a host, else ValueError naming `what`."""
    try:
        host, _ = split_host_port(value)
    except ValueError:
        raise ValueError(f"{what} must be host:port, got {value!r}") from None
    if not host:
        raise ValueError(f"{what} must be host:port, got {value!r}")
    return value
