"""The load generator: N simulated agents (bench/simagent.py) spread over a few processes, so
that generating the load does not starve the daemon of its core (or itself of one).

    with LoadGenerator(settings, nodes=2000, processes=4) as gen:
        t_last = gen.register()                 # every agent registered; they beat from then
        batch = gen.collect()                   # latencies since the last collect, counters
        gen.assignments()                       # what every agent runs now
        last_beat = gen.silence(node_id)        # it stops sending, keeps its connection open
        gen.reached(job_id, generation)         # when each agent first got that generation

Each generator process runs one asyncio loop with its share of the agents, each on its own
channel. It reads commands from a pipe (the harness's end) and answers each with one reply;
if the harness dies, the pipe's EOF stops it. Processes are started with `spawn` (a fresh
interpreter: no gRPC state forked from the harness), and `close()` stops and, past a grace,
kills every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from grpc import aio
from simagent import MAX_BACKOFF_S, AgentSettings, AgentStats, SimAgent

from spotwise.common import eventloop

REGISTER_CONCURRENCY = 64
"""Register calls in flight per generator process (a fleet coming up is not all at once)."""
REGISTER_ATTEMPTS = 5
"""Register calls an agent makes (with backoff) before the run counts it as failed."""
REPLY_TIMEOUT_S = 180.0
"""Longest wait for a generator's reply (registering a large fleet on a slow daemon is the
slowest command)."""
START_TIMEOUT_S = 60.0
"""Longest wait for a spawned generator to import and say it is ready."""
STOP_GRACE_S = 10.0
"""How long generators get to close their channels before they are killed."""


@dataclass(frozen=True)
class Holding:
    """What one agent runs now."""

    node_id: str
    job_id: str
    """Empty: nothing."""
    generation: int
    rank: int
    since: float
    """Wall time the agent adopted this assignment."""
    silent: bool


@dataclass
class Batch:
    """The fleet's statistics since the previous collect (counters are cumulative)."""

    latencies_ms: array = field(default_factory=lambda: array("d"))
    connect_ms: array = field(default_factory=lambda: array("d"))
    """Beat-channel connections opened (TCP and TLS), in milliseconds."""
    first_beat_ms: array = field(default_factory=lambda: array("d"))
    """From a Register answer to the agent's first beat after it, in milliseconds."""
    counters: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


# ---- the generator process ---------------------------------------------------------------


class _Generator:
    """The agents of one process and the commands the harness sends them."""

    def __init__(self, settings: AgentSettings, first: int, count: int) -> None:
        self.stats = AgentStats()
        self.agents = [SimAgent(i, settings, self.stats) for i in range(first, first + count)]
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def register(self) -> dict[str, Any]:
        """Register every agent (at most REGISTER_CONCURRENCY at once) and start its beats as
        soon as it is registered. Replies with the wall time of the last registration."""
        gate = asyncio.Semaphore(REGISTER_CONCURRENCY)
        failed: list[str] = []
        last = 0.0

        async def one(agent: SimAgent) -> None:
            nonlocal last
            backoff = 0.5
            for attempt in range(1, REGISTER_ATTEMPTS + 1):
                async with gate:
                    try:
                        await agent.register()  # counts its failures in the stats
                        break
                    except aio.AioRpcError as exc:
                        if attempt == REGISTER_ATTEMPTS:
                            failed.append(f"{agent.index}: {exc.code().name} {exc.details()}")
                            return
                # As an agent does when the daemon is slow or away: wait, then try again.
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            last = max(last, time.time())
            self.tasks.append(asyncio.create_task(agent.run(self.stop)))

        for agent in self.agents:
            agent.open()
        await asyncio.gather(*(one(a) for a in self.agents))
        return {"last": last, "failed": failed}

    def collect(self) -> dict[str, Any]:
        counters = self.stats.counters()
        errors = counters.pop("errors")
        connect_ms, first_beat_ms = self.stats.take_connects()
        return {"latencies_ms": self.stats.take_latencies(), "counters": counters,
                "errors": errors, "connect_ms": connect_ms, "first_beat_ms": first_beat_ms}

    def assignments(self) -> list[Holding]:
        out = []
        for agent in self.agents:
            a = agent.assignment
            since = agent.adopted[-1][2] if agent.adopted else 0.0
            out.append(Holding(agent.node_id, a.job_id if a else "", a.generation if a else 0,
                               a.rank_start if a else 0, since, agent.silent))
        return out

    def reached(self, job_id: str, generation: int) -> list[tuple[str, float | None, bool]]:
        """(node_id, wall time it first adopted generation >= `generation` of job_id or None,
        silent) for each agent."""
        out = []
        for agent in self.agents:
            when = next((t for j, g, t in agent.adopted if j == job_id and g >= generation),
                        None)
            out.append((agent.node_id, when, agent.silent))
        return out

    def silence(self, node_id: str) -> float | None:
        for agent in self.agents:
            if agent.node_id == node_id:
                return agent.silence()
        return None

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(a.close() for a in self.agents), return_exceptions=True)


