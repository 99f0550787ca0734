"""Database binding for one app: connections, migrations, and the key lookup.

Each app owns a :class:`Store`. Models use thread-local metadata, so :meth:`Store.use`
binds them to this app's database in the calling thread; several apps with different
databases can live in one process. The key lookup of the authentication cold path is one
prebuilt SQL statement (key joined with its team, user and membership), because building
a Peewee query costs about ten times more than running it.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

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
#: Bytes of an SQLite database file read through a memory map instead of ``pread`` calls
#: (address space, not memory: the pages are the OS page cache's, shared by every process).
#: A cold key lookup reads a few random pages of a large file; mapped, each read is a memory
#: access instead of a system call and a 4 KiB copy into the connection's own page cache.
#: Writes still go through the WAL (SQLite never writes through the map by default).
SQLITE_MMAP_SIZE = 2**30
#: How long an SQLite connection waits for another one's write lock.
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Errors meaning "the database cannot answer now": answered 503, never treated as a pass.
DB_ERRORS = (peewee.OperationalError, peewee.InterfaceError)


def open_database(url: str) -> peewee.Database:
    """Open a Peewee database from a URL; Postgres URLs get a connection pool."""
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("postgres", "postgresql"):
        url = "postgresql+pool" + url[len(scheme):]
        return db_url.connect(url, max_connections=64, stale_timeout=300, timeout=10)
    if scheme == "sqlite":
        return _SqliteDatabase(
            **db_url.parse(url),
            pragmas={"busy_timeout": SQLITE_BUSY_TIMEOUT_MS, "synchronous": "normal",
                     "mmap_size": SQLITE_MMAP_SIZE},
            # Transactions take the write lock when they begin: a deferred one that reads
            # and then writes fails at once with SQLITE_BUSY (its snapshot is stale) when
            # another process wrote meanwhile — the busy timeout never applies to it.
            lock_type="IMMEDIATE",
            check_same_thread=False,
        )
    return db_url.connect(url)


class _SqliteDatabase(peewee.SqliteDatabase):
    """SQLite in WAL mode. A new connection switches the file to WAL first (a no-op once it
    is): on a file another process is still writing in rollback mode — two workers starting
    on a new database — that switch fails at once with "database is locked", the busy
    timeout not applying to it, so it is retried until the busy timeout has passed."""

    def _set_pragmas(self, conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                conn.execute("PRAGMA journal_mode = wal")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        super()._set_pragmas(conn)  # type: ignore[misc]  # peewee's hook, not in its stubs


class NotMigrated(ServiceUnavailable):
    """The database answers but has no llmauth tables (``LLMAUTH_AUTO_MIGRATE=False`` and
    ``flask llmauth init-db`` not run yet): a 503 like an outage for a request, named as
    what it is in the log and on the command line (:attr:`hint`)."""

    hint = ("the database has no llmauth tables yet: run `flask llmauth init-db` "
            "(or leave LLMAUTH_AUTO_MIGRATE on)")


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("Service Unavailable, the database is temporarily unreachable.",
                              error_type="db_unavailable")


def _failure(exc: peewee.PeeweeException) -> Exception:
    """What a database error becomes for the caller: a logged 503 when the database cannot
    answer now or has no llmauth tables yet, otherwise the error itself."""
    if _missing_table(exc):
        log.error("llmauth: %s", NotMigrated.hint)
        return NotMigrated("Service Unavailable, the database is temporarily unreachable.",
                           error_type="db_unavailable")
    if isinstance(exc, DB_ERRORS):
        log.error("llmauth: database unavailable: %s", type(exc).__name__)
        return _unavailable()
    return exc


def _missing_table(exc: peewee.PeeweeException) -> bool:
    """Whether the error is a missing table: the schema is not migrated. Postgres reports
    "relation does not exist" (SQLSTATE 42P01) as a ProgrammingError, SQLite "no such
    table: ..." as an OperationalError."""
    if isinstance(exc, peewee.OperationalError):
        return str(exc).startswith("no such table: ")
    if not isinstance(exc, peewee.ProgrammingError):
        return False
    for original in (exc.args[0] if exc.args else None, exc.__cause__, exc.__context__):
        if getattr(original, "sqlstate", None) == "42P01":
            return True
    return False


#: ``_scan(text, 0) -> (value, end)``: the JSON scanner itself (C), which
#: ``JSONDecoder.raw_decode`` wraps in a Python frame; raises ``StopIteration`` when no value
#: starts at 0, ``ValueError`` on bad JSON.
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
#: The longest JSON text of an array :func:`_json_value` remembers, and how many it keeps.
_ARRAY_TEXT_MAX = 1024
_ARRAYS_MAX = 4096
#: JSON text of an array of strings -> its tuple. A tuple of strings is immutable all the way
#: down, so every record can hold the same one; model lists repeat across thousands of keys
#: (a cold lookup then spends one dict lookup on ``models`` instead of a parse).
_ARRAYS: dict[str, tuple[str, ...]] = {}


