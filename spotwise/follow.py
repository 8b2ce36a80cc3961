"""Following a job from the command line: its events (`watch`, `submit --follow`) and its
logs (`logs --follow`), reconnecting while the daemon restarts; and the exit codes they end in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

# How long --follow / watch / logs --follow keep retrying while the daemon is unreachable
# (it may be restarting; training goes on without it), before giving up.
RECONNECT_GIVE_UP_S = 60.0
RECONNECT_MAX_BACKOFF_S = 5.0
LOG_POLL_S = 0.5
LOG_STATE_CHECK_S = 2.0


def following(job_id: str, follow: Callable[[], int]) -> int:
    """Run a follow loop; Ctrl-C stops following, not the job, and says so."""
    try:
        return follow()
    except KeyboardInterrupt:
        print(
            f"\nspotwise: stopped following job {job_id}; it keeps running "
            f"(`spotwise cancel {job_id}` stops it)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED


def exit_for(job: Any) -> int:
    from spotwise.proto.v1 import jobs_pb2

    return EXIT_OK if job.state == jobs_pb2.JOB_STATE_SUCCEEDED else EXIT_FAILURE


def follow_events(
    client: Any,
    job_id: str,
    *,
    replay: bool = True,
    give_up_after_s: float = RECONNECT_GIVE_UP_S,
    on_retry: Callable[[Exception], None] | None = None,
) -> Iterator[Any]:
    """The job's events until it ends, across daemon restarts.

    Always ends with an event whose `job` is in a final state. While the daemon is
    unreachable it retries with backoff; after `give_up_after_s` without contact it raises
    DaemonUnavailable. JobNotFound and other errors propagate at once.
    """
    from spotwise.client import DaemonUnavailable, WatchInterrupted, is_terminal
    from spotwise.proto.v1 import jobs_pb2

    job = client.get(job_id)
    if is_terminal(job.state):
        # Nothing more will happen; do not depend on what a replayed stream contains.
        yield jobs_pb2.JobEvent(
            job_id=job_id, time=job.updated_at, kind="state", generation=job.generation, job=job
        )
        return
    last_contact = time.monotonic()
    backoff = 0.5
    while True:
        try:
            for event in client.watch(job_id, replay=replay):
                last_contact = time.monotonic()
                backoff = 0.5
                yield event
                if event.HasField("job") and is_terminal(event.job.state):
                    return
            # The daemon closed the stream without a final event: ask where the job stands.
            job = client.get(job_id)
            last_contact = time.monotonic()
            if is_terminal(job.state):
                yield jobs_pb2.JobEvent(
                    job_id=job_id,
                    time=job.updated_at or time.time(),
                    kind="state",
                    generation=job.generation,
                    job=job,
                )
                return
        except WatchInterrupted:
            last_contact = time.monotonic()  # the daemon is there; resume the live stream
        except DaemonUnavailable as exc:
            if time.monotonic() - last_contact > give_up_after_s:
                raise
            if on_retry is not None:
                on_retry(exc)
        # Events of the gap are not replayed again; the next event carries the whole job.
        replay = False
        time.sleep(backoff)
        backoff = min(backoff * 2, RECONNECT_MAX_BACKOFF_S)


def follow_lines(client: Any, job_id: str, *, out: IO[str]) -> int:
    from spotwise.live import event_line, final_line

    noted = False

    def on_retry(exc: Exception) -> None:
        nonlocal noted
        if not noted:
            print(f"spotwise: lost the daemon, retrying: {exc}", file=sys.stderr, flush=True)
            noted = True

    last = None
    for event in follow_events(client, job_id, on_retry=on_retry):
        noted = False
        print(event_line(event), file=out, flush=True)
        last = event.job
    assert last is not None, "follow_events always ends with a final event"
    print(final_line(last), file=out, flush=True)
    return exit_for(last)


def follow_live(client: Any, job_id: str) -> int:
    from rich.console import Console
    from rich.live import Live

    from spotwise.live import LiveView, final_line

    view = LiveView(job_id)
    console = Console()
    with Live(view.render(), console=console, refresh_per_second=4, transient=False) as live:

        def on_retry(exc: Exception) -> None:
            view.note = f"daemon unreachable, retrying ({exc})"
            live.update(view.render())

        view.set_job(client.get(job_id))
        live.update(view.render())
        for event in follow_events(client, job_id, on_retry=on_retry):
            view.note = ""
            view.update(event)
            live.update(view.render())
    assert view.job is not None
    print(final_line(view.job), flush=True)
    return exit_for(view.job)


def follow_logs(client: Any, follower: Any, out: IO[bytes]) -> int:
    """Write the job's log files as they grow until the job ends (then its last lines)."""
    from spotwise.client import DaemonUnavailable, JobNotFound, is_terminal

    current = None
    next_check = 0.0
    ended = False
    warned = False
    try:
        while True:
            for log, data in follower.poll():
                if log != current:
                    prefix = b"" if current is None else b"\n"
                    out.write(prefix + (log.header() + "\n").encode())
                    current = log
                out.write(data)
            out.flush()
            if ended:
                return EXIT_OK
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LOG_STATE_CHECK_S
                try:
                    # One more read after the job ends picks up the last lines.
                    ended = is_terminal(client.get(follower.job_id).state)
                except DaemonUnavailable as exc:
                    if not warned:
                        print(f"spotwise: {exc}; following the files anyway", file=sys.stderr)
                        warned = True
                except JobNotFound:
                    if current is None:
                        raise
                    ended = True
                if ended:
                    continue
            time.sleep(LOG_POLL_S)
    finally:
        client.close()
