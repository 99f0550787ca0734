"""Database binding for one app: connections, migrations, and the key lookup.

Each app owns a :class:`Store`. Models use thread-local metadata, so :meth:`Store.use`
binds them to this app's database in the calling thread; several apps with different
databases can live in one process. The key lookup of the authentication cold path is one
prebuilt SQL statement (key joined with its team, user and membership), because building
a Peewee query costs about ten times more than running it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import peewee
from playhouse import db_url
from playhouse.migrations import Runner
from playhouse.pool import PooledDatabase

from ..errors import ServiceUnavailable
from .records import KeyRecord, MembershipRecord, TeamRecord, UserRecord
from .tables import ALL_TABLES, JSONText, Key, KeyGrace, Team, TeamMembership, User

log = logging.getLogger("flask_llmauth")

MIGRATIONS_DIR = os.path.join(os.path.dirname(__file__), "migrations")
MIGRATION_TABLE = "llmauth_schema_migration"
_PG_MIGRATION_LOCK = 0x6C6C6D61  # "llma"
#: Errors meaning "the database cannot answer now": answered 503, never treated as a pass.
DB_ERRORS = (peewee.OperationalError, peewee.InterfaceError)


def open_database(url: str) -> peewee.Database:
    """Open a Peewee database from a URL; Postgres URLs get a connection pool."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgres", "postgresql"):
        url = "postgresql+pool" + url[len(scheme):]
        return db_url.connect(url, max_connections=64, stale_timeout=300, timeout=10)
    if scheme == "sqlite":
        return db_url.connect(
            url,
            pragmas={"journal_mode": "wal", "busy_timeout": 10000, "synchronous": "normal"},
            # Transactions take the write lock when they begin: a deferred one that reads
            # and then writes fails at once with SQLITE_BUSY (its snapshot is stale) when
            # another process wrote meanwhile — the busy timeout never applies to it.
            lock_type="IMMEDIATE",
            check_same_thread=False,
        )
    return db_url.connect(url)


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("Service Unavailable, the database is temporarily unreachable.",
                              error_type="db_unavailable")


def _missing_table(exc: peewee.ProgrammingError) -> bool:
    """Postgres' "relation does not exist" (SQLSTATE 42P01): the schema is not migrated.
    (SQLite reports it as an OperationalError, which is already a 503.)"""
    for original in (exc.args[0] if exc.args else None, exc.__cause__, exc.__context__):
        if getattr(original, "sqlstate", None) == "42P01":
            return True
    return False


def _converter(field: peewee.Field) -> Any:
    """A fast equivalent of the field's ``python_value`` for the cold key lookup (``None``:
    take the driver's value as it is).

    Text and integer columns come back from both drivers as ``str``/``int`` already;
    booleans come back as 0/1 from SQLite; timestamps as ISO strings from SQLite (parsed with
    :meth:`datetime.fromisoformat`, falling back to Peewee's parser); JSON columns have a
    fast path for the empty values most rows hold (a fresh object each time: records never
    share a mutable value).
    """
    convert = field.python_value
    if isinstance(field, JSONText):
        def json_value(value: Any) -> Any:
            if value == "[]":
                return []
            if value == "{}":
                return {}
            return convert(value)

        return json_value
    if isinstance(field, peewee.BooleanField):
        return lambda value: value if value is None else bool(value)
    if isinstance(field, peewee.DateTimeField):
        def datetime_value(value: Any) -> Any:
            if value is None or isinstance(value, datetime):
                return value
            try:
                return datetime.fromisoformat(value)
            except (TypeError, ValueError):
                return convert(value)

        return datetime_value
    if isinstance(field, (peewee.IntegerField, peewee.CharField)) and type(
            field).python_value in _PLAIN_PYTHON_VALUES:
        return None  # the driver's value is the Python value: no call at all
    return convert


_PLAIN_PYTHON_VALUES = (peewee.Field.python_value, peewee.IntegerField.python_value,
                        peewee.CharField.python_value, peewee.BigIntegerField.python_value)


@dataclass(frozen=True, slots=True)
class KeyRow:
    """What one key lookup returns: the key with its team, user and team membership."""

    key: KeyRecord
    team: TeamRecord | None
    user: UserRecord | None
    membership: MembershipRecord | None


