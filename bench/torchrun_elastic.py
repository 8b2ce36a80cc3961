"""torchrun elastic as the benchmarks run it: the baseline spotwise is measured against.

Each "node" is one `torchrun --nnodes=MIN:MAX --nproc-per-node=1 --rdzv-backend=c10d` agent;
their rendezvous store is a standalone TCPStore process (`--rdzv-conf=is_host=false`), so that
losing a node does not take the store with it (a real deployment would need etcd or a
rendezvous host that is never preempted: this is the generous setup). Every other setting is
torchrun's default. The workers run the spotwise runtime, which under torchrun checkpoints with
DCP every SPOTWISE_CHECKPOINT_EVERY steps and, on each (re)start, restores the newest commit:
torchrun with DCP.

`TorchrunNodes` is a local provider whose nodes run such an agent instead of a spotwise agent,
so that a trace replay (spotwise.cloud.replay) launches and SIGKILLs torchrun nodes exactly as
it does spotwise nodes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence

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


TUNED_RDZV_CONF = {"last_call_timeout": "1", "join_timeout": "60", "keep_alive_interval": "1",
                   "keep_alive_max_attempt": "3"}
"""torchrun's rendezvous as an experienced user tunes it for a job that must recover fast: a
1 s last call (default 30 s: how long a rendezvous that has its minimum waits for more nodes),
a 60 s join timeout (default 600 s), and a dead node dropped from the rendezvous after 3 missed
1 s keep-alives (default 3 x 5 s: until then a survivor's restart waits for the next round,
measured at about 10 s of a tuned recovery without it)."""
TUNED_MONITOR_INTERVAL = 0.1
"""Seconds between the agent's checks of its workers; torch 2.13's default already (older
releases had 5 s), set explicitly so that the tuned command says it."""


def torchrun_argv(*, endpoint: str, rdzv_id: str, nnodes: str, workload: Sequence[str],
                  max_restarts: int = 100, rdzv_conf: Mapping[str, str] | None = None,
                  monitor_interval: float | None = None) -> list[str]:
    """The command of one torchrun node (one process per node) running `workload` (a script
    and its arguments), rendezvousing at `endpoint` (host:port of the standalone store).
    `rdzv_conf` adds to `is_host=false`; `monitor_interval` None keeps torchrun's default."""
    conf = ",".join(["is_host=false", *(f"{k}={v}" for k, v in (rdzv_conf or {}).items())])
    monitor = [] if monitor_interval is None else [f"--monitor-interval={monitor_interval}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={rdzv_id}", f"--rdzv-conf={conf}", *monitor,
            f"--max-restarts={max_restarts}", *workload]


class TorchrunNodes(LocalProvider):
    """Local nodes that each run a torchrun elastic agent (see the module docstring). A
    NodeRequest's daemon_address is the rendezvous endpoint the agents register at."""

    def __init__(self, *, rdzv_id: str, nnodes: str, workload: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.rdzv_id = rdzv_id
        self.nnodes = nnodes
        self.workload = list(workload)

    def node_command(self, handle: str, request: NodeRequest, lifecycle: str) -> list[str]:
        return torchrun_argv(endpoint=request.daemon_address, rdzv_id=self.rdzv_id,
                             nnodes=self.nnodes, workload=self.workload)
