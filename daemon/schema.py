"""The daemon's database schema: a numbered list of migrations (daemon.store applies them).

The database records the highest applied in `PRAGMA user_version`; opening a database applies
the rest in order. Never renumber or edit a released migration: add a new one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    """Applied in increasing order; never renumber or edit a released one, add a new one."""
    description: str
    statements: tuple[str, ...]


MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "initial schema: jobs, nodes, generations, events, checkpoints",
        (
            """CREATE TABLE jobs (
                id TEXT PRIMARY KEY,
                spec BLOB NOT NULL,
                name TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL,
                generation INTEGER NOT NULL DEFAULT 0,
                world_size INTEGER NOT NULL DEFAULT 0,
                step INTEGER NOT NULL DEFAULT 0,
                last_checkpoint_step INTEGER NOT NULL DEFAULT -1,
                last_checkpoint_path TEXT NOT NULL DEFAULT '',
                last_checkpoint_at REAL NOT NULL DEFAULT 0,
                samples_per_second REAL NOT NULL DEFAULT 0,
                loss REAL NOT NULL DEFAULT 0,
                cost_usd REAL NOT NULL DEFAULT 0,
                message TEXT NOT NULL DEFAULT '',
                created_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                lost_steps INTEGER NOT NULL DEFAULT 0,
                failures INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE nodes (
                id TEXT PRIMARY KEY,
                instance_id TEXT NOT NULL DEFAULT '',
                instance_type TEXT NOT NULL DEFAULT '',
                zone TEXT NOT NULL DEFAULT '',
                lifecycle TEXT NOT NULL DEFAULT 'spot',
                gpus INTEGER NOT NULL DEFAULT 0,
                slots INTEGER NOT NULL DEFAULT 0,
                address TEXT NOT NULL DEFAULT '',
                store_port INTEGER NOT NULL DEFAULT 0,
                price_per_hour REAL NOT NULL DEFAULT 0,
                log_dir TEXT NOT NULL DEFAULT '',
                provider_node TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL,
                job_id TEXT NOT NULL DEFAULT '',
                node_rank INTEGER NOT NULL DEFAULT 0,
                joined_at REAL NOT NULL,
                drain_since REAL,
                drain_deadline REAL,
                registered_at REAL NOT NULL
            )""",
            """CREATE TABLE generations (
                job_id TEXT NOT NULL REFERENCES jobs(id),
                generation INTEGER NOT NULL,
                started_at REAL NOT NULL,
                members TEXT NOT NULL,
                nproc_per_node INTEGER NOT NULL,
                world_size INTEGER NOT NULL,
                restore_step INTEGER NOT NULL,
                reason TEXT NOT NULL,
                ended_at REAL,
                PRIMARY KEY (job_id, generation)
            )""",
            """CREATE TABLE events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id TEXT NOT NULL,
                time REAL NOT NULL,
                kind TEXT NOT NULL,
                generation INTEGER NOT NULL,
                message TEXT NOT NULL,
                job BLOB
            )""",
            """CREATE TABLE checkpoints (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                job_id TEXT NOT NULL REFERENCES jobs(id),
                generation INTEGER NOT NULL,
                step INTEGER NOT NULL,
                path TEXT NOT NULL,
                bytes INTEGER NOT NULL,
                cursor INTEGER NOT NULL,
                committed_at REAL NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "indexes for WatchJob replay and checkpoint lookups",
        (
            "CREATE INDEX events_by_job ON events (job_id, id)",
            "CREATE INDEX checkpoints_by_job ON checkpoints (job_id, step)",
        ),
    ),
    Migration(
        3,
        "money survives a restart: when the spend was last charged, and its on-demand equivalent",
        (
            "ALTER TABLE jobs ADD COLUMN cost_at REAL NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN on_demand_usd REAL NOT NULL DEFAULT 0",
        ),
    ),
    Migration(
        4,
        "node credentials, job owners, checkpoint health, and an index to thin progress events",
        (
            "ALTER TABLE nodes ADD COLUMN secret_hash TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE jobs ADD COLUMN checkpoint_failures INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE jobs ADD COLUMN last_checkpoint_error TEXT NOT NULL DEFAULT ''",
            "CREATE INDEX events_by_job_kind ON events (job_id, kind, id)",
        ),
    ),
]
