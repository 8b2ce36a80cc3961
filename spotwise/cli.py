"""The `spotwise` command line: submit and follow jobs, run the daemon, an agent or the demo.

Every failure ends in one line on stderr and a non-zero exit: 2 for a bad command line, spec
or config, 1 for a failure at run time (daemon unreachable, unknown job, job failed under
--follow), 130 on Ctrl-C. `spotwise submit --follow` and `spotwise watch` exit 0 only when the
job SUCCEEDED, like `ray job submit`.

The daemon, agent and demo commands import their modules only when run, so the client
commands and `--help` work without them.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from spotwise.follow import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    follow_lines,
    follow_live,
    follow_logs,
    following,
)

EXIT_USAGE = 2

DEFAULT_ADDRESS = "127.0.0.1:7450"

CLIENT_COMMANDS = ("submit", "jobs", "status", "watch", "logs", "cancel", "cost")
DELEGATED = {"agent": "spotwise.worker.agent", "demo": "spotwise.demo"}


class UsageError(Exception):
    """A bad command line (argparse's complaint, as one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so main() owns the exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _default_address() -> str:
    return os.environ.get("SPOTWISE_ADDRESS") or DEFAULT_ADDRESS


def build_parser(delegate: str | None = None) -> argparse.ArgumentParser:
    """The full parser. `delegate` names the one delegated command whose module is imported
    to add its arguments ("agent" or "demo"); the others get a placeholder."""
    parser = _Parser(
        prog="spotwise",
        description="Fault-tolerant elastic PyTorch training on spot machines.",
        epilog="Connection settings from the environment: SPOTWISE_ADDRESS, SPOTWISE_TOKEN "
        "(bearer token), SPOTWISE_CA_FILE (TLS: the cluster CA), SPOTWISE_CERT_FILE and "
        "SPOTWISE_KEY_FILE (mutual TLS).",
    )
    parser.add_argument(
        "--address",
        default=_default_address(),
        help="daemon host:port (default: $SPOTWISE_ADDRESS or %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for each daemon call"
    )
    # The client commands also accept --address/--timeout after the command name.
    common = _Parser(add_help=False)
    common.add_argument("--address", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("submit", parents=[common], help="submit a job spec (YAML)")
    p.add_argument("spec", metavar="JOB.yaml", help="the job spec file")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="stream progress until the job ends; exit 0 only if it SUCCEEDED",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate the spec and print it; submit nothing"
    )
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", parents=[common], help="list jobs")
    p.add_argument(
        "--state", action="append", default=[], metavar="STATE", help="only jobs in STATE (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("status", parents=[common], help="show one job")
    p.add_argument("job", metavar="JOB", help="job id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("watch", parents=[common], help="live view of a job until it ends")
    p.add_argument("job", metavar="JOB", help="job id")
    p.add_argument(
        "--plain", action="store_true", help="print one line per event (default when not a terminal)"
    )
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("logs", parents=[common], help="print a job's process logs (this machine)")
    p.add_argument("job", metavar="JOB", help="job id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where agents write logs (default: $SPOTWISE_LOG_DIR or <state dir>/logs)",
    )
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", parents=[common], help="cancel a job")
    p.add_argument("job", metavar="JOB", help="job id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("cost", parents=[common], help="what a job has cost and will cost")
    p.add_argument("job", metavar="JOB", help="job id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("report", parents=[common],
                       help="draw a job's life (world size, steps, checkpoints, cost) as PNG+HTML")
    p.add_argument("job", metavar="JOB", help="job id")
    p.add_argument("--out", type=Path, default=Path("."),
                   help="folder for JOB-report.png and JOB-report.html (default: here)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("daemon", help="run the coordinator daemon")
    p.add_argument("--config", type=Path, default=None, help="TOML config file ([daemon] table)")
    p.add_argument("--listen", default=None, help="host:port to serve on (overrides the config)")
    p.add_argument("--state-dir", type=Path, default=None, help="state directory (overrides)")
    p.add_argument(
        "--provider", choices=("none", "local", "ray"), default=None,
        help="node provider (overrides; ray: agents on the Ray cluster of [daemon.ray])"
    )
    p.add_argument("--log-dir", type=Path, default=None, help="local agents' log dir (overrides)")
    p.add_argument(
        "--log-level",
        default=os.environ.get("SPOTWISE_LOG_LEVEL", "INFO"),
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        type=str.upper,
        help="daemon log level on stderr (default: $SPOTWISE_LOG_LEVEL or INFO)",
    )
    p.set_defaults(func=cmd_daemon)

    for name, module in DELEGATED.items():
        helps = {"agent": "run a node agent", "demo": "run the local demo"}
        p = sub.add_parser(name, help=helps[name])
        if name == delegate:
            _import_delegate(module).add_arguments(p)
        p.set_defaults(func=_run_delegate, delegate_module=module)
    return parser


def _import_delegate(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise _Fail(f"{module} is not available in this installation: {exc}") from None


class _Fail(Exception):
    """A run-time failure already phrased for the user (exit 1)."""


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (skipping global options and their values), if any."""
    takes_value = {"--address", "--timeout"}
    skip = False
    for token in argv:
        if skip:
            skip = False
            continue
        if token in takes_value:
            skip = True
            continue
        if token.startswith("-"):
            continue
        return token
    return None


# ---- client commands ------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Any:
    from spotwise.client import Client

    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    return Client(args.address, timeout=args.timeout)


def _job_id(raw: str) -> str:
    from spotwise.joblogs import check_job_id

    try:
        return check_job_id(raw)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_submit(args: argparse.Namespace) -> int:
    from spotwise.spec import JobSpec

    spec = JobSpec.from_yaml(args.spec)
    if args.dry_run:
        sys.stdout.write(spec.to_yaml())
        return EXIT_OK
    with _client(args) as client:
        job_id = client.submit(spec)
        print(job_id, flush=True)
        if not args.follow:
            return EXIT_OK
        return following(job_id, lambda: follow_lines(client, job_id, out=sys.stdout))


def cmd_jobs(args: argparse.Namespace) -> int:
    from spotwise.client import parse_state
    from spotwise.live import jobs_table_text

    try:
        states = [parse_state(s) for s in args.state]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    with _client(args) as client:
        jobs = client.list(states)
    if args.json:
        _print_json({"jobs": [_to_dict(job) for job in jobs]})
    elif jobs:
        print(jobs_table_text(jobs))
    else:
        print("no jobs", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from spotwise.live import status_text

    job_id = _job_id(args.job)
    with _client(args) as client:
        job = client.get(job_id)
    if args.json:
        _print_json(_to_dict(job))
    else:
        print(status_text(job))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from spotwise.client import state_name

    job_id = _job_id(args.job)
    with _client(args) as client:
        job = client.cancel(job_id)
    print(f"cancel requested for job {job.id or job_id}: now {state_name(job.state)}")
    return EXIT_OK


def cmd_cost(args: argparse.Namespace) -> int:
    from spotwise.live import cost_text

    job_id = _job_id(args.job)
    with _client(args) as client:
        report = client.cost(job_id)
    if args.json:
        _print_json(_to_dict(report))
    else:
        print(cost_text(report))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from spotwise.report import write_report

    job_id = _job_id(args.job)
    with _client(args) as client:
        paths = write_report(client, job_id, args.out)
    print(f"{paths.data.title}\n{paths.png}\n{paths.html}")
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    job_id = _job_id(args.job)
    with _client(args) as client:
        if args.plain or not sys.stdout.isatty():
            return following(job_id, lambda: follow_lines(client, job_id, out=sys.stdout))
        return following(job_id, lambda: follow_live(client, job_id))


def cmd_logs(args: argparse.Namespace) -> int:
    from spotwise.joblogs import LogFollower, default_log_dir, job_log_files

    job_id = _job_id(args.job)
    log_dir = args.log_dir if args.log_dir is not None else default_log_dir()
    out = sys.stdout.buffer
    if not args.follow:
        files = job_log_files(log_dir, job_id)
        if not files:
            raise _Fail(f"no logs for job {job_id} under {log_dir} (wrong --log-dir?)")
        for index, log in enumerate(files):
            # Like `tail` with several files: a blank line before every header but the first.
            out.write(("\n" if index else "").encode() + (log.header() + "\n").encode())
            try:
                out.write(log.path.read_bytes())
            except FileNotFoundError:
                continue
        out.flush()
        return EXIT_OK
    return follow_logs(_client(args), LogFollower(log_dir, job_id), out)


# ---- server-side commands ---------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from spotwise.config import DaemonConfig

    overrides: dict[str, Any] = {}
    if args.listen is not None:
        overrides["listen"] = args.listen
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    if args.provider is not None:
        overrides["provider"] = args.provider
    if args.log_dir is not None:
        overrides["log_dir"] = args.log_dir
    config = DaemonConfig.load(args.config, **overrides)
    server = _import_delegate("spotwise.daemon.server")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=args.log_level,
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    try:
        result = server.serve(config)
        if inspect.iscoroutine(result):
            from spotwise.common import eventloop

            try:
                result = eventloop.run(result, config.event_loop)
            except eventloop.LoopUnavailable as exc:
                raise _Fail(f"daemon: {exc}") from None
    except RuntimeError as exc:
        # Daemon.start raises RuntimeError for an address it cannot bind.
        raise _Fail(f"daemon: {exc}") from None
    return result if isinstance(result, int) else EXIT_OK


def _run_delegate(args: argparse.Namespace) -> int:
    module = _import_delegate(args.delegate_module)
    result = module.run(args)
    return result if isinstance(result, int) else EXIT_OK


# ---- output helpers ---------------------------------------------------------------------


def _to_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _print_json(data: Any) -> None:
    import json

    print(json.dumps(data, indent=2, sort_keys=False))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(message: str) -> None:
    print(f"spotwise: error: {_one_line(message)}", file=sys.stderr, flush=True)


# ---- entry point ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code; errors become one line on stderr, not raises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `spotwise logs JOB | head`: the reader left. Point stdout at devnull so the
        # interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _main(argv: list[str]) -> int:
    from spotwise.spec import SpecError

    command = _command_of(argv)
    try:
        parser = build_parser(command if command in DELEGATED else None)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help and --version print and "exit" through argparse
            return exc.code if isinstance(exc.code, int) else EXIT_OK
        return int(args.func(args))
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except _Fail as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except SpecError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except Exception as exc:  # noqa: BLE001 - the CLI's promise: one line, never a traceback
        return _report(exc)


def _report(exc: Exception) -> int:
    """Map an exception to its one-line message and exit code."""
    from spotwise.client import ClientConfigError, InvalidSpec, SpotwiseError

    try:
        from spotwise.config import ConfigError
    except ImportError:  # pragma: no cover - config is part of the package
        ConfigError = ()  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(exc, InvalidSpec):
        _error(f"the daemon refused the spec: {exc}")
        return EXIT_USAGE
    if isinstance(exc, (ConfigError, ClientConfigError)):
        _error(str(exc))
        return EXIT_USAGE
    if isinstance(exc, SpotwiseError):
        _error(str(exc))
        return EXIT_FAILURE
    if isinstance(exc, OSError):
        _error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return EXIT_FAILURE
    if os.environ.get("SPOTWISE_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    _error(
        f"internal error: {type(exc).__name__}: {exc} (set SPOTWISE_DEBUG=1 for the traceback)"
    )
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
