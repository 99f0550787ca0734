"""Budgets: every level and window, LiteLLM's precedence, reservations, lazy and CLI resets,
soft budgets, 429 + Retry-After, /key/{key}/reset_spend — on SQLite and Postgres."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta, timezone
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request, stream_with_context

from flask_llmauth import record_usage
from flask_llmauth.budgets import next_reset, resolve
from flask_llmauth.durations import utcnow
from flask_llmauth.money import to_units
from flask_llmauth.signals import budget_exceeded, soft_budget_crossed
from flask_llmauth.store.tables import (
    BudgetCounter,
    BudgetReservation,
    Customer,
    Key,
    Team,
    User,
)
from tests.helpers import ADMIN, assert_error, bearer, new_key

CHAT = "/v1/chat/completions"
#: The test price: 1 unit (1e-9 USD) per prompt token, 1000 units per completion token.
PRICES = {"budget-model": {"input_cost_per_token": "0.000000001",
                           "output_cost_per_token": "0.000001"}}


def add_llm_routes(app: Flask) -> None:
    """A gateway whose usage is what the request says (``completion``, ``prompt``; the
    model it reports: ``reported``, else the one asked)."""

    @app.post(CHAT)
    def chat() -> Any:
        body = request.get_json()
        usage = {"prompt_tokens": int(body.get("prompt", 0)),
                 "completion_tokens": int(body.get("completion", 0))}
        if body.get("fail"):
            return jsonify(error={"message": "upstream failed"}), 502
        if body.get("raise"):
            raise RuntimeError("view failed")
        if body.get("record"):
            record_usage(usage["prompt_tokens"], usage["completion_tokens"])
            return jsonify(ok=True)
        if body.get("stream"):
            def events() -> Iterator[str]:
                yield 'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
                yield f'data: {{"choices":[],"usage":{json.dumps(usage)}}}\n\n'
                yield "data: [DONE]\n\n"

            return Response(stream_with_context(events()), mimetype="text/event-stream")
        return jsonify(model=body.get("reported", body.get("model")), choices=[], usage=usage)


def budget_gateway(app_factory: Any, db_url: str,
                   prices: dict[str, Any] | None = None) -> Callable[..., Flask]:
    """The budget tests' gateway: ``build(**config)`` makes an app with the LLM routes,
    ``prices`` (default :data:`PRICES`) and a default ``max_tokens`` of 10."""
    def build(**config: Any) -> Flask:
        app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES if prices is None else prices,
                           "LLMAUTH_DEFAULT_MAX_TOKENS": 10, **config},
                          db_url=db_url, routes=False)
        add_llm_routes(app)
        return app

    return build


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def usd(units: int) -> float:
    return units / 1e9


def flush(app: Flask) -> None:
    """Write the spend the spend ledger holds (when it runs): settlement is then done."""
    ledger = getattr(app.extensions["llmauth"], "spend_ledger", None)
    if ledger is not None:
        ledger.flush()


def chat(client: Any, key: str, **body: Any) -> Any:
    body.setdefault("max_tokens", 10)
    response = client.post(CHAT, json={"model": "budget-model", **body}, headers=bearer(key))
    if not body.get("stream"):
        flush(client.application)
    return response


def give_back(app: Flask) -> None:
    """Write the queued spend, then take it out of this process's budget leases and give
    their unused part back (what the background sweep does once a lease is idle)."""
    flush(app)
    budgets = app.extensions["llmauth"].budgets
    if budgets is not None:
        budgets.leases.sweep(final=True)


def row(app: Flask, table: Any, **where: Any) -> Any:
    give_back(app)
    with app.extensions["llmauth"].store.use():
        query = table.select()
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        return query.get()


def test_key_budget_reserves_and_settles_exactly(make: Any) -> None:
    app = make()
    client = app.test_client()
    # worst case: prompt estimate (~1 token) + 10 completion tokens = ~10,001 units
    key = new_key(client, max_budget=usd(20_000))
    assert chat(client, key["key"], completion=3).status_code == 200
    k = row(app, Key, key_id=key["key_id"])
    assert k.reserved == 0
    assert k.spend == 3000
    assert chat(client, key["key"], completion=10).status_code == 200
    assert row(app, Key, key_id=key["key_id"]).spend == 13_000
    # 13,000 spent: a worst case of 10,00x no longer fits 20,000
    error = assert_error(chat(client, key["key"], completion=1), 429, "budget_exceeded")
    assert "may cost up to" in error["message"]
    with app.extensions["llmauth"].store.use():
        assert BudgetReservation.select().count() == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "8000"), ("max_tokens", 8000.0), ("max_tokens", True), ("max_tokens", -1),
    ("max_completion_tokens", [5]), ("max_output_tokens", {"n": 5})])
def test_a_completion_cap_that_is_not_a_count_is_refused_not_guessed(
        make: Any, field: str, value: Any) -> None:
    """The reservation needs the request's cap. An upstream may read ``"8000"`` or
    ``8000.0`` as 8000 and -1 as no cap at all, so a cap the budget cannot read is a 400
    naming it: a reservation of ``LLMAUTH_DEFAULT_MAX_TOKENS`` could be far too small."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(1_000_000))
    response = client.post(CHAT, json={"model": "budget-model", field: value, "completion": 3},
                           headers=bearer(key["key"]))
    error = assert_error(response, 400, "invalid_request_error")
    assert error["param"] == field
    assert "must be a non-negative integer" in error["message"]
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (0, 0)
    # A count is reserved; zero and null mean no cap (the default is reserved).
    for cap in (5, 0, None):
        response = client.post(CHAT, json={"model": "budget-model", field: cap,
                                           "completion": 3}, headers=bearer(key["key"]))
        assert response.status_code == 200, (cap, response.get_json())
    assert row(app, Key, key_id=key["key_id"]).spend == 3 * 3000


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_finished_request_holds_its_cost_not_its_worst_case_near_the_limit(
        make: Any) -> None:
    """Until its spend is written, a finished request's cost stays reserved; near the
    limit it used to be its whole worst case, so on a small budget every other back-to-back
    request was refused ("held by reservations ... retry shortly") though little was spent."""
    app = make(LLMAUTH_SPEND_FLUSH_INTERVAL=3600)  # nothing is written between the requests
    client = app.test_client()
    # worst case: no prompt + 10 completion tokens = 10,000 units; each request costs 1,000
    key = new_key(client, max_budget=usd(14_500))

    def unflushed(key: str, **body: Any) -> Any:  # chat() writes the spend after each request
        return client.post(CHAT, json={"model": "budget-model", "max_tokens": 10, **body},
                           headers=bearer(key))

    statuses = [unflushed(key["key"], completion=1).status_code for _ in range(5)]
    assert statuses == [200] * 5
    # 5,000 known; the sixth request's worst case (10,000) no longer fits 14,500 - 5,000
    error = assert_error(unflushed(key["key"], completion=1), 429, "budget_exceeded")
    assert "held by reservations" in error["message"]
    give_back(app)
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (5_000, 0)
    # Charged more than its worst case (the upstream ignored max_tokens): the worst case
    # stays held, as before (19,999 - 10,000 leaves no room for another).
    other = new_key(client, max_budget=usd(19_999))
    assert unflushed(other["key"], completion=12).status_code == 200
    assert_error(unflushed(other["key"], completion=1), 429, "budget_exceeded")
    give_back(app)
    assert row(app, Key, key_id=other["key_id"]).spend == 12_000


