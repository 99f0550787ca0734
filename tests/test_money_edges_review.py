"""Edges of the money path: what an answer without usage costs without the spend ledger,
what a request addressed by an alias costs when the upstream names a model no price table
knows — on SQLite and Postgres."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask, jsonify, request

from flask_llmauth.store.tables import Key, SpendLog
from tests.helpers import bearer, new_key
from tests.test_budgets import PRICES, give_back, usd

CHAT = "/v1/chat/completions"
#: A prompt of 400 characters in one message: (400 + 12 framing) / 4 = 103 tokens estimated.
PROMPT = [{"role": "user", "content": "x" * 400}]
ESTIMATE = 103


def gateway(app_factory: Any, db_url: str, answer_as: str | None, **config: Any) -> Flask:
    """A gateway whose upstream answers as ``answer_as`` (``None``: the name it was asked
    for) with 10 completion tokens, or without ``usage`` when the body says
    ``"no_usage": true``. ``routed`` is a ``model_list`` name deployed as budget-model."""
    routed = {"model_name": "routed", "litellm_params": {"model": "openai/budget-model"}}
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10,
                       "LLMAUTH_MODEL_LIST": [routed], **config}, db_url=db_url, routes=False)

    @app.post(CHAT)
    def completions() -> Any:
        body = request.get_json()
        model = answer_as or body.get("model")
        if body.get("no_usage"):
            return jsonify(model=model, choices=[])
        return jsonify(model=model, choices=[],
                       usage={"prompt_tokens": 0, "completion_tokens": 10})

    return app


def key_spend(app: Flask, key_id: str) -> int:
    give_back(app)
    with app.extensions["llmauth"].store.use():
        return Key.get(Key.key_id == key_id).spend


# -- an answer without usage, with and without the spend ledger ---------------------------------


@pytest.mark.parametrize("spend_enabled", [True, False])
def test_an_answer_without_usage_is_charged_its_prompt_estimate_with_or_without_the_ledger(
        app_factory: Any, db_url: str, spend_enabled: bool) -> None:
    """docs/spend.md: a JSON answer without ``usage`` is charged its prompt estimate. With
    ``LLMAUTH_SPEND_ENABLED=false`` the budget guard writes the spend itself, and charged such
    an answer nothing: a budget was never used up by an upstream that reports no usage."""
    app = gateway(app_factory, db_url, None, LLMAUTH_SPEND_ENABLED=spend_enabled)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    for _ in range(2):
        response = client.post(CHAT, headers=bearer(key["key"]), json={
            "model": "budget-model", "messages": PROMPT, "max_tokens": 10, "no_usage": True})
        assert response.status_code == 200
    assert key_spend(app, key["key_id"]) == 2 * ESTIMATE  # 1 unit per prompt token


def test_a_failed_answer_without_usage_stays_free_without_the_ledger(app_factory: Any,
                                                                     db_url: str) -> None:
    """Sanity: only a successful answer is charged its estimate (as with the ledger)."""
    app = gateway(app_factory, db_url, None, LLMAUTH_SPEND_ENABLED=False)

    @app.post("/v1/embeddings")
    def failing() -> Any:
        return jsonify(error={"message": "upstream failed"}), 502

    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    response = client.post("/v1/embeddings", headers=bearer(key["key"]),
                           json={"model": "budget-model", "input": "y" * 400})
    assert response.status_code == 502
    assert key_spend(app, key["key_id"]) == 0


# -- an alias answered by a model no price table knows ------------------------------------------


@pytest.mark.parametrize("spend_enabled", [True, False])
@pytest.mark.parametrize("model", ["fast", "routed"])
@pytest.mark.parametrize("no_usage", [False, True])
def test_an_alias_answered_by_an_unknown_model_is_charged_the_price_it_stands_for(
        app_factory: Any, db_url: str, model: str, no_usage: bool,
        spend_enabled: bool) -> None:
    """A key alias (``fast``) or a ``model_list`` name (``routed``) is reserved at the price
    of the model it stands for. When the upstream names a concrete model no price table
    knows (a private deployment name), the request was charged the unknown-model price —
    free by default — while its worst case had been reserved at budget-model's price: a
    budget could be spent without limit through an alias. It is charged the price the alias
    stands for (the highest of its targets, as its worst case is reserved)."""
    app = gateway(app_factory, db_url, "eu-prod-deployment-7",
                  LLMAUTH_SPEND_ENABLED=spend_enabled)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9), aliases={"fast": "budget-model"})
    body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": 10}
    if no_usage:
        body["no_usage"] = True
    assert client.post(CHAT, headers=bearer(key["key"]), json=body).status_code == 200
    expected = ESTIMATE if no_usage else 10_000  # budget-model's price
    assert key_spend(app, key["key_id"]) == expected
    if spend_enabled:
        with app.extensions["llmauth"].store.use():
            (logged,) = SpendLog.select()
        assert (logged.model, logged.spend) == (model, expected)


def test_a_known_reported_model_still_prices_an_alias(app_factory: Any, db_url: str) -> None:
    """Sanity: a reported model the tables know prices the request (here: free), not the
    alias's targets."""
    app = gateway(app_factory, db_url, "free-model",
                  LLMAUTH_MODEL_PRICES={**PRICES, "free-model": {"input_cost_per_token": 0}})
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9), aliases={"fast": "budget-model"})
    assert client.post(CHAT, headers=bearer(key["key"]),
                       json={"model": "fast", "max_tokens": 10}).status_code == 200
    assert key_spend(app, key["key_id"]) == 0


