"""A multi-host fault lab on one Linux machine: each simulated host is a network namespace.

    with Lab(["head", "w1", "w2"]) as lab:
        head = lab.hosts["head"]
        p = head.popen([sys.executable, "-m", "spotwise.cli", "daemon", ...])
        lab.hosts["w1"].cut_from(head)      # w1 reaches its peers, not the head
        lab.hosts["w2"].pause(5.0)          # SIGSTOP every process of w2, SIGCONT after 5 s

Every host gets a veth pair: one end, renamed eth0, inside its namespace with an address on a
private /24; the other end on a bridge that the lab creates, which also carries the .1 address
so that the test driver (in the root namespace) reaches every host. Rendezvous, gloo and S3
traffic between hosts therefore crosses real interfaces, and faults are what the kernel does:

- `kill9(pid)`: a process death; `Host.processes()` finds a host's processes (agent, ranks);
- `Host.pause(s)`: SIGSTOP of every process in the namespace, SIGCONT after `s` seconds;
- `Host.link_down()` / `link_up()`: the host cut off from everything;
- `Host.cut_from(other)` / `heal()`: iptables DROP rules inside the namespace, both ways, so the
  host loses `other` (e.g. the head) while every other peer still reaches it;
- `Host.limit_bandwidth(dest, port, rate)`: an htb class with a tbf leaf on the host's egress,
  for traffic to dest:port only (a slow link to S3; this kernel has tbf but not netem);
- S3 errors are `spotwise.cloud.s3_faults`, a proxy in front of moto.

Names are unique per run (a random 4-hex tag: namespaces `swl<tag>-<host>`, bridge
`swl<tag>br`), and the subnet is picked among 10.213.0.0/16's /24s not in use on this machine.
Everything the lab creates is removed by `close()`: on leaving the `with`, at interpreter exit
(atexit) and when the object is collected (weakref.finalize), whichever comes first, even when
a test fails. Every command runs with a timeout. Needs root, `ip`, `iptables` and `tc`
(`make setup-lab` installs them).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_CMD_TIMEOUT_S = 20.0
TOOLS = ("ip", "iptables", "tc")
"""Commands the lab runs (from the iproute2 and iptables OS packages)."""


class LabError(RuntimeError):
    """A lab command failed (the message has the command and its stderr)."""


def missing_tools() -> list[str]:
    """The lab's commands that are not on PATH."""
    return [t for t in TOOLS if shutil.which(t) is None]


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one setup command, bounded; raises LabError when it fails (and check is set)."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{' '.join(argv)} timed out after {_CMD_TIMEOUT_S}s") from exc
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = run(["ip", "-o", "-4", "addr", "show"]).stdout
    nets = set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] == "inet":
            nets.add(ipaddress.ip_interface(parts[3]).network)
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_subnets()
    for _ in range(64):
        net = ipaddress.ip_network(f"10.213.{secrets.randbelow(254) + 1}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise LabError("no free /24 in 10.213.0.0/16 on this machine")


@dataclass
class Host:
    """One simulated host: a network namespace with one interface (eth0) on the lab bridge."""

    name: str
    """The host's name in the lab (e.g. "head")."""
    ns: str
    """Its network namespace."""
    address: str
    """Its address on the bridge."""
    veth: str
    """The root-namespace end of its veth pair (on the bridge)."""
    lab: Lab = field(repr=False)
    """The lab it belongs to."""
    _paused: bool = field(default=False, repr=False)
    _timers: list[threading.Timer] = field(default_factory=list, repr=False)

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the host (bounded)."""
        return run(self.exec_argv(argv), check=check)

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, log_path: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process on the host, in a session of its own, output to
        `log_path` (or discarded). The lab kills it, and everything else on the host, at close."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            return subprocess.Popen(self.exec_argv(argv), env=dict(env) if env is not None else None,
                                    cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if log_path:
                out.close()

    def pids(self) -> list[int]:
        """Every process in the host's namespace."""
        res = run(["ip", "netns", "pids", self.ns], check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def processes(self, contains: str = "") -> dict[int, str]:
        """pid -> command line of the host's processes whose command line contains `contains`."""
        found = {}
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if contains in cmd:
                found[pid] = cmd
        return found

    # ----- faults

    def signal_all(self, sig: int) -> int:
        """Send `sig` to every process on the host; returns how many got it."""
        n = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                n += 1
            except ProcessLookupError:
                pass
        return n

    def pause(self, seconds: float) -> threading.Timer:
        """SIGSTOP the whole host now; SIGCONT after `seconds` (from a timer thread; `resume`
        or the lab's close does it earlier). Returns the timer."""
        self.signal_all(signal.SIGSTOP)
        self._paused = True
        timer = threading.Timer(seconds, self.resume)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer

    def resume(self) -> None:
        """SIGCONT every process on the host (idempotent)."""
        if self._paused:
            self._paused = False
            self.signal_all(signal.SIGCONT)

    def link_down(self) -> None:
        """Cut the host off from everything (its bridge port goes down)."""
        run(["ip", "link", "set", self.veth, "down"])

    def link_up(self) -> None:
        run(["ip", "link", "set", self.veth, "up"])

    def cut_from(self, other: Host) -> None:
        """Drop all traffic between this host and `other`, inside this host's namespace; every
        other host still reaches both."""
        for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
            self.run(["iptables", "-w", "5", "-A", chain, flag, other.address, "-j", "DROP"])

    def heal(self) -> None:
        """Remove every iptables rule and bandwidth limit of this host."""
        self.run(["iptables", "-w", "5", "-F"])
        self.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)

    def limit_bandwidth(self, dest: Host | str, port: int, rate: str) -> None:
        """Shape this host's traffic to dest:port (TCP) to `rate` (tc units: "2mbit"); other
        traffic is untouched. One limit per host (heal() removes it)."""
        ip = dest.address if isinstance(dest, Host) else dest
        tc = ["tc"]
        self.run([*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"])
        self.run([*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb",
                  "rate", "10gbit", "quantum", "60000"])
        self.run([*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb",
                  "rate", rate, "ceil", rate])
        self.run([*tc, "qdisc", "add", "dev", "eth0", "parent", "1:20", "handle", "20:", "tbf",
                  "rate", rate, "burst", "32kbit", "latency", "400ms"])
        self.run([*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio",
                  "1", "u32", "match", "ip", "dst", f"{ip}/32", "match", "ip", "dport", str(port),
                  "0xffff", "flowid", "1:20"])


class Lab:
    """Simulated hosts on a private bridge. Use as a context manager; see the module docstring."""

    def __init__(self, names: Sequence[str]) -> None:
        if os.geteuid() != 0:
            raise LabError("the fault lab needs root (network namespaces, iptables, tc)")
        missing = missing_tools()
        if missing:
            raise LabError(f"the fault lab needs {', '.join(missing)}: run `make setup-lab`")
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and non-empty, got {list(names)}")
        self.tag = secrets.token_hex(2)
        self.bridge = f"swl{self.tag}br"
        self.subnet = _free_subnet()
        addrs = list(self.subnet.hosts())
        self.gateway = str(addrs[0])
        self.hosts: dict[str, Host] = {}
        self._created: list[list[str]] = []  # undo commands, newest last
        self._closed = False
        self._finalizer = weakref.finalize(self, Lab._undo, self._created, self.hosts)
        atexit.register(self.close)
        try:
            self._setup(list(names), addrs)
        except BaseException:
            self.close()
            raise

    def _setup(self, names: list[str], addrs: list[ipaddress.IPv4Address]) -> None:
        prefix = self.subnet.prefixlen
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._created.append(["ip", "link", "del", self.bridge])
        run(["ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        for i, name in enumerate(names):
            ns, veth, peer = f"swl{self.tag}-{name}"[:40], f"swl{self.tag}v{i}", f"swl{self.tag}p{i}"
            run(["ip", "netns", "add", ns])
            self._created.append(["ip", "netns", "del", ns])
            run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
            self._created.append(["ip", "link", "del", veth])
            run(["ip", "link", "set", peer, "netns", ns])
            run(["ip", "link", "set", veth, "master", self.bridge])
            run(["ip", "link", "set", veth, "up"])
            address = str(addrs[i + 1])
            host = Host(name=name, ns=ns, address=address, veth=veth, lab=self)
            host.run(["ip", "link", "set", peer, "name", "eth0"])
            host.run(["ip", "addr", "add", f"{address}/{prefix}", "dev", "eth0"])
            host.run(["ip", "link", "set", "eth0", "up"])
            host.run(["ip", "link", "set", "lo", "up"])
            self.hosts[name] = host
        log.info("lab %s: bridge %s %s, hosts %s", self.tag, self.bridge, self.subnet,
                 {h.name: h.address for h in self.hosts.values()})

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Resume and kill every process on every host, then remove what the lab created."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._finalizer.detach()
        Lab._undo(self._created, self.hosts)

    @staticmethod
    def _undo(created: list[list[str]], hosts: dict[str, Host]) -> None:
        for host in hosts.values():
            for t in host._timers:
                t.cancel()
            # A stopped process does not die of SIGKILL until it runs; CONT first.
            host.signal_all(signal.SIGCONT)
            host.signal_all(signal.SIGKILL)
        for argv in reversed(created):
            res = run(argv, check=False)
            if res.returncode != 0 and "Cannot find" not in res.stderr and "No such" not in res.stderr:
                log.warning("lab cleanup: %s: %s", " ".join(argv), res.stderr.strip())
        created.clear()


def kill9(pid: int) -> bool:
    """SIGKILL one process (an agent, a rank, the daemon); False when it was gone already."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def lab_resources(tag: str) -> list[str]:
    """Namespaces and links on this machine whose names carry the lab tag (empty after close)."""
    names = run(["ip", "netns", "list"]).stdout.split()
    links = run(["ip", "-o", "link", "show"]).stdout
    found = [n for n in names if n.startswith(f"swl{tag}")]
    found += [w.rstrip(":").split("@")[0] for w in links.split() if w.startswith(f"swl{tag}")]
    return found