def api(client: Any, path: str, **body: Any) -> Any:
    response = client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


# -- levels and precedence -------------------------------------------------------------------------


def test_spend_equal_to_the_budget_is_exceeded_even_for_a_free_request(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000))
    assert chat(client, key["key"], completion=10).status_code == 200  # spend == budget
    response = chat(client, key["key"], model="some-free-model", max_tokens=1)
    error = assert_error(response, 429, "budget_exceeded")
    assert error["message"].startswith("Budget has been exceeded! Key=")
    assert "Current cost: 0.00001, Max budget: 0.00001" in error["message"]
    assert "Retry-After" not in response.headers  # no window: it never resets
    assert response.headers["x-should-retry"] == "false"
    assert key["key"] not in response.get_data(as_text=True)


def test_a_used_up_window_too_small_for_the_request_says_when_it_resets(make: Any) -> None:
    """A used-up budget with a window: ``Retry-After`` until the reset when the request fits
    a whole window; when even a fresh window cannot hold it, no ``Retry-After`` (retrying is
    useless) but never "does not reset": the message names the reset and the request's
    cost."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000), budget_duration="1d")
    assert chat(client, key["key"], completion=10).status_code == 200  # spend == budget
    fits = chat(client, key["key"], max_tokens=10)
    assert 86_000 <= int(assert_retry_after(fits)) <= 86_400
    response = chat(client, key["key"], max_tokens=20)
    error = assert_error(response, 429, "budget_exceeded")
    assert "Retry-After" not in response.headers
    assert response.headers["x-should-retry"] == "false"
    assert "does not reset" not in error["message"]
    assert "Budget resets at: " in error["message"] and "(1d window)" in error["message"]
    assert "may cost up to 0.00002" in error["message"]


def test_refusal_messages_state_amounts_exactly(make: Any) -> None:
    """Amounts below $0.0000005 are not rounded to 0, and a huge worst case (a client's
    ``max_tokens`` of 10**30) is printed in its own digits, not a float's."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(400))
    error = assert_error(chat(client, key["key"]), 429, "budget_exceeded")
    assert "Current cost: 0, Max budget: 0.0000004, this request may cost up to 0.00001" \
        in error["message"]
    error = assert_error(chat(client, key["key"], max_tokens=10**30), 429, "budget_exceeded")
    # 10**30 completion tokens at 1,000 units (the body has no prompt): 10**33 units
    assert "may cost up to " + "1" + "0" * 24 + ". Lower max_tokens" in error["message"]