# -- a database outage longer than the reservation TTL ------------------------------------------


def later(monkeypatch: Any, seconds: float) -> None:
    """Every clock the budgets and the spend ledger read, ``seconds`` later."""
    import time
    import types

    from flask_llmauth import budget_leases, budgets, spend
    from flask_llmauth.durations import utcnow

    shifted = types.SimpleNamespace(monotonic=lambda: time.monotonic() + seconds,
                                    time=lambda: time.time() + seconds, sleep=time.sleep)
    for module in (budget_leases, budgets, spend):
        monkeypatch.setattr(module, "time", shifted)
    for module in (budget_leases, budgets):
        monkeypatch.setattr(module, "utcnow", lambda: utcnow() + timedelta(seconds=seconds))


def run_task(app: Flask, name: str) -> None:
    """Run one of the app's background tasks now, as its thread would (failures logged)."""
    from flask_llmauth.background import _run

    background = app.extensions["llmauth"].background
    _run(next(task for task in background._tasks if task.name == name))


def wait_for_database(*apps: Flask) -> None:
    """After the proxy is restored: each app's pool may hand out a dead connection first."""
    import time

    from flask_llmauth.errors import ServiceUnavailable

    deadline = time.monotonic() + 20
    for app in apps:
        ok = 0
        while ok < 3:
            try:
                app.extensions["llmauth"].store.ping()
                ok += 1
            except ServiceUnavailable:
                assert time.monotonic() < deadline, "the database never came back"
                ok = 0
                time.sleep(0.2)


