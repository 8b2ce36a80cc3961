"""torchrun elastic as the benchmarks run it: the baseline spotwise is measured against.

Each "node" is one `torchrun --nnodes=MIN:MAX --nproc-per-node=1 --rdzv-backend=c10d` agent;
their rendezvous store is a standalone TCPStore process (`--rdzv-conf=is_host=false`), so that
losing a node does not take the store with it (a real deployment would need etcd or a
rendezvous host that is never preempted: this is the generous setup). Every other setting is
torchrun's default (`DEFAULT`), or what an experienced user sets (`TUNED`, see
`TorchrunSettings`). The workers run the spotwise runtime, which under torchrun checkpoints with
DCP every SPOTWISE_CHECKPOINT_EVERY steps and, on each (re)start, restores the newest commit:
torchrun with DCP.

`TorchrunNodes` is a local provider whose nodes run such an agent instead of a spotwise agent,
so that a trace replay (spotwise.cloud.replay) launches and SIGKILLs torchrun nodes exactly as
it does spotwise nodes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from spotwise.cloud.local import LocalProvider
from spotwise.cloud.provider import NodeRequest


def start_store() -> tuple[subprocess.Popen[bytes], int]:
    """A standalone TCPStore server process on a free loopback port: (process, port). The
    caller kills it (its own session: os.killpg(process.pid, SIGKILL))."""
    store = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from torch.distributed import TCPStore\n"
         "s = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, "
         "multi_tenant=True)\nprint(s.port, flush=True)\ntime.sleep(10**6)"],
        stdout=subprocess.PIPE, start_new_session=True)
    assert store.stdout is not None
    line = store.stdout.readline()
    if not line.strip():
        store.kill()
        store.wait(timeout=10)
        raise RuntimeError("the TCPStore process exited before printing its port")
    return store, int(line)


@dataclass(frozen=True, kw_only=True)
class TorchrunSettings:
    """torchrun's elastic timings; None leaves torchrun's own default (shown beside each)."""

    name: str
    """How results name this variant."""
    last_call_timeout_s: int | None = None
    """Extra wait for more nodes once the minimum has joined (default 30 s)."""
    join_timeout_s: int | None = None
    """Longest a rendezvous may take to complete (default 600 s)."""
    keep_alive_interval_s: int | None = None
    """Rendezvous keep-alive period of each agent (default 5 s)."""
    keep_alive_max_attempt: int | None = None
    """Missed keep-alives before a node counts as dead in the rendezvous (default 3)."""
    monitor_interval_s: float | None = None
    """How often an agent checks its workers and waiting nodes (default 0.1 s in torch 2.13)."""

    def rdzv_conf(self) -> str:
        conf = {"is_host": "false", "last_call_timeout": self.last_call_timeout_s,
                "join_timeout": self.join_timeout_s, "keep_alive_interval": self.keep_alive_interval_s,
                "keep_alive_max_attempt": self.keep_alive_max_attempt}
        return ",".join(f"{k}={v}" for k, v in conf.items() if v is not None)

    def flags(self) -> list[str]:
        extra = [] if self.monitor_interval_s is None else [f"--monitor-interval={self.monitor_interval_s}"]
        return [f"--rdzv-conf={self.rdzv_conf()}", *extra]

    def describe(self) -> dict:
        return {**asdict(self), "flags": self.flags()}


DEFAULT = TorchrunSettings(name="torchrun")
TUNED = TorchrunSettings(
    name="torchrun_tuned",
    # Long enough for agents launched together to make one round (they start within about
    # 1 s of each other here), short enough that a shrunk job does not sit waiting for nodes.
    last_call_timeout_s=2,
    # A generous bound: a rendezvous waits for capacity instead of failing the job.
    join_timeout_s=600,
    # A SIGKILLed node drops out of the rendezvous in ~3 s instead of ~15 s.
    keep_alive_interval_s=1,
    keep_alive_max_attempt=3,
    # torch 2.13's default already; written out because older torch defaulted to 5 s.
    monitor_interval_s=0.1,
)


def torchrun_argv(*, endpoint: str, rdzv_id: str, nnodes: str, workload: Sequence[str],
                  max_restarts: int = 100, settings: TorchrunSettings = DEFAULT) -> list[str]:
    """The command of one torchrun node (one process per node) running `workload` (a script
    and its arguments), rendezvousing at `endpoint` (host:port of the standalone store).
    `max_restarts` overrides torchrun's default of 0 (an elastic job must restart)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={rdzv_id}", *settings.flags(),
            f"--max-restarts={max_restarts}", *workload]


class TorchrunNodes(LocalProvider):
    """Local nodes that each run a torchrun elastic agent (see the module docstring). A
    NodeRequest's daemon_address is the rendezvous endpoint the agents register at."""

    def __init__(self, *, rdzv_id: str, nnodes: str, workload: Sequence[str],
                 settings: TorchrunSettings = DEFAULT, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rdzv_id = rdzv_id
        self.nnodes = nnodes
        self.workload = list(workload)
        self.settings = settings

    def node_command(self, handle: str, request: NodeRequest, lifecycle: str) -> list[str]:
        return torchrun_argv(endpoint=request.daemon_address, rdzv_id=self.rdzv_id,
                             nnodes=self.nnodes, workload=self.workload, settings=self.settings)