def test_team_key_is_bound_by_the_team_budget_not_the_personal_one(make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/user/new", user_id="ann", max_budget=usd(1))  # personal budget: 1 unit
    api(client, "/team/new", team_id="t-budget", max_budget=usd(25_000))
    api(client, "/team/member_add", team_id="t-budget", member=[{"user_id": "ann"}])
    team_key = new_key(client, user_id="ann", team_id="t-budget")
    personal = new_key(client, user_id="ann")
    assert chat(client, team_key["key"], completion=10).status_code == 200
    assert chat(client, team_key["key"], completion=10).status_code == 200
    error = assert_error(chat(client, team_key["key"]), 429, "budget_exceeded")
    assert "Team=t-budget" in error["message"]
    # the personal key is bound by the personal budget (1 unit: the worst case never fits)
    error = assert_error(chat(client, personal["key"]), 429, "budget_exceeded")
    assert "User=ann" in error["message"]
    assert row(app, Team, team_id="t-budget").spend == 20_000
    # ann's spend is tracked (far past her personal budget of 1 unit), yet her team key was
    # admitted: only the team's budgets bind it
    assert row(app, User, user_id="ann").spend == 20_000


def test_team_member_budget_own_and_team_default(make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-m", team_member_budget=usd(15_000))
    api(client, "/team/member_add", team_id="t-m", member=[{"user_id": "bob"}])
    api(client, "/team/member_add", team_id="t-m", member=[{"user_id": "cat"}],
        max_budget_in_team=usd(25_000))
    bob = new_key(client, user_id="bob", team_id="t-m")
    cat = new_key(client, user_id="cat", team_id="t-m")
    assert chat(client, bob["key"], completion=10).status_code == 200
    error = assert_error(chat(client, bob["key"]), 429, "budget_exceeded")
    assert "Team member=t-m:bob" in error["message"]
    assert chat(client, cat["key"], completion=10).status_code == 200
    assert chat(client, cat["key"], completion=10).status_code == 200
    assert_error(chat(client, cat["key"]), 429, "budget_exceeded")


def test_global_budget_is_shared_by_every_caller(make: Any) -> None:
    app = make(LLMAUTH_MAX_BUDGET=usd(25_000))
    client = app.test_client()
    one, two = new_key(client), new_key(client)
    assert chat(client, one["key"], completion=10).status_code == 200
    assert chat(client, two["key"], completion=10).status_code == 200
    error = assert_error(chat(client, one["key"], completion=10), 429, "budget_exceeded")
    assert "Proxy=proxy" in error["message"]
    counter = row(app, BudgetCounter, scope="global")
    assert (counter.spend, counter.reserved) == (20_000, 0)
    # the master key is exempt
    response = client.post(CHAT, json={"model": "budget-model", "completion": 1}, headers=ADMIN)
    assert response.status_code == 200


def test_zero_global_budget_means_none(make: Any) -> None:
    app = make(LLMAUTH_MAX_BUDGET=0)
    assert app.extensions["llmauth"].settings.max_budget is None
    client = app.test_client()
    assert chat(client, new_key(client)["key"]).status_code == 200


def test_per_model_key_budget(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, model_max_budget={
        "budget-model": {"budget_limit": usd(15_000), "time_period": "1d"}})
    assert chat(client, key["key"], completion=10).status_code == 200
    error = assert_error(chat(client, key["key"]), 429, "budget_exceeded")
    assert "Key model=" in error["message"] and "budget-model" in error["message"]
    assert 86_000 <= int(assert_retry_after(chat(client, key["key"]))) <= 86_400
    # another model is not held by it
    assert chat(client, key["key"], model="some-free-model").status_code == 200
    counter = row(app, BudgetCounter, scope="key_model", entity_id=key["key_id"])
    assert (counter.model, counter.spend, counter.reserved) == ("budget-model", 10_000, 0)


def assert_retry_after(response: Any) -> str:
    assert_error(response, 429, "budget_exceeded")
    return response.headers["Retry-After"]


@pytest.mark.parametrize("own", [True, False])
def test_end_user_budget_own_or_default(make: Any, own: bool) -> None:
    app = make(LLMAUTH_MAX_END_USER_BUDGET=usd(15_000), LLMAUTH_END_USER_BUDGET_DURATION="7d")
    client = app.test_client()
    if own:
        api(client, "/customer/new", user_id="end-1", max_budget=usd(25_000))
    key = new_key(client)
    assert chat(client, key["key"], user="end-1", completion=10).status_code == 200
    if own:
        assert chat(client, key["key"], user="end-1", completion=10).status_code == 200
    response = chat(client, key["key"], user="end-1")
    error = assert_error(response, 429, "budget_exceeded")
    assert "End User=end-1" in error["message"]
    if not own:
        assert 7 * 86_400 - 60 <= int(response.headers["Retry-After"]) <= 7 * 86_400
    counter = row(app, BudgetCounter, scope="end_user", entity_id="end-1")
    assert (counter.spend, counter.reserved) == (20_000 if own else 10_000, 0)
    # another end user, and no end user at all, are not held by it
    assert chat(client, key["key"], user="end-2").status_code == 200
    assert chat(client, key["key"]).status_code == 200


def test_end_user_with_only_a_soft_budget_is_bound_by_the_default(make: Any) -> None:
    """LLMAUTH_MAX_END_USER_BUDGET binds an end user whose row sets no max_budget, also when
    the row sets a soft budget (which only alerts)."""
    app = make(LLMAUTH_MAX_END_USER_BUDGET=usd(15_000), LLMAUTH_END_USER_BUDGET_DURATION="7d")
    client = app.test_client()
    api(client, "/customer/new", user_id="end-1", soft_budget=usd(5_000))
    key = new_key(client)
    assert chat(client, key["key"], user="end-1", completion=10).status_code == 200
    error = assert_error(chat(client, key["key"], user="end-1"), 429, "budget_exceeded")
    assert "End User=end-1" in error["message"]
    counter = row(app, BudgetCounter, scope="end_user", entity_id="end-1")
    assert (counter.spend, counter.reserved) == (10_000, 0)


def test_asserted_budget_of_a_custom_auth_principal(make: Any) -> None:
    from flask_llmauth.principal import Principal, Role

    def hook(req: Any, api_key: str) -> Any:
        return Principal(method="custom", role=Role.INTERNAL_USER, user_id="ext-user",
                         limits={"max_budget": 15_000})

    app = make(LLMAUTH_CUSTOM_AUTH=hook, LLMAUTH_AUTH_ORDER=["custom"])
    client = app.test_client()
    assert chat(client, "anything", completion=10).status_code == 200
    error = assert_error(chat(client, "anything"), 429, "budget_exceeded")
    assert "Caller=ext-user" in error["message"]


def test_resolution_order_and_precedence_unit() -> None:
    from flask_llmauth.principal import Principal, Role
    from flask_llmauth.store.records import KeyRecord, MembershipRecord, TeamRecord, UserRecord

    key = KeyRecord(id=1, key_id="k1", key_name="sk-...abcd", max_budget=5, team_id="t",
                    model_max_budget={"m": {"budget_limit": 1.0}})
    user = UserRecord(id=2, user_id="u", max_budget=7)
    team = TeamRecord(id=3, team_id="t", max_budget=9, team_member_budget=4)
    member = MembershipRecord(id=4, team_id="t", user_id="u")
    principal = Principal(method="virtual_key", role=Role.INTERNAL_USER, user_id="u",
                          team_id="t", key=key, user=user, team=team, membership=member)
    levels = [(b.level, b.max_budget) for b in resolve(principal, ("m",), None, None, None)]
    assert levels == [("key", 5), ("team", 9), ("team_member", 4), ("key_model", 10**9)]
    personal = Principal(method="virtual_key", role=Role.INTERNAL_USER, user_id="u",
                         key=KeyRecord(id=1, key_id="k1", key_name="x"), user=user)
    assert [b.level for b in resolve(personal, (), None, None, None)] == ["user"]
    nothing = Principal(method="virtual_key", role=Role.INTERNAL_USER, user_id="u",
                        key=KeyRecord(id=1, key_id="k1", key_name="x"),
                        user=UserRecord(id=2, user_id="u"))
    assert resolve(nothing, ("m",), "end", None, None) == []


# -- windows ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("duration", "seconds"), [
    ("30s", 30), ("10m", 600), ("24h", 86_400), ("7d", 7 * 86_400), ("30d", 30 * 86_400)])
def test_next_reset_keeps_the_schedule(duration: str, seconds: int) -> None:
    now = utcnow()
    assert next_reset(duration, None, now) == now + timedelta(seconds=seconds)
    previous = now - timedelta(seconds=seconds * 2.5)
    assert next_reset(duration, previous, now) == previous + timedelta(seconds=seconds * 3)
    later = now + timedelta(seconds=5)
    assert next_reset(duration, later, now) == later