@pytest.mark.postgres
def test_queued_spend_stays_reserved_through_an_outage_longer_than_the_ttl(
        app_factory: Any, postgres_url: str, monkeypatch: Any, caplog: Any) -> None:
    """Two processes (A, B) on one Postgres, cut away for longer than
    ``LLMAUTH_BUDGET_RESERVATION_TTL``. During the outage A admits requests from its lease
    and queues their spend. When the database is back, until A has written that spend, its
    worst cases must stay reserved in A's lease row, or B admits against room that is spent:

    * B's expiry sweep released A's lease row as if A had crashed (B could not reach the
      database either: A could not refresh it);
    * A's own expiry sweep released A's own live lease row;
    * A's lease sweep took the requests whose spend was queued out of the lease as if the
      spend ledger had dropped them (finished longer than the TTL ago).

    Each let the budget be passed by what A had spent during the outage."""
    from tests.helpers import TcpProxy
    from tests.test_budgets import add_llm_routes, chat, flush

    host, _, port = postgres_url.split("@", 1)[1].split("/", 1)[0].partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    url = proxy.url(postgres_url)
    config = {"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10,
              "LLMAUTH_BUDGET_RESERVATION_TTL": 60, "LLMAUTH_BUDGET_LEASE_IDLE": 30,
              "LLMAUTH_BUDGET_LEASE_FRACTION": 0.5, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600}
    a, b = app_factory(config, db_url=url, routes=False), app_factory(config, db_url=url,
                                                                      routes=False)
    for app in (a, b):
        add_llm_routes(app)
        app.extensions["llmauth"].background.started = True  # passes are run by hand
    ca, cb = a.test_client(), b.test_client()
    w = 10_000  # each request's worst case, and what it spends (10 completion tokens)
    try:
        key = new_key(ca, max_budget=usd(20 * w))
        other = new_key(cb, max_budget=usd(20 * w))
        assert chat(ca, key["key"], completion=10).status_code == 200  # A leases 10 w
        assert chat(cb, other["key"], completion=10).status_code == 200  # B leases too
        run_task(a, "budget-leases")  # the written spend leaves A's lease: it holds 9 w
        proxy.cut()
        for _ in range(5):  # admitted from A's lease; their spend stays queued
            response = ca.post(CHAT, headers=bearer(key["key"]),
                               json={"model": "budget-model", "max_tokens": 10,
                                     "completion": 10})
            assert response.status_code == 200
        for app in (a, b):  # the background passes during the outage fail
            for task in ("budget-reservations", "budget-leases", "spend"):
                run_task(app, task)
        assert a.extensions["llmauth"].spend_ledger.pending == 5
        later(monkeypatch, 65)  # the outage outlasts the TTL (and A's lease idles)
        for app in (a, b):
            for task in ("budget-reservations", "budget-leases"):
                run_task(app, task)
        proxy.restore()
        wait_for_database(a, b)
        caplog.set_level("WARNING", logger="flask_llmauth")
        admitted = 0
        run_task(b, "budget-reservations")  # B's sweep first,
        run_task(a, "budget-reservations")  # then A's own,
        while chat(cb, key["key"], completion=10).status_code == 200:  # and B spends
            admitted += 1
        run_task(a, "budget-leases")  # A's lease sweep (not its spend flush yet)
        while chat(cb, key["key"], completion=10).status_code == 200:
            admitted += 1
        run_task(a, "spend")  # A writes what it queued during the outage
        assert a.extensions["llmauth"].spend_ledger.pending == 0
        for app in (a, b):
            give_back(app)
        with a.extensions["llmauth"].store.use():
            k = Key.get(Key.key_id == key["key_id"])
        assert k.spend == (1 + 5 + admitted) * w  # every request counted once
        assert k.spend <= 20 * w, f"the budget was passed: B admitted {admitted}"
        assert k.reserved == 0
        assert "expired while it was alive" not in caplog.text
        flush(b)
    finally:
        proxy.cut()
        for app in (a, b):
            app.extensions["llmauth"].close()
        proxy.restore()


