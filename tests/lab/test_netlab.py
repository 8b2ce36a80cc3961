"""The lab's fault primitives on real namespaces: who reaches whom after each fault, pauses
that stop and resume a host, a bandwidth limit that slows one destination only, and cleanup
that leaves nothing behind even when the test body raises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spotwise.cloud.netlab import Host, Lab, kill9, lab_resources
from tests.support.wait import until

_SERVE = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
while True:
    c, _ = s.accept()
    while c.recv(1 << 16):
        pass
    c.close()
"""
_REACH = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5).close()"
_SEND = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
data = b"x" * 65536; t0 = time.monotonic(); sent = 0
while sent < int(sys.argv[3]):
    c.sendall(data); sent += len(data)
c.shutdown(socket.SHUT_WR); c.recv(1)
print(time.monotonic() - t0)
"""
PORTS = (7001, 7002)  # inside private namespaces: no other process on this machine can hold them


def reaches(src: Host, dst: Host, port: int = PORTS[0]) -> bool:
    return src.run([sys.executable, "-c", _REACH, dst.address, str(port)], check=False).returncode == 0


@pytest.fixture
def lab(tmp_path: Path):
    with Lab(["head", "w1", "w2"]) as lab:
        for h in lab.hosts.values():
            for port in PORTS:
                h.popen([sys.executable, "-c", _SERVE, h.address, str(port)])
        for h in lab.hosts.values():
            until(lambda h=h: reaches(h, h), 30, f"{h.name}'s server")
        yield lab


def test_every_host_reaches_every_other(lab: Lab) -> None:
    hosts = list(lab.hosts.values())
    assert len({h.address for h in hosts}) == 3
    assert all(reaches(a, b) for a in hosts for b in hosts)


def test_link_down_cuts_a_host_off_from_everything(lab: Lab) -> None:
    head, w1, w2 = lab.hosts.values()
    w1.link_down()
    assert not reaches(w1, head) and not reaches(w2, w1) and not reaches(head, w1)
    assert reaches(w2, head)
    w1.link_up()
    until(lambda: reaches(w1, head) and reaches(w2, w1), 10, "w1 back")


def test_cut_from_head_only_keeps_peers(lab: Lab) -> None:
    head, w1, w2 = lab.hosts.values()
    w1.cut_from(head)
    assert not reaches(w1, head) and not reaches(head, w1)
    assert reaches(w1, w2) and reaches(w2, w1) and reaches(w2, head)
    w1.heal()
    assert reaches(w1, head)


def test_two_workers_cut_from_each_other(lab: Lab) -> None:
    head, w1, w2 = lab.hosts.values()
    w1.cut_from(w2)
    assert not reaches(w1, w2) and not reaches(w2, w1)
    assert reaches(w1, head) and reaches(w2, head)


def test_pause_stops_a_whole_host_then_resumes_it(lab: Lab) -> None:
    head, w1, _w2 = lab.hosts.values()
    pids = w1.pids()
    assert pids
    w1.pause(2.0)

    def state(pid: int) -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    until(lambda: all(state(p) == "T" for p in pids), 5, "every process of w1 stopped")
    # A stopped server's kernel still accepts (backlog), but nothing on the host runs.
    until(lambda: all(state(p) != "T" for p in pids), 10, "SIGCONT after the pause")
    assert reaches(head, w1)


def test_bandwidth_limit_slows_only_its_destination(lab: Lab) -> None:
    head, w1, _w2 = lab.hosts.values()
    size = 2 * 1024 * 1024

    def seconds(port: int) -> float:
        out = w1.run([sys.executable, "-c", _SEND, head.address, str(port), str(size)]).stdout
        return float(out.strip())

    fast = seconds(PORTS[0])
    w1.limit_bandwidth(head, PORTS[0], "4mbit")  # 2 MiB at 4 Mbit/s: about 4 s
    slow = seconds(PORTS[0])
    other = seconds(PORTS[1])
    assert slow > 2.5 and slow > 5 * fast, (fast, slow)
    assert other < slow / 3, (other, slow)
    w1.heal()


def test_kill9_and_cleanup_even_when_the_body_fails() -> None:
    tag = None
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(["a", "b"]) as lab:
            tag = lab.tag
            p = lab.hosts["a"].popen([sys.executable, "-c", "import time; time.sleep(600)"])
            until(lambda: lab.hosts["a"].processes("time.sleep"), 10, "the sleeper")
            assert kill9(p.pid)
            assert p.wait(10) == -9
            lab.hosts["b"].popen([sys.executable, "-c", "import time; time.sleep(600)"])
            assert lab_resources(tag)
            raise RuntimeError("boom")
    assert lab_resources(tag) == []
