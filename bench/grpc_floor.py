"""The floor under bench/scale.py's CPU per heartbeat: a bare grpc.aio server of the Heartbeats
stream (it answers every beat; no TLS, no daemon logic) and N clients beating at 2 Hz, over two
client processes. It prints the server's CPU per beat.

    python bench/grpc_floor.py 500 30      # 500 streams for 30 s
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpc import aio  # noqa: E402

from spotwise.proto.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402


class Echo(agent_pb2_grpc.AgentServiceServicer):
    async def Heartbeats(self, request_iterator, context):  # noqa: ANN001, ANN201, N802
        resp = agent_pb2.HeartbeatResponse(assignment_version=1)
        while True:
            req = await context.read()
            if req is aio.EOF:
                return
            await context.write(resp)


def server(q: mp.Queue) -> None:
    async def main() -> None:
        s = aio.server()
        agent_pb2_grpc.add_AgentServiceServicer_to_server(Echo(), s)
        port = s.add_insecure_port("127.0.0.1:0")
        await s.start()
        q.put(port)
        await s.wait_for_termination()

    asyncio.run(main())


def client(port: int, n: int, secs: float, q: mp.Queue) -> None:
    async def main() -> None:
        count = 0

        async def one() -> None:
            nonlocal count
            ch = aio.insecure_channel(f"127.0.0.1:{port}",
                                      options=[("grpc.use_local_subchannel_pool", 1)])
            call = agent_pb2_grpc.AgentServiceStub(ch).Heartbeats()
            end = time.monotonic() + secs
            beat = agent_pb2.HeartbeatRequest(node_id="n", job_id="j", generation=1,
                                              processes=[agent_pb2.ProcessStatus(rank=1,
                                                                                 running=True)])
            while time.monotonic() < end:
                await call.write(beat)
                await call.read()
                count += 1
                await asyncio.sleep(0.5)
            call.cancel()
            await ch.close()

        await asyncio.gather(*(one() for _ in range(n)))
        q.put(count)

    asyncio.run(main())


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    sp = ctx.Process(target=server, args=(q,))
    sp.start()
    try:
        port = q.get(timeout=60)
        c0 = cpu_s(sp.pid)
        cq: mp.Queue = ctx.Queue()
        clients = [ctx.Process(target=client, args=(port, n // 2, secs, cq)) for _ in range(2)]
        for p in clients:
            p.start()
        total = cq.get(timeout=secs + 120) + cq.get(timeout=secs + 120)
        for p in clients:
            p.join(30)
        used = cpu_s(sp.pid) - c0
    finally:
        sp.kill()
    print(f"beats {total} server cpu {used:.2f}s -> {1000 * used / max(total, 1):.3f} ms/beat")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