def test_a_process_never_releases_its_own_live_lease_rows(app_factory: Any, db_url: str,
                                                         monkeypatch: Any,
                                                         caplog: Any) -> None:
    """A process stalled past the TTL (its lease rows expired, no outage seen) runs its
    expiry sweep before its lease sweep refreshes them: the sweep released its own live
    lease, and until the lease sweep reserved it again (with a warning) what the process
    held — requests in flight, queued spend — was not reserved in the database. Another
    process's sweep still releases a lease whose owner is gone."""
    from flask_llmauth.store.tables import BudgetReservation
    from tests.test_budgets import add_llm_routes, chat

    config = {"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10,
              "LLMAUTH_BUDGET_RESERVATION_TTL": 60, "LLMAUTH_BUDGET_LEASE_IDLE": 30}
    a = app_factory(config, db_url=db_url, routes=False)
    add_llm_routes(a)
    a.extensions["llmauth"].background.started = True  # passes are run by hand
    client = a.test_client()
    key = new_key(client, max_budget=usd(10**9))
    held = client.post(CHAT, headers=bearer(key["key"]), json={  # in flight: a stream
        "model": "budget-model", "max_tokens": 10, "stream": True, "completion": 1})
    assert held.status_code == 200
    store = a.extensions["llmauth"].store

    def reserved() -> int:
        with store.use():
            return Key.get(Key.key_id == key["key_id"]).reserved

    before = reserved()
    assert before > 0
    later(monkeypatch, 65)  # the lease row is past its expiry: the process was stalled
    caplog.set_level("WARNING", logger="flask_llmauth")
    run_task(a, "budget-reservations")  # its own sweep runs first
    assert reserved() == before  # its live lease is kept
    run_task(a, "budget-leases")  # then its lease sweep refreshes the row
    assert "expired while it was alive" not in caplog.text
    assert reserved() > 0
    with store.use():
        assert BudgetReservation.select().count() == 1
    held.close()
    monkeypatch.undo()
    b = app_factory(config, db_url=db_url, routes=False)  # another process
    add_llm_routes(b)
    assert chat(b.test_client(), key["key"], completion=1).status_code == 200
    ledger = b.extensions["llmauth"].budgets.ledger
    from flask_llmauth.durations import utcnow

    assert ledger.sweep(utcnow() + timedelta(hours=2)) >= 1  # released as if it crashed


# -- 1mo windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("previous", "now", "day", "expected"), [
    # a 31st anchor: back to the 31st after February (the day a shorter month clamped to
    # was taken as the new anchor: Mar 28, Apr 28, ... for good)
    ((2026, 2, 28), (2026, 3, 1), 31, (2026, 3, 31)),
    ((2026, 3, 31), (2026, 4, 2), 31, (2026, 4, 30)),
    ((2026, 4, 30), (2026, 5, 1), 31, (2026, 5, 31)),
    ((2026, 2, 28), (2026, 3, 1), 30, (2026, 3, 30)),
    ((2026, 2, 28), (2026, 3, 1), 28, (2026, 3, 28)),
    ((2024, 2, 29), (2024, 3, 1), 31, (2024, 3, 31)),  # a leap year
    # windows skipped in one step are counted from the previous end, not compounded
    ((2026, 1, 31), (2026, 4, 1), None, (2026, 4, 30)),
    ((2026, 1, 31), (2026, 3, 1), None, (2026, 3, 31)),
    ((2024, 1, 30), (2024, 3, 2), None, (2024, 3, 30)),
])
def test_month_windows_keep_their_day_of_the_month(previous: tuple[int, ...],
                                                   now: tuple[int, ...], day: int | None,
                                                   expected: tuple[int, ...]) -> None:
    from datetime import datetime

    from flask_llmauth.budgets import next_reset

    at = datetime(*previous, 10, 30)
    assert next_reset("1mo", at, datetime(*now), day) == datetime(*expected, 10, 30)


def test_month_windows_of_several_months_and_leap_days() -> None:
    from datetime import datetime

    from flask_llmauth.budgets import next_reset

    assert next_reset("12mo", datetime(2025, 2, 28), datetime(2027, 3, 1), 29) == datetime(
        2028, 2, 29)
    assert next_reset("3mo", datetime(2026, 2, 28), datetime(2026, 3, 1), 31) == datetime(
        2026, 5, 31)
    assert next_reset("1mo", datetime(2026, 1, 31), datetime(2026, 1, 31)) == datetime(
        2026, 2, 28)  # a window that ends exactly now is over


