"""Binding a node's processes to its advertised address: the interface lookup, the
environment it yields, the address-bound rendezvous store, and checkpoint requests that only
reach processes that said they are ready."""

from __future__ import annotations

import json
import os
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from spotwise.worker.agent.netif import InterfaceNotFound, interface_for, resolve_ip, socket_env
from spotwise.worker.agent.store_server import store_server
from spotwise.worker.agent.supervisor import LaunchSpec, Supervisor, process_env
from tests.support.wait import until


def _spec(entrypoint: list[str], **kw) -> LaunchSpec:
    base = dict(job_id="job-1", generation=3, entrypoint=tuple(entrypoint), world_size=2,
                node_rank=0, num_nodes=1, rank_start=0, nproc=2, master_addr="127.0.0.1",
                master_port=1)
    base.update(kw)
    return LaunchSpec(**base)


def test_loopback_is_carried_by_lo() -> None:
    assert interface_for("127.0.0.1") == "lo"
    assert interface_for("localhost") == "lo"
    assert socket_env("127.0.0.1") == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}


def test_foreign_or_unresolvable_address_is_a_clear_error() -> None:
    # TEST-NET-3 (RFC 5737): never assigned to a host.
    with pytest.raises(InterfaceNotFound, match="203.0.113.77"):
        interface_for("203.0.113.77")
    with pytest.raises(InterfaceNotFound, match="does not resolve"):
        resolve_ip("no-such-host.invalid")


def test_process_env_binds_collectives_unless_the_spec_says_otherwise(tmp_path: Path) -> None:
    binding = {"GLOO_SOCKET_IFNAME": "eth7", "NCCL_SOCKET_IFNAME": "eth7"}
    env = process_env(_spec(["python"]), 0, log_dir=tmp_path, base_env={}, socket_ifname=binding)
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "eth7"
    own = _spec(["python"], spec_env={"NCCL_SOCKET_IFNAME": "ib0"})
    env = process_env(own, 0, log_dir=tmp_path, base_env={}, socket_ifname=binding)
    assert env["NCCL_SOCKET_IFNAME"] == "ib0" and env["GLOO_SOCKET_IFNAME"] == "eth7"


def test_supervisor_sets_the_interface_of_its_address(tmp_path: Path) -> None:
    dump = tmp_path / "dump.py"
    dump.write_text("import json, os, sys\n"
                    "json.dump(dict(os.environ), open(sys.argv[1] + os.environ['RANK'], 'w'))\n")
    sup = Supervisor(_spec(["python", str(dump), str(tmp_path / "env.")], nproc=1, world_size=1,
                           address="127.0.0.1"), log_dir=tmp_path / "logs", base_env={})
    sup.start()
    until(lambda: (sup.poll(), not sup.running)[1], 30, "the process to exit")
    env = json.loads((tmp_path / "env.0").read_text())
    assert env["GLOO_SOCKET_IFNAME"] == "lo"
    # An address no interface carries: started anyway, without a binding (NAT setups).
    sup = Supervisor(_spec(["python", str(dump), str(tmp_path / "nat.")], nproc=1, world_size=1,
                           address="203.0.113.77"), log_dir=tmp_path / "logs2", base_env={})
    sup.start()
    until(lambda: (sup.poll(), not sup.running)[1], 30, "the process to exit")
    assert "GLOO_SOCKET_IFNAME" not in json.loads((tmp_path / "nat.0").read_text())


def test_store_listens_on_its_address_only_and_rebinds() -> None:
    from torch.distributed import TCPStore

    store = store_server("127.0.0.1", 0, timeout=timedelta(seconds=5))
    port = store.port
    with open("/proc/net/tcp") as f:
        listening = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{port:04X}" in listening  # 127.0.0.1, not 0.0.0.0
    store.set("k", "v")
    client = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    assert client.get("k") == b"v"
    del client, store
    again = store_server("127.0.0.1", port, timeout=timedelta(seconds=5))  # as StoreHost.reset
    assert again.port == port and not again.check(["k"])
    with pytest.raises(OSError):
        store_server("203.0.113.77", 0, timeout=timedelta(seconds=5))


