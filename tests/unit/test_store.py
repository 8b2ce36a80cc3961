"""The daemon's SQLite store: pragmas, numbered migrations, transactions, reload."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from spotwise.daemon.schema import MIGRATIONS, Migration
from spotwise.daemon.store import (
    CheckpointRow,
    EventRow,
    GenerationRow,
    JobRow,
    NodeRow,
    Store,
    StoredBatch,
    StoreError,
    row_values,
)


def test_wal_mode_and_full_synchronous(tmp_path: Path) -> None:
    store = Store(tmp_path / "spotwise.db")
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    # WAL is a property of the file: a second connection sees it too.
    other = sqlite3.connect(tmp_path / "spotwise.db")
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    store.close()


def test_migrations_are_numbered_in_order_and_all_applied(tmp_path: Path) -> None:
    versions = [m.version for m in MIGRATIONS]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    store = Store(tmp_path / "db")
    assert store.schema_version == versions[-1]
    tables = {r[0] for r in sqlite3.connect(tmp_path / "db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"jobs", "nodes", "generations", "events", "checkpoints"} <= tables
    # Opening again applies nothing.
    assert store.migrate() == []
    store.close()


def test_an_old_database_is_upgraded_by_the_newer_migrations_only(tmp_path: Path) -> None:
    path = tmp_path / "db"
    # Create the database as a release with only migration 1 would have left it.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    for statement in MIGRATIONS[0].statements:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    conn.execute(
        "INSERT INTO jobs (id, spec, state, created_at, updated_at) VALUES ('j', x'', 'PENDING', 1, 1)"
    )
    conn.close()
    store = Store(path)
    assert store.schema_version == MIGRATIONS[-1].version
    assert [j.id for j in store.jobs()] == ["j"]  # data kept across the upgrade
    indexes = {r[0] for r in sqlite3.connect(path).execute(
        "SELECT name FROM sqlite_master WHERE type='index'")}
    assert "events_by_job" in indexes
    store.close()


def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    version = store.schema_version
    broken = [*MIGRATIONS, Migration(version + 1, "broken",
                                      ("CREATE TABLE extra (x INTEGER)", "NOT SQL"))]
    with pytest.raises(StoreError, match="broken"):
        store.migrate(broken)
    assert store.schema_version == version
    with pytest.raises(sqlite3.OperationalError):
        store._select("SELECT * FROM extra")  # the first statement was rolled back too
    store.close()


def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db")
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "db")


def test_a_transaction_is_all_or_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    with pytest.raises(RuntimeError, match="boom"):
        with store.transaction() as conn:
            store.put_job(JobRow(id="j1", spec=b"s", state="PENDING", created_at=1, updated_at=1),
                          conn)
            store.add_event(EventRow(job_id="j1", time=1, kind="state", generation=0,
                                     message="submitted"), conn)
            raise RuntimeError("boom")
    assert store.jobs() == [] and store.events("j1") == []
    store.close()


def test_everything_written_is_there_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db"
    store = Store(path)
    job = JobRow(id="j1", spec=b"\x0a\x01x", state="RUNNING", created_at=1.0, updated_at=2.0,
                 generation=3, world_size=4, last_checkpoint_step=50, failures=1)
    node = NodeRow(id="n1", state="ASSIGNED", joined_at=1.0, registered_at=1.0, address="10.0.0.1",
                   store_port=29500, job_id="j1", node_rank=1, drain_since=5.0)
    gen = GenerationRow(job_id="j1", generation=3, started_at=4.0, members=["n0", "n1"],
                        nproc_per_node=2, world_size=4, restore_step=50, reason="lost n2")
    with store.transaction() as conn:
        store.put_job(job, conn)
        store.put_node(node, conn)
        store.put_generation(gen, conn)
    first = store.add_event(EventRow(job_id="j1", time=4.0, kind="generation", generation=3,
                                     message="g3", job=b"\x01"))
    second = store.add_event(EventRow(job_id="j1", time=5.0, kind="progress", generation=3,
                                      message="step 60"))
    store.add_checkpoint(CheckpointRow(job_id="j1", generation=3, step=50, path="/c/50",
                                       bytes=10, cursor=400, committed_at=4.5))
    job.state = "SUCCEEDED"
    store.put_job(job)  # an update, not a second row
    store.close()

    again = Store(path)
    assert again.jobs() == [job]
    assert again.nodes() == [node]
    assert again.generations("j1") == [gen]
    assert [e.id for e in again.events("j1")] == [first, second] and first < second
    assert [e.message for e in again.events("j1", after_id=first)] == ["step 60"]
    assert again.checkpoints("j1")[0].cursor == 400
    again.close()


def test_a_batch_of_many_rows_is_written_in_statements_under_the_variable_limit(
        tmp_path: Path) -> None:
    """A generation of thousands of nodes is a few multi-row statements; a run longer than the
    connection's bound-variable limit is split, rows of one key keep the last value, and every
    value (floats, NULLs, bytes) comes back as written."""
    store = Store(tmp_path / "db")
    store._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)  # 4 node rows a statement
    nodes = [NodeRow(id=f"n{i:03d}", state="ASSIGNED", joined_at=1.0 + i / 3, registered_at=0.1,
                     job_id="j1", node_rank=i, drain_since=None if i % 2 else 2.5)
             for i in range(23)]
    again = NodeRow(id="n007", state="DRAINING", joined_at=9.0, registered_at=0.1)
    job = JobRow(id="j1", spec=b"\x00\xffspec", state="RUNNING", created_at=1, updated_at=1)
    store.write_batch(StoredBatch(rows=[row_values(n) for n in nodes]
                                  + [row_values(job), row_values(again)]))
    by_id = {n.id: n for n in store.nodes()}
    assert len(by_id) == 23
    assert by_id["n007"] == again
    assert [by_id[n.id] for n in nodes if n.id != "n007"] == [n for n in nodes if n.id != "n007"]
    assert store.jobs() == [job]
    store.close()