def test_repeated_month_resets_keep_the_day_a_window_was_set_on(
        app_factory: Any, db_url: str, monkeypatch: Any) -> None:
    """A key, a user and a team given ``1mo`` on a 31st: resets by ``flask llmauth
    reset-budgets`` and by a request (the lazy reset) land on the last day of each month,
    not on the 28th for good once February clamped a reset to it."""
    from datetime import datetime

    from flask_llmauth import budget_leases, keys, teams, users
    from flask_llmauth.store.tables import Team, User
    from tests.test_budgets import add_llm_routes, api, chat

    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10},
                      db_url=db_url, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    set_on = datetime(2025, 12, 31, 10, 30)
    for module in (keys, users, teams):
        monkeypatch.setattr(module, "utcnow", lambda: set_on)
    api(client, "/user/new", user_id="ann", budget_duration="1mo", max_budget=1.0,
        auto_create_key=False)
    api(client, "/team/new", team_id="t-month", budget_duration="1mo", max_budget=1.0)
    key = new_key(client, user_id="ann", budget_duration="1mo", max_budget=1.0)
    monkeypatch.undo()
    store = app.extensions["llmauth"].store
    ledger = app.extensions["llmauth"].budgets.ledger

    def resets() -> list[datetime]:
        with store.use():
            return [Key.get(Key.key_id == key["key_id"]).budget_reset_at,
                    User.get(User.user_id == "ann").budget_reset_at,
                    Team.get(Team.team_id == "t-month").budget_reset_at]

    assert resets() == [datetime(2026, 1, 31, 10, 30)] * 3
    for now, expected in (((2026, 2, 1), (2026, 2, 28)), ((2026, 3, 1), (2026, 3, 31)),
                          ((2026, 4, 1), (2026, 4, 30))):
        ledger.reset_due(datetime(*now))
        assert resets() == [datetime(*expected, 10, 30)] * 3
    # the lazy reset: the first request after the window's end resets it
    monkeypatch.setattr(budget_leases, "utcnow", lambda: datetime(2026, 5, 1))
    assert chat(client, key["key"], completion=1).status_code == 200
    assert resets()[0] == datetime(2026, 5, 31, 10, 30)
    monkeypatch.setattr(budget_leases, "utcnow", lambda: datetime(2026, 6, 1))
    app.extensions["llmauth"].invalidate(f"key:{key['key_id']}")
    assert chat(client, key["key"], completion=1).status_code == 200
    assert resets()[0] == datetime(2026, 6, 30, 10, 30)


def test_a_month_counter_keeps_the_day_it_started_on(app_factory: Any, db_url: str,
                                                     monkeypatch: Any) -> None:
    """The global budget's counter (``1mo``), started by a request on a 31st: reset by
    ``flask llmauth reset-budgets`` on the last day of each month."""
    from datetime import datetime

    from flask_llmauth import budget_leases
    from flask_llmauth.store.tables import BudgetCounter
    from tests.test_budgets import add_llm_routes, chat

    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10,
                       "LLMAUTH_MAX_BUDGET": 1.0, "LLMAUTH_BUDGET_DURATION": "1mo"},
                      db_url=db_url, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    key = new_key(client)
    monkeypatch.setattr(budget_leases, "utcnow", lambda: datetime(2026, 1, 31, 10, 30))
    assert chat(client, key["key"], completion=1).status_code == 200
    monkeypatch.undo()
    store = app.extensions["llmauth"].store
    ledger = app.extensions["llmauth"].budgets.ledger

    def reset_at() -> datetime:
        with store.use():
            return BudgetCounter.get(BudgetCounter.scope == "global").budget_reset_at

    assert reset_at() == datetime(2026, 2, 28, 10, 30)
    for now, expected in (((2026, 3, 1), (2026, 3, 31)), ((2026, 4, 1), (2026, 4, 30))):
        ledger.reset_due(datetime(*now))
        assert reset_at() == datetime(*expected, 10, 30)


# -- setting a budget_duration on a budget that has spend ----------------------------------------