# A runtime-like process: says "ready" once its handlers are installed (after --delay seconds),
# then records each SIGUSR1 (a request) and SIGUSR2 (its end). A torchrun-like one never says
# ready and dies of either.
_READY = textwrap.dedent("""
    import json, os, signal, sys, time
    time.sleep(float(sys.argv[1]) * int(os.environ["RANK"]))
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append("usr1"))
    signal.signal(signal.SIGUSR2, lambda *_: got.append("usr2"))
    with open(os.environ["SPOTWISE_EVENTS_FILE"], "a") as f:
        f.write(json.dumps({"event": "ready"}) + "\\n")
    while True:
        time.sleep(0.02)
        if got:
            with open(sys.argv[2] + os.environ["RANK"], "a") as f:
                f.write("".join(g + "\\n" for g in got))
            got.clear()
""")


def _read_events(sup: Supervisor) -> None:
    for p in sup.processes:
        if p.events_path.exists():
            for line in p.events_path.read_text().splitlines():
                sup.note_event(p.rank, json.loads(line))


def test_checkpoint_request_reaches_only_ready_processes(tmp_path: Path) -> None:
    script = tmp_path / "ready.py"
    script.write_text(_READY)
    got = str(tmp_path / "usr1.")
    def lines(r: int, kind: str = "usr1") -> int:
        path = Path(got + str(r))
        return path.read_text().splitlines().count(kind) if path.exists() else 0

    # Rank r says ready after 4*r seconds: rank 0 at once, rank 1 well after.
    sup = Supervisor(_spec(["python", str(script), "4", got]), log_dir=tmp_path / "logs",
                     base_env=dict(os.environ))
    sup.start()
    try:
        until(lambda: (_read_events(sup), sup.processes[0].ready)[1], 30, "rank 0 ready")
        assert not sup.processes[1].ready
        assert sup.request_checkpoint() == 1
        until(lambda: lines(0) == 1, 10, "rank 0's SIGUSR1")
        assert sup.request_checkpoint() == 0  # idempotent while the request lasts
        # Rank 1 gets the same request the moment its ready event is read.
        until(lambda: (_read_events(sup), lines(1) == 1)[1], 30, "rank 1's SIGUSR1 on ready")
        # The request ends with no rescale: SIGUSR2 to each process it reached (their hold ends).
        sup.end_checkpoint_request()
        until(lambda: lines(0, "usr2") == 1 and lines(1, "usr2") == 1, 10, "the SIGUSR2s")
        assert sup.request_checkpoint() == 2  # a new request reaches both
        until(lambda: lines(0) == 2 and lines(1) == 2, 10, "the second request")
        assert all(p.running for p in sup.processes)
    finally:
        sup.kill()


def test_request_waits_for_ready_and_spares_an_unmodified_script(tmp_path: Path) -> None:
    ready = tmp_path / "ready.py"
    ready.write_text(_READY)
    plain = tmp_path / "plain.py"
    plain.write_text("import time\nwhile True:\n    time.sleep(0.05)\n")
    got = str(tmp_path / "usr1.")
    slow = Supervisor(_spec(["python", str(ready), "1.0", got], nproc=1, world_size=2,
                            rank_start=1),
                      log_dir=tmp_path / "a", base_env=dict(os.environ))
    torchrun_like = Supervisor(_spec(["python", str(plain)], nproc=1, world_size=1),
                               log_dir=tmp_path / "b", base_env=dict(os.environ))
    slow.start()
    torchrun_like.start()
    try:
        # Requested before the runtime is ready: nothing is sent now...
        assert slow.request_checkpoint() == 0
        assert torchrun_like.request_checkpoint() == 0
        # ...and the request is delivered when "ready" is read.
        until(lambda: (_read_events(slow), Path(got + "1").exists())[1], 30,
              "the SIGUSR1 delivered on ready")
        assert slow.processes[0].running
        _read_events(torchrun_like)
        assert torchrun_like.not_ready() == [0]
        # Nor does the end of the request reach it: it was never asked.
        torchrun_like.end_checkpoint_request()
        time.sleep(0.5)
        assert torchrun_like.processes[0].running and torchrun_like.signal(0) == 1
    finally:
        slow.kill()
        torchrun_like.kill()
