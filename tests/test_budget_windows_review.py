"""Budget windows of counter rows (per-model key budgets, the global and end-user budgets)
when their duration changes or goes away, and duration texts the columns must hold — on
SQLite and Postgres."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask, jsonify

from flask_llmauth.durations import parse_duration, utcnow
from flask_llmauth.store.tables import BudgetCounter, Key
from tests.helpers import ADMIN, assert_error, bearer, new_key
from tests.test_budgets import PRICES, budget_gateway, chat, give_back, usd


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def counter(app: Flask) -> Any:
    with app.extensions["llmauth"].store.use():
        return BudgetCounter.get(BudgetCounter.scope == "key_model")


def set_model_budget(client: Any, key: str, spec: dict[str, Any]) -> None:
    response = client.post("/key/update", headers=ADMIN,
                           json={"key": key, "model_max_budget": {"budget-model": spec}})
    assert response.status_code == 200, response.get_json()


def test_a_shorter_model_budget_window_starts_a_new_schedule(make: Any) -> None:
    """``time_period`` 30d -> 1d: the window ends a day after the change (as setting an
    entity's ``budget_duration`` does), not at the old 30-day end; the spend stays."""
    app = make()
    client = app.test_client()
    key = new_key(client, model_max_budget={
        "budget-model": {"budget_limit": usd(15_000), "time_period": "30d"}})
    assert chat(client, key["key"], completion=10).status_code == 200  # 10,000 spent
    give_back(app)
    assert counter(app).budget_reset_at - utcnow() > timedelta(days=29)
    set_model_budget(client, key["key"], {"budget_limit": usd(15_000), "time_period": "1d"})
    response = chat(client, key["key"], completion=10)  # ~10,001 no longer fits 5,000
    assert_error(response, 429, "budget_exceeded")
    assert 86_000 <= int(response.headers["Retry-After"]) <= 86_400
    c = counter(app)
    assert (c.budget_duration, c.spend) == ("1d", 10_000)
    assert timedelta(hours=23) < c.budget_reset_at - utcnow() <= timedelta(days=1)


def test_a_model_budget_whose_window_is_removed_is_never_reset_again(make: Any) -> None:
    """Without ``time_period`` a budget never resets: the counter forgets its old duration,
    so ``reset-budgets`` (and the scheduler) leave its spend alone."""
    app = make()
    client = app.test_client()
    key = new_key(client, model_max_budget={
        "budget-model": {"budget_limit": usd(50_000), "time_period": "1d"}})
    assert chat(client, key["key"], completion=10).status_code == 200
    set_model_budget(client, key["key"], {"budget_limit": usd(50_000)})
    assert chat(client, key["key"], completion=10).status_code == 200
    give_back(app)
    assert counter(app).spend == 20_000
    ledger = app.extensions["llmauth"].budgets.ledger
    ledger.reset_due(utcnow() + timedelta(days=2))
    c = counter(app)
    assert (c.spend, c.budget_duration, c.budget_reset_at) == (20_000, None, None)


def test_an_idle_lease_given_back_keeps_the_counter_window(make: Any) -> None:
    """The background give-back touches the counter without a window of its own: the
    counter's duration and schedule stay."""
    app = make()
    client = app.test_client()
    key = new_key(client, model_max_budget={
        "budget-model": {"budget_limit": usd(500_000), "time_period": "1d"}})
    assert chat(client, key["key"], completion=10).status_code == 200
    before = counter(app).budget_reset_at
    give_back(app)  # a lease transaction of the sweep
    c = counter(app)
    assert (c.budget_duration, c.budget_reset_at, c.reserved) == ("1d", before, 0)


@pytest.mark.parametrize("text", ["1               d", "\t30\n\nd", " 000001 mo "])
def test_a_duration_with_inner_spaces_is_stored_in_its_short_form(make: Any,
                                                                   text: str) -> None:
    """The duration pattern allows spaces between the number and the unit; what is stored
    (and answered) is the short form, which the 16-character columns hold on Postgres."""
    short = "".join(text.split())
    assert parse_duration(text).text == short
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(500_000), budget_duration=text,
                  model_max_budget={"budget-model": {"budget_limit": usd(500_000),
                                                     "time_period": text}})
    assert key["budget_duration"] == short
    assert chat(client, key["key"], completion=1).status_code == 200
    give_back(app)
    assert counter(app).budget_duration == short
    with app.extensions["llmauth"].store.use():
        assert Key.get(Key.key_id == key["key_id"]).budget_duration == short



# -- the worst case of a model name that stands for another ------------------------------------


def alias_gateway(app_factory: Any, db_url: str) -> Flask:
    """A gateway whose upstream answers as ``budget-model`` whatever name it was asked for
    (an alias resolved upstream), 10 completion tokens: 10,000 units."""
    routed = {"model_name": "routed", "litellm_params": {"model": "openai/budget-model"}}
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_DEFAULT_MAX_TOKENS": 10,
                       "LLMAUTH_MODEL_LIST": [routed]}, db_url=db_url, routes=False)

    @app.post("/v1/chat/completions")
    def completions() -> Any:
        return jsonify(model="budget-model", choices=[],
                       usage={"prompt_tokens": 0, "completion_tokens": 10})

    return app


@pytest.mark.parametrize("model", ["fast", "routed"])
def test_an_alias_reserves_the_worst_case_of_the_model_it_stands_for(app_factory: Any,
                                                                      db_url: str,
                                                                      model: str) -> None:
    """A name no price table knows — a key alias or a ``model_list`` name routed to a priced
    model — is charged at the price of the model the upstream reports; its worst case is
    reserved at the price of the model it stands for, not as free. Requests whose spend is
    not written yet never take the budget past its limit."""
    app = alias_gateway(app_factory, db_url)
    client = app.test_client()
    key = new_key(client, max_budget=usd(25_000), aliases={"fast": "budget-model"})
    statuses = [client.post("/v1/chat/completions", headers=bearer(key["key"]),
                            json={"model": model, "max_tokens": 10}).status_code
                for _ in range(4)]  # no flush in between: the spend is not written yet
    assert statuses == [200, 200, 429, 429]
    give_back(app)
    with app.extensions["llmauth"].store.use():
        k = Key.get(Key.key_id == key["key_id"])
    assert (k.spend, k.reserved) == (20_000, 0)
