"""Many watchers on one job: the daemon's memory with 1,000 WatchJob streams (over several
principals) on a job with a maximal spec, through 100 events.

    python bench/watchers.py                       # 1000 watchers, 10 principals, 100 events
    python bench/watchers.py --watchers 200 --events 20 --quick

A real `spotwise daemon` process with TLS and tokens (bench/headnode.py); the job's spec is
as large as the daemon takes (64 KiB, most of it one env value); the watchers are grpc.aio
streams in a separate process, one channel per principal; the events are checkpoint commits
reported by one registered agent (each one an event every watcher receives). The daemon's
peak resident memory (VmHWM) is read from /proc. Writes bench/results/watchers.json.
Target: peak memory under 300 MiB, every watcher receiving every event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

import grpc  # noqa: E402
from grpc import aio  # noqa: E402
from headnode import DaemonSettings, HeadNode  # noqa: E402

from spotwise.daemon.validation import MAX_SPEC_BYTES  # noqa: E402
from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc, jobs_pb2, jobs_pb2_grpc  # noqa: E402
from spotwise.spec import JobSpec  # noqa: E402

TARGET_MIB = 300
RESULTS = REPO / "bench" / "results"


def _creds(ca: bytes, token: str) -> grpc.ChannelCredentials:
    return grpc.composite_channel_credentials(grpc.ssl_channel_credentials(ca),
                                              grpc.access_token_call_credentials(token))


def watch_main(address: str, ca: bytes, tokens: list[str], job_id: str, per: int,
               expected: int, ready: multiprocessing.Queue, out: multiprocessing.Queue) -> None:
    """Open `per` streams for each token; report how many events each stream received."""

    async def main() -> None:
        channels = [aio.secure_channel(address, _creds(ca, t)) for t in tokens]
        counts: list[int] = []

        async def one(channel: aio.Channel) -> None:
            index = len(counts)
            counts.append(0)
            stub = jobs_pb2_grpc.JobServiceStub(channel)
            call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, replay=False))
            try:
                async for event in call:
                    if event.kind == "checkpoint":
                        counts[index] += 1
                        if counts[index] >= expected:
                            return
            except aio.AioRpcError as e:
                counts[index] = -abs(e.code().value[0])

        tasks = [asyncio.ensure_future(one(ch)) for ch in channels for _ in range(per)]
        await asyncio.sleep(2.0)
        ready.put(len(tasks))
        await asyncio.wait(tasks, timeout=300)
        out.put(counts)
        for ch in channels:
            await ch.close()

    asyncio.run(main())


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="spotwise-watchers-"))
    principals = args.principals
    per = -(-args.watchers // principals)
    settings = DaemonSettings(admins=principals,
                              extra_toml=f"max_watchers_per_principal = {per}\n")
    head = HeadNode.start(work, settings)
    try:
        creds = head.credentials
        ca = creds.ca_file.read_bytes()
        client = grpc.secure_channel(head.address, _creds(ca, creds.client_token))
        jobs = jobs_pb2_grpc.JobServiceStub(client)
        spec = JobSpec.model_validate({
            "entrypoint": ["python", "train.py"], "checkpoint": {"uri": str(work / "ck")},
            "global_batch_size": 4, "nodes": {"min": 1, "max": 1}}).to_proto()
        spec.env["PADDING"] = ""
        spec.env["PADDING"] = "x" * (MAX_SPEC_BYTES - spec.ByteSize() - 8)
        assert MAX_SPEC_BYTES - 64 < spec.ByteSize() <= MAX_SPEC_BYTES, spec.ByteSize()
        job_id = jobs.SubmitJob(jobs_pb2.SubmitJobRequest(spec=spec), timeout=30).job_id
        agent_channel = grpc.secure_channel(head.address, _creds(ca, creds.agent_token))
        agents = agent_pb2_grpc.AgentServiceStub(agent_channel)
        node = agents.Register(agent_pb2.RegisterRequest(address="127.0.0.1", store_port=1,
                                                         slots=1), timeout=30)
        deadline = time.monotonic() + 30
        generation = 0
        while time.monotonic() < deadline and not generation:
            a = agents.Heartbeat(agent_pb2.HeartbeatRequest(
                node_id=node.node_id, node_secret=node.node_secret), timeout=10).assignment
            generation = a.generation if a.job_id == job_id else 0
            time.sleep(0.2)
        assert generation, "the job did not start on the agent"
        rss_before = head.rss_bytes()

        ctx = multiprocessing.get_context("spawn")
        ready, out = ctx.Queue(), ctx.Queue()
        watchers = ctx.Process(target=watch_main, args=(
            head.address, ca, list(creds.admin_tokens), job_id, per, args.events, ready, out))
        watchers.start()
        try:
            opened = ready.get(timeout=120)
            rss_watching = head.rss_bytes()
            started = time.monotonic()
            for step in range(1, args.events + 1):
                report = agent_pb2.ReportEventRequest(
                    node_id=node.node_id, node_secret=node.node_secret, job_id=job_id,
                    generation=generation, time=time.time())
                report.checkpoint_committed.step = step
                report.checkpoint_committed.path = (f"{work / 'ck'}/{job_id}/data/"
                                                    f"step-{step:010d}-g{generation}")
                assert agents.ReportEvent(report, timeout=30).accepted
                agents.Heartbeat(agent_pb2.HeartbeatRequest(
                    node_id=node.node_id, node_secret=node.node_secret, job_id=job_id,
                    generation=generation), timeout=10)
            counts = out.get(timeout=300)
            delivered_s = time.monotonic() - started
        finally:
            watchers.join(30)
            if watchers.is_alive():
                watchers.kill()
        peak = head.peak_rss_bytes()
        mib = 1024 * 1024
        complete = sum(1 for c in counts if c >= args.events)
        return {
            "watchers": opened, "principals": principals, "events": args.events,
            "spec_bytes": spec.ByteSize(),
            "watchers_with_every_event": complete,
            "refused_streams": sum(1 for c in counts if c < 0),
            "daemon_rss_mib_before": round(rss_before / mib, 1),
            "daemon_rss_mib_watching": round(rss_watching / mib, 1),
            "daemon_peak_rss_mib": round(peak / mib, 1),
            "events_delivered_s": round(delivered_s, 2),
            "target_peak_rss_mib": TARGET_MIB,
            "target_met": peak / mib < TARGET_MIB and complete == opened,
            "setup": {"max_watchers_per_principal": per, "tls": True, "tokens": True,
                      "heartbeat_interval_s": settings.heartbeat_interval_s,
                      "lease_s": settings.lease_s},
        }
    finally:
        head.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--principals", type=int, default=10)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--quick", action="store_true",
                        help="write bench/results/watchers-quick.json (a smoke run)")
    args = parser.parse_args(argv)
    result = run(args)
    for key, value in result.items():
        if key != "setup":
            print(f"{key}: {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("watchers-quick.json" if args.quick else "watchers.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if result["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