def test_adding_a_window_keeps_the_spend_in_its_first_window(app_factory: Any,
                                                           db_url: str) -> None:
    """Adding ``budget_duration`` to a budget that had none is a schedule, not a spend
    reset: what was spent stays in the first window (which starts now), so adding a window
    never lets more through at once than the budget allows; ``/key/{key}/reset_spend``
    resets it explicitly (audited)."""
    from tests.helpers import ADMIN, assert_error
    from tests.test_budgets import add_llm_routes, chat

    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10},
                      db_url=db_url, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    key = new_key(client, max_budget=usd(15_000))
    assert chat(client, key["key"], completion=10).status_code == 200  # 10,000 of 15,000
    response = client.post("/key/update", headers=ADMIN,
                           json={"key": key["key"], "budget_duration": "30d"})
    assert response.status_code == 200
    assert key_spend(app, key["key_id"]) == 10_000
    assert_error(chat(client, key["key"], completion=10), 429, "budget_exceeded")


@pytest.mark.parametrize("entity", ["key", "user", "team", "member", "follower", "customer"])
def test_a_new_window_on_a_budget_whose_window_is_over_resets_it_first(
        app_factory: Any, db_url: str, entity: str) -> None:
    """A window that is over keeps its due reset when the schedule changes: its spend is
    reset first, as the lazy reset (or ``flask llmauth reset-budgets``) would have. The
    spend of an ended window was carried into the new one — a full budget blocked for a
    whole new window — unless a reset job happened to run before the change."""
    from flask_llmauth.durations import utcnow
    from flask_llmauth.store.tables import Customer, Team, TeamMembership, User
    from tests.helpers import ADMIN
    from tests.test_budgets import api, set_reset_at

    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES}, db_url=db_url, routes=False)
    client = app.test_client()
    api(client, "/user/new", user_id="ann", auto_create_key=False)
    api(client, "/team/new", team_id="t-over", max_budget=1.0)
    api(client, "/team/member_add", team_id="t-over", member=[{"user_id": "ann"}])
    api(client, "/customer/new", user_id="cust-over", max_budget=1.0)
    key = new_key(client, max_budget=1.0)
    table, where, path, body = {
        "key": (Key, {"key_id": key["key_id"]}, "/key/update", {"key": key["key"]}),
        "user": (User, {"user_id": "ann"}, "/user/update", {"user_id": "ann"}),
        "team": (Team, {"team_id": "t-over"}, "/team/update", {"team_id": "t-over"}),
        "member": (TeamMembership, {"team_id": "t-over", "user_id": "ann"},
                   "/team/member_update", {"team_id": "t-over", "user_id": "ann"}),
        "customer": (Customer, {"user_id": "cust-over"}, "/customer/update",
                     {"user_id": "cust-over"}),
        # a member that follows its team's default window, which changes
        "follower": (TeamMembership, {"team_id": "t-over", "user_id": "ann"}, "/team/update",
                     {"team_id": "t-over"}),
    }[entity]
    field = "team_member_budget_duration" if entity == "follower" else "budget_duration"
    response = client.post(path, headers=ADMIN, json={**body, field: "30d"})
    assert response.status_code == 200, response.get_json()
    store = app.extensions["llmauth"].store
    with store.use():
        query = table.update(spend=777)
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        assert query.execute() == 1
    set_reset_at(app, table, utcnow() - timedelta(hours=1), **where)  # over, not reset yet
    response = client.post(path, headers=ADMIN, json={**body, field: "7d"})
    assert response.status_code == 200, response.get_json()

    def current() -> Any:
        with store.use():
            query = table.select()
            for name, value in where.items():
                query = query.where(getattr(table, name) == value)
            return query.get()

    changed = current()
    assert changed.spend == 0
    assert timedelta(days=6) < changed.budget_reset_at - utcnow() <= timedelta(days=7)
    # a window that is not over keeps its spend when the schedule changes
    with store.use():
        query = table.update(spend=555)
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        assert query.execute() == 1
    response = client.post(path, headers=ADMIN, json={**body, field: "1d"})
    assert response.status_code == 200, response.get_json()
    assert current().spend == 555
