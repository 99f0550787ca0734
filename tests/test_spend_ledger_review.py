"""The spend ledger under the conditions a second reading found it losing spend: a request
body its prompt estimate cannot walk, token counts or costs a column cannot hold, a fork
while a flush was writing, and a final flush the database does not answer."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.errors import ServiceUnavailable
from flask_llmauth.spend import SpendEvent, SpendLedger, flush
from flask_llmauth.store.tables import Key, User
from tests import test_spend
from tests.helpers import ADMIN, bearer, new_key
from tests.test_spend import IN, OUT, PRICES, add_views, event, rows, spend_of

spend_app = test_spend.spend_app  # the same fixture


def ledger_of(app: Flask) -> SpendLedger:
    ledger: SpendLedger = app.extensions["llmauth"].spend_ledger
    return ledger


# -- the prompt estimate, off the request path ---------------------------------------------------


def nested(depth: int) -> Any:
    """A JSON value ``depth`` lists deep: a body the recursive text walk cannot finish."""
    return json.loads("[" * depth + '"deep text"' + "]" * depth)


def test_a_body_the_estimate_cannot_walk_loses_no_spend(spend_app: Flask,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """An answer without ``usage`` is charged its prompt estimate, computed by the ledger
    when it takes the event. A body the estimate fails on (content nested deeper than the
    recursion limit allows) used to raise out of the flush, losing every event already
    taken for that batch; now that event is charged what the body's strings add up to and
    the others are written."""
    client = spend_app.test_client()
    key = new_key(client)
    auth = bearer(key["key"])
    plain = {"model": "m-in", "messages": [{"role": "user", "content": "x" * 40}]}
    hostile = {"model": "m-in", "messages": [{"role": "user", "content": nested(600)}]}
    for body in (plain, plain, hostile, plain):
        assert client.post("/v1/moderations", json=body, headers=auth).status_code == 200
    assert ledger_of(spend_app).pending == 4
    assert flush(spend_app) == 4
    logged = rows(spend_app)
    assert len(logged) == 4 and all(r.estimated for r in logged)
    assert [r.prompt_tokens > 0 for r in logged] == [True] * 4
    # the hostile request's prompt: its text and one message's framing, 4 characters a token
    assert logged[2].prompt_tokens == -(-(len("deep text") + 12) // 4)
    assert logged[2].spend == logged[2].prompt_tokens * IN
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == sum(r.spend for r in logged)
    assert ledger_of(spend_app).failed == 0


# -- values a column cannot hold ------------------------------------------------------------------


def test_token_counts_and_costs_beyond_the_columns_are_clipped_not_dropped(
        spend_app: Flask) -> None:
    """Token counts are 32-bit columns on Postgres and costs 64-bit ones everywhere: an
    upstream that reports ``4294967295`` tokens (an unsigned -1) used to have its event
    refused by Postgres and dropped — the key never charged — while SQLite kept it. The
    counts are clipped to what the column holds; the cost is charged."""
    client = spend_app.test_client()
    key = new_key(client)
    huge = 2**32 - 1
    ledger = ledger_of(spend_app)
    ledger.record(event("big-tokens", 77, key_id=key["key_id"], prompt_tokens=huge,
                        completion_tokens=huge))
    ledger.record(event("big-cost", 2**70, key_id=key["key_id"]))
    ledger.record(event("after", 5, key_id=key["key_id"]))
    assert ledger.flush() == 3 and ledger.failed == 0
    by_id = {r.request_id: r for r in rows(spend_app)}
    assert (by_id["big-tokens"].prompt_tokens, by_id["big-tokens"].completion_tokens) == (
        2**31 - 1, 2**31 - 1)
    assert by_id["big-tokens"].spend == 77
    assert by_id["big-cost"].spend == 2**62
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == 77 + 2**62 + 5


@pytest.mark.parametrize("model,stored", [("m-in\u0000x", "m-in\ufffdx"),
                                          ("m-in\ud800x", "m-in\ufffdx"),
                                          ("\udfff\ud83d", "\ufffd\ufffd"),
                                          ("m-\ud83d\ude00", "m-\U0001f600")])
def test_a_model_name_with_a_nul_or_a_lone_surrogate_is_charged(
        app_factory: Any, db_url: str, model: str, stored: str) -> None:
    """A request's ``model`` is the client's text. Postgres text cannot hold a NUL, and
    JSON may escape half a UTF-16 pair (``"\\ud800"``), which Python reads as a lone
    surrogate no database driver can encode: the event of such a request was refused and
    dropped (an ERROR and a traceback; SQLite kept the NUL) — a request nobody paid for.
    Both are replaced by U+FFFD and the key is charged; a well-formed pair stays."""
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600,
                       "LLMAUTH_UNKNOWN_MODEL_PRICE": {"input_cost_per_token": "0.000003"}},
                      db_url=db_url, routes=False)
    add_views(app)
    client = app.test_client()
    key = new_key(client, models=[])
    body = json.dumps({"model": model})  # escapes the surrogate: valid JSON text
    assert client.post("/v1/responses", data=body, content_type="application/json",
                       headers=bearer(key["key"])).status_code == 200  # record_usage(100, 50)
    assert flush(app) == 1 and ledger_of(app).failed == 0
    (row,) = rows(app)
    assert (row.model, row.spend) == (stored, 100 * 3000)
    assert spend_of(app, Key, key_id=key["key_id"]) == 100 * 3000


def test_master_key_spend_is_the_admin_names(spend_app: Flask) -> None:
    """As docs/spend.md says: a master-key request is logged under the proxy admin name,
    adds to that user's row when one exists, and to no key or team."""
    client = spend_app.test_client()
    assert client.post("/user/new", json={"user_id": "default_user_id",
                                          "auto_create_key": False},
                       headers=ADMIN).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "m-in"},
                       headers=ADMIN).status_code == 200  # 11 prompt, 7 completion tokens
    flush(spend_app)
    (row,) = rows(spend_app)
    assert (row.user_id, row.key_id, row.team_id) == ("default_user_id", None, None)
    assert spend_of(spend_app, User, user_id="default_user_id") == row.spend == (
        11 * IN + 7 * OUT)


