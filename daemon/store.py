"""The daemon's durable state: jobs, nodes, generations, events and checkpoints in SQLite.

WAL mode with synchronous=FULL, so a committed transaction survives a power cut and readers never
see a torn write. Every write runs in one explicit transaction (BEGIN IMMEDIATE ... COMMIT) that
rolls back on any error. The schema is a numbered list of migrations (daemon.schema); the
database records the highest applied in `PRAGMA user_version`, and opening a database applies
the rest in order.

Soft state (heartbeat times, what an agent last reported) is not stored: after a restart every
known node gets a fresh lease and re-registers.
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from spotwise.daemon.schema import MIGRATIONS, Migration

BUSY_TIMEOUT_S = 5.0
"""Longest wait for SQLite's write lock before a call fails (sqlite3.OperationalError)."""


class StoreError(RuntimeError):
    """The database cannot be used (newer schema than this code, or a failed migration)."""


@dataclass(kw_only=True)
class JobRow:
    """A job as stored; `spec` is the serialized spotwise.v1.JobSpec."""

    id: str
    spec: bytes
    state: str
    created_at: float
    updated_at: float
    name: str = ""
    generation: int = 0
    world_size: int = 0
    step: int = 0
    last_checkpoint_step: int = -1
    last_checkpoint_path: str = ""
    last_checkpoint_at: float = 0.0
    samples_per_second: float = 0.0
    loss: float = 0.0
    cost_usd: float = 0.0
    message: str = ""
    lost_steps: int = 0
    failures: int = 0
    cost_at: float = 0.0
    """Clock seconds up to which cost_usd is charged (0: never charged)."""
    on_demand_usd: float = 0.0
    """What the node-seconds charged so far would have cost on demand."""
    owner: str = ""
    """The principal that submitted the job ("" when the daemon checks no tokens)."""
    checkpoint_failures: int = 0
    """Checkpoint saves that failed in a row since the last commit."""
    last_checkpoint_error: str = ""
    """Why the last failed save failed."""


@dataclass(kw_only=True)
class NodeRow:
    """A node as stored."""

    id: str
    state: str
    joined_at: float
    registered_at: float
    instance_id: str = ""
    instance_type: str = ""
    zone: str = ""
    lifecycle: str = "spot"
    gpus: int = 0
    slots: int = 0
    address: str = ""
    store_port: int = 0
    price_per_hour: float = 0.0
    log_dir: str = ""
    provider_node: str = ""
    job_id: str = ""
    node_rank: int = 0
    drain_since: float | None = None
    drain_deadline: float | None = None
    secret_hash: str = ""
    """SHA-256 (hex) of the node's credential; "" for a node registered before credentials."""


@dataclass(kw_only=True)
class GenerationRow:
    """One generation of a job: its members in node-rank order and where it restores from."""

    job_id: str
    generation: int
    started_at: float
    members: list[str] = field(default_factory=list)
    nproc_per_node: int = 1
    world_size: int = 0
    restore_step: int = -1
    reason: str = ""
    ended_at: float | None = None


@dataclass(kw_only=True)
class EventRow:
    """A job event; `job` is the serialized spotwise.v1.Job after the event, without its spec
    (its figures: state, generation, world size, step, loss, cost ...; may be empty)."""

    job_id: str
    time: float
    kind: str
    generation: int
    message: str
    job: bytes = b""
    id: int = 0
    wire: bytes | None = field(default=None, compare=False, repr=False,
                               metadata={"transient": True})
    """The JobEvent as sent to watchers, serialized once (not stored)."""


@dataclass(kw_only=True)
class CheckpointRow:
    """A committed checkpoint as an agent reported it."""

    job_id: str
    generation: int
    step: int
    path: str
    bytes: int
    cursor: int
    committed_at: float
    id: int = 0


def _columns(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if not f.metadata.get("transient")]


TABLE_KEYS: dict[type, tuple[str, tuple[str, ...]]] = {
    JobRow: ("jobs", ("id",)),
    NodeRow: ("nodes", ("id",)),
    GenerationRow: ("generations", ("job_id", "generation")),
}
"""Each upserted row type's table and primary key."""


_ROW_COLUMNS: dict[type, list[str]] = {cls: _columns(cls) for cls in TABLE_KEYS}