def test_next_reset_months_clamp_to_the_month_end() -> None:
    from datetime import datetime

    assert next_reset("1mo", datetime(2026, 1, 31), datetime(2026, 2, 3)) == datetime(2026, 2, 28)
    assert next_reset("1mo", datetime(2026, 1, 15), datetime(2026, 4, 20)) == datetime(2026, 5, 15)
    assert next_reset("1mo", None, datetime(2024, 1, 31)) == datetime(2024, 2, 29)


def set_reset_at(app: Flask, table: Any, when: Any, **where: Any) -> None:
    with app.extensions["llmauth"].store.use():
        query = table.update(budget_reset_at=when)
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        assert query.execute() == 1


def test_window_refuses_with_retry_after_until_the_reset_then_resets_lazily(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000), budget_duration="30s")
    assert chat(client, key["key"], completion=10).status_code == 200
    response = chat(client, key["key"], completion=1)
    retry = int(assert_retry_after(response))
    assert 1 <= retry <= 30
    assert "Budget resets at:" in response.get_json()["error"]["message"]
    # the window ends (no job runs): the next request resets it first
    past = utcnow() - timedelta(seconds=1)
    set_reset_at(app, Key, past, key_id=key["key_id"])
    assert chat(client, key["key"], completion=2).status_code == 200
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (2000, 0)
    assert past + timedelta(seconds=29) <= k.budget_reset_at <= past + timedelta(seconds=31)


def test_cli_reset_budgets(make: Any) -> None:
    app = make(LLMAUTH_MAX_BUDGET=usd(100_000), LLMAUTH_BUDGET_DURATION="10m")
    client = app.test_client()
    api(client, "/user/new", user_id="dora", max_budget=usd(50_000), budget_duration="24h")
    api(client, "/team/new", team_id="t-cli", max_budget=usd(50_000), budget_duration="7d")
    personal = new_key(client, user_id="dora", max_budget=usd(50_000), budget_duration="30d")
    team_key = new_key(client, team_id="t-cli")
    assert chat(client, personal["key"], completion=5).status_code == 200
    assert chat(client, team_key["key"], completion=5).status_code == 200
    past = utcnow() - timedelta(seconds=5)
    set_reset_at(app, Key, past, key_id=personal["key_id"])
    set_reset_at(app, User, past, user_id="dora")
    set_reset_at(app, Team, past, team_id="t-cli")
    set_reset_at(app, BudgetCounter, past, scope="global")
    api(client, "/customer/new", user_id="cust-cli", max_budget=1.0, budget_duration="1mo")
    with app.extensions["llmauth"].store.use():
        Customer.update(spend=123).where(Customer.user_id == "cust-cli").execute()
    set_reset_at(app, Customer, past, user_id="cust-cli")
    result = app.test_cli_runner().invoke(args=["llmauth", "reset-budgets"])
    assert result.exit_code == 0, result.output
    assert "reset 5 budget window(s)" in result.output
    now = utcnow()
    for table, where, seconds in ((Key, {"key_id": personal["key_id"]}, 30 * 86_400),
                                  (User, {"user_id": "dora"}, 86_400),
                                  (Team, {"team_id": "t-cli"}, 7 * 86_400),
                                  (BudgetCounter, {"scope": "global"}, 600),
                                  (Customer, {"user_id": "cust-cli"}, 31 * 86_400)):
        r = row(app, table, **where)
        assert r.spend == 0, table
        assert now < r.budget_reset_at <= now + timedelta(seconds=seconds), table
    again = app.test_cli_runner().invoke(args=["llmauth", "reset-budgets"])
    assert "reset 0 budget window(s)" in again.output


def test_scheduler_setting_resets_in_the_background(make: Any) -> None:
    app = make(LLMAUTH_BUDGET_RESET_INTERVAL=0.2)
    client = app.test_client()
    key = new_key(client, max_budget=usd(50_000), budget_duration="24h")
    assert chat(client, key["key"], completion=5).status_code == 200
    set_reset_at(app, Key, utcnow() - timedelta(seconds=1), key_id=key["key_id"])
    names = [t.name for t in app.extensions["llmauth"].background._tasks]
    assert "budget-reset" in names
    deadline = utcnow() + timedelta(seconds=5)
    while row(app, Key, key_id=key["key_id"]).spend and utcnow() < deadline:
        import time

        time.sleep(0.05)
    assert row(app, Key, key_id=key["key_id"]).spend == 0
    assert "budget-reset" not in [t.name for t in make().extensions["llmauth"].background._tasks]


# -- soft budgets, signals -------------------------------------------------------------------------


def test_soft_budget_fires_once_per_window_and_never_blocks(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, soft_budget=usd(5_000), budget_duration="24h")
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **data: Any) -> None:
        seen.append(data)

    with soft_budget_crossed.connected_to(receiver, app):
        assert chat(client, key["key"], completion=4).status_code == 200  # 4,000 < 5,000
        assert chat(client, key["key"], completion=4).status_code == 200  # sees 4,000
        assert seen == []
        for _ in range(3):  # sees 8,000 >= 5,000: once
            assert chat(client, key["key"], completion=4).status_code == 200
        assert len(seen) == 1
        assert seen[0]["level"] == "key" and seen[0]["spend"] == usd(8_000)
        assert seen[0]["soft_budget"] == usd(5_000)
        assert seen[0]["principal"].key_id == key["key_id"]
        # a new window: it may fire again
        set_reset_at(app, Key, utcnow() - timedelta(seconds=1), key_id=key["key_id"])
        assert chat(client, key["key"], completion=6).status_code == 200
        assert chat(client, key["key"], completion=1).status_code == 200
        assert len(seen) == 2


def test_budget_exceeded_signal(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000))
    seen: list[dict[str, Any]] = []
    with budget_exceeded.connected_to(lambda sender, **data: seen.append(data), app):
        assert chat(client, key["key"], completion=10).status_code == 200
        assert_error(chat(client, key["key"]), 429, "budget_exceeded")
    assert len(seen) == 1
    assert (seen[0]["level"], seen[0]["spend"], seen[0]["max_budget"]) == (
        "key", usd(10_000), usd(10_000))


