"""Which network interface carries the address a node advertises.

gloo and NCCL pick the interface they bind and advertise from the hostname (gloo) or a
heuristic (NCCL). In many containers, and with Ubuntu's default /etc/hosts, the hostname
resolves to 127.0.0.1: ranks on other hosts are then told to dial 127.0.0.1 and never connect.
The agent knows the address its peers reach it on (`AgentConfig.address`), so it pins both
libraries to the interface that carries it (`GLOO_SOCKET_IFNAME`, `NCCL_SOCKET_IFNAME`).

The lookup asks the kernel for each interface's IPv4 address (ioctl SIOCGIFADDR, no extra
package), then, for addresses that ioctl does not report (IPv6, secondary IPv4 addresses),
reads `ip -o addr show`. Both are bounded: the ioctls are local calls, `ip` runs with a timeout.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import shutil
import socket
import struct
import subprocess

log = logging.getLogger(__name__)

_SIOCGIFADDR = 0x8915  # linux/sockios.h
_IP_TIMEOUT_S = 5.0


class InterfaceNotFound(LookupError):
    """No local interface carries the address (it is not this host's, or it is a name that
    does not resolve)."""


def resolve_ip(host: str) -> str:
    """`host` as an IP address string: an address is returned as is (normalized), a name is
    resolved. Raises InterfaceNotFound when a name does not resolve."""
    host = host.strip().strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InterfaceNotFound(f"address {host!r} does not resolve: {exc}") from exc
    # Prefer IPv4: gloo's and the TCPStore's defaults are IPv4 on the hosts we run on.
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return str(ipaddress.ip_address(infos[0][4][0]))


def ipv4_addresses() -> dict[str, str]:
    """Each interface's primary IPv4 address, by interface name (interfaces without one are
    left out)."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            req = struct.pack("256s", name.encode()[:15])
            try:
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)
            except OSError:  # EADDRNOTAVAIL: the interface has no IPv4 address
                continue
            out[name] = socket.inet_ntoa(res[20:24])
    return out


def _ip_command_addresses() -> list[tuple[str, str]]:
    """(interface, address) for every address `ip -o addr show` lists; [] without `ip`."""
    ip = shutil.which("ip")
    if ip is None:
        return []
    try:
        text = subprocess.run([ip, "-o", "addr", "show"], capture_output=True, text=True,
                              timeout=_IP_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot list addresses with %s: %s", ip, exc)
        return []
    pairs = []
    for line in text.splitlines():
        # "2: eth0    inet 10.0.0.5/24 brd ... scope global eth0\       valid_lft ..."
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("inet", "inet6"):
            name = parts[1].split("@", 1)[0]
            pairs.append((name, parts[3].split("/", 1)[0]))
    return pairs


def interface_for(host: str) -> str:
    """The name of the local interface that carries `host` (an address or a name that resolves
    to one). Raises InterfaceNotFound when no interface of this host has it."""
    ip = resolve_ip(host)
    for name, addr in ipv4_addresses().items():
        if addr == ip:
            return name
    for name, addr in _ip_command_addresses():
        try:
            if str(ipaddress.ip_address(addr)) == ip:
                return name
        except ValueError:
            continue
    raise InterfaceNotFound(f"no interface of this host carries {ip}"
                            + (f" (the address of {host!r})" if ip != host else ""))


def socket_env(host: str) -> dict[str, str]:
    """The environment that binds gloo and NCCL to the interface carrying `host`; raises
    InterfaceNotFound (see `interface_for`)."""
    name = interface_for(host)
    return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}
