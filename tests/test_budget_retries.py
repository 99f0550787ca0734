"""``atomic_with_retries``: the budget transactions' retry of a deadlock, a serialization
failure or a busy SQLite database, on real SQLite and Postgres. Each attempt is one whole
transaction (what a failed one wrote is rolled back), a retryable error is retried up to
``_RETRIES`` attempts in all, any other error is raised at once."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import peewee
import pytest

from flask_llmauth.budgets import _RETRIES, _is_retryable, atomic_with_retries
from flask_llmauth.store import db as store_db


@dataclass
class Probe:
    """The tested connection (``db``, in ``store.use()``) and a peer connection to the same
    database, with two tables: ``probe_runs`` (one row per attempt that got to write) and
    ``probe_row`` (one row the peer conflicts on)."""

    db: Any
    peer: Any
    postgres: bool
    attempts: int = 0

    def start(self) -> int:
        """The start of an attempt's work: on Postgres its transaction reads a snapshot
        (repeatable read) so a peer's committed update conflicts with it. Writes the
        attempt's row; returns its number."""
        self.attempts += 1
        if self.postgres:
            self.db.execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            self.db.execute_sql('SELECT "n" FROM "probe_row" WHERE "id" = 1').fetchone()
        self.db.execute_sql(f'INSERT INTO "probe_runs" ("attempt") VALUES ({self.db.param})',  # noqa: S608
                            [self.attempts])
        return self.attempts

    def conflict(self) -> None:
        """A retryable error in the running attempt. Postgres: a real serialization failure
        (the peer commits an update of a row this transaction's snapshot read, then this
        transaction updates it). SQLite: no peer can make a transaction that holds the
        write lock (``BEGIN IMMEDIATE``) busy, so the driver's busy error is raised here,
        wrapped as peewee wraps what the driver raises."""
        if self.postgres:
            self.peer.execute_sql('UPDATE "probe_row" SET "n" = "n" + 1 WHERE "id" = 1')
            self.db.execute_sql('UPDATE "probe_row" SET "n" = "n" + 1 WHERE "id" = 1')
            raise AssertionError("no serialization failure")  # pragma: no cover
        with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
            raise sqlite3.OperationalError("database is locked")

    def runs(self) -> list[int]:
        """The attempts whose rows were committed, read by the peer."""
        rows = self.peer.execute_sql('SELECT "attempt" FROM "probe_runs" ORDER BY 1')
        return [row[0] for row in rows.fetchall()]


@pytest.fixture
def probe(db_url: str) -> Iterator[Probe]:
    store = store_db.Store(db_url)
    peer = store_db.open_database(db_url)
    try:
        with store.use() as db:
            db.execute_sql('CREATE TABLE "probe_runs" ("attempt" integer NOT NULL)')
            db.execute_sql('CREATE TABLE "probe_row" ("id" integer PRIMARY KEY, '
                           '"n" integer NOT NULL)')
            db.execute_sql('INSERT INTO "probe_row" ("id", "n") VALUES (1, 0)')
            yield Probe(db, peer, not isinstance(db, peewee.SqliteDatabase))
    finally:
        peer.close_all() if hasattr(peer, "close_all") else peer.close()
        store.close()


def test_a_retryable_error_runs_the_whole_work_again_in_a_new_transaction(
        probe: Probe) -> None:
    """Failing on every attempt but the last: the work runs ``_RETRIES`` times, only the
    last attempt's writes are committed, and its result is returned."""

    def work(label: str) -> str:
        attempt = probe.start()
        if attempt < _RETRIES:
            probe.conflict()
        return f"{label} {attempt}"

    assert atomic_with_retries(probe.db, work, "done in") == f"done in {_RETRIES}"
    assert probe.attempts == _RETRIES
    assert probe.runs() == [_RETRIES]


def test_a_retryable_error_on_every_attempt_is_raised_after_the_last(probe: Probe) -> None:
    def work() -> None:
        probe.start()
        probe.conflict()

    with pytest.raises(peewee.OperationalError) as raised:
        atomic_with_retries(probe.db, work)
    assert _is_retryable(raised.value)
    assert str(raised.value) == ("could not serialize access due to concurrent update"
                                 if probe.postgres else "database is locked")
    assert probe.attempts == _RETRIES
    assert probe.runs() == []


@pytest.mark.parametrize("error", ["database", "other"])
def test_any_other_error_is_raised_at_once(probe: Probe, error: str) -> None:
    """A database error that is not a conflict (Postgres: a row lock not granted under
    ``NOWAIT``; SQLite: a missing table), or any other exception, is raised from the first
    attempt, which is rolled back."""

    def work() -> None:
        probe.start()
        if error == "other":
            raise LookupError("not a database error")
        if probe.postgres:
            probe.db.execute_sql('SELECT 1 FROM "probe_row" WHERE "id" = 1 FOR UPDATE NOWAIT')
        else:
            probe.db.execute_sql('SELECT 1 FROM "no_such_table"')

    if probe.postgres and error == "database":
        probe.peer.execute_sql("BEGIN")
        probe.peer.execute_sql('SELECT 1 FROM "probe_row" WHERE "id" = 1 FOR UPDATE')
    expected: type[Exception] = LookupError if error == "other" else peewee.OperationalError
    try:
        with pytest.raises(expected) as raised:
            atomic_with_retries(probe.db, work)
    finally:
        if probe.postgres and error == "database":
            probe.peer.execute_sql("ROLLBACK")
    if error == "database":
        assert not _is_retryable(raised.value)
    assert probe.attempts == 1
    assert probe.runs() == []


def test_a_sqlite_database_another_connection_holds_is_tried_again_then_raised(
        tmp_path: Any) -> None:
    """A real busy SQLite database: another connection holds the write lock and this one
    does not wait for it (busy timeout 0), so each attempt's ``BEGIN IMMEDIATE`` fails;
    the work never runs and the busy error is raised after ``_RETRIES`` attempts."""
    url = f"sqlite:///{tmp_path}/busy.db"
    store = store_db.Store(url)
    peer = store_db.open_database(url)
    statements: list[str] = []
    runs: list[int] = []
    work: Callable[[], None] = lambda: runs.append(1)  # noqa: E731
    try:
        with store.use() as db:
            db.execute_sql('CREATE TABLE "probe_runs" ("attempt" integer NOT NULL)')
            peer.execute_sql("BEGIN IMMEDIATE")
            db.execute_sql("PRAGMA busy_timeout = 0")
            db.connection().set_trace_callback(statements.append)
            with pytest.raises(peewee.OperationalError, match="^database is locked$"):
                atomic_with_retries(db, work)
            db.connection().set_trace_callback(None)
    finally:
        peer.close()
        store.close()
    assert statements == ["BEGIN IMMEDIATE"] * _RETRIES
    assert runs == []
