"""Storage: migrations (fresh, idempotent, reversible, concurrent), the schema matching the
models, fail-closed behaviour with the database down, and cross-process invalidation."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.store.db import MIGRATION_TABLE, MIGRATIONS_DIR, Store
from flask_llmauth.store.tables import ALL_TABLES, CacheEvent, Key, Team, User
from tests.helpers import (
    ADMIN,
    MASTER_KEY,
    TcpProxy,
    assert_error,
    bearer,
    keys_seen_later,
    new_key,
    record_secret,
)

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
MIGRATIONS = sorted(f[:-3] for f in os.listdir(MIGRATIONS_DIR)
                    if f[:4].isdigit() and f.endswith(".py"))


def chat(client: Any, key: str, model: str = "gpt-4o") -> Any:
    return client.post(CHAT, json={"model": model}, headers=bearer(key))


# -- migrations ---------------------------------------------------------------------------------


def test_migrations_apply_on_a_fresh_database_and_are_idempotent(empty_db_url: str) -> None:
    store = Store(empty_db_url)
    try:
        assert store.migration_status() == [(name, False) for name in MIGRATIONS]
        assert store.migrate() == MIGRATIONS
        tables = set(store.db.get_tables())
        assert {t._meta.table_name for t in ALL_TABLES} | {MIGRATION_TABLE} <= tables
        assert store.migrate() == []
        assert store.migration_status() == [(name, True) for name in MIGRATIONS]
    finally:
        store.close()


def test_schema_of_the_migrations_matches_the_models(db_url: str) -> None:
    """tables.py and the frozen migrations must describe the same columns."""
    store = Store(db_url)
    try:
        store.migrate()
        for table in ALL_TABLES:
            name = table._meta.table_name
            in_db = {c.name: c for c in store.db.get_columns(name)}
            in_model = {f.column_name: f for f in table._meta.sorted_fields}
            assert set(in_db) == set(in_model), name
            for column, field in in_model.items():
                assert in_db[column].null == field.null, f"{name}.{column} nullability"
            unique = {tuple(i.columns) for i in store.db.get_indexes(name) if i.unique}
            for column, field in in_model.items():
                if field.unique:
                    assert (column,) in unique, f"{name}.{column} should be unique"
    finally:
        store.close()


def test_migrations_reverse_and_reapply(db_url: str) -> None:
    store = Store(db_url)
    try:
        store.migrate()
        with store.use() as db:
            reverted = store._runner(db).down(target=MIGRATIONS[0])
        assert reverted == list(reversed(MIGRATIONS))
        remaining = set(store.db.get_tables()) - {MIGRATION_TABLE}
        assert remaining == set()
        assert store.migrate() == MIGRATIONS
    finally:
        store.close()


def test_key_role_cap_migration_caps_keys_a_non_admin_made_for_another_user(
        db_url: str) -> None:
    """0005 gives existing keys the cap new keys get: the role of a creator with a user row
    who is not the key's user, unless that creator is a proxy admin."""
    store = Store(db_url)
    try:
        store.migrate()
        with store.use() as db:
            store._runner(db).down(target="0005_key_role_cap")
            User.create(user_id="alice", user_role="internal_user")
            User.create(user_id="root", user_role="proxy_admin")
            for key_id, user_id, created_by in (("by-alice", "bob", "alice"),
                                                ("by-root", "bob", "root"),
                                                ("own", "alice", "alice"),
                                                ("by-master", "bob", "default_user_id"),
                                                ("service", None, "alice")):
                # Key's columns less max_role (which 0005 adds): the row as 0004 had it.
                Key.insert(key_id=key_id, digest="d-" + key_id, key_name="sk-...x",
                           user_id=user_id, created_by=created_by).execute()
        assert store.migrate() == MIGRATIONS[MIGRATIONS.index("0005_key_role_cap"):]
        with store.use():
            caps = {k.key_id: k.max_role for k in Key.select()}
        assert caps == {"by-alice": "internal_user", "by-root": None, "own": None,
                        "by-master": None, "service": None}
    finally:
        store.close()


