"""Starting, watching and stopping the training processes of one generation on one node.

The node agent owns one `Supervisor` per (job, generation) it runs. A supervisor starts the
node's `nproc` processes the way torchrun would (one per local rank, torchrun's environment
plus spotwise's, see `process_env`), each in its own session so that its whole process group
can be killed, with stdout and stderr going to `<log_dir>/<job_id>/g<generation>/rank<r>.log`.

Every process is bound to the address the agent advertises (`LaunchSpec.address`): gloo and
NCCL get the interface that carries it (see `spotwise.worker.agent.netif`), so that a hostname that
resolves to 127.0.0.1 cannot make them advertise loopback to peers on other hosts.

A checkpoint request (SIGUSR1) goes only to a process whose runtime has said, with a `ready`
event, that its handler is installed: SIGUSR1's default action kills, so a process that is
still importing torch, or an unmodified torchrun script that never says it is ready, is never
sent one. A request made before any process is ready is delivered as each becomes ready, for
as long as the request lasts (`request_checkpoint` ... `end_checkpoint_request`). After that
checkpoint the runtime holds (takes no step: the next generation would replay it) until it is
stopped for the rescale, or for at most REQUEST_HOLD_S; a request that ends without a rescale
sends SIGUSR2 to the processes it signalled, and they go on at once.

Stopping follows the runtime contract: SIGTERM to each process (the runtime checkpoints at the
next step boundary and exits 143), a grace period, then SIGKILL of each whole process group,
which also takes any grandchild (data-loader workers, a shell's children) with it.

The processes never see the agent's credentials: their base environment goes through
`job_isolation.job_environment`, they run as `run_as` (a separate unprivileged user) when one is
given, and the only storage credentials they get are the `storage_env` the agent passes (scoped
to the job's own checkpoint folder, see scoped_credentials).

Nothing here blocks without a bound: `poll` never waits, `stop` waits at most its grace period
plus `reap_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotwise.worker.agent.job_isolation import (
    JobUser,
    drop_ambient_capabilities,
    job_environment,
    prepare_generation_dir,
)
from spotwise.worker.agent.netif import InterfaceNotFound, socket_env
from spotwise.worker.runtime.job_facts import ENV_VAR as JOB_FACTS_ENV
from spotwise.worker.runtime.job_facts import facts_path

log = logging.getLogger(__name__)

REQUEST_HOLD_S = 30.0
"""Longest hold after a requested checkpoint (SPOTWISE_REQUEST_HOLD_S of every process): the
daemon starts the rescale within a second or two of the commit; this bounds the idle time of a
daemon that never follows up (it died, say)."""

# Interpreter names in an entrypoint that mean "the Python this agent runs on". A spec says
# ["python", "train.py"]; the agent may have been started from a virtualenv that is not on
# PATH (e.g. `.venv/bin/spotwise agent`), and torchrun likewise runs scripts with sys.executable.
_PYTHON_NAMES = frozenset({"python", "python3"})


class SupervisorError(RuntimeError):
    """A training process could not be started (bad entrypoint, missing working directory)."""


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """One node's share of one generation: everything needed to start its processes."""

    job_id: str
    """The job the processes belong to (TORCHELASTIC_RUN_ID, SPOTWISE_JOB_ID)."""
    generation: int
    """The generation, also the fencing token (TORCHELASTIC_RESTART_COUNT)."""
    entrypoint: tuple[str, ...]
    """argv of one training process."""
    working_dir: str = ""
    """Directory the processes start in; empty means the agent's own."""
    spec_env: Mapping[str, str] = field(default_factory=dict)
    """The job spec's env, added to each process's environment."""
    world_size: int
    """Total training processes over all nodes."""
    node_rank: int
    """This node's rank among the generation's nodes (GROUP_RANK)."""
    num_nodes: int
    """Nodes in the generation (GROUP_WORLD_SIZE)."""
    rank_start: int
    """Global rank of this node's local rank 0."""
    nproc: int
    """Processes on this node (LOCAL_WORLD_SIZE)."""
    master_addr: str
    """Host of the rendezvous store (node rank 0's agent)."""
    master_port: int
    """Port of the rendezvous store."""
    restore_step: int | None = None
    """Committed step to restore, -1 to start fresh, None to leave it to the runtime (newest)."""
    checkpoint_uri: str = ""
    """Where the job's checkpoints live (fsspec URI)."""
    checkpoint_every: int = 0
    """Checkpoint every N optimizer steps (0: the runtime's default)."""
    checkpoint_keep: int = 0
    """Keep the newest K committed checkpoints (0: the runtime's default)."""
    global_batch_size: int = 0
    """Samples per optimizer step over the whole world (0: the script's own)."""
    address: str = ""
    """The address this node's peers reach it on (AgentConfig.address); gloo and NCCL are bound
    to the interface that carries it. Empty leaves them to choose."""

    def __post_init__(self) -> None:
        if not self.entrypoint:
            raise ValueError(f"job {self.job_id}: empty entrypoint")
        if self.nproc < 1:
            raise ValueError(f"job {self.job_id}: nproc must be >= 1, got {self.nproc}")
        if self.rank_start + self.nproc > self.world_size:
            raise ValueError(
                f"job {self.job_id} g{self.generation}: ranks {self.rank_start}.."
                f"{self.rank_start + self.nproc - 1} do not fit world size {self.world_size}"
            )