def _reply(conn: multiprocessing.connection.Connection, message: tuple[str, Any]) -> None:
    """Send one reply whole. The event loop's reader made the pipe non-blocking, and a reply
    larger than the pipe's buffer (4,000 agents' assignments) would fail half-sent with EAGAIN:
    the write blocks until the harness, which waits for this reply, has read it."""
    fd = conn.fileno()
    os.set_blocking(fd, True)
    try:
        conn.send(message)
    finally:
        os.set_blocking(fd, False)


async def _serve(conn: multiprocessing.connection.Connection, gen: _Generator) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...] | None] = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(conn.recv())
        except (EOFError, OSError):  # the harness is gone: stop
            loop.remove_reader(conn.fileno())
            commands.put_nowait(None)

    loop.add_reader(conn.fileno(), readable)
    _reply(conn, ("ready", None))
    while True:
        command = await commands.get()
        if command is None or command[0] == "stop":
            await gen.close()
            return
        name, *args = command
        try:
            if name == "register":
                reply: Any = await gen.register()
            else:
                reply = getattr(gen, name)(*args)
        except Exception as exc:  # a bug in a command must reach the harness, not hang it
            _reply(conn, ("error", f"{name}: {exc!r}"))
            continue
        _reply(conn, ("ok", reply))


def generator_main(conn: multiprocessing.connection.Connection, settings: AgentSettings,
                   first: int, count: int) -> None:
    """The entry point of one generator process: agents first .. first+count-1."""

    async def main() -> None:
        await _serve(conn, _Generator(settings, first, count))

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches the group; the harness cleans up
        eventloop.run(main())  # uvloop where installed: less generator CPU per simulated agent


# ---- the harness's handle ----------------------------------------------------------------


class GeneratorError(RuntimeError):
    """A generator process failed, died or did not answer in time."""


class LoadGenerator:
    """`nodes` simulated agents over `processes` generator processes (spawned at once)."""

    def __init__(self, settings: AgentSettings, *, nodes: int, processes: int) -> None:
        if nodes < 1 or processes < 1:
            raise ValueError(f"need at least one node and one process, got {nodes}, {processes}")
        processes = min(processes, nodes)
        ctx = multiprocessing.get_context("spawn")
        self.nodes = nodes
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        try:
            for p in range(processes):
                first, last = nodes * p // processes, nodes * (p + 1) // processes
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=generator_main, args=(theirs, settings, first,
                                                                last - first),
                                   name=f"loadgen-{p}", daemon=True)
                proc.start()
                theirs.close()
                self._procs.append(proc)
                self._conns.append(ours)
            for i in range(processes):
                self._reply(i, START_TIMEOUT_S, "start")
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def _reply(self, i: int, timeout_s: float, what: str) -> Any:
        conn = self._conns[i]
        if not conn.poll(timeout_s):
            raise GeneratorError(f"generator {i} did not answer {what} within {timeout_s}s")
        try:
            status, value = conn.recv()
        except EOFError:
            raise GeneratorError(f"generator {i} died during {what} "
                                 f"(exit code {self._procs[i].exitcode})") from None
        if status == "error":
            raise GeneratorError(f"generator {i}: {value}")
        return value

    def _all(self, *command: Any, timeout_s: float = REPLY_TIMEOUT_S) -> list[Any]:
        for conn in self._conns:
            conn.send(command)
        return [self._reply(i, timeout_s, command[0]) for i in range(len(self._conns))]

    def register(self) -> float:
        """Register every agent; the wall time the last registration was answered.
        GeneratorError listing the first failures if any failed."""
        replies = self._all("register")
        failed = [f for r in replies for f in r["failed"]]
        if failed:
            raise GeneratorError(f"{len(failed)} registrations failed, e.g. {failed[:3]}")
        return max(r["last"] for r in replies)

    def collect(self) -> Batch:
        batch = Batch()
        for r in self._all("collect"):
            batch.latencies_ms.extend(r["latencies_ms"])
            batch.connect_ms.extend(r["connect_ms"])
            batch.first_beat_ms.extend(r["first_beat_ms"])
            batch.counters.update(r["counters"])
            batch.errors.update(r["errors"])
        return batch

    def assignments(self) -> list[Holding]:
        return [h for r in self._all("assignments") for h in r]

    def reached(self, job_id: str, generation: int) -> list[tuple[str, float | None, bool]]:
        return [x for r in self._all("reached", job_id, generation) for x in r]

    def silence(self, node_id: str) -> float:
        """Silence one agent; the wall time of the last beat it sent. KeyError if no
        generator has it."""
        found = [t for t in self._all("silence", node_id) if t is not None]
        if not found:
            raise KeyError(node_id)
        return found[0]

    def close(self) -> None:
        """Stop every generator: ask, wait STOP_GRACE_S, then kill what is left."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send(("stop",))
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
