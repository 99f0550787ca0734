"""The session-wide leak check works, and the error paths leak nothing.

The first tests prove that the check in ``tests/conftest.py`` would catch a leaked secret
(in a log message, in a traceback, in a table) and fail the run, without leaving a leak in
the session's own log. The others run the 400/401/403/404/413/503 paths with the log at
DEBUG and look for every raw key, the master key and the bearer tokens used.
"""

from __future__ import annotations

import logging
import random
import secrets
import sqlite3
import string
from pathlib import Path
from typing import Any

import pytest

from flask_llmauth.crypto import KeyDigester
from tests import conftest
from tests.helpers import (
    ADMIN,
    MASTER_KEY,
    SECRETS,
    assert_error,
    bearer,
    new_key,
    random_key,
    record_secret,
)

CHAT = "/v1/chat/completions"


def fresh_secret() -> str:
    return record_secret("sk-probe-" + secrets.token_urlsafe(24))


def test_find_leaks_answers_as_a_search_for_each_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The session check's fast search finds exactly what ``secret in text`` finds: key-shaped
    secrets anywhere in a run (after another ``sk-``, glued to more url-safe characters, at
    either end), overlapping ones, and secrets of other shapes."""
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits + "_-"
    keys = ["sk-" + "".join(rng.choice(alphabet) for _ in range(rng.choice((21, 40, 43))))
            for _ in range(40)]
    others = ["eyJ" + "".join(rng.choice(alphabet + ".") for _ in range(60)),
              "p@ss word/with+odd=chars", "sk-has a space in it"]
    prefix = keys[0][:-5]  # a secret that is a prefix of another one
    monkeypatch.setattr(conftest, "SECRETS", {*keys, *others, prefix})
    fillers = ["", " ", "sk-", "sk-x", "Bearer ", "\n", "sk-sk-", "abc", "=", "...", "é"]
    for _ in range(300):
        parts = [rng.choice(fillers)]
        for _ in range(rng.randrange(0, 5)):
            secret = rng.choice([*keys, *others, prefix, "sk-notasecret" * 2])
            cut = rng.randrange(len(secret) - 3, len(secret) + 1)  # sometimes cut short
            parts += [secret[:cut], rng.choice(fillers)]
        text = "".join(parts)
        expected = sorted({s[:12] + "..." for s in conftest.SECRETS if s in text})
        assert conftest.find_leaks(text) == expected, text
    assert conftest.find_leaks(f"x{keys[1]}-tail sk-{keys[2]}") == sorted(
        {keys[1][:12] + "...", keys[2][:12] + "..."})
    assert conftest.find_leaks(keys[3][:-1]) == []


def test_the_session_capture_is_installed_at_debug() -> None:
    root = logging.getLogger()
    handlers = [h for h in root.handlers if isinstance(h, conftest._CaptureAll)]
    assert len(handlers) == 1 and handlers[0].level == logging.DEBUG
    marker = "leak-probe-marker-" + secrets.token_hex(8)  # not a secret
    logging.getLogger("flask_llmauth.probe").debug("captured %s", marker)
    assert any(marker in line for line in conftest._LOG_LINES)


def test_a_leaked_secret_in_a_log_line_or_traceback_is_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    in_message, in_traceback = fresh_secret(), fresh_secret()
    private: list[str] = []
    # The same handler class the session uses, writing to a private list: the secrets never
    # reach the session's log, so this test leaves no leak behind.
    monkeypatch.setattr(conftest, "_LOG_LINES", private)
    probe = logging.getLogger("tests.leak_probe.private")
    probe.propagate = False
    handler = conftest._CaptureAll(level=logging.DEBUG)
    probe.addHandler(handler)
    try:
        probe.debug("presented key %s", in_message)
        try:
            raise RuntimeError(f"upstream rejected {in_traceback}")
        except RuntimeError:
            probe.exception("call failed")  # the secret is only in the traceback
    finally:
        probe.removeHandler(handler)
        monkeypatch.undo()
    assert conftest.find_leaks("\n".join(private)) == sorted(
        [in_message[:12] + "...", in_traceback[:12] + "..."])
    session_log = "\n".join(conftest._LOG_LINES)
    assert in_message not in session_log and in_traceback not in session_log


def test_a_leaked_secret_in_a_table_is_found(tmp_path: Path) -> None:
    secret = fresh_secret()
    path = tmp_path / "leaky.db"  # not opened through Store: not in the session's scan list
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE audit (note TEXT)")
        db.execute("INSERT INTO audit VALUES (?)", (f"rotated {secret}",))
    assert conftest.find_leaks(conftest.dump_database(f"sqlite:///{path}")) == \
        [secret[:12] + "..."]
    path.unlink()


def test_every_digested_key_is_registered_as_a_secret(app_factory: Any) -> None:
    app = app_factory()
    presented = "sk-presented-" + secrets.token_urlsafe(24)
    assert presented not in SECRETS
    assert_error(app.test_client().post(CHAT, json={}, headers=bearer(presented)), 401)
    assert presented in SECRETS
    assert KeyDigester.digest is conftest._recording_digest


class _Reporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write_line(self, line: str, **markup: Any) -> None:
        self.lines.append(line)


class _Session:
    def __init__(self) -> None:
        self.exitstatus = 0
        self.reporter = _Reporter()
        plugins = {"terminalreporter": self.reporter}
        self.config = type("Config", (), {"pluginmanager": type(
            "PM", (), {"get_plugin": staticmethod(plugins.get)})()})()


def test_the_session_end_hook_fails_the_run_on_a_leak(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    secret = fresh_secret()
    leaky_db = tmp_path / "rows.db"
    with sqlite3.connect(leaky_db) as db:
        db.execute("CREATE TABLE t (v TEXT)")
        db.execute("INSERT INTO t VALUES (?)", (secret,))
    clean = _Session()
    monkeypatch.setattr(conftest, "_LOG_LINES", ["nothing to see"])
    monkeypatch.setattr(conftest, "_DATABASE_URLS", [])
    conftest.pytest_sessionfinish(clean, 0)  # type: ignore[arg-type]
    assert clean.exitstatus == 0 and clean.reporter.lines[0].startswith("leak check:")
    for log_lines, urls in (([f"Bearer {secret}"], []), ([], [f"sqlite:///{leaky_db}"])):
        monkeypatch.setattr(conftest, "_LOG_LINES", log_lines)
        monkeypatch.setattr(conftest, "_DATABASE_URLS", urls)
        session = _Session()
        conftest.pytest_sessionfinish(session, 0)  # type: ignore[arg-type]
        assert session.exitstatus == 1
        assert session.reporter.lines[-1].startswith("LEAK: raw secrets found:")
        assert secret[:12] in session.reporter.lines[-1] and secret not in \
            session.reporter.lines[-1]
    leaky_db.unlink()


# -- the error paths leak nothing -----------------------------------------------------------------


def test_error_paths_log_no_secret(app_factory: Any, db_url: str,
                                   caplog: pytest.LogCaptureFixture) -> None:
    app = app_factory(db_url=db_url)
    client = app.test_client()
    live = new_key(client, user_id="alice", models=["gpt-4o"])
    llm_only = new_key(client, key_type="llm_api")
    revoked = new_key(client)
    blocked = new_key(client)
    client.post("/key/delete", json={"keys": [revoked["key_id"]]}, headers=ADMIN)
    client.post("/key/block", json={"key": blocked["key_id"]}, headers=ADMIN)
    unknown = random_key()
    jwt_like = record_secret("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9."
                             + secrets.token_urlsafe(32))
    opaque = record_secret("opaque-token-" + secrets.token_urlsafe(24))
    huge = record_secret("sk-" + secrets.token_urlsafe(9000))
    responses = []
    with caplog.at_level(logging.DEBUG):
        for headers, status in (
            (bearer(unknown), 401), (bearer(revoked["key"]), 401), (bearer(blocked["key"]), 401),
            (bearer(jwt_like), 401), (bearer(opaque), 401), (bearer(huge), 401),
            ({"Authorization": f"Token {live['key']}"}, 401),
            ({"Authorization": live["key"]}, 401),
        ):
            response = client.post(CHAT, json={"model": "gpt-4o"}, headers=headers)
            responses.append(assert_error(response, status))
        responses += [
            assert_error(client.post(CHAT, json={"model": "claude-3-5-sonnet"},
                                     headers=bearer(live["key"])), 403),
            assert_error(client.post("/key/generate", json={},
                                     headers=bearer(llm_only["key"])), 403),
            assert_error(client.get(f"/key/info?key={live['key']}",
                                    headers=bearer(llm_only["key"])), 403),
            assert_error(client.get(f"/key/info?key={unknown}", headers=ADMIN), 404),
            assert_error(client.post("/key/generate", json={"key": live["key"]},
                                     headers=ADMIN), 400),
            assert_error(client.post("/key/generate", json={"key": "sk-short"},
                                     headers=ADMIN), 400),
            assert_error(client.post("/key/update", data=f'{{"key": "{live["key"]}", ',
                                     headers={**ADMIN, "Content-Type": "application/json"}),
                         400),
            assert_error(client.post("/key/block", json={"key": live["key"], "x": 1},
                                     headers=ADMIN), 400),
            assert_error(client.post("/key/regenerate", json={
                "key": live["key"], "new_master_key": MASTER_KEY + "x"}, headers=ADMIN), 400),
            assert_error(client.post("/key/update", headers={**ADMIN,
                         "Content-Type": "application/json"},
                         data='{"key": "' + live["key"] + '", "metadata": {"x": "'
                         + "y" * 2_000_000 + '"}}'), 413),
        ]
    text = caplog.text + repr(responses)
    for secret in (MASTER_KEY, live["key"], llm_only["key"], revoked["key"], blocked["key"],
                   unknown, jwt_like, opaque, huge, MASTER_KEY + "x"):
        assert secret not in text
    assert "401" in caplog.text and "403" in caplog.text  # the failures were logged


def test_database_outage_logs_no_secret(app_factory: Any,
                                        caplog: pytest.LogCaptureFixture) -> None:
    password = record_secret("pw-" + secrets.token_urlsafe(16))
    app = app_factory({"LLMAUTH_AUTO_MIGRATE": False},
                      db_url=f"postgresql://llmauth:{password}@127.0.0.1:9/nowhere")
    client = app.test_client()
    key = random_key()
    with caplog.at_level(logging.DEBUG):
        response = client.post(CHAT, json={}, headers=bearer(key))
        assert_error(response, 503, "db_unavailable")
        assert_error(client.post("/key/generate", json={}, headers=ADMIN), 503)
        app.extensions["llmauth"].background.run_all()
    for secret in (key, MASTER_KEY, password):
        assert secret not in caplog.text and secret not in response.get_data(as_text=True)


def test_a_raw_key_in_the_path_is_not_logged(app_factory: Any,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """LiteLLM's ``/key/{key}/regenerate`` accepts the raw key in the path; refusals log the
    route as the rule spells it, never the path."""
    app = app_factory()
    client = app.test_client()
    mine = new_key(client, user_id="alice")["key"]
    theirs = new_key(client, user_id="bob")["key"]
    unknown = random_key()
    with caplog.at_level(logging.DEBUG):
        assert_error(client.post(f"/key/{theirs}/regenerate", json={},
                                 headers=bearer(mine)), 403)
        assert_error(client.post(f"/key/{unknown}/regenerate", json={}, headers=ADMIN), 404)
        assert_error(client.post(f"/key/{theirs}/regenerate", json={}), 401)
    assert "/key/{key_id}/regenerate" in caplog.text
    for secret in (mine, theirs, unknown):
        assert secret not in caplog.text


def test_a_refusal_is_one_warning_line_with_a_digest_prefix_not_the_key(
        app_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """security.md's log line: ``llmauth: <status> <reason> <method> <route> from <ip>``, then
    ``via <header>`` when a credential was presented and ``key_digest=<12 hex>`` when it is an
    ``sk-`` key: the same key gives the same prefix (attempts correlate), never the key."""
    app = app_factory()
    client = app.test_client()
    unknown = random_key()
    opaque = record_secret("opaque-token-" + secrets.token_urlsafe(24))
    prefix = KeyDigester(MASTER_KEY).digest(unknown)[:12]
    lines: list[str] = []
    for headers in (bearer(unknown), {"x-api-key": unknown}, bearer(opaque), {}):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
            assert_error(client.post(CHAT, json={"model": "gpt-4o"}, headers=headers), 401)
        refusals = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(refusals) == 1
        lines.append(refusals[0])
    assert lines[0] == (f"llmauth: 401 unknown_key POST {CHAT} from 127.0.0.1 "
                        f"via Authorization key_digest={prefix}")
    assert lines[1].endswith(f" via x-api-key key_digest={prefix}")
    assert lines[2].startswith(f"llmauth: 401 not_a_virtual_key POST {CHAT} from 127.0.0.1 via ")
    assert "key_digest=" not in lines[2]
    assert " via " not in lines[3] and lines[3].startswith("llmauth: 401 ")
    assert not any(unknown in line or opaque in line for line in lines)
