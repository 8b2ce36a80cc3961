"""`spotwise agent`: the node agent's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from spotwise.common.sdnotify import Notifier
from spotwise.config import AgentConfig, ConfigError
from spotwise.worker.agent.node import Agent, AgentError

log = logging.getLogger("spotwise.worker.agent")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `spotwise agent`. Unset flags fall back to SPOTWISE_AGENT_* and the config
    file (see spotwise.config.AgentConfig)."""
    parser.add_argument("--daemon", help="host:port of the daemon (default 127.0.0.1:7450)")
    parser.add_argument("--config", help="TOML config file ([agent] table)")
    parser.add_argument("--slots", type=int, help="training processes this node can run")
    parser.add_argument("--address", help="host this node's peers reach it on")
    parser.add_argument("--log-dir", help="process logs: <log-dir>/<job>/g<gen>/rank<r>.log")
    parser.add_argument("--state-dir", help="the agent's state directory")
    parser.add_argument("--node-id", help="this node's id (default: the daemon assigns one)")
    parser.add_argument("--provider-node", help="the provider's handle for this node")
    parser.add_argument("--instance-type", help="cloud instance type")
    parser.add_argument("--lifecycle", choices=["spot", "on-demand"])
    parser.add_argument("--price-per-hour", type=float, help="USD per hour this node costs")
    parser.add_argument("--grace-s", type=float,
                        help="SIGTERM-to-SIGKILL grace when stopping a generation (default 30)")
    parser.add_argument("--imds-endpoint",
                        help="instance metadata service URL to poll for spot interruption "
                             "notices (on EC2: http://169.254.169.254; default: none)")
    parser.add_argument("--metrics-listen",
                        help="host:port to serve the agent's Prometheus metrics on (no "
                             "authentication: loopback or a private network; default: none)")
    parser.add_argument("--max-disconnect-s", type=float, default=600.0,
                        help="give up (stop processes, exit 1) after the daemon is unreachable "
                             "this long (default 600)")
    parser.add_argument("--switch-grace-s", type=float, default=0.5,
                        help="grace when a newer generation of the same job replaces the "
                             "running one: its checkpoints are fenced anyway (default 0.5)")


_FLAG_FIELDS = ("daemon", "slots", "address", "log_dir", "state_dir", "node_id", "provider_node",
                "instance_type", "lifecycle", "price_per_hour", "grace_s", "imds_endpoint",
                "metrics_listen")


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """AgentConfig from the flags given, then the environment and the config file."""
    overrides = {f: getattr(args, f) for f in _FLAG_FIELDS if getattr(args, f, None) is not None}
    return AgentConfig.load(getattr(args, "config", None), **overrides)


def run(args: argparse.Namespace) -> int:
    """`spotwise agent`: 0 when stopped by SIGTERM/SIGINT, 1 when the daemon refused the node
    or stayed unreachable, 2 for a bad configuration."""
    try:
        config = config_from_args(args)
    except ConfigError as e:
        print(f"spotwise agent: {e}", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = Agent(config, max_disconnect_s=args.max_disconnect_s,
                      switch_grace_s=args.switch_grace_s, notifier=Notifier.from_env())
    except (OSError, ValueError) as e:
        print(f"spotwise agent: {e}", file=sys.stderr)
        return 2

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop)
        try:
            return await agent.run()
        except AgentError as e:
            log.error("agent %s: %s", agent.node_id or config.provider_node or "-", e)
            return 1

    return asyncio.run(main())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spotwise agent")
    add_arguments(parser)
    return run(parser.parse_args(argv))