# -- reservations ----------------------------------------------------------------------------------


def test_reservations_are_released_on_errors_and_refusals(make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-rel", max_budget=usd(5_000))  # worst case never fits
    key = new_key(client, max_budget=usd(50_000))
    team_key = new_key(client, team_id="t-rel", max_budget=usd(50_000))
    assert client.post(CHAT, json={"model": "budget-model", "fail": True, "completion": 5},
                       headers=bearer(key["key"])).status_code == 502
    with pytest.raises(RuntimeError):
        client.post(CHAT, json={"model": "budget-model", "raise": True},
                    headers=bearer(key["key"]))
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (0, 0)
    # the team refuses after the key reserved: the key's reservation is rolled back
    assert_error(chat(client, team_key["key"]), 429, "budget_exceeded")
    k = row(app, Key, key_id=team_key["key_id"])
    assert (k.spend, k.reserved) == (0, 0)
    with app.extensions["llmauth"].store.use():
        assert BudgetReservation.select().count() == 0


def test_host_reported_usage_and_streams_settle_at_the_end(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(100_000))
    assert chat(client, key["key"], record=True, prompt=7, completion=2).status_code == 200
    assert row(app, Key, key_id=key["key_id"]).spend == 2007
    response = chat(client, key["key"], stream=True, completion=3)
    k = row(app, Key, key_id=key["key_id"])
    assert k.reserved > 0  # held while the stream is open
    assert b"[DONE]" in response.get_data()
    response.close()
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (5007, 0)


@pytest.mark.parametrize("written_each", [True, False], ids=["written", "queued"])
def test_concurrent_requests_never_pass_the_budget(make: Any, written_each: bool) -> None:
    """``queued``: the spend ledger writes in the background, so finished requests hold
    their cost in the lease (``Ticket.costs``) while others are admitted from it."""
    app = make()
    client = app.test_client()
    # each worst case is ~10,001 units; actual cost 6,000; budget 55,000:
    # 5 reservations fit at once, but never more than the budget in total
    key = new_key(client, max_budget=usd(55_000))
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def worker() -> None:
        c = app.test_client()
        barrier.wait()
        for _ in range(3):
            if written_each:
                status = chat(c, key["key"], completion=6).status_code
            else:
                status = c.post(CHAT, json={"model": "budget-model", "max_tokens": 10,
                                            "completion": 6},
                                headers=bearer(key["key"])).status_code
            with lock:
                results.append(status)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = results.count(200)
    assert set(results) <= {200, 429}
    k = row(app, Key, key_id=key["key_id"])
    assert k.reserved == 0
    assert k.spend == admitted * 6000
    assert k.spend <= 55_000
    assert admitted >= 5  # at least what fits when every reservation is at its worst


def test_an_extended_lease_row_holds_what_its_budget_row_holds_for_it(make: Any) -> None:
    """Each lease transaction after the first rewrites the lease row's parts: they always
    name what the lease adds to the budget row's ``reserved``, so an expired lease is
    released exactly."""
    app = make(LLMAUTH_BUDGET_RESERVATION_TTL=60, LLMAUTH_BUDGET_LEASE_REQUESTS=2)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000_000))
    state = app.extensions["llmauth"]
    amounts = set()
    for i in range(7):  # several extensions of the lease (2 worst cases at a time)
        assert chat(client, key["key"], completion=3, max_tokens=10 + 5 * i).status_code == 200
        held = row_without_give_back(app, Key, key_id=key["key_id"])
        lease_row = row_without_give_back(app, BudgetReservation)
        assert lease_row.parts == [["llmauth_key", held.id, held.reserved, False,
                                    held.created_at.isoformat()]]
        amounts.add(held.reserved)
    assert len(amounts) > 1  # the row was rewritten, not only written once
    state.budgets.leases._reseed()  # the process is gone: nobody gives this lease back
    assert state.budgets.ledger.sweep(utcnow() + timedelta(seconds=61)) == 1
    k = row_without_give_back(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (7 * 3000, 0)


def test_the_lease_of_a_crashed_process_expires_and_is_released(make: Any) -> None:
    app = make(LLMAUTH_BUDGET_RESERVATION_TTL=60)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000_000))
    assert chat(client, key["key"], completion=3).status_code == 200
    state = app.extensions["llmauth"]
    flush(app)  # the spend is written; the lease still holds its reservation
    held = row_without_give_back(app, Key, key_id=key["key_id"])
    assert held.spend == 3000 and held.reserved > 10_000  # a lease: more than one request
    lease_row = row_without_give_back(app, BudgetReservation)
    assert lease_row.request_id.startswith("lease:")
    assert lease_row.parts == [["llmauth_key", held.id, held.reserved, False,
                                held.created_at.isoformat()]]
    assert timedelta(seconds=59) <= lease_row.expires_at - utcnow() <= timedelta(seconds=61)
    state.budgets.leases._reseed()  # the process is gone: nobody gives this lease back
    ledger = state.budgets.ledger
    assert ledger.sweep() == 0  # not expired yet
    assert row_without_give_back(app, Key, key_id=key["key_id"]).reserved == held.reserved
    assert ledger.sweep(utcnow() + timedelta(seconds=61)) == 1
    k = row_without_give_back(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (3000, 0)
    # the next process leases again, and gives back exactly what it holds
    assert chat(client, key["key"], completion=2).status_code == 200
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (5000, 0)
    with state.store.use():
        assert BudgetReservation.select().count() == 0


def row_without_give_back(app: Flask, table: Any, **where: Any) -> Any:
    with app.extensions["llmauth"].store.use():
        query = table.select()
        for name, value in where.items():
            query = query.where(getattr(table, name) == value)
        return query.get()


def test_key_update_does_not_clobber_reservations_in_flight(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(100_000))
    response = chat(client, key["key"], stream=True, completion=3)  # holds a reservation
    held = row(app, Key, key_id=key["key_id"]).reserved
    assert held > 0
    api(client, "/key/update", key=key["key_id"], key_alias="renamed", max_budget=usd(90_000))
    assert row(app, Key, key_id=key["key_id"]).reserved == held
    response.get_data()
    response.close()
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (3000, 0)


def test_principals_without_budgets_cost_no_query(make: Any, caplog: Any) -> None:
    import logging

    app = make()
    client = app.test_client()
    key = new_key(client)
    assert chat(client, key["key"]).status_code == 200  # warms the key cache
    guard = app.extensions["llmauth"].budgets
    caplog.set_level(logging.DEBUG, logger="peewee")
    caplog.clear()
    response = client.post(CHAT, json={"model": "budget-model", "max_tokens": 10},
                           headers=bearer(key["key"]))
    assert response.status_code == 200
    assert [r for r in caplog.records if r.name == "peewee"] == []
    verdicts = app.extensions["llmauth"]._verdicts.values()
    assert verdicts and all(guard not in v.plan.wanted for v in verdicts if v.plan is not None)


def test_budgets_can_be_disabled(make: Any) -> None:
    app = make(LLMAUTH_BUDGETS_ENABLED=False)
    client = app.test_client()
    key = new_key(client, max_budget=0)
    assert chat(client, key["key"]).status_code == 200
    assert app.extensions["llmauth"].budgets is None


@pytest.mark.parametrize(("name", "value"), [
    ("LLMAUTH_MAX_BUDGET", "lots"), ("LLMAUTH_MAX_BUDGET", -1),
    ("LLMAUTH_BUDGET_DURATION", "3 fortnights"), ("LLMAUTH_MAX_END_USER_BUDGET", "x"),
    ("LLMAUTH_END_USER_BUDGET_DURATION", "0d"), ("LLMAUTH_BUDGET_RESERVATION_TTL", 1),
    ("LLMAUTH_BUDGET_RESET_INTERVAL", -1), ("LLMAUTH_BUDGETS_ENABLED", "maybe"),
    ("LLMAUTH_BUDGET_LEASE_REQUESTS", -1), ("LLMAUTH_BUDGET_LEASE_REQUESTS", 1.5),
    ("LLMAUTH_BUDGET_LEASE_FRACTION", 0), ("LLMAUTH_BUDGET_LEASE_FRACTION", 1.5),
    ("LLMAUTH_BUDGET_LEASE_FRACTION", "half"), ("LLMAUTH_BUDGET_LEASE_IDLE", 0)])
def test_bad_budget_settings_are_refused_at_start(app_factory: Any, name: str,
                                                  value: Any) -> None:
    from flask_llmauth import ConfigurationError

    with pytest.raises(ConfigurationError, match=name):
        app_factory({name: value})


def test_budget_settings_from_litellm_yaml(tmp_path: Any, app_factory: Any) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("litellm_settings:\n  max_budget: 12.5\n  budget_duration: 30d\n"
                      "  max_end_user_budget: 0.25\n")
    settings = app_factory({"LLMAUTH_CONFIG_FILE": str(config)}).extensions["llmauth"].settings
    assert settings.max_budget == to_units("12.5")
    assert settings.budget_duration == "30d"
    assert settings.max_end_user_budget == to_units("0.25")


# -- leases ----------------------------------------------------------------------------------------


def worst(app: Flask, **body: Any) -> int:
    """The worst case ``chat`` reserves for ``body``."""
    from flask_llmauth.prices import worst_case_units

    body = {"model": "budget-model", "max_tokens": 10, **body}
    return worst_case_units("budget-model", body, app.extensions["llmauth"].settings)


def reserved_now(app: Flask, key_id: str) -> int:
    return row_without_give_back(app, Key, key_id=key_id).reserved


def test_lease_settings(app_factory: Any) -> None:
    settings = app_factory().extensions["llmauth"].settings
    assert (settings.budget_lease_requests, settings.budget_lease_fraction,
            settings.budget_lease_idle) == (100, 0.1, 1.0)
    settings = app_factory({"LLMAUTH_BUDGET_LEASE_REQUESTS": "0",
                            "LLMAUTH_BUDGET_LEASE_FRACTION": "1",
                            "LLMAUTH_BUDGET_LEASE_IDLE": 0.25}).extensions["llmauth"].settings
    assert (settings.budget_lease_requests, settings.budget_lease_fraction,
            settings.budget_lease_idle) == (0, 1.0, 0.25)


def test_requests_admitted_from_a_lease_run_no_query(make: Any, caplog: Any) -> None:
    import logging

    app = make(LLMAUTH_MAX_BUDGET=usd(10**12), LLMAUTH_MAX_END_USER_BUDGET=usd(10**12))
    client = app.test_client()
    api(client, "/team/new", team_id="t-lease", max_budget=usd(10**12))
    key = new_key(client, team_id="t-lease", max_budget=usd(10**12), model_max_budget={
        "budget-model": {"budget_limit": usd(10**12)}})
    assert chat(client, key["key"], user="end-lease", completion=2).status_code == 200  # leased
    caplog.set_level(logging.DEBUG, logger="peewee")
    caplog.clear()
    for _ in range(5):
        response = client.post(CHAT, json={"model": "budget-model", "max_tokens": 10,
                                           "user": "end-lease", "completion": 2},
                               headers=bearer(key["key"]))
        assert response.status_code == 200
    mine = threading.get_ident()
    assert [r.getMessage() for r in caplog.records
            if r.name == "peewee" and r.thread == mine] == []
    # key, team, per-model key, end user and global: five budgets, five leases
    assert len(app.extensions["llmauth"].budgets.leases._leases) == 5
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (12_000, 0)
    for scope in ("global", "key_model", "end_user"):
        counter = row(app, BudgetCounter, scope=scope)
        assert (counter.spend, counter.reserved) == (12_000, 0), scope
    team = row(app, Team, team_id="t-lease")
    assert (team.spend, team.reserved) == (12_000, 0)


def test_a_lease_grows_by_whole_worst_cases_and_not_near_the_limit(make: Any) -> None:
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=4, LLMAUTH_BUDGET_LEASE_FRACTION=0.5)
    client = app.test_client()
    w = worst(app, stream=True, completion=1)
    far = new_key(client, max_budget=usd(1000 * w))
    held = chat(client, far["key"], stream=True, completion=1)  # in flight
    assert reserved_now(app, far["key_id"]) == 5 * w  # its worst case + 4 more
    held.close()
    # 2.5 worst cases: half of what is left after the request is less than one more
    near = new_key(client, max_budget=usd(5 * w // 2))
    first = chat(client, near["key"], stream=True, completion=1)
    assert reserved_now(app, near["key_id"]) == w  # exactly the request's reservation
    second = chat(client, near["key"], stream=True, completion=1)
    assert second.status_code == 200
    assert reserved_now(app, near["key_id"]) == 2 * w
    error = assert_error(chat(client, near["key"], stream=True, completion=1), 429,
                         "budget_exceeded")
    assert "in flight" in error["message"]
    second.close()  # streams close in the reverse order they opened (request contexts)
    first.close()
    k = row(app, Key, key_id=near["key_id"])
    assert (k.spend, k.reserved) == (2000, 0)


def test_without_leases_every_request_reserves_exactly(make: Any) -> None:
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=0)
    client = app.test_client()
    w = worst(app, stream=True, completion=1)
    key = new_key(client, max_budget=usd(1000 * w))
    held = chat(client, key["key"], stream=True, completion=1)
    assert reserved_now(app, key["key_id"]) == w
    held.close()


def test_another_process_lease_refuses_early_until_it_is_given_back(make: Any) -> None:
    one = make(LLMAUTH_BUDGET_LEASE_FRACTION=0.5)
    two = make(LLMAUTH_BUDGET_LEASE_FRACTION=0.5)
    w = worst(one, completion=10)  # a request costs its worst case: 10,000 units
    key = new_key(one.test_client(), max_budget=usd(20 * w))
    c1, c2 = one.test_client(), two.test_client()
    assert chat(c1, key["key"], completion=10).status_code == 200
    # the first process leased its request + half of the 19 worst cases left: 10 in all
    assert reserved_now(one, key["key_id"]) == 10 * w
    admitted = 1
    while chat(c2, key["key"], completion=10).status_code == 200:
        admitted += 1
    # the second process had the other 10 worst cases, minus the first request's spend
    assert admitted == 10
    error = assert_error(chat(c2, key["key"], completion=10), 429, "budget_exceeded")
    assert "in flight" in error["message"]  # held by the other process's unused lease
    # nothing is in flight in this process: the message says where the rest may be held
    assert "(in this or another worker process)" in error["message"]
    assert "other worker processes' budget leases" in error["message"]
    # the first process goes idle: the sweep gives back what it does not use
    state = one.extensions["llmauth"]
    lease = next(iter(state.budgets.leases._leases.values()))
    lease.last_used -= 10 * state.settings.budget_lease_idle
    assert state.budgets.leases.sweep() == 1
    with state.store.use():
        assert not BudgetReservation.select().where(
            BudgetReservation.request_id == lease.lease_id).exists()
    while chat(c2, key["key"], completion=10).status_code == 200:
        admitted += 1
    assert admitted == 20  # the whole budget: 20 requests of 10,000 units
    error = assert_error(chat(c2, key["key"], completion=10), 429, "budget_exceeded")
    assert error["message"].startswith("Budget has been exceeded! Key=")
    assert "Current cost: 0.0002, Max budget: 0.0002" in error["message"]
    give_back(two)
    give_back(one)
    k = row_without_give_back(one, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (admitted * 10_000, 0)
    assert k.spend <= 20 * w


def test_the_end_of_a_window_sends_a_lease_to_the_database(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9), budget_duration="30s")
    assert chat(client, key["key"], completion=4).status_code == 200
    flush(app)
    assert row_without_give_back(app, Key, key_id=key["key_id"]).spend == 4000
    # the window ends (the lease has room left, and would admit the next request in memory)
    past = utcnow() - timedelta(seconds=1)
    set_reset_at(app, Key, past, key_id=key["key_id"])
    lease = next(iter(app.extensions["llmauth"].budgets.leases._leases.values()))
    assert lease.held > lease.in_use
    lease.window_end = past.replace(tzinfo=timezone.utc).timestamp()
    assert chat(client, key["key"], completion=3).status_code == 200
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (3000, 0)
    assert utcnow() < k.budget_reset_at <= utcnow() + timedelta(seconds=30)


def test_a_lowered_limit_resizes_the_lease_before_admitting(make: Any) -> None:
    app = make()
    client = app.test_client()
    w = worst(app, completion=1)
    key = new_key(client, max_budget=usd(1000 * w))
    assert chat(client, key["key"], completion=1).status_code == 200
    assert reserved_now(app, key["key_id"]) > 2 * w
    api(client, "/key/update", key=key["key_id"], max_budget=usd(w // 2))
    error = assert_error(chat(client, key["key"], completion=1), 429, "budget_exceeded")
    assert "may cost up to" in error["message"]
    flush(app)
    assert reserved_now(app, key["key_id"]) <= w  # the unused lease was given back


def test_a_new_window_setting_sends_the_lease_to_the_database(make: Any) -> None:
    import time

    # the lease is kept while idle: given back after the default second (a slow run), the
    # next request would make a new lease that reads the window from the database anyway
    app = make(LLMAUTH_BUDGET_LEASE_IDLE=3600)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    assert chat(client, key["key"], completion=1).status_code == 200
    lease = next(iter(app.extensions["llmauth"].budgets.leases._leases.values()))
    assert (lease.duration, lease.window_end) == (None, float("inf"))
    api(client, "/key/update", key=key["key_id"], budget_duration="30s")
    assert chat(client, key["key"], completion=1).status_code == 200
    assert lease.duration == "30s"
    assert time.time() < lease.window_end <= time.time() + 30


def test_a_live_process_whose_lease_expired_reserves_what_is_in_use_again(
        make: Any, caplog: Any) -> None:
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=0)
    client = app.test_client()
    w = worst(app, stream=True, completion=1)
    key = new_key(client, max_budget=usd(1000 * w))
    held = chat(client, key["key"], stream=True, completion=1)  # in flight
    assert reserved_now(app, key["key_id"]) == w
    ledger = app.extensions["llmauth"].budgets.ledger
    assert ledger.sweep(utcnow() + timedelta(hours=2)) == 1  # released as if it crashed
    assert reserved_now(app, key["key_id"]) == 0
    caplog.set_level("WARNING", logger="flask_llmauth")
    second = chat(client, key["key"], stream=True, completion=1)
    assert second.status_code == 200
    assert "expired while it was alive" in caplog.text
    assert reserved_now(app, key["key_id"]) == 2 * w  # the first request's again, and its own
    second.close()
    held.close()
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (2000, 0)


def test_spend_without_the_spend_ledger_is_written_by_the_budgets(make: Any) -> None:
    app = make(LLMAUTH_SPEND_ENABLED=False, LLMAUTH_MAX_BUDGET=usd(10**9))
    assert app.extensions["llmauth"].spend_ledger is None
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    for completion in (3, 0, 4):
        assert chat(client, key["key"], completion=completion).status_code == 200
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (7000, 0)
    counter = row(app, BudgetCounter, scope="global")
    assert (counter.spend, counter.reserved) == (7000, 0)


def test_shutdown_gives_every_lease_back(make: Any, db_url: str) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    assert chat(client, key["key"], completion=5).status_code == 200
    assert reserved_now(app, key["key_id"]) > 0
    app.extensions["llmauth"].close()
    other = make()
    k = row_without_give_back(other, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (5000, 0)
    with other.extensions["llmauth"].store.use():
        assert BudgetReservation.select().count() == 0


# -- /key/{key}/reset_spend ------------------------------------------------------------------------


def test_reset_spend(make: Any) -> None:
    from flask_llmauth.store.tables import AuditLog

    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(20_000), model_max_budget={
        "budget-model": {"budget_limit": usd(50_000)}})
    assert chat(client, key["key"], completion=11).status_code == 200
    assert_error(chat(client, key["key"]), 429, "budget_exceeded")
    path = f"/key/{key['key']}/reset_spend"
    # only a proxy admin; bad input is a clean 400
    other = new_key(client)
    assert client.post(path, json={"reset_to": 0}, headers=bearer(other["key"])).status_code in (
        401, 403)
    for body in ({}, {"reset_to": -1}, {"reset_to": "x"}, {"reset_to": usd(11_001)}):
        assert_error(client.post(path, json=body, headers=ADMIN), 400)
    assert_error(client.post("/key/sk-unknown/reset_spend", json={"reset_to": 0},
                             headers=ADMIN), 404)
    done = api(client, f"/key/{key['key_id']}/reset_spend", reset_to=usd(1_000))
    assert done == {"key_hash": key["key_id"], "spend": usd(1_000),
                    "previous_spend": usd(11_000), "max_budget": usd(20_000),
                    "budget_reset_at": None}
    assert row(app, Key, key_id=key["key_id"]).spend == 1_000
    assert row(app, BudgetCounter, scope="key_model", entity_id=key["key_id"]).spend == 0
    assert chat(client, key["key"], completion=1).status_code == 200
    audit = row(app, AuditLog, action="reset_spend")
    assert audit.object_id == key["key_id"] and audit.after == {"spend": usd(1_000)}
    assert key["key"] not in json.dumps([audit.before, audit.after])


def test_reset_spend_never_sets_spend_above_the_budget(make: Any) -> None:
    """A spend above ``max_budget`` (set by an admin, or an overshoot) can only be reset to
    at most the budget: a reset is never a way to raise the spend a budget allows."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(20_000))
    api(client, "/key/update", key=key["key_id"], spend=usd(30_000))
    path = f"/key/{key['key_id']}/reset_spend"
    refused = assert_error(client.post(path, json={"reset_to": usd(25_000)}, headers=ADMIN), 400)
    assert refused["param"] == "reset_to" and "max_budget" in refused["message"]
    assert row(app, Key, key_id=key["key_id"]).spend == 30_000
    done = api(client, path, reset_to=usd(20_000))
    assert done["spend"] == usd(20_000) and done["previous_spend"] == usd(30_000)


def test_database_down_refuses_budgeted_requests_with_503(app_factory: Any, postgres_url: str
                                                          ) -> None:
    """A budget that cannot be checked fails closed: 503, never a 500 — once the process's
    lease (room already reserved in the database) is used up; callers without a budget keep
    working from the key cache."""
    from tests.helpers import TcpProxy

    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.partition(":")
    proxy = TcpProxy(host, int(port or 5432))
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10,
                       "LLMAUTH_BUDGET_LEASE_REQUESTS": 2},
                      db_url=proxy.url(postgres_url), routes=False)
    add_llm_routes(app)
    client = app.test_client()
    try:
        budgeted = new_key(client, max_budget=1.0)["key"]
        free = new_key(client)["key"]
        for key in (budgeted, free):
            assert client.post(CHAT, json={"model": "budget-model", "completion": 1},
                               headers=bearer(key)).status_code == 200
        proxy.cut()
        # the lease took two more worst cases than the first request needed: at most two
        # more are admitted from memory, then the lease cannot grow (each of them spends, so
        # its worst case stays in the lease until its spend is written: a request that
        # spends nothing would give its worst case back at once)
        statuses = [client.post(CHAT, json={"model": "budget-model", "completion": 1},
                                headers=bearer(budgeted)).status_code for _ in range(4)]
        assert statuses.count(200) <= 2
        assert statuses == sorted(statuses) and statuses[-1] == 503
        response = client.post(CHAT, json={"model": "budget-model"}, headers=bearer(budgeted))
        assert_error(response, 503, "db_unavailable")
        assert client.post(CHAT, json={"model": "budget-model"},
                           headers=bearer(free)).status_code == 200
    finally:
        proxy.cut()
        app.extensions["llmauth"].close()
        proxy.restore()


def test_an_admission_that_finds_a_dropped_lease_looks_the_lease_up_again(make: Any) -> None:
    """A lease the idle sweep drops while a request is being admitted is never admitted
    from: the request takes (or makes) the lease now in the table."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10_000_000))
    assert chat(client, key["key"], completion=3).status_code == 200
    leases = app.extensions["llmauth"].budgets.leases
    (old,) = leases._leases.values()
    give_back(app)  # idle: given back and dropped
    assert old.dead and not leases._leases

    class StaleOnce(dict):  # the first look-up still sees the dropped lease
        stale = True

        def get(self, ident: Any, default: Any = None) -> Any:
            if self.stale:
                self.stale = False
                return old
            return super().get(ident, default)

    leases._leases = StaleOnce()
    assert chat(client, key["key"], completion=3).status_code == 200
    (new,) = leases._leases.values()
    assert new is not old and not new.dead and not old.in_flight and old.held == 0
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (6000, 0)
