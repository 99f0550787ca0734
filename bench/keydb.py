"""The benchmark's key database: N virtual keys in the extension's own SQLite schema.

Key *i* is derived from *i* (``sk-`` + 43 url-safe characters of a SHA-256 of a fixed seed
and *i*), so the benchmark can present any stored key without the database holding one;
the database holds only what the extension stores: the HMAC digest computed by
:class:`flask_llmauth.crypto.KeyDigester` under the benchmark's master key. The file is
built once (schema by the extension's migrations, rows by one bulk insert with the indexes
created afterwards) and reused while its parameters match.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from flask_llmauth.crypto import KeyDigester, abbreviate
from flask_llmauth.store.db import Store
from flask_llmauth.store.tables import Key

#: Bump when the rows the builder writes change.
FORMAT = 1
#: Not a secret: the benchmark's own master key (digests are computed under it).
BENCH_MASTER_KEY = "sk-bench-master-key-0123456789abcdefghijklmnopqrstuvwxyz"
MODELS = ["gpt-4o", "gpt-4o-mini"]
_SEED = b"flask_llmauth bench key "


def raw_key(index: int) -> str:
    """The secret of key ``index`` (same shape as a generated key)."""
    digest = hashlib.sha256(_SEED + index.to_bytes(8, "big")).digest()
    return "sk-" + base64.urlsafe_b64encode(digest).decode()[:43]


def key_id(index: int) -> str:
    return str(uuid.UUID(int=index + 1))


def user_id(index: int) -> str:
    return f"bench-user-{index % 1000}"


def _fingerprint() -> str:
    """Identifies the digest secret without revealing anything (the digest of key 0)."""
    return KeyDigester(BENCH_MASTER_KEY).digest(raw_key(0))[:16]


def _meta(path: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            return dict(conn.execute("SELECT name, value FROM bench_meta").fetchall())
    except sqlite3.Error:
        return {}


def ensure(path: Path, count: int, log: Callable[[str], object] = print) -> Path:
    """Return ``path``, (re)building it unless it already holds ``count`` keys of this
    format under this digest secret."""
    wanted = {"format": str(FORMAT), "count": str(count), "digest": _fingerprint()}
    if path.exists() and _meta(path) == wanted:
        return path
    log(f"building {path.name}: {count:,} keys (once; it is cached under bench/) ...")
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".building")
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    store = Store(f"sqlite:///{tmp}")
    store.migrate()  # the extension's own schema
    store.close()
    _bulk_insert(tmp, count, wanted)
    for stale in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    os.replace(tmp, path)  # complete or absent: an interrupted build is never used
    log(f"built in {time.perf_counter() - started:.1f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    return path


def _bulk_insert(path: Path, count: int, meta: dict[str, str]) -> None:
    digester = KeyDigester(BENCH_MASTER_KEY)
    table = Key._meta.table_name
    fields = [f for f in Key._meta.sorted_fields if f.name != "id"]
    constant: dict[str, object] = {}
    for field in fields:
        default = field.default() if callable(field.default) else field.default
        value = field.db_value(default)
        constant[field.name] = str(value) if isinstance(value, datetime) else value
    constant["models"] = Key.models.db_value(MODELS)
    per_row = ("key_id", "digest", "key_name", "user_id")
    names = [f.name for f in fields]
    columns = ", ".join(f'"{f.column_name}"' for f in fields)
    placeholders = ", ".join("?" for _ in fields)
    positions = [names.index(n) for n in per_row]
    template = [constant[n] for n in names]

    def rows() -> Iterator[list[Any]]:
        for index in range(count):
            raw = raw_key(index)
            row = list(template)
            for position, value in zip(positions, (
                    key_id(index), digester.digest(raw), abbreviate(raw), user_id(index)),
                    strict=True):
                row[position] = value
            yield row

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        indexes = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name=? "
            "AND sql IS NOT NULL", (table,)).fetchall()
        for name, _ in indexes:
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute("BEGIN")
        conn.executemany(
            f'INSERT INTO "{table}" ({columns}) VALUES ({placeholders})',  # noqa: S608
            rows())
        conn.execute("COMMIT")
        for _, sql in indexes:  # building an index over sorted input is much faster
            conn.execute(sql)
        conn.execute("ANALYZE")
        conn.execute("CREATE TABLE bench_meta (name TEXT PRIMARY KEY, value TEXT)")
        conn.executemany("INSERT INTO bench_meta VALUES (?, ?)", meta.items())
        conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        conn.close()
