"""The node agent: one per machine, between the daemon and the node's training processes
(flows 3, 4, 6, 7). `spotwise agent` runs `spotwise.worker.agent.cli.main`.

Modules: `node` (the Agent: registration, heartbeats, assignments), `session` (the daemon
connection: credentials and the Heartbeats stream), `store_host` (the rendezvous TCPStore),
`launch` (assignment -> LaunchSpec, fence markers), `reports` (runtime events -> ReportEvent),
`supervisor` (the processes of one generation), `orphans`, `notices` (IMDS), `metrics`, `cli`.
It imports the runtime's storage and event formats, never the daemon.
"""

from spotwise.worker.agent.backoff import Backoff
from spotwise.worker.agent.cli import add_arguments, config_from_args, main, run
from spotwise.worker.agent.launch import fence_generation, launch_spec
from spotwise.worker.agent.node import Agent, AgentError
from spotwise.worker.agent.reports import event_report
from spotwise.worker.agent.store_host import STAMP_KEY, StoreHost

__all__ = ["STAMP_KEY", "Agent", "AgentError", "Backoff", "StoreHost", "add_arguments",
           "config_from_args", "event_report", "fence_generation", "launch_spec", "main", "run"]