def row_values(row: JobRow | NodeRow | GenerationRow) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """A row's table, key and column values, copied now (the caller may change the row next):
    shallow, as every column is a str, number or bytes (a generation's members encoded here)."""
    table, key = TABLE_KEYS[type(row)]
    data = {c: getattr(row, c) for c in _ROW_COLUMNS[type(row)]}
    if table == "generations":
        data["members"] = json.dumps(data["members"])
    return table, key, data


def _shape(row: tuple[str, tuple[str, ...], dict[str, Any]]) -> tuple[str, tuple[str, ...],
                                                                     tuple[str, ...]]:
    return row[0], row[1], tuple(row[2])


@functools.lru_cache(maxsize=256)
def _upsert_sql(table: str, key: tuple[str, ...], cols: tuple[str, ...], rows: int = 1) -> str:
    """An upsert of `rows` rows in one statement."""
    one = f"({', '.join('?' for _ in cols)})"
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES {', '.join([one] * rows)} "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c}=excluded.{c}" for c in cols if c not in key))


MAX_STATEMENT_VARIABLES = 32766
"""Bound values in one statement: SQLite's default limit since 3.32 (older builds: 999, read
from the connection where Python can)."""


def _upsert_run(conn: sqlite3.Connection, table: str, key: tuple[str, ...],
                cols: tuple[str, ...], values: list[list[Any]]) -> None:
    """Upsert rows of one shape with as few statements as the variable limit allows.

    Not executemany: that steps SQLite once per row and releases the GIL around each step, and
    the writer thread then waits for the event loop's thread to hand it back (up to the switch
    interval, 5 ms) for every row: 4,000 node rows took 0.5 s under 4,000 agents' beats instead
    of 0.03 s. A multi-row statement is a handful of steps."""
    limit = 999
    if hasattr(conn, "getlimit"):  # Python 3.11+
        limit = min(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), MAX_STATEMENT_VARIABLES)
    per = max(1, limit // len(cols))
    for i in range(0, len(values), per):
        chunk = values[i:i + per]
        conn.execute(_upsert_sql(table, key, cols, len(chunk)), [v for row in chunk for v in row])


@dataclass
class StoredBatch:
    """One tick's writes, as values copied on the event loop (the write runs in a thread)."""

    rows: list[tuple[str, tuple[str, ...], dict[str, Any]]] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    thin_progress: list[str] = field(default_factory=list)


class Store:
    """One SQLite database. Safe to share between threads (calls are serialized by a lock).

    Raises StoreError if the database's schema is newer than this code; sqlite3 errors
    (including a write lock held longer than BUSY_TIMEOUT_S) propagate.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every write opens its own below.
        self._conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
            self._conn.execute(f"PRAGMA {pragma}")
        self.migrate()

    # ---- plumbing --------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def pragma(self, name: str) -> Any:
        """The value of a PRAGMA (journal_mode, synchronous, user_version ...)."""
        with self._lock:
            return self._conn.execute(f"PRAGMA {name}").fetchone()[0]

    @property
    def schema_version(self) -> int:
        return int(self.pragma("user_version"))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the body's statements as one transaction: all of them commit, or none."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def migrate(self, migrations: list[Migration] | None = None) -> list[int]:
        """Apply the migrations newer than the database's version, each in its own transaction.

        Returns the versions applied.
        """
        migrations = MIGRATIONS if migrations is None else migrations
        versions = [m.version for m in migrations]
        assert versions == sorted(set(versions)), "migrations must be numbered in order"
        current = self.schema_version
        known = versions[-1] if versions else 0
        if current > known:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this spotwise knows "
                f"({known}); upgrade spotwise or use another state directory"
            )
        applied = []
        for migration in migrations:
            if migration.version <= current:
                continue
            try:
                with self.transaction() as conn:
                    for statement in migration.statements:
                        conn.execute(statement)
                    # PRAGMA takes no parameters; the version is an int from our own list.
                    conn.execute(f"PRAGMA user_version = {int(migration.version)}")
            except sqlite3.Error as exc:
                raise StoreError(
                    f"{self.path}: migration {migration.version} ({migration.description}) "
                    f"failed: {exc}"
                ) from exc
            applied.append(migration.version)
        return applied

    # ---- writes (each one transaction unless given a connection inside one) ------------

    @staticmethod
    def _upsert(conn: sqlite3.Connection, table: str, key: tuple[str, ...], data: dict) -> None:
        conn.execute(_upsert_sql(table, key, tuple(data)), list(data.values()))

    def put(self, row: JobRow | NodeRow | GenerationRow, conn: sqlite3.Connection | None = None
            ) -> None:
        """Insert or replace a job, node or generation row."""
        values = row_values(row)
        self._write(lambda c: self._upsert(c, *values), conn)

    put_job = put_node = put_generation = put

    def add_event(self, row: EventRow, conn: sqlite3.Connection | None = None) -> int:
        """Store an event; returns its id (increasing: the order WatchJob replays)."""
        ids: list[int] = []

        def write(c: sqlite3.Connection) -> None:
            cur = c.execute(
                "INSERT INTO events (job_id, time, kind, generation, message, job) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (row.job_id, row.time, row.kind, row.generation, row.message, row.job),
            )
            ids.append(int(cur.lastrowid or 0))

        self._write(write, conn)
        row.id = ids[0]
        return ids[0]

    def add_checkpoint(self, row: CheckpointRow, conn: sqlite3.Connection | None = None) -> int:
        ids: list[int] = []

        def write(c: sqlite3.Connection) -> None:
            cur = c.execute(
                "INSERT INTO checkpoints (job_id, generation, step, path, bytes, cursor, "
                "committed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.job_id, row.generation, row.step, row.path, row.bytes, row.cursor,
                 row.committed_at),
            )
            ids.append(int(cur.lastrowid or 0))

        self._write(write, conn)
        row.id = ids[0]
        return ids[0]

    def write_batch(self, batch: StoredBatch) -> None:
        """Write one tick's changes in one transaction (all or nothing); sets each event's id."""
        with self.transaction() as conn:
            # A run of rows of one table is a few statements (a generation of 4,000 nodes).
            for (table, key, cols), run in itertools.groupby(batch.rows, key=_shape):
                _upsert_run(conn, table, key, cols, [list(r[2].values()) for r in run])
            for row in batch.checkpoints:
                self.add_checkpoint(row, conn)
            for row in batch.events:
                self.add_event(row, conn)
            for job_id in batch.thin_progress:
                self._thin_progress(conn, job_id)

    @staticmethod
    def _thin_progress(conn: sqlite3.Connection, job_id: str) -> None:
        """Delete every second progress event of the job: its history keeps its shape at half
        the resolution (the other kinds are kept for the job's life)."""
        conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM (SELECT id, ROW_NUMBER() OVER "
            "(ORDER BY id) AS n FROM events WHERE job_id = ? AND kind = 'progress') "
            "WHERE n % 2 = 0)",
            (job_id,),
        )

    def progress_counts(self) -> dict[str, int]:
        """Stored progress events per job."""
        rows = self._select("SELECT job_id, COUNT(*) AS n FROM events WHERE kind = 'progress' "
                            "GROUP BY job_id")
        return {r["job_id"]: int(r["n"]) for r in rows}

    def _write(self, fn: Any, conn: sqlite3.Connection | None) -> None:
        if conn is not None:
            fn(conn)
            return
        with self.transaction() as c:
            fn(c)

    # ---- reads ---------------------------------------------------------------------------

    def _select(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def jobs(self) -> list[JobRow]:
        """Every job, oldest first."""
        rows = self._select("SELECT * FROM jobs ORDER BY created_at, id")
        return [JobRow(**{c: r[c] for c in _columns(JobRow)}) for r in rows]

    def job(self, job_id: str) -> JobRow | None:
        rows = self._select("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return JobRow(**{c: rows[0][c] for c in _columns(JobRow)}) if rows else None

    def nodes(self) -> list[NodeRow]:
        rows = self._select("SELECT * FROM nodes ORDER BY registered_at, id")
        return [NodeRow(**{c: r[c] for c in _columns(NodeRow)}) for r in rows]

    def generations(self, job_id: str) -> list[GenerationRow]:
        rows = self._select(
            "SELECT * FROM generations WHERE job_id = ? ORDER BY generation", (job_id,)
        )
        out = []
        for r in rows:
            data = {c: r[c] for c in _columns(GenerationRow)}
            data["members"] = json.loads(data["members"])
            out.append(GenerationRow(**data))
        return out

    def events(self, job_id: str, after_id: int = 0) -> list[EventRow]:
        """The job's events with id > after_id, oldest first."""
        rows = self._select(
            "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after_id)
        )
        return [EventRow(**{c: r[c] for c in _columns(EventRow)}) for r in rows]

    def checkpoints(self, job_id: str) -> list[CheckpointRow]:
        rows = self._select("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY id", (job_id,))
        return [CheckpointRow(**{c: r[c] for c in _columns(CheckpointRow)}) for r in rows]
