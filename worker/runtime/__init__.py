"""The training runtime: the library inside each training process (flows 4, 5).

    from spotwise.worker.runtime import Runtime, run_main

Modules: `runtime` (Runtime, RuntimeConfig, run_main), `checkpoint` (asynchronous DCP
checkpoints, manifests, fencing), `dcp_reader` (restricted, fast readers), `storage` (fsspec
I/O), `sampler` and `batching` (the exact data position and the fixed global batch),
`sharding` (FSDP2), `events` (the events file the node agent tails), `ledger` (the sample
audit). It imports neither the node agent nor the daemon.
"""

from spotwise.worker.runtime.runtime import EXIT_STOPPED, Runtime, RuntimeConfig, run_main

__all__ = ["EXIT_STOPPED", "Runtime", "RuntimeConfig", "run_main"]