def generation_dir(log_dir: Path, job_id: str, generation: int) -> Path:
    """Where a generation's logs and event files live on this node."""
    return Path(log_dir) / job_id / f"g{generation}"


def process_env(spec: LaunchSpec, local_rank: int, *, log_dir: Path,
                base_env: Mapping[str, str],
                storage_env: Mapping[str, str] | None = None,
                socket_ifname: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of local rank `local_rank`: `base_env`, the interface binding
    (`socket_ifname`, from `netif.socket_env`), the spec's env, then the contract's variables
    (torchrun's and spotwise's, and `storage_env`, the job's scoped storage credentials),
    which nothing else may override.

    A spec that names GLOO_/NCCL_SOCKET_IFNAME itself wins over the binding: its author may
    want collectives on another NIC (EFA, InfiniBand) than the one the agent is reached on."""
    rank = spec.rank_start + local_rank
    env = dict(base_env)
    if "OMP_NUM_THREADS" not in spec.spec_env:
        env["OMP_NUM_THREADS"] = "1"
    env.update(socket_ifname or {})
    env.update(spec.spec_env)
    contract = {
        # torchrun's
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(spec.world_size),
        "LOCAL_WORLD_SIZE": str(spec.nproc),
        "GROUP_RANK": str(spec.node_rank),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(spec.world_size),
        "GROUP_WORLD_SIZE": str(spec.num_nodes),
        "MASTER_ADDR": spec.master_addr,
        "MASTER_PORT": str(spec.master_port),
        "TORCHELASTIC_RESTART_COUNT": str(spec.generation),
        "TORCHELASTIC_RUN_ID": spec.job_id,
        "TORCHELASTIC_USE_AGENT_STORE": str(True),
        # spotwise's
        "SPOTWISE_JOB_ID": spec.job_id,
        "SPOTWISE_GENERATION": str(spec.generation),
        "SPOTWISE_CHECKPOINT_URI": spec.checkpoint_uri,
        "SPOTWISE_CHECKPOINT_EVERY": str(spec.checkpoint_every),
        "SPOTWISE_CHECKPOINT_KEEP": str(spec.checkpoint_keep),
        "SPOTWISE_GLOBAL_BATCH_SIZE": str(spec.global_batch_size),
        "SPOTWISE_EVENTS_FILE": str(events_path(log_dir, spec, rank)),
        "SPOTWISE_REQUEST_HOLD_S": str(REQUEST_HOLD_S),
        JOB_FACTS_ENV: str(facts_path(Path(log_dir) / spec.job_id)),
        **(storage_env or {}),
    }
    clobbered = sorted(k for k in contract if k in spec.spec_env)
    if clobbered:
        log.warning("job %s g%d: spec env sets %s; the agent's values win",
                    spec.job_id, spec.generation, ",".join(clobbered))
    env.update(contract)
    if spec.restore_step is None:
        env.pop("SPOTWISE_RESTORE_STEP", None)
    else:
        env["SPOTWISE_RESTORE_STEP"] = str(spec.restore_step)
    return env


def log_path(log_dir: Path, spec: LaunchSpec, rank: int) -> Path:
    """The file a process's stdout and stderr go to."""
    return generation_dir(log_dir, spec.job_id, spec.generation) / f"rank{rank}.log"


def events_path(log_dir: Path, spec: LaunchSpec, rank: int) -> Path:
    """The JSON-lines file a process's runtime appends its events to (SPOTWISE_EVENTS_FILE)."""
    return generation_dir(log_dir, spec.job_id, spec.generation) / f"rank{rank}.events.jsonl"


def resolve_argv(entrypoint: Sequence[str]) -> list[str]:
    """The argv to exec: a bare "python"/"python3" becomes this interpreter (see _PYTHON_NAMES)."""
    argv = list(entrypoint)
    if argv[0] in _PYTHON_NAMES:
        argv[0] = sys.executable
    return argv


def exit_code_of(returncode: int) -> int:
    """A Popen returncode as a shell would report it: death by signal N is 128+N (SIGTERM: 143)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass(kw_only=True)
class ManagedProcess:
    """One training process and what the agent knows of it."""

    local_rank: int
    """Index on this node."""
    rank: int
    """Global rank."""
    popen: subprocess.Popen[bytes]
    """The process (a session and process-group leader)."""
    log_path: Path
    """Its stdout+stderr."""
    events_path: Path
    """Its SPOTWISE_EVENTS_FILE."""
    exit_code: int | None = None
    """None while running; else as `exit_code_of` reports it."""
    exit_taken: bool = False
    """Whether `Supervisor.take_exits` has handed this exit out already."""
    ready: bool = False
    """Whether its runtime said (a `ready` event) that it takes SIGUSR1 as a checkpoint request."""
    checkpoint_signalled: bool = False
    """Whether it got SIGUSR1 for the current checkpoint request."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.exit_code is None


class Supervisor:
    """The processes of one generation on this node. Not thread-safe: one event loop owns it."""

    def __init__(self, spec: LaunchSpec, *, log_dir: Path,
                 base_env: Mapping[str, str] | None = None,
                 run_as: JobUser | None = None,
                 storage_env: Mapping[str, str] | None = None) -> None:
        """`base_env` (default: this process's) loses the agent's secrets before any process
        sees it; `run_as` is the user the processes run as (None: the agent's own);
        `storage_env` the job's scoped storage credentials (scoped_credentials)."""
        self.spec = spec
        self.log_dir = Path(log_dir)
        self.run_as = run_as
        self._base_env = job_environment(os.environ if base_env is None else base_env, user=run_as)
        self._storage_env = dict(storage_env or {})
        self.processes: list[ManagedProcess] = []
        self.stopping = False
        self.checkpoint_requested = False

    def start(self) -> list[ManagedProcess]:
        """Start the node's processes. Raises SupervisorError (after killing the ones already
        started) when one cannot be started."""
        assert not self.processes, "a Supervisor starts its generation once"
        spec = self.spec
        cwd = spec.working_dir or None
        if cwd is not None and not Path(cwd).is_dir():
            raise SupervisorError(f"job {spec.job_id} g{spec.generation}: working_dir {cwd} "
                                  "does not exist on this node")
        gen_dir = generation_dir(self.log_dir, spec.job_id, spec.generation)
        try:
            prepare_generation_dir(gen_dir, self.run_as)
        except OSError as e:
            raise SupervisorError(f"job {spec.job_id} g{spec.generation}: cannot prepare {gen_dir} "
                                  f"for user {self.run_as.name if self.run_as else '-'}: {e}") from e
        user_kwargs = self.run_as.popen_kwargs() if self.run_as is not None else {}
        # With or without run_as: capabilities the agent holds must not pass to job code.
        drop_ambient_capabilities()
        argv = resolve_argv(spec.entrypoint)
        binding = self._socket_binding()
        for local_rank in range(spec.nproc):
            rank = spec.rank_start + local_rank
            env = process_env(spec, local_rank, log_dir=self.log_dir, base_env=self._base_env,
                              storage_env=self._storage_env, socket_ifname=binding)
            out = log_path(self.log_dir, spec, rank)
            try:
                # O_NOFOLLOW: with run_as the folder is the job's too, and a process started
                # a moment ago must not turn the next rank's log into a link to our own files.
                fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
                with os.fdopen(fd, "ab") as logf:
                    popen = subprocess.Popen(
                        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                        **user_kwargs)
            except OSError as e:
                self.kill()
                raise SupervisorError(f"job {spec.job_id} g{spec.generation} rank {rank}: "
                                      f"cannot start {argv!r} in {cwd or os.getcwd()}: {e}") from e
            self.processes.append(ManagedProcess(
                local_rank=local_rank, rank=rank, popen=popen, log_path=out,
                events_path=events_path(self.log_dir, spec, rank)))
            log.info("job %s g%d: started rank %d (local %d) pid %d, log %s",
                     spec.job_id, spec.generation, rank, local_rank, popen.pid, out)
        return list(self.processes)

    def _socket_binding(self) -> dict[str, str]:
        """GLOO_/NCCL_SOCKET_IFNAME for the advertised address; {} without one or when no
        interface carries it (a NAT address: the libraries' own choice may still work, so a
        warning, not a failed start)."""
        spec = self.spec
        if not spec.address:
            return {}
        try:
            binding = socket_env(spec.address)
        except InterfaceNotFound as e:
            log.warning("job %s g%d: collectives not bound to %s: %s", spec.job_id,
                        spec.generation, spec.address, e)
            return {}
        log.info("job %s g%d: collectives bound to %s (%s)", spec.job_id, spec.generation,
                 binding["GLOO_SOCKET_IFNAME"], spec.address)
        return binding

    # ----- checkpoint requests

    def note_event(self, rank: int, event: Mapping[str, object]) -> bool:
        """Record what a runtime event says about its process (call for every event read from
        its events file). A `ready` during a checkpoint request gets the request at once.
        Returns whether a SIGUSR1 was sent."""
        if event.get("event") != "ready":
            return False
        for p in self.processes:
            if p.rank == rank:
                p.ready = True
                return self.checkpoint_requested and self._signal_checkpoint(p)
        return False

    def request_checkpoint(self) -> int:
        """A checkpoint request (idempotent while it lasts): SIGUSR1 to every ready process not
        yet signalled for it; processes that become ready later get it from `note_event`.
        Returns how many were signalled now. The runtime's per-step all-reduce spreads a request
        that reached one rank to all, so a partly delivered request is still a full one."""
        self.checkpoint_requested = True
        self.poll()
        return sum(self._signal_checkpoint(p) for p in self.processes)

    def end_checkpoint_request(self) -> None:
        """The request is over with no rescale: SIGUSR2 to the processes signalled for it (their
        hold ends; one is enough, the runtime all-reduces it). The next request signals every
        ready process again."""
        self.checkpoint_requested = False
        self.poll()
        for p in self.processes:
            if p.checkpoint_signalled:
                _send(p, signal.SIGUSR2)
            p.checkpoint_signalled = False

    def not_ready(self) -> list[int]:
        """Ranks still running that have not said they are ready (for logs)."""
        return [p.rank for p in self.processes if p.running and not p.ready]

    def _signal_checkpoint(self, p: ManagedProcess) -> bool:
        if not p.ready or p.checkpoint_signalled or not _send(p, signal.SIGUSR1):
            return False
        p.checkpoint_signalled = True
        log.info("job %s g%d: checkpoint request, SIGUSR1 to rank %d pid %d", self.spec.job_id,
                 self.spec.generation, p.rank, p.pid)
        return True

    @property
    def running(self) -> bool:
        """Whether any process of the generation is still running."""
        return any(p.running for p in self.processes)

    def pids(self) -> list[int]:
        """Pids of the processes still running."""
        return [p.pid for p in self.processes if p.running]

    def poll(self) -> None:
        """Record the exits that happened since the last poll (never blocks)."""
        for p in self.processes:
            if p.exit_code is None:
                rc = p.popen.poll()
                if rc is not None:
                    p.exit_code = exit_code_of(rc)
                    log.info("job %s g%d: rank %d pid %d exited with %d",
                             self.spec.job_id, self.spec.generation, p.rank, p.pid, p.exit_code)

    def take_exits(self) -> list[ManagedProcess]:
        """Processes that exited and were not handed out before (each exit is handed out once)."""
        self.poll()
        out = [p for p in self.processes if p.exit_code is not None and not p.exit_taken]
        for p in out:
            p.exit_taken = True
        return out

    def signal(self, sig: int) -> int:
        """Send `sig` to each running process (not its group); returns how many got it."""
        self.poll()
        return sum(_send(p, sig) for p in self.processes)

    def kill(self) -> None:
        """SIGKILL every process group of the generation at once (no grace)."""
        for p in self.processes:
            _killpg(p.pid)

    async def stop(self, grace_s: float, *, poll_interval_s: float = 0.05,
                   reap_timeout_s: float = 5.0) -> None:
        """SIGTERM each process, wait up to `grace_s` for all to exit, then SIGKILL every
        process group (leftover grandchildren included) and reap the leaders."""
        self.stopping = True
        spec = self.spec
        n = self.signal(signal.SIGTERM)
        if n:
            log.info("job %s g%d: SIGTERM to %d process(es), grace %.1fs",
                     spec.job_id, spec.generation, n, grace_s)
        deadline = time.monotonic() + grace_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(poll_interval_s)
            self.poll()
        if self.running:
            log.warning("job %s g%d: pids %s still running after %.1fs grace: SIGKILL",
                        spec.job_id, spec.generation, self.pids(), grace_s)
        self.kill()
        deadline = time.monotonic() + reap_timeout_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(poll_interval_s)
            self.poll()
        if self.running:
            # A process stuck in uninterruptible sleep cannot be reaped yet; say so and move on.
            log.error("job %s g%d: pids %s not reaped %.1fs after SIGKILL",
                      spec.job_id, spec.generation, self.pids(), reap_timeout_s)

    def stop_blocking(self, grace_s: float) -> None:
        """`stop` for callers without an event loop (shutdown paths, tests)."""
        asyncio.run(self.stop(grace_s))


def _send(p: ManagedProcess, sig: int) -> bool:
    """`sig` to `p` (not its group) if it runs; whether it was sent."""
    if not p.running:
        return False
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        return False  # exited between poll and kill; the next poll records it
    return True


def _killpg(pgid: int) -> None:
    """SIGKILL a process group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        # Gone already (PermissionError: macOS reports a zombie-only group this way).
        pass
