"""Edges of the money path: what an answer without usage costs without the spend ledger,
what a request addressed by an alias costs when the upstream names a model no price table
knows — on SQLite and Postgres."""

from __future__ import annotations

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