# -- fork ---------------------------------------------------------------------------------------


def fork_child(work: Any) -> str:
    """Run ``work()`` in a forked child; what it returns (as text), or the error it raised."""
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns about fork() with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            answer = repr(work())
        except BaseException as exc:  # noqa: BLE001
            answer = f"error: {type(exc).__name__}: {exc}"
        os.write(write, answer.encode()[:4000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


def test_a_child_forked_mid_flush_writes_its_own_spend_and_not_its_parents(
        spend_app: Flask) -> None:
    """A fork while the parent's background thread was flushing (its lock held) used to
    leave the child a lock nobody would release: the child's every flush — the background
    one and the one at exit — waited forever, so the child wrote no spend and never exited
    cleanly. The child also inherited the parent's queue and wrote the parent's events
    (ahead of the parent, so the parent's ``on_batch`` never ran for them)."""
    ledger = ledger_of(spend_app)
    ledger.record(event("parent-1", 5))
    assert ledger._flush_lock.acquire(timeout=5)  # a flush in progress in another thread

    def child() -> Any:
        ledger.record(event("child-1", 7))
        pending = ledger.pending
        done: list[int] = []
        writer = threading.Thread(target=lambda: done.append(ledger.flush()), daemon=True)
        writer.start()
        writer.join(timeout=10)
        return pending, done

    try:
        answer = fork_child(child)
    finally:
        ledger._flush_lock.release()
    assert answer == "(1, [1])"  # its own event only, written
    assert ledger.pending == 1 and ledger.flush() == 1
    assert {r.request_id: r.spend for r in rows(spend_app)} == {"child-1": 7, "parent-1": 5}


@pytest.mark.postgres
def test_a_forked_child_uses_postgres_connections_of_its_own(app_factory: Any,
                                                             postgres_url: str) -> None:
    """The pool of a Postgres store keeps the connection a request (or ``init_app``'s
    migration) used. A child forked after that (gunicorn ``--preload``) used to take it
    from the pool: two processes on one socket, each reading the other's answers and
    committing the other's transactions — the ledger's batches included. The child now
    opens its own; whatever it does with the inherited ones never reaches the parent's
    session."""
    app = app_factory({"LLMAUTH_SPEND_FLUSH_INTERVAL": 3600}, db_url=postgres_url,
                      routes=False)
    store = app.extensions["llmauth"].store
    backend = "SELECT pg_backend_pid()"
    with store.use() as db:
        parent = db.execute_sql(backend).fetchone()[0]

    def child() -> Any:
        with store.use() as db:
            own = db.execute_sql(backend).fetchone()[0]
        store.close()
        for conn in getattr(store, "_inherited", ()):  # what its exit may do to them
            conn.close()
        return own

    answer = fork_child(child)
    assert answer.isdigit() and int(answer) != parent, answer
    with store.use() as db:  # the parent's session is whole, and still the same one
        assert db.execute_sql(backend).fetchone()[0] == parent


# -- the last flush at exit -----------------------------------------------------------------------


def test_events_a_final_flush_cannot_write_are_counted_in_an_error_line(
        spend_app: Flask, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At exit (or ``state.close()``) there is no later flush: events the database does not
    take then are lost, and the log says how many, even when the background task had
    already reported the outage (it reports a failing task once a minute)."""
    state = spend_app.extensions["llmauth"]
    ledger = ledger_of(spend_app)
    for i in range(3):
        ledger.record(event(f"late-{i}", 10))

    def down() -> None:
        raise ServiceUnavailable("the database went away")

    monkeypatch.setattr(ledger, "_write", lambda batch: down())
    state.background.run_all()  # a periodic pass: reported, kept
    assert ledger.pending == 3
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="flask_llmauth"):
        state.background.stop()  # the final pass
    lost = [r.getMessage() for r in caplog.records if "spend" in r.getMessage()
            and "lost" in r.getMessage()]
    assert len(lost) == 1 and "3 spend event(s)" in lost[0], [
        r.getMessage() for r in caplog.records]


def test_events_the_guard_queues_reach_callbacks_and_the_last_flush_as_spend_events(
        spend_app: Flask, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The spend guard queues an event's fields; callbacks get :class:`SpendEvent` s with
    those fields, and the last flush's error line counts their units."""
    state = spend_app.extensions["llmauth"]
    ledger = ledger_of(spend_app)
    client = spend_app.test_client()
    key = new_key(client)
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/embeddings"):
        assert client.post(path, json={"model": "m-in"},
                           headers=bearer(key["key"])).status_code == 200
    queued = [SpendEvent._make(fields) for fields in ledger._queue]
    assert len(queued) == 3 and all(e.spend > 0 and e.key_id for e in queued)
    units = sum(e.spend for e in queued)

    def down() -> None:
        raise ServiceUnavailable("the database went away")

    monkeypatch.setattr(ledger, "_write", lambda batch: down())
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="flask_llmauth"):
        state.background.stop()  # the final pass
    lost = [r.getMessage() for r in caplog.records if "lost" in r.getMessage()]
    assert len(lost) == 1 and f"3 spend event(s) are lost ({units} units)" in lost[0]
    monkeypatch.undo()
    got: list[Any] = []
    ledger.on_batch(lambda events, db: got.extend(events))
    assert ledger.flush() == 3
    assert [type(e) for e in got] == [SpendEvent] * 3 and got == queued


def test_the_guard_prices_whole_and_fractional_unit_prices_exactly(app_factory: Any) -> None:
    """A price in whole money units per token is charged from its memo (no rounding
    needed); any other is rounded up once per request, each time the same."""
    prices = {**PRICES, "m-frac": {"input_cost_per_token": "0.0000000015",
                                   "output_cost_per_token": "0.000000001"}}
    app = app_factory({"LLMAUTH_MODEL_PRICES": prices, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600},
                      routes=False)
    add_views(app)
    ledger = ledger_of(app)
    client = app.test_client()
    key = new_key(client)
    for model in ("m-in", "m-frac", "m-in", "m-frac", "m-in", "m-frac", "unknown-model"):
        assert client.post("/v1/chat/completions", json={"model": model},
                           headers=bearer(key["key"])).status_code == 200
    queued = [SpendEvent._make(fields) for fields in ledger._queue]
    # 11 prompt and 7 completion tokens; m-frac: ceil(11 * 1.5 + 7 * 1) units; the unknown
    # model is priced as the model the answer reports (m-in)
    assert [(e.model, e.spend) for e in queued] == [
        ("m-in", 11 * IN + 7 * OUT), ("m-frac", 24)] * 3 + [
        ("unknown-model", 11 * IN + 7 * OUT)]
    assert app.extensions["llmauth"].guards.guards[-1]._per_token == {"m-in": (IN, OUT)}
