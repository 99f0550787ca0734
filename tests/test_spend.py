"""Spend: usage → cost → spend-log rows and spend columns, attribution, idempotent batches,
callbacks in the batch transaction, the request path that only queues, and what a clean exit
keeps and a crash loses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peewee
import pytest
from flask import Flask, Response, jsonify, stream_with_context

from flask_llmauth import record_usage
from flask_llmauth.errors import ServiceUnavailable
from flask_llmauth.guards import Admission
from flask_llmauth.spend import SpendEvent, SpendLedger, flush
from flask_llmauth.store.tables import Customer, Key, SpendLog, Team, TeamMembership, User
from flask_llmauth.usage import estimate_prompt_tokens
from tests.helpers import ADMIN, bearer, new_key

ROOT = Path(__file__).resolve().parent.parent
#: Integer prices in money units per token, so every cost below is exact by inspection.
PRICES = {"m-in": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"},
          "emb": {"input_cost_per_token": "0.0000001", "output_cost_per_token": "0"}}
IN, OUT = 1000, 2000  # units per token of m-in

OPENAI = {"model": "m-in", "choices": [],
          "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
ANTHROPIC = {"model": "m-in", "content": [],
             "usage": {"input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 2}}
EMBEDDINGS = {"object": "list", "data": [], "model": "emb",
              "usage": {"prompt_tokens": 40, "total_tokens": 40}}


def add_views(app: Flask) -> None:
    @app.post("/v1/chat/completions")
    def chat() -> Any:
        return jsonify(OPENAI)

    @app.post("/v1/messages")
    def messages() -> Any:
        return jsonify(ANTHROPIC)

    @app.post("/v1/embeddings")
    def embeddings() -> Any:
        return jsonify(EMBEDDINGS)

    @app.post("/v1/completions")
    def stream() -> Any:
        def events() -> Any:
            yield 'data: {"choices":[{"text":"hello there"}]}\n\n'
            yield 'data: {"choices":[{"text":" world"}]}\n\n'
            yield ('data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,'
                   '"total_tokens":13}}\n\n')
            yield "data: [DONE]\n\n"

        return Response(stream_with_context(events()), mimetype="text/event-stream")

    @app.post("/anthropic/v1/messages")
    def anthropic_stream() -> Any:
        def events() -> Any:
            yield ('event: message_start\ndata: {"type":"message_start","message":{"model":'
                   '"m-in","usage":{"input_tokens":21,"output_tokens":1}}}\n\n')
            yield ('event: content_block_delta\ndata: {"type":"content_block_delta",'
                   '"delta":{"type":"text_delta","text":"hi"}}\n\n')
            yield ('event: message_delta\ndata: {"type":"message_delta",'
                   '"usage":{"output_tokens":15}}\n\n')
            yield 'event: message_stop\ndata: {"type":"message_stop"}\n\n'

        return Response(stream_with_context(events()), mimetype="text/event-stream")

    @app.post("/v1/responses")
    def host_reported() -> Any:
        record_usage(100, 50)
        return jsonify(output="done")

    @app.post("/v1/moderations")
    def no_usage() -> Any:
        return jsonify(results=[])

    @app.post("/v1/images/generations")
    def fails() -> Any:
        return jsonify(error="upstream down"), 502

    @app.get("/v1/models")
    def models() -> Any:
        return jsonify(data=[])


@pytest.fixture
def spend_app(app_factory: Any, db_url: str) -> Flask:
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600},
                      db_url=db_url, routes=False)
    add_views(app)
    return app


def rows(app: Flask) -> list[SpendLog]:
    with app.extensions["llmauth"].store.use():
        return list(SpendLog.select().order_by(SpendLog.id))


def spend_of(app: Flask, table: Any, **where: Any) -> int:
    with app.extensions["llmauth"].store.use():
        query = table.select(table.spend)
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        return query.get().spend


def team_key(client: Any) -> dict[str, Any]:
    client.post("/team/new", json={"team_id": "t1"}, headers=ADMIN)
    client.post("/user/new", json={"user_id": "u1", "auto_create_key": False}, headers=ADMIN)
    response = client.post("/team/member_add", headers=ADMIN,
                           json={"team_id": "t1", "member": {"user_id": "u1", "role": "user"}})
    assert response.status_code == 200, response.get_json()
    return new_key(client, team_id="t1", user_id="u1", models=[])


def test_openai_anthropic_embeddings_and_streams_are_priced_and_attributed(
        spend_app: Flask) -> None:
    client = spend_app.test_client()
    key = team_key(client)
    auth = bearer(key["key"])
    body = {"model": "m-in", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    assert client.post("/v1/messages", json=body, headers=auth).status_code == 200
    client.post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers=auth)
    client.post("/v1/completions", json=body, headers=auth).get_data()
    client.post("/anthropic/v1/messages", json=body, headers=auth).get_data()
    client.post("/v1/responses", json=body, headers=auth)
    assert rows(spend_app) == []  # queued, not written: the request path does no write
    assert flush(spend_app) == 6
    logged = rows(spend_app)
    costs = [11 * IN + 7 * OUT, 7 * IN + 3 * OUT, 40 * 100, 9 * IN + 4 * OUT,
             21 * IN + 15 * OUT, 100 * IN + 50 * OUT]
    assert [r.spend for r in logged] == costs
    assert [(r.prompt_tokens, r.completion_tokens) for r in logged] == [
        (11, 7), (7, 3), (40, 0), (9, 4), (21, 15), (100, 50)]
    assert [r.route for r in logged] == ["/v1/chat/completions", "/v1/messages",
                                         "/v1/embeddings", "/v1/completions",
                                         "/anthropic/v1/messages", "/v1/responses"]
    for row in logged:
        assert (row.key_id, row.user_id, row.team_id) == (key["key_id"], "u1", "t1")
        assert row.auth_method == "virtual_key" and row.status == "success"
        assert not row.estimated and row.end_user_id is None
        assert len(row.request_id) == 32 and row.started_at <= row.created_at
    assert [r.model for r in logged] == ["m-in", "m-in", "emb", "m-in", "m-in", "m-in"]
    assert len({r.request_id for r in logged}) == 6
    total = sum(costs)
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == total
    assert spend_of(spend_app, User, user_id="u1") == total
    assert spend_of(spend_app, Team, team_id="t1") == total
    assert spend_of(spend_app, TeamMembership, team_id="t1", user_id="u1") == total


def test_end_user_spend_goes_to_the_customer_row(spend_app: Flask) -> None:
    client = spend_app.test_client()
    response = client.post("/customer/new", json={"user_id": "acme"}, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    key = new_key(client)
    auth = bearer(key["key"])
    client.post("/v1/chat/completions", json={"model": "m-in", "user": "acme"}, headers=auth)
    client.post("/v1/messages", json={"model": "m-in", "user": "acme"}, headers=auth)
    client.post("/v1/messages", json={"model": "m-in", "user": "no-row"}, headers=auth)
    flush(spend_app)
    assert [r.end_user_id for r in rows(spend_app)] == ["acme", "acme", "no-row"]
    assert spend_of(spend_app, Customer, user_id="acme") == 11 * IN + 7 * OUT + 7 * IN + 3 * OUT
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == 11 * IN + 7 * OUT + 2 * (
        7 * IN + 3 * OUT)
    with spend_app.extensions["llmauth"].store.use():  # no row is made up for "no-row"
        assert Customer.select().where(Customer.user_id == "no-row").count() == 0


def test_estimates_failures_and_what_is_not_logged(spend_app: Flask) -> None:
    client = spend_app.test_client()
    key = new_key(client)
    auth = bearer(key["key"])
    messages = [{"role": "user", "content": "x" * 400}]
    client.post("/v1/moderations", json={"model": "m-in", "messages": messages}, headers=auth)
    client.post("/v1/images/generations", json={"model": "m-in"}, headers=auth)
    client.get("/v1/models", headers=auth)  # a read: nothing to charge
    client.get("/key/info", headers=auth)  # not an LLM route
    client.post("/v1/chat/completions", json={"model": "m-in"}, headers=ADMIN)
    flush(spend_app)
    no_usage, failed, master = rows(spend_app)
    prompt = estimate_prompt_tokens({"messages": messages})
    assert (no_usage.prompt_tokens, no_usage.completion_tokens, no_usage.estimated) == (
        prompt, 0, True)
    assert no_usage.spend == prompt * IN and no_usage.status == "success"
    assert (failed.status, failed.spend, failed.prompt_tokens) == ("failure", 0, 0)
    assert failed.key_id == key["key_id"]
    # The master key is logged (its spend goes to no row); it has no key id.
    assert (master.auth_method, master.key_id, master.spend) == (
        "master_key", None, 11 * IN + 7 * OUT)
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == prompt * IN


def test_stream_closed_by_the_client_is_charged_an_estimate(spend_app: Flask) -> None:
    client = spend_app.test_client()
    key = new_key(client)
    messages = [{"role": "user", "content": "y" * 80}]
    response = client.post("/v1/completions", json={"model": "m-in", "messages": messages},
                           headers=bearer(key["key"]), buffered=False)
    assert b"hello" in next(iter(response.response))
    response.close()
    flush(spend_app)
    (row,) = rows(spend_app)
    prompt = estimate_prompt_tokens({"messages": messages})
    assert row.estimated and (row.prompt_tokens, row.completion_tokens) == (prompt, 3)
    assert row.spend == prompt * IN + 3 * OUT


def test_stream_that_breaks_off_is_a_failure_charged_what_it_streamed(
        spend_app: Flask) -> None:
    spend_app.config["PROPAGATE_EXCEPTIONS"] = False

    @spend_app.post("/chat/completions")
    def breaks_off() -> Any:
        def events() -> Any:
            yield 'data: {"choices":[{"delta":{"content":"hello there"}}]}\n\n'
            raise RuntimeError("upstream went away")

        return Response(events(), mimetype="text/event-stream")

    client = spend_app.test_client()
    key = new_key(client)
    messages = [{"role": "user", "content": "z" * 40}]
    response = client.post("/chat/completions", json={"model": "m-in", "messages": messages},
                           headers=bearer(key["key"]), buffered=False)
    chunks = iter(response.response)
    assert b"hello" in next(chunks)
    with pytest.raises(RuntimeError):
        next(chunks)
    flush(spend_app)
    (row,) = rows(spend_app)
    prompt = estimate_prompt_tokens({"messages": messages})
    assert row.status == "failure"
    assert row.estimated and (row.prompt_tokens, row.completion_tokens) == (prompt, 3)
    assert row.spend == prompt * IN + 3 * OUT
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == row.spend


def event(request_id: str, spend: int, **fields: Any) -> SpendEvent:
    values: dict[str, Any] = {
        "request_id": request_id, "started_at": time.time(), "created_at": time.time(),
        "key_id": None, "user_id": None, "team_id": None, "organization_id": None,
        "end_user_id": None, "model": "m-in", "route": "/v1/chat/completions",
        "auth_method": "virtual_key", "prompt_tokens": 1, "completion_tokens": 1,
        "spend": spend, "estimated": False, "status": "success"}
    values.update(fields)
    return SpendEvent(**values)


def test_the_same_event_recorded_twice_counts_once(spend_app: Flask) -> None:
    client = spend_app.test_client()
    key = new_key(client)
    ledger: SpendLedger = spend_app.extensions["llmauth"].spend_ledger
    first = event("req-1", 1234, key_id=key["key_id"])
    ledger.record(first)
    ledger.record(first)  # twice in one batch
    assert ledger.flush() == 1
    ledger.record(first)  # again later (a retried write)
    ledger.record(event("req-2", 66, key_id=key["key_id"]))
    assert ledger.flush() == 1
    # And from another process' ledger on the same database.
    other = SpendLedger(spend_app.extensions["llmauth"].store)
    other.record(first)
    assert other.flush() == 0 and other.duplicates == 1
    assert [(r.request_id, r.spend) for r in rows(spend_app)] == [("req-1", 1234), ("req-2", 66)]
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == 1300


def test_on_batch_runs_in_the_batch_transaction_with_new_events_only(spend_app: Flask) -> None:
    state = spend_app.extensions["llmauth"]
    ledger: SpendLedger = state.spend_ledger
    seen: list[list[str]] = []
    outage = [True]

    def callback(events: list[SpendEvent], db: peewee.Database) -> None:
        assert db.in_transaction()
        seen.append([e.request_id for e in events])
        if outage[0]:
            raise ServiceUnavailable("the database went away")

    assert ledger.on_batch(callback) is callback
    ledger.on_batch(callback)  # registering twice runs it once
    ledger.record(event("a", 5))
    ledger.record(event("b", 7))
    with pytest.raises(ServiceUnavailable):
        ledger.flush()
    # Rolled back together: no row, and both events are still queued, in order.
    assert rows(spend_app) == [] and ledger.pending == 2
    outage[0] = False
    ledger.record(event("a", 5))  # a duplicate queued behind them
    assert ledger.flush() == 2
    assert seen == [["a", "b"], ["a", "b"]]
    ledger.record(event("a", 5))
    assert ledger.flush() == 0 and seen[-1] == ["a", "b"]  # no callback for duplicates


def test_an_event_that_cannot_be_written_is_dropped_alone(
        spend_app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    client = spend_app.test_client()
    key = new_key(client)
    ledger: SpendLedger = spend_app.extensions["llmauth"].spend_ledger

    def refuse_poison(events: list[SpendEvent], db: peewee.Database) -> None:
        if any(e.request_id == "poison" for e in events):
            raise ValueError("a callback bug")

    ledger.on_batch(refuse_poison)
    for name in ("ok-1", "poison", "ok-2"):
        ledger.record(event(name, 10, key_id=key["key_id"]))
    assert ledger.flush() == 2  # no exception: the others are not held up
    assert [r.request_id for r in rows(spend_app)] == ["ok-1", "ok-2"]
    assert spend_of(spend_app, Key, key_id=key["key_id"]) == 20
    assert ledger.failed == 1 and ledger.pending == 0
    assert any("spend of request poison (10 units" in r.getMessage() and "dropped" in
               r.getMessage() for r in caplog.records)


def test_budget_reservations_ride_on_the_event(spend_app: Flask) -> None:
    state = spend_app.extensions["llmauth"]
    reservation = object()

    class Reserving:
        name = "budgets"

        def wants(self, principal: Any, route: Any, unsafe: bool) -> bool:
            return route.is_llm

        def admit(self, admission: Admission) -> None:
            admission.scratch["budget_reservations"] = reservation

        def settle(self, admission: Admission, usage: Any, failed: bool) -> None:
            pass

        def headers(self, admission: Admission) -> Mapping[str, str]:
            return {}

    state.guards.guards = (Reserving(), *state.guards.guards)
    got: list[Any] = []
    state.spend_ledger.on_batch(lambda events, db: got.extend(e.reservations for e in events))
    spend_app.test_client().post("/v1/chat/completions", json={"model": "m-in"}, headers=ADMIN)
    flush(spend_app)
    assert got == [reservation]


def test_callbacks_never_see_the_prompt_the_ledger_estimated(app_factory: Any) -> None:
    """spend.md: ``prompt_body`` (the request body kept to estimate an answer without usage
    off the request path) is ``None`` in the events ``on_batch`` callbacks see: a host that
    exports events never receives its callers' prompts."""
    app = app_factory({"LLMAUTH_SPEND_FLUSH_INTERVAL": 3600})
    seen: list[Any] = []
    app.extensions["llmauth"].spend_ledger.on_batch(lambda events, db: seen.extend(events))
    prompt = "a private prompt " * 20
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]}
    assert app.test_client().post("/v1/chat/completions", json=body,
                                  headers=ADMIN).status_code == 200  # its answer: no usage
    flush(app)
    assert len(seen) == 1
    assert seen[0].prompt_body is None
    assert seen[0].estimated and seen[0].prompt_tokens > 0  # estimated from that body
    assert "private prompt" not in repr(seen[0])