def test_key_creator_kind_migration_marks_keys_a_user_created(db_url: str) -> None:
    """0008 records what ``created_by`` names; an existing key's creator is a user when the
    id is a user's and no team's (a team id that is a user's id too stays unknown)."""
    store = Store(db_url)
    try:
        store.migrate()
        with store.use() as db:
            store._runner(db).down(target="0008_key_created_by_kind")
            for user_id in ("alice", "t1"):
                User.create(user_id=user_id)
            Team.create(team_id="t1")
            Team.create(team_id="t2")
            for key_id, created_by in (("by-alice", "alice"), ("by-t1", "t1"),
                                       ("by-t2", "t2"), ("by-master", "default_user_id"),
                                       ("unknown", None)):
                # Key's columns less created_by_kind (which 0008 adds): the row as 0007 had it.
                Key.insert(key_id=key_id, digest="d-" + key_id, key_name="sk-...x",
                           created_by=created_by).execute()
        assert store.migrate() == MIGRATIONS[MIGRATIONS.index("0008_key_created_by_kind"):]
        with store.use():
            kinds = {k.key_id: k.created_by_kind for k in Key.select()}
        assert kinds == {"by-alice": "user", "by-t1": None, "by-t2": None, "by-master": None,
                         "unknown": None}
    finally:
        store.close()


def test_db_status_and_upgrade_commands(app_factory: Any, empty_db_url: str) -> None:
    app = app_factory({"LLMAUTH_AUTO_MIGRATE": False}, db_url=empty_db_url)
    runner = app.test_cli_runner()
    status = runner.invoke(args=["llmauth", "db", "status"])
    assert status.exit_code == 0, status.output
    assert status.output.splitlines() == [f"pending  {name}" for name in MIGRATIONS]
    upgrade = runner.invoke(args=["llmauth", "db", "upgrade"])
    assert upgrade.exit_code == 0 and upgrade.output.strip() == \
        f"applied {len(MIGRATIONS)} migration(s): {', '.join(MIGRATIONS)}"
    status = runner.invoke(args=["llmauth", "db", "status"])
    assert status.output.splitlines() == [f"applied  {name}" for name in MIGRATIONS]
    for command in (["init-db"], ["db", "upgrade"]):
        again = runner.invoke(args=["llmauth", *command])
        assert again.exit_code == 0
        assert again.output.strip() == "applied 0 migration(s); the database is up to date"


