"""The node-local half of the agent: making the node run the generation it was assigned.

`Generations` is the part of `spotwise.worker.agent.node.Agent` that never talks to the daemon:
it stops the old generation's processes (SIGTERM, grace, SIGKILL; `supervisor`), writes the new
one's fence marker first (`launch.fence_assignment`), renews the rendezvous store, issues the
job's own storage credentials, starts the new processes, and tails their events and exits into
the report queue. The daemon-facing half (registration, heartbeats, assignments) is `Agent`
itself; both run on the agent's one event loop and share its state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from typing import Any

from spotwise.common.sdnotify import child_environment
from spotwise.proto.v1 import agent_pb2
from spotwise.worker.agent import orphans
from spotwise.worker.agent.launch import fence_assignment, launch_spec, start_failed
from spotwise.worker.agent.metrics import exit_outcome
from spotwise.worker.agent.reports import forwarded
from spotwise.worker.agent.scoped_credentials import refresh_loop, storage_env_for
from spotwise.worker.agent.store_host import stamp_of, wait_for_stamp
from spotwise.worker.agent.supervisor import (
    LaunchSpec,
    Supervisor,
    SupervisorError,
    generation_dir,
)
from spotwise.worker.runtime.events import EventsTail
from spotwise.worker.runtime.job_facts import append_fact, fact_from_assignment, facts_path

log = logging.getLogger("spotwise.worker.agent")


class Generations:
    """Mixed into Agent: the attributes it uses are set up by Agent.__init__."""

    def _save_pids(self) -> None:
        orphans.save_pids(self.pid_file, (p.pid for s in (self.current, *self._stopping)
                                          if s is not None for p in s.processes if p.running))

    async def _stop_all(self) -> None:
        sups = [s for s in (self.current, *self._stopping) if s is not None]
        await asyncio.gather(*(s.stop(self.config.grace_s) for s in sups))
        for s in sups:
            self._collect(s)
        self.current = None
        self._save_pids()

    # ---- daemon calls ---------------------------------------------------------------------

    async def _storage_env(self, spec: LaunchSpec) -> dict[str, str] | None:
        folder = generation_dir(self.log_dir, spec.job_id, spec.generation) / "aws"
        return await storage_env_for(self._issuer, spec, folder=folder,
                                     gid=self._run_as.gid if self._run_as else None,
                                     timeout_s=6 * self.config.rpc_timeout_s)

    async def _refresh_credentials_loop(self) -> None:
        await refresh_loop(self._issuer, stopped=self._stop.is_set, sleep=self._sleep)

    async def _reset_store(self, stamp: str) -> None:
        async with self._store_lock:
            if self._store_stamp == stamp and self.store is not None:
                await asyncio.to_thread(self.store.reset, stamp)

    async def _reconcile_loop(self) -> None:
        """Make the running generation the desired one; stopping takes up to the grace period,
        so this runs beside the heartbeat loop, which keeps the lease meanwhile."""
        while not self._stop.is_set():
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            cur = self.current
            cur_key = (cur.spec.job_id, cur.spec.generation) if cur else None
            if cur_key == self._desired_key:
                continue
            desired = self._desired
            fenced = desired is not None and await fence_assignment(desired, timeout_s=2 * self.config.rpc_timeout_s)
            if cur is not None:
                self.current = None
                self._start_failed = []
                self._stopping.append(cur)
                # A generation that a newer one of its job replaced cannot commit anything any
                # more (the fence marker is written), so a long grace buys no checkpoint; it
                # only delays recovery when a process hangs in a collective with a lost peer.
                grace = self.config.grace_s
                if fenced and desired.job_id == cur.spec.job_id:
                    grace = min(grace, self.switch_grace_s)
                # If this task is cancelled mid-stop, `cur` stays in _stopping and run()'s
                # shutdown stops it again (stop is idempotent).
                await cur.stop(grace)
                if self._issuer is not None:
                    self._issuer.forget(cur.spec.job_id, cur.spec.generation)
                self._stopping.remove(cur)
                self._collect(cur)
                self._save_pids()
            desired = self._desired
            if desired is None or (desired.job_id, desired.generation) != self._desired_key:
                self._wake.set()  # changed again while stopping: look again
                continue
            await self._start(desired)

    async def _start(self, a: agent_pb2.Assignment) -> None:
        try:
            # Every process of the generation binds the address its peers reach this node on.
            spec = dataclasses.replace(launch_spec(a), address=self.config.address)
        except ValueError as e:
            log.error("agent %s: bad assignment for job %s g%d: %s", self.node_id, a.job_id,
                      a.generation, e)
            return
        if self._store_reset is not None:
            await self._store_reset  # this node's store is fresh for the new generation
        if spec.node_rank != 0:
            stamp = stamp_of(spec.job_id, spec.generation)
            ok = await asyncio.to_thread(wait_for_stamp, spec.master_addr, spec.master_port,
                                         stamp, timeout_s=30.0)
            if (a.job_id, a.generation) != self._desired_key:
                self._wake.set()
                return
            if not ok:
                log.warning("agent %s: job %s g%d: store %s:%d has no stamp %s after 30s; "
                            "starting anyway", self.node_id, spec.job_id, spec.generation,
                            spec.master_addr, spec.master_port, stamp)
        # The job's figures for the processes' experiment tracker (the runtime never asks the
        # daemon): what the daemon said when this generation started.
        try:
            append_fact(facts_path(self.log_dir / spec.job_id), fact_from_assignment(a, time.time()))
        except OSError as e:
            log.warning("agent %s: job %s g%d: cannot write the job facts: %s", self.node_id,
                        spec.job_id, spec.generation, e)
        try:
            storage_env, failure = await self._storage_env(spec), None
        except ValueError as e:  # ScopeError, or STS refused: the job would have no storage
            storage_env, failure = None, f"no storage credentials: {e}"
        # Training processes must not inherit systemd's notify socket or watchdog (nor, in
        # job_environment, any credential of the agent's).
        sup = Supervisor(spec, log_dir=self.log_dir, base_env=child_environment(os.environ),
                         run_as=self._run_as, storage_env=storage_env)
        self.current = sup
        try:
            if failure is not None:
                raise SupervisorError(failure)
            sup.start()
        except SupervisorError as e:
            log.error("agent %s: job %s g%d: %s", self.node_id, spec.job_id, spec.generation, e)
            self._start_failed = start_failed(spec)
            for st in self._start_failed:
                self._queue(spec, agent_pb2.ReportEventRequest(
                    time=time.time(), process_exited=agent_pb2.ProcessExited(
                        local_rank=st.local_rank, rank=st.rank, exit_code=st.exit_code)))
            return
        for p in sup.processes:
            self._tails[p.events_path] = EventsTail(p.events_path)
        self.metrics.generation.set(spec.generation)
        self._save_pids()

    # ---- watching processes ---------------------------------------------------------------

    async def _watch_loop(self) -> None:
        while not self._stop.is_set():
            for sup in [s for s in (self.current, *self._stopping) if s is not None]:
                self._collect(sup, final=False)
            await self._sleep(self.poll_interval_s)

    def _collect(self, sup: Supervisor, *, final: bool = True) -> None:
        """Forward new events and exits of `sup`'s processes; `final` forgets their files."""
        # Exits are taken before the files are read, so whatever a process wrote before it
        # exited (its last commit) is read now and reported ahead of its exit.
        exits = sup.take_exits()
        for p in sup.processes:
            tail = self._tails.get(p.events_path)
            if tail is None:
                continue
            for event in tail.read():
                self._on_event(sup, p.rank, event)
            if final:
                del self._tails[p.events_path]
        for p in exits:
            self.metrics.process_exits.labels(exit_outcome(p.exit_code)).inc()
            self._queue(sup.spec, agent_pb2.ReportEventRequest(
                time=time.time(), process_exited=agent_pb2.ProcessExited(
                    local_rank=p.local_rank, rank=p.rank, exit_code=p.exit_code)))

    def _on_event(self, sup: Supervisor, rank: int, event: dict[str, Any]) -> None:
        sup.note_event(rank, event)  # a `ready` runtime may now get a pending checkpoint request
        req = forwarded(self.node_id, sup.spec, rank, event, self.metrics)
        if req is not None:
            self._queue(sup.spec, req)

    # ---- reports --------------------------------------------------------------------------

    def _queue(self, spec: LaunchSpec, req: agent_pb2.ReportEventRequest) -> None:
        req.job_id, req.generation = spec.job_id, spec.generation
        self._reports.add(req)
        self._reports_ready.set()