def _json_value(value: Any) -> Any:
    """A JSON column's value as a record holds it: an array as a tuple (see
    :mod:`.records`); the empty values most rows hold skip the parser (a fresh dict each
    time: records never share a mutable value), and an array of strings seen before is
    the tuple of the first time (:data:`_ARRAYS`)."""
    if value == "{}":
        return {}
    if value == "[]":
        return ()
    known = _ARRAYS.get(value)
    if known is not None:
        return known
    try:  # the C scanner without json.loads' wrappers (about half its cost on short text)
        parsed, end = _scan(value, 0)
    except (ValueError, StopIteration):
        end = -1
    if end != len(value):
        parsed = json.loads(value)
    if type(parsed) is not list:
        return parsed
    array = tuple(parsed)
    if len(value) <= _ARRAY_TEXT_MAX and all(type(item) is str for item in array):
        if len(_ARRAYS) >= _ARRAYS_MAX:
            _ARRAYS.clear()
        _ARRAYS[value] = array
    return array


def _json_exact(value: Any) -> Any:
    """:meth:`JSONText.python_value`, an array as a tuple (the exact conversion)."""
    parsed = json.loads(value)
    return tuple(parsed) if type(parsed) is list else parsed


def _converters(field: peewee.Field, packed: bool) -> tuple[Any, Any] | None:
    """``(fast, exact)``: fast equivalents of the field's ``python_value`` for the cold key
    lookup, applied to values that are not ``None`` (``exact`` when ``fast`` raises
    ``TypeError``/``ValueError``); ``None``: take the driver's value as it is.

    Text and integer columns come back from both drivers as ``str``/``int`` already;
    booleans as 0/1 from SQLite; timestamps as ISO text from SQLite (``packed``: always
    text) and as ``datetime`` from Postgres; JSON columns as text.
    """
    exact = field.python_value
    if isinstance(field, JSONText):
        return _json_value, _json_exact
    if isinstance(field, peewee.BooleanField):
        return bool, exact
    if isinstance(field, peewee.DateTimeField):
        if packed:
            return datetime.fromisoformat, exact

        def datetime_value(value: Any) -> Any:
            return value if isinstance(value, datetime) else datetime.fromisoformat(value)

        return datetime_value, exact
    if isinstance(field, (peewee.IntegerField, peewee.CharField)) and type(
            field).python_value in _PLAIN_PYTHON_VALUES:
        return None  # the driver's value is the Python value: no call at all
    return exact, exact


_PLAIN_PYTHON_VALUES = (peewee.Field.python_value, peewee.IntegerField.python_value,
                        peewee.CharField.python_value, peewee.BigIntegerField.python_value)


@dataclass(frozen=True, slots=True)
class _RecordReader:
    """Turns the values of one joined table (in the record's field order) into its record."""

    record_type: Any
    #: ``(position, fast, exact)`` of each value that needs converting (see _converters).
    converters: tuple[tuple[int, Any, Any], ...]

    def read(self, values: list[Any]) -> Any:
        for position, fast, exact in self.converters:
            value = values[position]
            if value is not None:
                try:
                    values[position] = fast(value)
                except (TypeError, ValueError):
                    values[position] = exact(value)
        return tuple.__new__(self.record_type, values)  # a record is a named tuple

    def compile(self, width: int) -> Callable[[list[Any]], Any]:
        """The same as :meth:`read`, as one generated function without a loop: each value
        that needs converting is converted inline (``None`` kept), the record is built from
        one tuple display. ``values`` may be any sequence; only its first ``width`` items are
        read (the packed lookup hands the key's reader the whole row). A value the fast
        converter refuses
        sends the whole row to :meth:`read` (the fast path changes nothing in ``values``, so
        it starts over from the driver's values)."""
        fast = {position: convert for position, convert, _ in self.converters}
        items = [f"v[{i}]" if i not in fast else _INLINE.get(fast[i], _CALL).format(i)
                 for i in range(width)]
        source = ("def read(v):\n"
                  "    try:\n"
                  f"        return new(record, ({', '.join(items)},))\n"
                  "    except (TypeError, ValueError):\n"
                  "        return slow(v)\n")
        namespace: dict[str, Any] = {f"f{i}": convert for i, convert in fast.items()}
        namespace.update(new=tuple.__new__, record=self.record_type, arrays=_ARRAYS,
                         slow=lambda values: self.read(list(values[:width])))
        exec(compile(source, f"<{self.record_type.__name__} reader>", "exec"),  # noqa: S102
             namespace)
        read: Callable[[list[Any]], Any] = namespace["read"]
        return read