class Store:
    """One app's database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = open_database(url)
        self.pooled = isinstance(self.db, PooledDatabase)
        self._local = threading.local()
        self._parts = [(Key, KeyRecord, "k"), (Team, TeamRecord, "t"), (User, UserRecord, "u"),
                       (TeamMembership, MembershipRecord, "m")]
        self._key_sql = {column: self._build_key_sql(column) for column in ("digest", "key_id")}
        #: Per joined table: (record type, index of its first column, then the row index,
        #: field name and converter of each column the record has), so turning a row into
        #: records does no lookups. Columns a record lacks are skipped (as ``from_values``).
        self._readers: list[tuple[Any, int, tuple[tuple[int, str, Any], ...]]] = []
        offset = 0
        for table, record_type, _ in self._parts:
            fields = table._meta.sorted_fields
            wanted = {f.name for f in dataclasses.fields(record_type)}
            columns = tuple((offset + i, f.name, _converter(f)) for i, f in enumerate(fields)
                            if f.name in wanted)
            self._readers.append((record_type, offset, columns))
            offset += len(fields)
        p = self.db.param
        # Identifiers are constants and the value is a bound parameter.
        self._grace_sql = (
            f'SELECT "key_id", "revoke_at" FROM "{KeyGrace._meta.table_name}" '  # noqa: S608
            f'WHERE "digest" = {p}'
        )

    # -- connection scope -----------------------------------------------------------------------

    @contextmanager
    def use(self) -> Iterator[peewee.Database]:
        """Bind the models to this database in this thread for the duration of the block.

        A pooled connection is checked out for the outermost block and returned after it.
        Database outages surface as :class:`ServiceUnavailable` (503).
        """
        for table in ALL_TABLES:
            table._meta.database = self.db
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield self.db
        except DB_ERRORS as exc:
            log.error("llmauth: database unavailable: %s", type(exc).__name__)
            raise _unavailable() from None
        except peewee.ProgrammingError as exc:
            if not _missing_table(exc):
                raise
            log.error("llmauth: the database has no llmauth tables yet: run "
                      "`flask llmauth init-db` (or leave LLMAUTH_AUTO_MIGRATE on)")
            raise _unavailable() from None
        finally:
            self._local.depth = depth
            if depth == 0 and self.pooled and not self.db.is_closed():
                self.db.close()

    def close(self) -> None:
        if self.pooled:
            self.db.close_all()  # type: ignore[attr-defined]
        elif not self.db.is_closed():
            self.db.close()

    # -- migrations -----------------------------------------------------------------------------

    def _runner(self, db: peewee.Database) -> Runner:
        return Runner(db, MIGRATIONS_DIR, table_name=MIGRATION_TABLE)

    def migrate(self) -> list[str]:
        """Apply pending migrations (serialised across processes); return their names."""
        with self.use() as db:
            if isinstance(db, peewee.PostgresqlDatabase):
                db.execute_sql("SELECT pg_advisory_lock(%s)", (_PG_MIGRATION_LOCK,))
                try:
                    applied = self._runner(db).up()
                finally:
                    db.execute_sql("SELECT pg_advisory_unlock(%s)", (_PG_MIGRATION_LOCK,))
            else:
                with db.atomic("IMMEDIATE") if isinstance(db, peewee.SqliteDatabase) else (
                    db.atomic()
                ):
                    applied = self._runner(db).up()
        for name in applied:
            log.info("llmauth: applied migration %s", name)
        return applied

    def migration_status(self) -> list[tuple[str, bool]]:
        with self.use() as db:
            return [(m.name, m.applied is not None) for m in self._runner(db).status()]

    # -- the key lookup (cold path of virtual-key authentication) -------------------------------

    def _build_key_sql(self, where_column: str) -> str:
        columns = []
        for table, _, alias in self._parts:
            columns += [f'{alias}."{f.column_name}"' for f in table._meta.sorted_fields]
        p = self.db.param
        # Identifiers are constants and the value is a bound parameter.
        return (
            f"SELECT {', '.join(columns)} "  # noqa: S608
            f'FROM "{Key._meta.table_name}" AS k '
            f'LEFT JOIN "{Team._meta.table_name}" AS t ON t."team_id" = k."team_id" '
            f'LEFT JOIN "{User._meta.table_name}" AS u ON u."user_id" = k."user_id" '
            f'LEFT JOIN "{TeamMembership._meta.table_name}" AS m '
            f'ON m."team_id" = k."team_id" AND m."user_id" = k."user_id" '
            f'WHERE k."{where_column}" = {p}'
        )

    def _fetch_key(self, column: str, value: str) -> KeyRow | None:
        with self.use() as db:
            row = db.execute_sql(self._key_sql[column], (value,)).fetchone()
        if row is None:
            return None
        records: list[Any] = []
        for record_type, start, columns in self._readers:
            if row[start] is None:  # no team / user / membership row
                records.append(None)
                continue
            records.append(record_type(**{
                name: row[index] if convert is None else convert(row[index])
                for index, name, convert in columns
            }))
        return KeyRow(*records)

    def key_by_digest(self, digest: str) -> KeyRow | None:
        return self._fetch_key("digest", digest)

    def key_by_id(self, key_id: str) -> KeyRow | None:
        return self._fetch_key("key_id", key_id)

    def grace_by_digest(self, digest: str) -> tuple[str, Any] | None:
        """``(key_id, revoke_at)`` of a rotated-out secret, or ``None``."""
        with self.use() as db:
            row = db.execute_sql(self._grace_sql, (digest,)).fetchone()
        if row is None:
            return None
        return row[0], KeyGrace.revoke_at.python_value(row[1])
