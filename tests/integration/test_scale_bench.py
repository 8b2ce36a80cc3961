"""The scale benchmark's load generator (bench/loadgen.py) against a real in-process daemon
with TLS and tokens on: 20 simulated agents in one generator process register, beat, adopt
the assignment of a job spanning all of them, and one goes silent without closing its
connection, which the daemon sees as a loss (the next generation reaches every survivor).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotwise.client import Client
from spotwise.config import DaemonConfig
from spotwise.daemon.server import DaemonThread
from tests.support.wait import until

# The benchmark's modules import each other as top-level modules (bench/ is a folder of
# scripts, not a package), as they do when bench/scale.py runs.
BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from loadgen import Batch, LoadGenerator  # noqa: E402
from pki import Credentials, make_credentials  # noqa: E402
from simagent import AgentSettings  # noqa: E402

AGENTS = 20
pytestmark = pytest.mark.timeout(60)


def established_to(port: int) -> int:
    """Established TCP connections whose local end is `port` (the server's side of each; gRPC
    may serve 127.0.0.1 from an IPv6 socket, so both tables count)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += int(local.rpartition(":")[2], 16) == port and state == "01"
    return count


@pytest.fixture
def head(tmp_path: Path) -> Iterator[tuple[DaemonThread, Credentials]]:
    creds = make_credentials(tmp_path / "pki")
    config = DaemonConfig(listen="127.0.0.1:0", state_dir=tmp_path / "state",
                          tls_cert_file=str(creds.server_cert),
                          tls_key_file=str(creds.server_key), tokens_file=str(creds.tokens_file))
    with DaemonThread(config) as daemon:
        yield daemon, creds


@pytest.mark.parametrize("protocol", ["unary", "stream", "channel"])
def test_simulated_agents_register_beat_run_a_job_and_a_silent_one_is_replaced(
    head: tuple[DaemonThread, Credentials], tmp_path: Path, protocol: str
) -> None:
    daemon, creds = head
    settings = AgentSettings(address=daemon.address, agent_token=creds.agent_token,
                             ca_pem=creds.ca_file.read_bytes(), unary=protocol == "unary",
                             stream=protocol == "stream")
    with LoadGenerator(settings, nodes=AGENTS, processes=1) as gen, \
            Client(daemon.address, token=creds.client_token, ca_file=creds.ca_file) as client:
        gen.register()

        def answered_or_unimplemented() -> Batch | None:
            batch = gen.collect()  # counters and errors are cumulative
            unimplemented = "Heartbeats: UNIMPLEMENTED" in batch.errors
            return batch if batch.counters["answered"] or unimplemented else None

        first = until(answered_or_unimplemented, 10, "heartbeat answers")
        if not first.counters["answered"]:
            pytest.skip("this daemon does not serve the Heartbeats stream yet")
        assert first.counters["registered"] == AGENTS
        def on_channel() -> int:
            return daemon.call(lambda: len(daemon.daemon.beats.connections))

        if protocol == "channel":
            until(lambda: on_channel() == AGENTS, 10, "every agent on the beat channel")
        else:
            assert on_channel() == 0
        # One connection per agent (plus none shared): the daemon's port has at least that many
        # established peers.
        assert established_to(int(daemon.address.rpartition(":")[2])) >= AGENTS
        assert not first.errors, first.errors

        job_id = client.submit({
            "entrypoint": ["python", "-c", "pass"], "nodes": {"min": 1, "max": AGENTS},
            "checkpoint": {"uri": str(tmp_path / "ckpt")}, "global_batch_size": AGENTS})

        def everyone_runs() -> list:
            held = gen.assignments()
            gens = {h.generation for h in held if h.job_id == job_id}
            return held if len(gens) == 1 and all(h.job_id == job_id for h in held) else []

        held = until(everyone_runs, 20, f"all {AGENTS} agents to run {job_id}", interval_s=0.2)
        assert sorted(h.rank for h in held) == list(range(AGENTS))
        generation = held[0].generation

        victim = next(h.node_id for h in held if h.rank == AGENTS // 2)
        last_beat = gen.silence(victim)
        assert last_beat > 0

        def survivors_moved_on() -> list:
            reached = gen.reached(job_id, generation + 1)
            live = [when for node, when, silent in reached if not silent]
            return live if all(when is not None for when in live) else []

        times = until(survivors_moved_on, 20, "the next generation on every survivor",
                      interval_s=0.2)
        assert len(times) == AGENTS - 1
        # Detection needs the 2 s lease; it cannot be faster than that.
        assert max(times) - last_beat >= 1.5
        assert client.get(job_id).world_size == AGENTS - 1

        batch = gen.collect()
        assert batch.counters["reregisters"] == 0
        assert batch.counters["reregister_answers"] == 0
        assert batch.counters["reports"] > 0  # rank 0 reported progress
        assert len(batch.latencies_ms) > AGENTS
        assert not batch.errors, batch.errors