#: How the generated reader converts a value, by fast converter (``{0}``: its position):
#: calls made inline where they are cheap to spell out. ``bool`` is a truth test; a JSON
#: column's empty object and array (what most rows hold) skip :func:`_json_value`, and so
#: does an array it has seen before (:data:`_ARRAYS`).
_CALL = "(None if v[{0}] is None else f{0}(v[{0}]))"
_INLINE: dict[Any, str] = {
    bool: "(None if v[{0}] is None else True if v[{0}] else False)",
    _json_value: ("({{}} if (x{0} := v[{0}]) == '{{}}' else () if x{0} == '[]' "
                  "else None if x{0} is None else arrays.get(x{0}) or f{0}(x{0}))"),
}


def _sqlite_has_json() -> bool:
    """Whether this SQLite library has the JSON functions (built in since 3.38)."""
    try:
        with closing(sqlite3.connect(":memory:")) as conn:
            return conn.execute("SELECT json_array(1, 'a', NULL)").fetchone()[0] == '[1,"a",null]'
    except sqlite3.Error:
        return False


class KeyRow(NamedTuple):
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
        if self.pooled:
            ref = weakref.ref(self)
            os.register_at_fork(
                after_in_child=lambda: None if (o := ref()) is None else o._forked())
        #: Connections a forked child inherited: kept, never used nor closed (see _forked).
        self._inherited: list[Any] = []
        #: Each joined table with its alias and the fields its record has, in the record's
        #: field order (a record mirrors its table, less columns like ``digest``).
        self._parts: list[tuple[type[peewee.Model], str, list[peewee.Field]]] = []
        for table, record_type, alias in ((Key, KeyRecord, "k"), (Team, TeamRecord, "t"),
                                          (User, UserRecord, "u"),
                                          (TeamMembership, MembershipRecord, "m")):
            self._parts.append((table, alias, [table._meta.fields[name]
                                               for name in record_type._fields]))
        #: SQLite packs the row into one JSON array (the key's values, then one array or
        #: ``null`` for each of its team, user and membership): the driver then fetches 1
        #: column, not ~100 (it drops and retakes the GIL and builds ``cursor.description``
        #: per column), and one JSON parse splits it.
        self._packed = isinstance(self.db, peewee.SqliteDatabase) and _sqlite_has_json()
        self._prepare_key_lookup()
        p = self.db.param
        # Identifiers are constants and the value is a bound parameter.
        self._grace_sql = (
            f'SELECT "key_id", "revoke_at" FROM "{KeyGrace._meta.table_name}" '  # noqa: S608
            f'WHERE "digest" = {p}'
        )

    def _forked(self) -> None:
        """A forked child must not use its parent's pooled connections: the two processes
        would share their sockets (one reading the other's answers, committing the other's
        transaction). The pool forgets them; in this process their descriptors are pointed
        at ``/dev/null``, so nothing the child does with them (a close sends the server a
        terminate message) reaches the parent's sessions; they are kept referenced."""
        db: Any = self.db
        inherited = [conn for _ts, _n, conn in db._connections]
        inherited += [held.connection for held in db._in_use.values()]
        if db._state.conn is not None:
            inherited.append(db._state.conn)
        if inherited:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                for conn in inherited:
                    try:
                        os.dup2(null, conn.fileno())
                    except Exception:  # noqa: S112 (already closed: no descriptor)
                        continue
            finally:
                os.close(null)
        self._inherited += inherited
        db._connections, db._in_use = [], {}
        db._state.reset()
        db._lock = threading.Lock()  # any of these may have been held by a parent's thread
        db._pool_lock = threading.RLock()
        db._pool_available = threading.Condition(db._pool_lock)

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
        except (*DB_ERRORS, peewee.ProgrammingError) as exc:
            failure = _failure(exc)
            if failure is exc:
                raise
            raise failure from None
        finally:
            self._local.depth = depth
            if depth == 0 and self.pooled and not self.db.is_closed():
                self.db.close()

    def ping(self) -> None:
        """One round trip that reads a llmauth table: raises :class:`ServiceUnavailable`
        when the database cannot answer or has no llmauth tables yet."""
        with self.use() as db:
            db.execute_sql(f'SELECT 1 FROM "{Key._meta.table_name}" LIMIT 1')  # noqa: S608

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

    def _prepare_key_lookup(self) -> None:
        """The lookup statements and, per joined table, how its values become a record."""
        self._readers = [
            _RecordReader(table_record, tuple(
                (i, *pair) for i, f in enumerate(fields)
                if (pair := _converters(f, self._packed)) is not None))
            for (_, _, fields), table_record in zip(
                self._parts, (KeyRecord, TeamRecord, UserRecord, MembershipRecord), strict=True)]
        #: One generated function per joined table (see _RecordReader.compile).
        self._key_reader, self._team_reader, self._user_reader, self._member_reader = (
            reader.compile(len(fields))
            for reader, (_, _, fields) in zip(self._readers, self._parts, strict=True))
        #: How many of a packed row's values are the key's (the joined rows follow).
        self._key_width = len(self._parts[0][2])
        self._key_sql = {column: self._build_key_sql(column) for column in ("digest", "key_id")}
        self._digest_sql = self._key_sql["digest"]

    def _build_key_sql(self, where_column: str) -> str:
        selected = []
        for table, alias, fields in self._parts:
            columns = [f'{alias}."{f.column_name}"' for f in fields]
            if not self._packed or table is Key:  # the row found: always there
                selected += columns
            else:  # packed: a nested array, NULL when the joined row is absent
                selected.append(f'CASE WHEN {alias}."id" IS NULL THEN NULL '
                                f"ELSE json_array({', '.join(columns)}) END")
        if self._packed:
            selected = [f"json_array({', '.join(selected)})"]
        p = self.db.param
        # Identifiers are constants and the value is a bound parameter.
        return (
            f"SELECT {', '.join(selected)} "  # noqa: S608
            f'FROM "{Key._meta.table_name}" AS k '
            f'LEFT JOIN "{Team._meta.table_name}" AS t ON t."team_id" = k."team_id" '
            f'LEFT JOIN "{User._meta.table_name}" AS u ON u."user_id" = k."user_id" '
            f'LEFT JOIN "{TeamMembership._meta.table_name}" AS m '
            f'ON m."team_id" = k."team_id" AND m."user_id" = k."user_id" '
            f'WHERE k."{where_column}" = {p}'
        )

    def _cursor(self) -> Any:
        """This thread's cursor for the prebuilt statements, kept per connection: a new
        cursor per lookup costs an object and the weak reference its connection keeps."""
        connection = self.db.connection()
        local = self._local
        cursor = getattr(local, "cursor", None)
        if cursor is None or cursor.connection is not connection:
            cursor = local.cursor = connection.cursor()
        return cursor

    def _fetch_row(self, sql: str, params: tuple[Any, ...]) -> Any:
        """The first row of a prebuilt statement (which names its tables, so the models need
        no binding). Errors are reported as :meth:`use` reports them."""
        if self.pooled:  # a pooled connection is checked out and returned by use()
            with self.use() as db:
                return db.execute_sql(sql, params).fetchone()
        try:
            try:
                cursor = self._cursor()
                cursor.execute(sql, params)
                return cursor.fetchone()
            except Exception:
                # the driver's error as Peewee's (the wrapper is missing from Peewee's stubs)
                with peewee.__exception_wrapper__:  # type: ignore[attr-defined]
                    raise
        except (*DB_ERRORS, peewee.ProgrammingError) as exc:
            failure = _failure(exc)
            if failure is exc:
                raise
            raise failure from None

    def _fetch_key(self, sql: str, value: str) -> KeyRow | None:
        row = self._fetch_row(sql, (value,))
        if row is None:
            return None
        if self._packed:  # SQLite's own JSON: one scan parses the whole row
            values = _scan(row[0], 0)[0]
            team, user, member = values[self._key_width:]
            return tuple.__new__(KeyRow, (
                self._key_reader(values),
                None if team is None else self._team_reader(team),
                None if user is None else self._user_reader(user),
                None if member is None else self._member_reader(member)))
        records: list[Any] = []
        start = 0
        for read, (_, _, fields) in zip((self._key_reader, self._team_reader, self._user_reader,
                                         self._member_reader), self._parts, strict=True):
            end = start + len(fields)
            records.append(None if row[start] is None else read(row[start:end]))
            start = end
        return KeyRow(*records)

    def key_by_digest(self, digest: str) -> KeyRow | None:
        return self._fetch_key(self._digest_sql, digest)

    def key_by_id(self, key_id: str) -> KeyRow | None:
        return self._fetch_key(self._key_sql["key_id"], key_id)

    def grace_by_digest(self, digest: str) -> tuple[str, Any] | None:
        """``(key_id, revoke_at)`` of a rotated-out secret, or ``None``."""
        row = self._fetch_row(self._grace_sql, (digest,))
        if row is None:
            return None
        return row[0], KeyGrace.revoke_at.python_value(row[1])