def test_an_unmigrated_database_is_named_as_such(app_factory: Any, empty_db_url: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """With LLMAUTH_AUTO_MIGRATE=False on a fresh database the log and the CLI say that the
    tables are missing and how to create them (not that the database is unavailable); a
    request gets the same 503 as during an outage."""
    hint = ("the database has no llmauth tables yet: run `flask llmauth init-db` "
            "(or leave LLMAUTH_AUTO_MIGRATE on)")
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        app = app_factory({"LLMAUTH_AUTO_MIGRATE": False}, db_url=empty_db_url)
        result = app.test_cli_runner().invoke(args=["llmauth", "list-keys"])
    assert result.exit_code == 1 and result.stderr == f"Error: {hint}\n"
    messages = [r.getMessage() for r in caplog.records]
    assert f"llmauth: {hint}" in messages
    assert not [m for m in messages if "database unavailable" in m
                or "invalidation log not reachable" in m], messages
    response = app.test_client().post("/key/generate", json={}, headers=ADMIN)
    assert response.status_code == 503
    assert response.get_json()["error"]["type"] == "db_unavailable"
    init = app.test_cli_runner().invoke(args=["llmauth", "init-db"])
    assert init.exit_code == 0, init.output
    assert app.test_client().post("/key/generate", json={}, headers=ADMIN).status_code == 200


def _subprocess_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMAUTH_", "LITELLM_"))}
    env.update(PYTHONPATH=str(ROOT), FLASK_APP="example_app", LLMAUTH_DATABASE_URL=db_url,
               LLMAUTH_MASTER_KEY=MASTER_KEY, LLMAUTH_AUTO_MIGRATE="false")
    return env


def test_concurrent_init_db_processes_all_succeed(empty_db_url: str, tmp_path: Path) -> None:
    db_url = empty_db_url
    env = _subprocess_env(db_url, tmp_path)
    processes = [
        subprocess.Popen([sys.executable, "-m", "flask", "llmauth", "init-db"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-2000:]
        assert MASTER_KEY not in out + err
    applied = [out for out, _ in outputs if f"applied {len(MIGRATIONS)} migration(s)" in out]
    assert len(applied) == 1, [o for o, _ in outputs]  # exactly one process did the work
    store = Store(db_url)
    try:
        assert store.migration_status() == [(name, True) for name in MIGRATIONS]
        with store.use() as db:
            sql = f'SELECT COUNT(*) FROM "{MIGRATION_TABLE}"'  # noqa: S608 - a constant
            rows = db.execute_sql(sql).fetchone()[0]
        assert rows == len(MIGRATIONS)
    finally:
        store.close()


# -- the database is down -------------------------------------------------------------------------


def test_unreachable_database_is_503_for_uncached_keys_never_200_or_500(
        app_factory: Any) -> None:
    url = "postgresql://postgres@127.0.0.1:9/nowhere"  # port 9 (discard) is closed
    app = app_factory({"LLMAUTH_AUTO_MIGRATE": False}, db_url=url)
    client = app.test_client()
    for response in (
        chat(client, "sk-" + "u" * 43),
        client.get("/key/list", headers=ADMIN),
        client.post("/key/generate", json={}, headers=ADMIN),
        client.get("/key/info?key=x", headers=ADMIN),
        client.post("/user/new", json={"user_id": "x"}, headers=ADMIN),
    ):
        error = assert_error(response, 503, "db_unavailable")
        assert error["message"] == "Service Unavailable, the database is temporarily unreachable."
        text = response.get_data(as_text=True)
        assert "Traceback" not in text and "llmauth_" not in text and "psycopg" not in text
    # The master key needs no database.
    assert client.post(CHAT, json={"model": "gpt-4o"}, headers=ADMIN).status_code == 200


def test_database_outage_mid_run(app_factory: Any, postgres_url: str,
                                 caplog: pytest.LogCaptureFixture) -> None:
    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    app = app_factory(db_url=proxy.url(postgres_url))
    state = app.extensions["llmauth"]
    client = app.test_client()
    try:
        cached = new_key(client)["key"]
        uncached = new_key(client)["key"]
        assert chat(client, cached).status_code == 200  # now in the cache
        proxy.cut()
        for _ in range(3):
            assert chat(client, cached).status_code == 200  # no database needed
            error = assert_error(chat(client, uncached), 503, "db_unavailable")
            assert "Traceback" not in error["message"]
            assert_error(client.get("/key/list", headers=ADMIN), 503, "db_unavailable")
            assert_error(chat(client, "sk-" + "n" * 43), 503, "db_unavailable")
        with app.app_context():
            assert not state.ext.database_ready()  # a readiness probe sees the outage
        # The background work (invalidation poll, last-used flush) fails quietly.
        state.background.run_all()
        assert client.post(CHAT, json={}, headers=ADMIN).status_code == 200
        proxy.restore()
        deadline = time.monotonic() + 20
        while chat(client, uncached).status_code != 200:
            assert time.monotonic() < deadline, "the store did not recover after the outage"
            time.sleep(0.2)
        assert client.get("/key/list", headers=ADMIN).status_code == 200
        assert chat(client, cached).status_code == 200
        with app.app_context():
            assert state.ext.database_ready()
    finally:
        proxy.cut()
        state.close()
        proxy.restore()
    assert MASTER_KEY not in caplog.text and uncached not in caplog.text


# -- cross-process invalidation -------------------------------------------------------------------


@pytest.fixture
def pair(app_factory: Any, db_url: str) -> tuple[Flask, Flask]:
    """Two app instances (two extension states, as two processes have) on one database.
    Their background poll of the invalidation log is pushed out of the test's way: each
    test polls when it means to, and a background poll in between (a slow run takes more
    than the default second) made "not seen yet" and "applied by this poll" untrue."""
    quiet = {"LLMAUTH_CACHE_SYNC_INTERVAL": 3600}
    return app_factory(quiet, db_url=db_url), app_factory(quiet, db_url=db_url)


def _warm(client: Any, key: str) -> None:
    assert chat(client, key).status_code == 200


def _poll(app: Flask) -> int:
    return int(app.extensions["llmauth"].invalidation_log.poll())


def test_revoke_in_one_instance_is_refused_by_the_other_after_its_poll(
        pair: tuple[Flask, Flask]) -> None:
    first, second = pair
    a, b = first.test_client(), second.test_client()
    key = new_key(a)
    _warm(b, key["key"])
    assert a.post("/key/delete", json={"keys": [key["key_id"]]}, headers=ADMIN).status_code == 200
    assert_error(chat(a, key["key"]), 401)
    assert chat(b, key["key"]).status_code == 200  # b's cache does not know yet
    assert _poll(second) >= 1
    assert_error(chat(b, key["key"]), 401)


@pytest.mark.parametrize("change", ["block", "update_models", "rotate", "team_block",
                                    "expire"])
def test_changes_reach_the_other_instance(pair: tuple[Flask, Flask], change: str,
                                          monkeypatch: Any) -> None:
    first, second = pair
    a, b = first.test_client(), second.test_client()
    if change == "team_block":
        assert a.post("/team/new", json={"team_id": "t1"}, headers=ADMIN).status_code == 200
        key = new_key(a, team_id="t1")
    else:
        key = new_key(a, models=["gpt-4o", "gpt-4o-mini"])
    _warm(b, key["key"])
    _warm(b, key["key"])
    if change == "block":
        a.post("/key/block", json={"key": key["key_id"]}, headers=ADMIN)
    elif change == "update_models":
        a.post("/key/update", json={"key": key["key_id"], "models": ["gpt-4o-mini"]},
               headers=ADMIN)
    elif change == "rotate":
        response = a.post("/key/regenerate", json={"key": key["key_id"]}, headers=ADMIN)
        new_secret = record_secret(response.get_json()["key"])
    elif change == "team_block":
        a.post("/team/block", json={"team_id": "t1"}, headers=ADMIN)
    elif change == "expire":
        a.post("/key/update", json={"key": key["key_id"], "duration": "1s"}, headers=ADMIN)
    assert chat(b, key["key"]).status_code == 200  # stale until the poll
    _poll(second)
    if change == "expire":
        assert chat(b, key["key"]).status_code == 200
        keys_seen_later(second, monkeypatch, 1.1)
    response = chat(b, key["key"])
    if change == "update_models":
        assert_error(response, 403)
        assert chat(b, key["key"], "gpt-4o-mini").status_code == 200
    else:
        assert_error(response, 401)
    if change == "rotate":
        assert chat(b, new_secret).status_code == 200


def test_the_background_poll_applies_changes_within_about_a_second(
        app_factory: Any, db_url: str) -> None:
    config = {"LLMAUTH_CACHE_SYNC_INTERVAL": 0.2}
    first = app_factory(config, db_url=db_url)
    second = app_factory(config, db_url=db_url)
    a, b = first.test_client(), second.test_client()
    key = new_key(a)
    _warm(b, key["key"])  # also starts b's background thread
    a.post("/key/block", json={"key": key["key_id"]}, headers=ADMIN)
    started = time.monotonic()
    while chat(b, key["key"]).status_code == 200:
        assert time.monotonic() - started < 10, "the other instance never saw the block"
        time.sleep(0.05)
    assert_error(chat(b, key["key"]), 401)


def test_poll_tolerates_out_of_order_ids(pair: tuple[Flask, Flask]) -> None:
    first, second = pair
    state = second.extensions["llmauth"]
    log = state.invalidation_log
    seen: list[str] = []
    original = state.invalidate.local
    state.invalidate.local = lambda tag: seen.append(tag) or original(tag)  # type: ignore
    try:
        _poll(second)
        base = log.last_id
        with state.store.use():
            CacheEvent.create(id=base + 20, tag="key:later")
        assert _poll(second) == 1 and seen == ["key:later"] and log.last_id == base + 20
        with state.store.use():  # a transaction that took an earlier id commits late
            CacheEvent.create(id=base + 5, tag="key:committed-late")
        assert _poll(second) == 1 and seen[-1] == "key:committed-late"
        assert _poll(second) == 0  # never applied twice
        with state.store.use():
            CacheEvent.create(id=base + 21, tag="key:next")
            CacheEvent.create(id=base + 19, tag="key:in-between")
        assert _poll(second) == 2
        assert seen[-2:] == ["key:in-between", "key:next"]
        assert log.last_id == base + 21
    finally:
        state.invalidate.local = original  # type: ignore[method-assign]


def test_an_event_between_start_up_and_the_first_poll_is_applied(
        app_factory: Any, db_url: str) -> None:
    first = app_factory(db_url=db_url)
    a = first.test_client()
    old = new_key(a)
    a.post("/key/block", json={"key": old["key_id"]}, headers=ADMIN)  # logged before b exists
    second = app_factory(db_url=db_url)
    b = second.test_client()
    key = new_key(a)
    _warm(b, key["key"])
    a.post("/key/delete", json={"keys": [key["key_id"]]}, headers=ADMIN)
    assert _poll(second) >= 1  # the first poll after start-up applies it
    assert_error(chat(b, key["key"]), 401)


def test_the_default_database_file_is_owner_only(tmp_path: Path) -> None:
    from flask_llmauth import LLMAuth
    from tests.helpers import MASTER_KEY

    app = Flask("owner_only", instance_path=str(tmp_path / "instance"))
    app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY)
    LLMAuth(app)
    try:
        path = tmp_path / "instance" / "llmauth.db"
        assert path.stat().st_size > 0  # the migrated database, not a placeholder
        assert path.stat().st_mode & 0o777 == 0o600
        # the folder created for it too (it was 0755 under the usual umask: listable)
        assert (tmp_path / "instance").stat().st_mode & 0o777 == 0o700
    finally:
        app.extensions["llmauth"].close()


def test_shutdown_runs_flushes_not_polls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A CLI command on a database without tables (``LLMAUTH_AUTO_MIGRATE=False``) names
    the missing tables once, at load; the exit's last pass flushes batched writes but does
    not poll the invalidation log (nothing is left to serve)."""
    from flask_llmauth import LLMAuth
    from tests.helpers import MASTER_KEY

    app = Flask("no_tables", instance_path=str(tmp_path / "instance"))
    app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY, LLMAUTH_AUTO_MIGRATE=False)
    with caplog.at_level(logging.INFO, logger="flask_llmauth"):
        LLMAuth(app)
        state = app.extensions["llmauth"]
        assert [task.name for task in state.background._tasks if task.at_stop] == [
            "last-used", "budget-reservations", "budget-leases", "spend"]
        state.background.stop()
        state.close()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("no llmauth tables yet" in m for m in messages) == 1, messages
    assert not [m for m in messages if "background task" in m], messages


def test_a_new_sqlite_file_another_process_is_writing_is_opened_once_its_lock_is_free(
        tmp_path: Path) -> None:
    """Two workers starting on a new SQLite database: while one still writes the file in
    rollback mode (its first migration), the other's switch to WAL failed at once with
    "database is locked" (the busy timeout does not apply to it) and the worker did not
    boot. The switch now waits for the lock, as every other statement does."""
    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    releaser = threading.Timer(0.3, writer.execute, ("COMMIT",))
    releaser.start()
    store = Store(f"sqlite:///{path}")
    try:
        with store.use() as db:
            assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
            # it waited for the writer: its transaction had ended (not a measured delay,
            # which a slow start of the store on a loaded machine would eat into)
            assert not writer.in_transaction
            assert db.execute_sql("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        releaser.join()
        store.close()
        writer.close()
