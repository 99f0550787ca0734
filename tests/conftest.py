"""Shared fixtures: app factories over SQLite or Postgres, and the session-wide leak check.

Every string the key digester ever sees (every key presented or generated) and every
master key used is recorded. When the session ends, the DEBUG log of the whole run and a
dump of every table of every database the tests created are searched for them; a hit fails
the run. Postgres databases are dumped before they are dropped.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from flask import Flask, jsonify, request

from flask_llmauth import LLMAuth, allowed_models, current_principal, require_role
from flask_llmauth.crypto import KeyDigester
from flask_llmauth.store import db as store_db
from tests.helpers import MASTER_KEY, SECRETS, record_secret
from tests.idp_fixture import idp, idp_factory  # noqa: F401 - fixtures
from tests.storage_servers import (  # noqa: F401 - fixtures
    memcached_url,
    redis_cluster_url,
    redis_sentinel_url,
    redis_tls,
)

POSTGRES_URL = os.environ.get("LLMAUTH_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("LLMAUTH_TEST_REDIS_URL")

# -- secret recording and the leak check ------------------------------------------------------

_DATABASE_URLS: list[str] = []
_LOG_LINES: list[str] = []
_original_digest = KeyDigester.digest
_original_store_init = store_db.Store.__init__


def _recording_digest(self: KeyDigester, raw_key: str) -> str:
    if len(raw_key) >= 12:
        SECRETS.add(raw_key)
    return _original_digest(self, raw_key)


def _recording_store_init(self: store_db.Store, url: str) -> None:
    _DATABASE_URLS.append(url)
    _original_store_init(self, url)


class _CaptureAll(logging.Handler):
    """Keeps every log line of the run: the message, and the traceback when there is one
    (an exception's text is where secrets hide most often)."""

    _formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # a bad log call elsewhere must not hide our check
            line = f"{record.msg} {record.args}"
        if record.exc_info:
            line += "\n" + self._formatter.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + record.stack_info
        _LOG_LINES.append(line)


def pytest_sessionstart(session: pytest.Session) -> None:
    KeyDigester.digest = _recording_digest  # type: ignore[method-assign]
    store_db.Store.__init__ = _recording_store_init  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(_CaptureAll(level=logging.DEBUG))
    root.setLevel(logging.DEBUG)
    # SIGTERM (``timeout``, a CI runner cancelling a job) ends the run as Ctrl-C does, so
    # fixtures still stop the servers they started (gunicorn, the IdP, Apache): terminated
    # outright, the run left them running, orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def dump_database(url: str) -> str:
    """Every row of every table of a database, as text."""
    db = store_db.open_database(url)
    try:
        chunks = []
        for table in db.get_tables():
            cursor = db.execute_sql(f'SELECT * FROM "{table}"')  # noqa: S608 - test dump
            chunks += [repr(row) for row in cursor.fetchall()]
        return "\n".join(chunks)
    finally:
        db.close()


#: A secret of this shape (every virtual key, most master keys) is found through the text's
#: ``sk-`` runs: such a secret occurs in the text exactly when it is a prefix of the run of
#: url-safe characters that starts where it does (all its characters are url-safe).
_KEY_SHAPED = re.compile(r"sk-[A-Za-z0-9_\-]+")


def find_leaks(text: str) -> list[str]:
    """The secrets of :data:`SECRETS` that occur in ``text`` (abbreviated). The same answer
    as ``s in text`` for every secret, in one pass over the text's ``sk-`` runs for the
    key-shaped ones (tens of thousands in a full run: a scan of the whole text each took
    minutes over the session's log) and a search of the text for each of the others."""
    keys = {s for s in SECRETS if _KEY_SHAPED.fullmatch(s)}
    found = {s for s in SECRETS - keys if s in text}
    lengths = sorted({len(s) for s in keys})
    start = text.find("sk-") if keys else -1
    while start != -1:
        match = _KEY_SHAPED.match(text, start)  # None: "sk-" ends the run
        run = match.group() if match is not None else ""
        for length in lengths:
            if length > len(run):
                break
            if run[:length] in keys:
                found.add(run[:length])
        start = text.find("sk-", start + 1)
    return sorted({s[:12] + "..." for s in found})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    leaks = find_leaks("\n".join(_LOG_LINES))
    for url in dict.fromkeys(_DATABASE_URLS):
        if url.startswith("sqlite:///") and os.path.exists(url[len("sqlite:///"):]):
            leaks += [f"{leak} in {url}" for leak in find_leaks(dump_database(url))]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    summary = (f"leak check: {len(SECRETS)} secrets, {len(_LOG_LINES)} log lines, "
               f"{len(set(_DATABASE_URLS))} databases scanned")
    if reporter is not None:
        reporter.write_line(summary)
    if leaks:
        if reporter is not None:
            reporter.write_line(f"LEAK: raw secrets found: {leaks}", red=True)
        session.exitstatus = 1


REQUIRE_PEERS = os.environ.get("LLMAUTH_TEST_REQUIRE_PEERS") == "1"


def missing_peer(reason: str) -> None:
    """Skip a test whose real peer is not configured; with LLMAUTH_TEST_REQUIRE_PEERS=1
    (set by .ci/run) a missing peer is a failure instead."""
    if REQUIRE_PEERS:
        pytest.fail(f"{reason} (LLMAUTH_TEST_REQUIRE_PEERS=1)")
    pytest.skip(reason)


# -- databases ----------------------------------------------------------------------------------


def _admin_url(url: str) -> str:
    base, _, _ = url.rpartition("/")
    return base + "/postgres"


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A fresh, empty database on the test Postgres server: its URL, then, on exit, its
    rows are dumped and searched for raw secrets and it is dropped."""
    assert POSTGRES_URL
    name = f"llmauth_test_{uuid.uuid4().hex[:12]}"
    admin = store_db.open_database(_admin_url(POSTGRES_URL))
    admin.execute_sql(f'CREATE DATABASE "{name}"')
    url = POSTGRES_URL.rpartition("/")[0] + "/" + name
    try:
        yield url
    finally:
        leaks = find_leaks(dump_database(url))
        admin.execute_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close_all() if hasattr(admin, "close_all") else admin.close()
        assert not leaks, f"raw secrets in database rows: {leaks}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database for one test (dumped for leaks, then dropped)."""
    if not POSTGRES_URL:
        missing_peer("LLMAUTH_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    with fresh_postgres_database() as url:
        yield url


_SQLITE_TEMPLATE: list[str] = []


def migrated_sqlite_url(directory: Any) -> str:
    """A SQLite database with every migration applied, copied from one migrated once per
    session (migrating each test's database from scratch dominated the suite's run time)."""
    path = os.path.join(str(directory), "llmauth.db")
    if not os.path.exists(path):
        if not _SQLITE_TEMPLATE:
            template = os.path.join(tempfile.mkdtemp(prefix="llmauth-template-"), "template.db")
            store = store_db.Store(f"sqlite:///{template}")
            store.migrate()
            store.close()
            _SQLITE_TEMPLATE.append(template)
        shutil.copyfile(_SQLITE_TEMPLATE[0], path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Each test using it runs on SQLite and, when configured, on Postgres."""
    if request.param == "sqlite":
        return migrated_sqlite_url(tmp_path)
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Like ``db_url``, but a database with no tables at all (for migration tests)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/empty.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def redis_prefix() -> str:
    if not REDIS_URL:
        missing_peer("LLMAUTH_TEST_REDIS_URL is not set (.ci/run sets it)")
    return f"llmauth-test-{uuid.uuid4().hex[:8]}"


# -- apps -----------------------------------------------------------------------------------------

AppFactory = Callable[..., Flask]


def add_test_routes(app: Flask, llmauth: LLMAuth) -> None:
    """Host routes a typical LLM gateway has, each echoing who called it."""

    def who() -> dict[str, Any]:
        p = current_principal
        return {"method": p.method, "role": p.role.value, "user_id": p.user_id,
                "team_id": p.team_id, "key_id": p.key_id, "key_name": p.key_name}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    def chat() -> Any:
        body = request.get_json(silent=True) or {}
        return jsonify(model=body.get("model"), principal=who())

    @app.post("/v1/embeddings")
    def embeddings() -> Any:
        return jsonify(model=(request.get_json(silent=True) or {}).get("model"), principal=who())

    @app.get("/v1/models")
    def models() -> Any:
        return jsonify(data=allowed_models(["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]))

    @app.post("/v1beta/models/<path:model_name>:generateContent")
    def gemini(model_name: str) -> Any:
        return jsonify(model=model_name, principal=who())

    @app.get("/custom/admin")
    @require_role("PROXY_ADMIN")
    def custom_admin() -> Any:
        return jsonify(principal=who())

    @app.get("/custom/internal")
    @require_role("internal_user", "PROXY_ADMIN_VIEWER")
    def custom_internal() -> Any:
        return jsonify(principal=who())

    @app.get("/public/ping")
    @llmauth.exempt
    def ping() -> Any:
        return jsonify(pong=True)

    @app.get("/health/liveliness")
    def liveliness() -> Any:
        return jsonify(status="healthy")

    @app.get("/unclassified")
    def unclassified() -> Any:
        return jsonify(principal=who())


@pytest.fixture
def app_factory(tmp_path: Any) -> Iterator[AppFactory]:
    """``app_factory(config=None, db_url=None, **options)`` → an app with the extension and
    the test routes; closed after the test."""
    states = []

    def make(config: dict[str, Any] | None = None, db_url: str | None = None,
             routes: bool = True, **options: Any) -> Flask:
        app = Flask(f"test_app_{len(states)}", instance_path=str(tmp_path / "instance"))
        app.config.update({
            "TESTING": True,
            "LLMAUTH_MASTER_KEY": MASTER_KEY,
            "LLMAUTH_DATABASE_URL": db_url or migrated_sqlite_url(tmp_path),
        })
        app.config.update(config or {})
        if isinstance(app.config.get("LLMAUTH_MASTER_KEY"), str):
            record_secret(app.config["LLMAUTH_MASTER_KEY"])
        llmauth = LLMAuth(app, **options)
        if routes:
            add_test_routes(app, llmauth)
        states.append(app.extensions["llmauth"])
        app.llmauth = llmauth  # type: ignore[attr-defined]
        return app

    yield make
    for state in states:
        state.close()


@pytest.fixture
def sdk_clients() -> Iterator[ExitStack]:
    """Closes the OpenAI/Anthropic SDK clients a test enters into it
    (``client = sdk_clients.enter_context(openai.OpenAI(...))``) when the test ends. A client
    left open keeps its keep-alive connections, and a server's graceful stop waits for them.
    Request it after the fixture that serves the app, so it is torn down first."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def app(app_factory: AppFactory, db_url: str) -> Flask:
    return app_factory(db_url=db_url)


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()