def test_large_batches_are_split_and_ids_sorted_per_table(app_factory: Any, db_url: str) -> None:
    app = app_factory({"LLMAUTH_SPEND_BATCH_SIZE": 7, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600},
                      db_url=db_url, routes=False)
    client = app.test_client()
    keys = [new_key(client)["key_id"] for _ in range(3)]
    ledger: SpendLedger = app.extensions["llmauth"].spend_ledger
    batches: list[int] = []
    ledger.on_batch(lambda events, db: batches.append(len(events)))
    for i in range(50):
        ledger.record(event(f"r{i:03d}", i, key_id=keys[i % 3]))
    assert ledger.flush() == 50
    assert batches == [7] * 7 + [1]
    for n, key_id in enumerate(keys):
        assert spend_of(app, Key, key_id=key_id) == sum(i for i in range(50) if i % 3 == n)


def test_full_queue_drops_new_events_and_says_so(spend_app: Flask,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    ledger = SpendLedger(spend_app.extensions["llmauth"].store, queue_limit=3)
    for i in range(5):
        ledger.record(event(f"q{i}", 1))
    assert ledger.pending == 3
    assert any("spend queue full" in r.getMessage() and "2 spend event(s)" not in r.getMessage()
               for r in caplog.records)


def test_spend_disabled_installs_nothing(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_SPEND_ENABLED": False}, routes=False)
    add_views(app)
    state = app.extensions["llmauth"]
    assert state.spend_ledger is None
    assert all(g.name != "spend" for g in state.guards.guards)
    assert app.test_client().post("/v1/chat/completions", json={}, headers=ADMIN).status_code == 200
    assert rows(app) == []


def test_bad_model_list_price_fails_init_app(app_factory: Any) -> None:
    from flask_llmauth.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="input_cost_per_token"):
        app_factory({"LLMAUTH_MODEL_LIST": [{"model_name": "x", "model_info": {
            "input_cost_per_token": "free"}}]})


def test_request_path_does_no_database_round_trip(spend_app: Flask,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client = spend_app.test_client()
    key = new_key(client)
    auth = bearer(key["key"])
    client.post("/v1/chat/completions", json={"model": "m-in"}, headers=auth)  # caches the key
    store = spend_app.extensions["llmauth"].store
    statements: list[str] = []
    original = store.db.execute_sql

    def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        statements.append(sql)
        return original(sql, *args, **kwargs)

    monkeypatch.setattr(store.db, "execute_sql", counting)
    for _ in range(5):
        assert client.post("/v1/chat/completions", json={"model": "m-in"},
                           headers=auth).status_code == 200
    assert statements == []
    assert spend_app.extensions["llmauth"].spend_ledger.pending == 6
    monkeypatch.undo()
    assert flush(spend_app) == 6


# -- process exit: clean shutdown keeps everything, a crash loses the queue ---------------------

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from flask import Flask, jsonify
    from flask_llmauth import LLMAuth
    from tests.helpers import ADMIN

    db_url, count, interval, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    app = Flask("child")
    app.config.update(LLMAUTH_MASTER_KEY=ADMIN["Authorization"][7:], LLMAUTH_DATABASE_URL=db_url,
                      LLMAUTH_SPEND_FLUSH_INTERVAL=interval,
                      LLMAUTH_MODEL_PRICES={"m-in": {"input_cost_per_token": "0.000001"}})
    LLMAuth(app)

    @app.post("/v1/chat/completions")
    def chat():
        return jsonify(model="m-in", usage={"prompt_tokens": 3, "completion_tokens": 0})

    client = app.test_client()
    for i in range(count):
        assert client.post("/v1/chat/completions", json={"model": "m-in"},
                           headers=ADMIN).status_code == 200
    print("recorded", flush=True)
    if end == "wait":  # let the background thread flush, then crash
        time.sleep(interval * 3 + 0.5)
        print("waited", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if end == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # "exit": a normal interpreter exit
""")


def run_child(db_url: str, count: int, interval: float, end: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", CHILD, db_url, str(count), str(interval), end],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def logged_count(app: Flask) -> int:
    with app.extensions["llmauth"].store.use():
        return SpendLog.select().count()


def test_clean_exit_writes_every_queued_event(spend_app: Flask, db_url: str) -> None:
    done = run_child(db_url, 40, 3600.0, "exit")  # no flush would come for an hour
    assert done.returncode == 0, done.stderr[-2000:]
    assert logged_count(spend_app) == 40
    assert sum(r.spend for r in rows(spend_app)) == 40 * 3 * IN


def test_crash_loses_only_what_was_queued_since_the_last_flush(spend_app: Flask,
                                                               db_url: str) -> None:
    crashed = run_child(db_url, 25, 3600.0, "kill")
    assert crashed.returncode == -signal.SIGKILL and "recorded" in crashed.stdout
    assert logged_count(spend_app) == 0  # all 25 were still queued: lost
    # With a 0.2 s interval, what was recorded more than an interval before the crash is in.
    waited = run_child(db_url, 25, 0.2, "wait")
    assert waited.returncode == -signal.SIGKILL and "waited" in waited.stdout
    assert logged_count(spend_app) == 25


def test_flush_latency_is_bounded_by_the_interval(app_factory: Any, db_url: str) -> None:
    interval = 0.2
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_SPEND_FLUSH_INTERVAL": interval},
                      db_url=db_url, routes=False)
    add_views(app)
    client = app.test_client()
    latencies = []
    for i in range(5):
        client.post("/v1/chat/completions", json={"model": "m-in"}, headers=ADMIN)
        start = time.monotonic()
        while logged_count(app) < i + 1:
            assert time.monotonic() - start < 5, "the background flush never came"
            time.sleep(0.01)
        latencies.append(time.monotonic() - start)
    # The background thread wakes at least every interval; allow for a loaded machine.
    assert max(latencies) < interval + 1.0, latencies


def test_request_ids_are_unique_across_threads_and_forked_processes() -> None:
    import threading

    from flask_llmauth.guards import _request_ids

    seen: list[str] = []

    def take() -> None:
        seen.extend(_request_ids.next() for _ in range(2000))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 8000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in seen)
    read, write = os.pipe()
    with warnings.catch_warnings():  # Python 3.12 warns about fork() with threads running
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child draws its own prefix, so its ids never repeat the parent's
        os.write(write, _request_ids.next().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child[:16] != seen[0][:16] and child not in seen


@pytest.mark.postgres
def test_database_outage_keeps_events_queued_until_it_is_back(app_factory: Any,
                                                             postgres_url: str) -> None:
    from tests.helpers import TcpProxy

    host, _, port = postgres_url.split("@", 1)[1].split("/", 1)[0].partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600},
                      db_url=proxy.url(postgres_url), routes=False)
    add_views(app)
    state = app.extensions["llmauth"]
    client = app.test_client()
    try:
        key = new_key(client)
        auth = bearer(key["key"])
        assert client.post("/v1/chat/completions", json={"model": "m-in"},
                           headers=auth).status_code == 200  # the key is cached now
        proxy.cut()
        for _ in range(3):  # requests are served: spend never blocks them
            assert client.post("/v1/chat/completions", json={"model": "m-in"},
                               headers=auth).status_code == 200
        with pytest.raises(ServiceUnavailable):
            flush(app)
        state.background.run_all()  # the background flush fails quietly
        assert state.spend_ledger.pending == 4
        proxy.restore()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert flush(app) == 4
                break
            except ServiceUnavailable:  # the pool may hand out a dead connection first
                assert time.monotonic() < deadline, "the ledger never recovered"
                time.sleep(0.2)
        assert spend_of(app, Key, key_id=key["key_id"]) == 4 * (11 * IN + 7 * OUT)
        assert len({r.request_id for r in rows(app)}) == 4
    finally:
        proxy.cut()
        state.close()
        proxy.restore()


def test_price_of_the_requested_name_then_the_reported_one_cold_and_memoised(
        app_factory: Any, db_url: str) -> None:
    """A request model the table does not know is priced by the model the response names,
    the same on the first request (no memo yet) and after (the memo holds ``None``)."""
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600,
                       "LLMAUTH_UNKNOWN_MODEL_PRICE": {"input_cost_per_token": "0.000005"}},
                      db_url=db_url, routes=False)
    add_views(app)
    client = app.test_client()
    auth = bearer(new_key(client, models=[])["key"])
    for model in ("alias-of-m-in", "alias-of-m-in", "m-in", "m-in", "nowhere"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body, headers=auth).status_code == 200
    body = {"model": "nowhere", "messages": []}
    assert client.post("/v1/embeddings", json=body, headers=auth).status_code == 200
    assert flush(app) == 6
    # the response names m-in (chat) or emb (embeddings): its price applies whenever the
    # requested name is unknown; a known requested name wins
    assert [r.spend for r in rows(app)] == [11 * IN + 7 * OUT] * 5 + [40 * 100]
