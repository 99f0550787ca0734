"""Rate limits: every descriptor (key, model per key, team member, user, team, end user,
global), rpm / tpm / max_parallel_requests, windows, headers, storage outages and the per-IP
failed-authentication limit — on memory:// and on the real Redis."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request, stream_with_context

from flask_llmauth import ConfigurationError
from flask_llmauth.config import load_settings
from flask_llmauth.errors import TooManyRequests
from flask_llmauth.guards import Admission
from flask_llmauth.ratelimits import descriptors, openai_duration
from flask_llmauth.signals import rate_limited
from flask_llmauth.store.tables import Key
from tests.conftest import REDIS_URL
from tests.helpers import ADMIN, assert_error, bearer, new_key, random_key, serve_in_thread

CHAT = "/v1/chat/completions"


def add_llm_routes(app: Flask) -> None:
    """A gateway whose responses report the tokens the request asks for (``tokens``)."""

    @app.post(CHAT)
    def chat() -> Any:
        body = request.get_json()
        tokens = int(body.get("tokens", 10))
        if body.get("fail"):
            return jsonify(error={"message": "upstream failed"}), 502
        if body.get("raise"):
            raise RuntimeError("view failed")
        usage = {"prompt_tokens": tokens // 2, "completion_tokens": tokens - tokens // 2,
                 "total_tokens": tokens}
        if body.get("stream"):
            def events() -> Iterator[str]:
                yield 'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
                yield f'data: {{"choices":[],"usage":{__import__("json").dumps(usage)}}}\n\n'
                yield "data: [DONE]\n\n"

            return Response(stream_with_context(events()), mimetype="text/event-stream")
        return jsonify(model=body.get("model"), choices=[], usage=usage)

    @app.get("/v1/models")
    def models() -> Any:
        return jsonify(data=[])


#: The storages started for the session (tests/storage_servers.py), by parameter.
STARTED_STORAGES = {"redis-cluster": "redis_cluster_url", "redis-sentinel": "redis_sentinel_url",
                    "memcached": "memcached_url"}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("valkey", marks=pytest.mark.redis),
                        pytest.param("redis-cluster", marks=pytest.mark.redis),
                        pytest.param("redis-sentinel", marks=pytest.mark.redis),
                        pytest.param("redis-tls", marks=pytest.mark.redis), "memcached"])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Rate-limit storage settings: per-process memory, the shared Redis with a key prefix
    of its own (never flushed), or a storage started for the session: a Redis Cluster of
    three nodes or a memcached (their counters take one storage call each: a request's keys
    may sit on different nodes; memcached decrements with ``decr``), or a Redis behind a
    Sentinel (the Lua scripts, on the master the Sentinel names); ``valkey``: the shared
    Redis through limits' ``valkey://`` storage and the Valkey client (the same protocol)."""
    if request.param == "memory":
        return {"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://"}
    if request.param == "redis-tls":  # a Redis that speaks only TLS, started for the session
        return {**request.getfixturevalue("redis_tls"),
                "LLMAUTH_RATELIMIT_KEY_PREFIX": f"llmauth-test-{uuid.uuid4().hex[:8]}"}
    if request.param in STARTED_STORAGES:
        url = request.getfixturevalue(STARTED_STORAGES[request.param])
        return {"LLMAUTH_RATELIMIT_STORAGE_URI": url,
                "LLMAUTH_RATELIMIT_KEY_PREFIX": f"llmauth-test-{uuid.uuid4().hex[:8]}"}
    prefix = request.getfixturevalue("redis_prefix")
    assert REDIS_URL is not None  # redis_prefix: set, or the test was skipped
    url = REDIS_URL if request.param == "redis" else "valkey:" + REDIS_URL.split(":", 1)[1]
    return {"LLMAUTH_RATELIMIT_STORAGE_URI": url, "LLMAUTH_RATELIMIT_KEY_PREFIX": prefix}


@pytest.fixture
def make(app_factory: Any, storage: dict[str, Any]) -> Any:
    def build(**config: Any) -> Flask:
        app = app_factory({**storage, **config}, routes=False)
        add_llm_routes(app)
        return app

    return build


def chat(client: Any, key: str, **body: Any) -> Any:
    return client.post(CHAT, json={"model": "gpt-4o", **body}, headers=bearer(key))


def statuses(client: Any, key: str, n: int, **body: Any) -> list[int]:
    return [chat(client, key, **body).status_code for _ in range(n)]


def message(response: Any) -> str:
    return response.get_json()["error"]["message"]


# -- rpm per descriptor --------------------------------------------------------------------------


def test_key_rpm_admits_the_limit_then_429_with_litellm_message_and_headers(make: Any) -> None:
    client = make().test_client()
    body = new_key(client, rpm_limit=3)
    key = body["key"]
    remaining = []
    for _ in range(3):
        response = chat(client, key)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [2, 1, 0]
    refused = chat(client, key)
    error = assert_error(refused, 429, "rate_limit_error")
    assert error["message"].startswith(
        f"Rate limit exceeded for key: {body['key_name']}. Limit type: requests. "
        "Current limit: 3, Remaining: 0. Limit resets at: ")
    assert error["message"].endswith(" UTC")
    assert key not in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize(("path", "fields"), [
    ("/key/generate", {"rpm_limit": 0}), ("/key/generate", {"tpm_limit": 0}),
    ("/key/generate", {"max_parallel_requests": 0}),
    ("/key/generate", {"model_rpm_limit": {"gpt-4o": 0}}),
    ("/key/generate", {"model_max_budget": {"gpt-4o": {"rpm_limit": 0}}}),
    ("/user/new", {"user_id": "u-zero", "rpm_limit": 0}),
    ("/team/new", {"team_id": "t-zero", "team_member_tpm_limit": 0}),
    ("/team/new", {"team_id": "t-zero", "model_tpm_limit": {"gpt-4o": "0"}}),
    ("/customer/new", {"user_id": "c-zero", "max_parallel_requests": 0.0}),
])
def test_a_limit_of_zero_is_refused_not_stored(make: Any, path: str,
                                              fields: dict[str, Any]) -> None:
    """In LiteLLM a 0 refuses every request; here a stored 0 sets no limit. So the API
    refuses it (400 naming the field) instead of letting a caller meant to be stopped run
    unlimited: null removes a limit, a block or a budget of 0 stops a caller."""
    client = make().test_client()
    error = assert_error(client.post(path, json=fields, headers=ADMIN), 400,
                         "invalid_request_error")
    assert error["param"] == next(iter(fields.keys() - {"user_id", "team_id"}))
    assert "must be at least 1" in error["message"] and "block" in error["message"]


def test_a_stored_limit_of_zero_is_no_limit_and_blocking_stops_the_caller(make: Any) -> None:
    """As docs/rate_limits.md says: a 0 already in a row adds no descriptor; null clears a
    limit; a block or a budget of 0 is what stops a caller."""
    app = make()
    client = app.test_client()
    body = new_key(client, rpm_limit=1, tpm_limit=5, max_parallel_requests=1)
    with app.extensions["llmauth"].store.use():
        Key.update(rpm_limit=0, tpm_limit=0, max_parallel_requests=0).where(
            Key.key_id == body["key_id"]).execute()
    app.extensions["llmauth"].invalidate.clear_local()
    for _ in range(2):
        response = chat(client, body["key"])
        assert response.status_code == 200
        assert not any(name.lower().startswith("x-ratelimit")
                       for name in response.headers.keys())
    cleared = client.post("/key/update", json={"key": body["key_id"], "rpm_limit": None},
                          headers=ADMIN)
    assert cleared.status_code == 200 and cleared.get_json()["rpm_limit"] is None
    assert client.post("/key/block", json={"key": body["key_id"]},
                       headers=ADMIN).status_code == 200
    assert chat(client, body["key"]).status_code == 401
    stopped = new_key(client, max_budget=0)
    assert_error(chat(client, stopped["key"]), 429, "budget_exceeded")


def test_a_budget_refusal_carries_no_rate_limit_headers(make: Any) -> None:
    """The rate limits admitted the request, then a budget refused it: its counts are taken
    back and only the budget's headers are sent (docs/rate_limits.md, Responses)."""
    client = make().test_client()
    key = new_key(client, rpm_limit=5, max_budget=0.00001)["key"]
    response = chat(client, key)  # gpt-4o's worst case for 4096 tokens is $0.04
    assert_error(response, 429, "budget_exceeded")
    assert response.headers["x-should-retry"] == "false"
    assert not any(name.lower().startswith("x-ratelimit") for name in response.headers.keys())


def test_rpm_window_rolls_over_and_refusals_are_not_counted(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_WINDOW=2).test_client()
    key = new_key(client, rpm_limit=2)["key"]
    assert statuses(client, key, 5) == [200, 200, 429, 429, 429]
    time.sleep(2.1)
    assert statuses(client, key, 3) == [200, 200, 429]


def test_a_changed_limit_keeps_the_count_of_its_window(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_WINDOW=3600).test_client()
    key = new_key(client, rpm_limit=3)["key"]
    assert statuses(client, key, 2) == [200, 200]

    def update(rpm: int) -> None:
        response = client.post("/key/update", json={"key": key, "rpm_limit": rpm},
                               headers=ADMIN)
        assert response.status_code == 200, response.get_json()

    update(2)  # lowered to what the window has used: no fresh allowance
    refused = chat(client, key)
    assert refused.status_code == 429
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    update(5)  # raised: the rest of the new value
    assert statuses(client, key, 4) == [200, 200, 200, 429]


def test_user_team_and_team_member_rpm(make: Any) -> None:
    client = make().test_client()
    assert client.post("/user/new", json={"user_id": "u-rl", "rpm_limit": 2},
                       headers=ADMIN).status_code == 200
    personal = new_key(client, user_id="u-rl")["key"]
    personal2 = new_key(client, user_id="u-rl")["key"]
    assert [chat(client, personal).status_code, chat(client, personal2).status_code] == [200,
                                                                                          200]
    refused = chat(client, personal)
    assert message(refused).startswith("Rate limit exceeded for user: u-rl. Limit type: "
                                       "requests. Current limit: 2")

    assert client.post("/team/new", json={"team_id": "t-rl", "rpm_limit": 3},
                       headers=ADMIN).status_code == 200
    a, b = new_key(client, team_id="t-rl")["key"], new_key(client, team_id="t-rl")["key"]
    assert statuses(client, a, 2) + statuses(client, b, 2) == [200, 200, 200, 429]
    assert message(chat(client, b)).startswith("Rate limit exceeded for team: t-rl.")

    assert client.post("/team/new", json={"team_id": "t-m", "team_member_rpm_limit": 5},
                       headers=ADMIN).status_code == 200
    for user in ("m1", "m2"):
        assert client.post("/user/new", json={"user_id": user}, headers=ADMIN).status_code == 200
        assert client.post("/team/member_add", json={
            "team_id": "t-m", "member": {"user_id": user, "role": "user"}},
            headers=ADMIN).status_code == 200
    assert client.post("/team/member_update", json={"team_id": "t-m", "user_id": "m1",
                                                    "rpm_limit": 1},
                       headers=ADMIN).status_code == 200
    m1 = new_key(client, team_id="t-m", user_id="m1")["key"]
    m2 = new_key(client, team_id="t-m", user_id="m2")["key"]
    assert statuses(client, m1, 2) == [200, 429]
    assert message(chat(client, m1)).startswith(
        "Rate limit exceeded for team_member: t-m:m1. Limit type: requests. Current limit: 1")
    assert statuses(client, m2, 6) == [200] * 5 + [429]  # the team's member default


def test_model_per_key_rpm_counts_each_model_and_its_aliases(make: Any) -> None:
    client = make().test_client()
    key = new_key(client, model_rpm_limit={"gpt-4o": 2}, aliases={"fast": "gpt-4o"})["key"]
    assert chat(client, key, model="gpt-4o").status_code == 200
    assert chat(client, key, model="fast").status_code == 200  # same counter as its target
    refused = chat(client, key, model="gpt-4o")
    assert message(refused).startswith("Rate limit exceeded for model_per_key: ")
    assert ":gpt-4o. Limit type: requests. Current limit: 2" in message(refused)
    assert statuses(client, key, 3, model="gpt-4o-mini") == [200, 200, 200]


def test_global_rpm_is_shared_by_every_key_and_the_master_key_is_exempt(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_GLOBAL_RPM=3).test_client()
    a, b = new_key(client)["key"], new_key(client)["key"]
    assert [chat(client, a).status_code, chat(client, b).status_code,
            chat(client, a).status_code] == [200, 200, 200]
    refused = chat(client, b)
    assert message(refused).startswith("Rate limit exceeded for global: deployment.")
    assert "x-ratelimit-remaining-requests" in refused.headers
    admin = [client.post(CHAT, json={"model": "gpt-4o"}, headers=ADMIN).status_code
             for _ in range(5)]
    assert admin == [200] * 5


def test_success_headers_never_show_the_global_window(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_GLOBAL_RPM=1000).test_client()
    key = new_key(client)["key"]
    response = chat(client, key)
    assert response.status_code == 200
    assert not [h for h in response.headers.keys() if h.lower().startswith("x-ratelimit")]


def test_a_caller_over_its_own_limit_does_not_use_up_the_team(make: Any) -> None:
    client = make().test_client()
    client.post("/team/new", json={"team_id": "t-share", "rpm_limit": 3}, headers=ADMIN)
    noisy = new_key(client, team_id="t-share", rpm_limit=1)["key"]
    quiet = new_key(client, team_id="t-share")["key"]
    assert statuses(client, noisy, 10) == [200] + [429] * 9
    assert statuses(client, quiet, 3) == [200, 200, 429]


def test_safe_methods_and_unlimited_keys_are_not_counted(make: Any) -> None:
    client = make().test_client()
    key = new_key(client, rpm_limit=1)["key"]
    for _ in range(3):
        response = client.get("/v1/models", headers=bearer(key))
        assert response.status_code == 200
        assert "x-ratelimit-remaining-requests" not in response.headers
    assert statuses(client, key, 2) == [200, 429]
    free = new_key(client)["key"]
    response = chat(client, free)
    assert response.status_code == 200 and "x-ratelimit-limit-requests" not in response.headers


def test_refusal_by_a_later_guard_is_not_counted(make: Any) -> None:
    app = make()

    class Refuse:
        name = "refuse"
        on = True

        def wants(self, principal: Any, route: Any, unsafe: bool) -> bool:
            return route.is_llm

        def admit(self, admission: Admission) -> None:
            if self.on:
                raise TooManyRequests("budget says no")

        def settle(self, *args: Any) -> None:
            pass

        def headers(self, admission: Admission) -> dict[str, str]:
            return {}

    refuse = Refuse()
    app.extensions["llmauth"].guards.add(refuse)
    assert [g.name for g in app.extensions["llmauth"].guards.guards] == [
        "customers", "rate_limits", "budgets", "spend", "refuse"]
    client = app.test_client()
    key = new_key(client, rpm_limit=2, max_parallel_requests=1)["key"]
    for _ in range(4):
        assert message(chat(client, key)) == "budget says no"
    refuse.on = False
    assert statuses(client, key, 3) == [200, 200, 429]


# -- tpm -----------------------------------------------------------------------------------------


def test_tpm_charges_real_tokens_after_the_response(make: Any) -> None:
    client = make().test_client()
    key = new_key(client, tpm_limit=50)["key"]
    first = chat(client, key, tokens=30)
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "50"
    assert first.headers["x-ratelimit-remaining-tokens"] == "50"  # charged after the response
    second = chat(client, key, tokens=30)  # 30 used < 50: admitted, then overshoots to 60
    assert second.headers["x-ratelimit-remaining-tokens"] == "20"
    refused = chat(client, key, tokens=1)
    assert message(refused).startswith(
        "Rate limit exceeded for key: ") and "Limit type: tokens. Current limit: 50, " \
        "Remaining: 0." in message(refused)
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


@pytest.mark.parametrize("token_type,remaining", [("total", None), ("input", "25"),
                                                 ("output", "23")])
def test_token_type_picks_what_tpm_counts(make: Any, token_type: str,
                                          remaining: str | None) -> None:
    client = make(LLMAUTH_RATELIMIT_TOKEN_TYPE=token_type).test_client()
    key = new_key(client, tpm_limit=50)["key"]
    chat(client, key, tokens=31)  # 15 prompt + 16 completion
    chat(client, key, tokens=21)  # 10 + 11: total 52, input 25, output 27
    response = chat(client, key, tokens=0)
    if remaining is None:
        assert response.status_code == 429
    else:
        assert response.headers["x-ratelimit-remaining-tokens"] == remaining


def test_tpm_estimate_refuses_a_request_that_cannot_fit(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_TPM_ESTIMATE=True).test_client()
    key = new_key(client, tpm_limit=100)["key"]
    refused = chat(client, key, max_tokens=200, messages=[{"role": "user", "content": "hi"}])
    # larger than the limit itself: refused for good (tests/test_ratelimits_followup.py)
    assert "Limit type: tokens. Current limit: 100. This request alone needs an estimated " \
           in message(refused)
    assert chat(client, key, max_tokens=50).status_code == 200
    refused = chat(client, key, max_tokens=95)  # fits the limit, not what is left
    assert "Limit type: tokens. Current limit: 100, Remaining: 90." in message(refused)


def test_tpm_estimate_refuses_a_completion_cap_that_is_not_a_count(make: Any) -> None:
    """With a tpm window to reserve in, a cap that is not a count is a 400 (an upstream may
    read ``"8000"`` as 8000, or -1 as no cap), and the refusal is not counted."""
    client = make(LLMAUTH_RATELIMIT_TPM_ESTIMATE=True).test_client()
    key = new_key(client, tpm_limit=1000, rpm_limit=2)["key"]
    for value in ("8000", 8000.0, -1, False):
        error = assert_error(chat(client, key, max_tokens=value), 400, "invalid_request_error")
        assert error["param"] == "max_tokens", value
    assert statuses(client, key, 3, max_tokens=5) == [200, 200, 429]
    # No tokens reserved (rpm only): the cap goes to the upstream as it was sent.
    rpm_only = new_key(client, rpm_limit=5)["key"]
    assert chat(client, rpm_only, max_tokens="8000").status_code == 200


def test_stream_is_charged_when_it_ends(make: Any) -> None:
    client = make().test_client()
    key = new_key(client, tpm_limit=20)["key"]
    streaming = client.post(CHAT, json={"model": "gpt-4o", "stream": True, "tokens": 25},
                            headers=bearer(key), buffered=False)
    assert streaming.status_code == 200
    assert chat(client, key, tokens=0).status_code == 200  # not charged yet
    assert b"[DONE]" in b"".join(streaming.response)
    streaming.close()
    assert chat(client, key, tokens=0).status_code == 429


def test_model_per_key_and_team_tpm(make: Any) -> None:
    client = make().test_client()
    client.post("/team/new", json={"team_id": "t-tpm", "model_tpm_limit": {"gpt-4o": 10}},
                headers=ADMIN)
    key = new_key(client, team_id="t-tpm")["key"]
    assert chat(client, key, tokens=15).status_code == 200
    refused = chat(client, key)
    assert "model_per_key" in message(refused) and "Limit type: tokens" in message(refused)
    assert chat(client, key, model="gpt-4o-mini").status_code == 200


@pytest.mark.parametrize("stored", [0.5, 0, -3, "5", True, None])
def test_a_stored_per_model_value_that_is_not_a_limit_leaves_the_next_level_in_force(
        make: Any, stored: Any) -> None:
    """A key's metadata value below 1 (or not a number) sets no limit at the key's level:
    the team's per-model limit then applies, as it does for a key without any. A fraction
    below 1 used to be read as a limit of 0, which stopped the search and lifted the
    team's limit."""
    client = make().test_client()
    client.post("/team/new", json={"team_id": "t-frac", "model_rpm_limit": {"gpt-4o": 1}},
                headers=ADMIN)
    key = new_key(client, team_id="t-frac",
                  metadata={"model_rpm_limit": {"gpt-4o": stored}})["key"]
    assert statuses(client, key, 2) == [200, 429]
    fraction = new_key(client, metadata={"model_rpm_limit": {"gpt-4o": 2.9}})["key"]
    assert statuses(client, fraction, 3) == [200, 200, 429]  # the fraction dropped


def _team_member_key(client: Any, **team: Any) -> str:
    assert client.post("/team/new", json={"team_id": "t-src", **team},
                       headers=ADMIN).status_code == 200
    assert client.post("/user/new", json={"user_id": "u-src"}, headers=ADMIN).status_code == 200
    assert client.post("/team/member_add", json={
        "team_id": "t-src", "member": {"user_id": "u-src", "role": "user"}},
        headers=ADMIN).status_code == 200
    return str(new_key(client, team_id="t-src", user_id="u-src")["key"])


@pytest.mark.parametrize("source", [
    "key", "key_model", "key_metadata", "key_model_max_budget", "user", "team",
    "team_model", "team_member", "global"])
def test_every_tpm_source_is_charged_after_the_response(app_factory: Any,
                                                        source: str) -> None:
    """The settlement of a request that names no end user runs when any tpm window may
    apply to its principal (``RateLimits.settles``), whichever record sets it: 15 tokens
    charged to a window of 10 refuse the next request."""
    config = {"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://"}
    if source == "global":
        config["LLMAUTH_RATELIMIT_GLOBAL_TPM"] = 10  # type: ignore[assignment]
    app = app_factory(config, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    limit = {"gpt-4o": 10}
    if source == "user":
        assert client.post("/user/new", json={"user_id": "u-src", "tpm_limit": 10},
                           headers=ADMIN).status_code == 200
        key = new_key(client, user_id="u-src")["key"]
    elif source in ("team", "team_model", "team_member"):
        key = _team_member_key(client, **{"team": {"tpm_limit": 10},
                                          "team_model": {"model_tpm_limit": limit},
                                          "team_member": {"team_member_tpm_limit": 10}}[source])
    else:
        key = new_key(client, **{"key": {"tpm_limit": 10},
                                 "key_model": {"model_tpm_limit": limit},
                                 "key_metadata": {"metadata": {"model_tpm_limit": limit}},
                                 "key_model_max_budget": {"model_max_budget": {
                                     "gpt-4o": {"budget_limit": 100, "tpm_limit": 10}}},
                                 "global": {}}[source])["key"]
    assert chat(client, key, tokens=15).status_code == 200
    refused = chat(client, key)
    assert refused.status_code == 429 and "Limit type: tokens" in message(refused)


def test_settles_answers_whether_a_window_is_charged_or_a_slot_released() -> None:
    """``RateLimits.settles``: true when a tpm window or a parallel slot may apply to the
    principal's requests (for any model), false for rpm windows only."""
    from flask_llmauth.principal import Principal, Role
    from flask_llmauth.ratelimits import RateLimits

    def settles(limits: dict[str, int], **config: Any) -> bool:
        guard = RateLimits.__new__(RateLimits)
        guard.settings = load_settings(config)
        principal = Principal(method="custom", role=Role.INTERNAL_USER, user_id="alice",
                              limits=limits)
        return guard.settles(principal, None, True, ())  # type: ignore[arg-type]

    assert settles({"rpm_limit": 5}) is False
    assert settles({}) is False
    assert settles({"rpm_limit": 5, "tpm_limit": 100}) is True
    assert settles({"rpm_limit": 5, "max_parallel_requests": 2}) is True
    assert settles({"rpm_limit": 5}, LLMAUTH_RATELIMIT_GLOBAL_RPM=10) is False
    assert settles({"rpm_limit": 5}, LLMAUTH_RATELIMIT_GLOBAL_TPM=10) is True
    assert settles({"rpm_limit": 5}, LLMAUTH_RATELIMIT_GLOBAL_MAX_PARALLEL_REQUESTS=3) is True


# -- max_parallel_requests -------------------------------------------------------------------------


def test_parallel_slots_are_taken_and_released_on_every_path(make: Any) -> None:
    app = make()
    app.config["PROPAGATE_EXCEPTIONS"] = False
    client = app.test_client()
    key = new_key(client, max_parallel_requests=1)["key"]
    open_stream = client.post(CHAT, json={"model": "gpt-4o", "stream": True},
                              headers=bearer(key), buffered=False)
    refused = chat(client, key)
    assert message(refused).startswith(
        "Rate limit exceeded for key: ") and "Limit type: max_parallel_requests. Current " \
        "limit: 1, Remaining: 0. Retry when a request in flight completes." in message(refused)
    assert refused.headers["Retry-After"] == "1"
    next(iter(open_stream.response))
    open_stream.close()  # the client went away mid-stream: the slot is released
    assert chat(client, key, fail=True).status_code == 502
    assert chat(client, key, **{"raise": True}).status_code == 500
    assert statuses(client, key, 3) == [200, 200, 200]


def test_global_parallel(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_GLOBAL_MAX_PARALLEL_REQUESTS=2).test_client()
    a, b, c = (new_key(client)["key"] for _ in range(3))
    streams = [client.post(CHAT, json={"model": "m", "stream": True}, headers=bearer(k),
                           buffered=False) for k in (a, b)]
    for stream in streams:
        next(iter(stream.response))
    assert message(chat(client, c)).startswith("Rate limit exceeded for global: deployment. "
                                               "Limit type: max_parallel_requests.")
    streams[1].close()  # (the test client nests the streams' contexts: close the last first)
    assert chat(client, c).status_code == 200
    streams[0].close()


# -- end users (the customer record the customer guard puts on the admission) ----------------------


class Customer:
    rpm_limit = 2
    tpm_limit = None
    max_parallel_requests = None


def test_end_user_descriptor_reads_the_customer_record() -> None:
    settings = load_settings({})

    class P:
        key = user = team = membership = None
        user_id = None
        limits: dict[str, int] = {}

    found = descriptors(P(), (), "cust/1", Customer(), settings)  # type: ignore[arg-type]
    assert [(d.kind, d.label, d.ident, d.rpm) for d in found] == [
        ("end_user", "cust/1", "cust%2F1", 2)]
    assert descriptors(P(), (), "cust/1", None, settings) == []  # type: ignore[arg-type]
    assert descriptors(P(), (), None, Customer(), settings) == []  # type: ignore[arg-type]


def test_limits_asserted_by_the_authenticating_method_apply() -> None:
    from flask_llmauth.principal import Principal, Role

    principal = Principal(method="custom", role=Role.INTERNAL_USER, user_id="alice",
                          limits={"rpm_limit": 5, "tpm_limit": 100, "max_parallel_requests": 2})
    found = descriptors(principal, ("gpt-4o",), None, None, load_settings({}))
    assert [(d.kind, d.label, d.ident, d.rpm, d.tpm, d.parallel) for d in found] == [
        ("key", "alice", "custom:alice", 5, 100, 2)]


# -- signal, SDK -----------------------------------------------------------------------------------


def test_rate_limited_signal(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, rpm_limit=1)["key"]
    seen: list[Any] = []

    def receiver(sender: Any, principal: Any, limit: Any) -> None:
        seen.append((sender, principal.key_id, limit))

    with rate_limited.connected_to(receiver, app):
        statuses(client, key, 2)
    assert len(seen) == 1
    sender, key_id, limit = seen[0]
    assert sender is app and key_id is not None
    assert (limit.descriptor, limit.limit_type, limit.limit, limit.remaining) == (
        "key", "requests", 1, 0)


def test_a_failing_rate_limited_receiver_leaves_the_429(make: Any, caplog: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, rpm_limit=1)["key"]

    def receiver(sender: Any, **data: Any) -> None:
        raise RuntimeError("receiver failed")

    with rate_limited.connected_to(receiver, app):
        assert statuses(client, key, 2) == [200, 429]
    assert "a receiver of the llmauth-rate-limited signal failed" in caplog.text


@pytest.fixture
def served(app_factory: Any) -> Iterator[tuple[str, Flask]]:
    """The app on a real socket (werkzeug, threaded)."""
    from werkzeug.serving import make_server

    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://"}, routes=False)
    add_llm_routes(app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        thread.join()


def test_openai_sdk_sees_rate_limit_error_with_a_readable_message(
        served: Any, sdk_clients: ExitStack) -> None:
    import openai

    base, app = served
    key = new_key(app.test_client(), rpm_limit=1)["key"]
    client = sdk_clients.enter_context(
        openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0))
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o",
                                       messages=[{"role": "user", "content": "x"}])
    error = caught.value
    assert error.status_code == 429
    assert "Rate limit exceeded for key: " in error.message
    assert "Limit type: requests. Current limit: 1, Remaining: 0." in error.message
    assert int(error.response.headers["retry-after"]) >= 1


# -- storage outage ------------------------------------------------------------------------------


def _dead_redis_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there


def test_storage_down_fails_closed_by_default_with_503(app_factory: Any,
                                                       caplog: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": _dead_redis_url(),
                       "LLMAUTH_RATELIMIT_RETRY_INTERVAL": 30}, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    limited, free = new_key(client, rpm_limit=5)["key"], new_key(client)["key"]
    with caplog.at_level(logging.ERROR, "flask_llmauth"):
        for _ in range(3):
            response = chat(client, limited)
            error = assert_error(response, 503, "service_unavailable")
            assert error["message"] == "Rate limiting is temporarily unavailable; try again " \
                                       "shortly."
            assert response.headers["Retry-After"] == "30"
    outage_logs = [r for r in caplog.records if "storage is unreachable" in r.getMessage()]
    assert len(outage_logs) == 1  # one loud line per outage, not one per request
    assert chat(client, free).status_code == 200  # no limits: storage never consulted


def test_storage_down_open_and_memory_modes(app_factory: Any) -> None:
    for mode, expected in (("open", [200] * 4), ("memory", [200, 200, 429, 429])):
        app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": _dead_redis_url(),
                           "LLMAUTH_RATELIMIT_STORAGE_DOWN": mode}, routes=False)
        add_llm_routes(app)
        client = app.test_client()
        key = new_key(client, rpm_limit=2, max_parallel_requests=1)["key"]
        assert statuses(client, key, 4) == expected, mode


# -- failed authentications per IP -----------------------------------------------------------------


def test_failed_authentications_block_the_ip_before_the_credential_is_checked(
        make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="5/minute").test_client()
    attacker = {"REMOTE_ADDR": "203.0.113.9"}
    for _ in range(5):
        response = client.post(CHAT, json={"model": "m"}, headers=bearer(random_key()),
                               environ_base=attacker)
        assert_error(response, 401)
    blocked = client.post(CHAT, json={"model": "m"}, headers=ADMIN, environ_base=attacker)
    error = assert_error(blocked, 429, "rate_limit_error")
    assert "Too many failed authentication attempts" in error["message"]
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    # X-Forwarded-For from an untrusted peer does not change who is counted
    spoofed = client.post(CHAT, json={"model": "m"}, environ_base=attacker,
                          headers={**ADMIN, "X-Forwarded-For": "198.51.100.7"})
    assert spoofed.status_code == 429
    # another address is unaffected; requests without a credential are not counted
    other = {"REMOTE_ADDR": "203.0.113.10"}
    for _ in range(8):
        assert client.post(CHAT, json={"model": "m"}, environ_base=other).status_code == 401
    assert client.post(CHAT, json={"model": "m"}, headers=ADMIN,
                       environ_base=other).status_code == 200


def test_a_blocked_address_is_signalled_once_without_a_principal(make: Any) -> None:
    """``rate_limited`` is sent once when an address is blocked for failed authentications:
    no principal (none was authenticated), the counted block as the value, no secret."""
    app = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute")
    client = app.test_client()
    seen: list[dict[str, Any]] = []
    attacker = {"REMOTE_ADDR": "203.0.113.21"}
    tried = [random_key() for _ in range(2)]
    with rate_limited.connected_to(lambda sender, **data: seen.append(data), app):
        for key in tried:
            assert_error(client.post(CHAT, json={"model": "m"}, headers=bearer(key),
                                     environ_base=attacker), 401)
        for _ in range(2):
            assert client.post(CHAT, json={"model": "m"}, headers=ADMIN,
                               environ_base=attacker).status_code == 429
    assert len(seen) == 1, seen
    breach = seen[0]["limit"]
    assert seen[0]["principal"] is None
    assert (breach.descriptor, breach.value, breach.limit_type, breach.limit,
            breach.remaining) == ("ip", "203.0.113.21", "auth_failures", 2, 0)
    assert breach.reset_at > time.time()
    assert not any(key in repr(seen) for key in tried)


def test_failed_authentications_behind_a_trusted_proxy_count_the_forwarded_client(
        make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="3/minute",
                  LLMAUTH_TRUSTED_PROXY_RANGES=["10.0.0.0/8"]).test_client()
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    for _ in range(3):
        assert client.post(CHAT, json={"model": "m"}, headers={
            **bearer(random_key()), "X-Forwarded-For": "198.51.100.7"},
            environ_base=proxy).status_code == 401
    assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
        **ADMIN, "X-Forwarded-For": "198.51.100.7"}).status_code == 429
    assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
        **ADMIN, "X-Forwarded-For": "198.51.100.8"}).status_code == 200


def test_200_bad_keys_from_one_ip_are_mostly_refused_unchecked(make: Any) -> None:
    app = make()  # the default limit
    client = app.test_client()
    codes = [client.post(CHAT, json={"model": "m"}, headers=bearer(random_key())).status_code
             for _ in range(200)]
    assert codes == [401] * 30 + [429] * 170


# -- configuration -------------------------------------------------------------------------------


def test_bad_settings_fail_init_naming_the_key(app_factory: Any) -> None:
    with pytest.raises(ConfigurationError, match="LLMAUTH_AUTH_FAILURE_LIMIT"):
        app_factory({"LLMAUTH_AUTH_FAILURE_LIMIT": "lots"})
    with pytest.raises(ConfigurationError, match="LLMAUTH_RATELIMIT_STORAGE_DOWN"):
        app_factory({"LLMAUTH_RATELIMIT_STORAGE_DOWN": "maybe"})
    with pytest.raises(ConfigurationError, match="LLMAUTH_RATELIMIT_WINDOW"):
        app_factory({"LLMAUTH_RATELIMIT_WINDOW": 0})


def test_memory_storage_with_several_workers_warns_or_refuses(app_factory: Any,
                                                               caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, "flask_llmauth"):
        app_factory({"LLMAUTH_WORKER_PROCESSES": 4})
    warned = [r.getMessage() for r in caplog.records if "worker processes" in r.getMessage()]
    assert len(warned) == 1 and "up to 4x" in warned[0] and "LLMAUTH_REDIS_URL" in warned[0]
    with pytest.raises(ConfigurationError, match="LLMAUTH_RATELIMIT_STORAGE_URI"):
        app_factory({"LLMAUTH_WORKER_PROCESSES": 2,
                     "LLMAUTH_RATELIMIT_MULTIPROCESS_MEMORY": "refuse"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, "flask_llmauth"):
        app_factory({"LLMAUTH_WORKER_PROCESSES": 1})
        app_factory({"LLMAUTH_WORKER_PROCESSES": 4, "LLMAUTH_REDIS_URL": _dead_redis_url()})
    assert not [r for r in caplog.records if "worker processes" in r.getMessage()]


def test_rate_limits_can_be_switched_off(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_ENABLED": False}, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    key = new_key(client, rpm_limit=1)["key"]
    assert statuses(client, key, 3) == [200] * 3
    assert app.extensions["llmauth"].limiter is None


def test_host_routes_can_use_the_apps_limiter(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://"})
    limiter = app.extensions["llmauth"].limiter

    @app.get("/custom/limited")
    @app.llmauth.route_group("llm_api_routes")
    @limiter.limit("2/minute")
    def limited() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    a = new_key(client)["key"]
    b = new_key(client)["key"]
    assert [client.get("/custom/limited", headers=bearer(a)).status_code
            for _ in range(3)] == [200, 200, 429]
    assert client.get("/custom/limited", headers=bearer(b)).status_code == 200  # per principal


def test_host_limits_follow_the_storage_down_mode(app_factory: Any) -> None:
    for mode, expected in (("closed", 503), ("open", 200), ("memory", 200)):
        app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": _dead_redis_url(),
                           "LLMAUTH_RATELIMIT_STORAGE_DOWN": mode})
        limiter = app.extensions["llmauth"].limiter

        @app.get("/custom/limited")
        @app.llmauth.route_group("llm_api_routes")
        @limiter.limit("2/minute")
        def limited() -> Any:
            return jsonify(ok=True)

        response = app.test_client().get("/custom/limited", headers=ADMIN)
        assert response.status_code == expected, mode
        if expected == 503:
            assert_error(response, 503, "service_unavailable")


def test_flask_limiter_application_limits_from_the_app_config_apply(
        app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://",
                       "RATELIMIT_APPLICATION": "2/minute"})
    client = app.test_client()
    assert [client.get("/public/ping").status_code for _ in range(3)] == [200, 200, 429]


def test_requests_without_any_limit_skip_the_guard(make: Any) -> None:
    app = make()
    state = app.extensions["llmauth"]
    client = app.test_client()
    free, limited = new_key(client)["key"], new_key(client, model_tpm_limit={"x": 5})["key"]
    seen: list[Any] = []
    original = state.ratelimits.admit
    state.ratelimits.admit = lambda admission: seen.append(admission) or original(admission)
    chat(client, free)
    assert seen == []  # no admission at all: unconfigured features cost nothing
    chat(client, limited)  # a per-model limit (for another model) makes the key limited
    assert len(seen) == 1
    global_app = make(LLMAUTH_RATELIMIT_GLOBAL_RPM=100)
    assert global_app.extensions["llmauth"].ratelimits.always


def _window_stats(app: Flask, body: dict[str, Any], field: str, amount: int,
                  seconds: int) -> tuple[float, int]:
    """limits' own view of a key's window (its storage's ``get`` and ``get_expiry`` of
    the window item's key — amount 1 whatever the limit), as ``(reset, amount - count)``."""
    from limits import RateLimitItemPerSecond

    from flask_llmauth.ratelimits import _ident

    state = app.extensions["llmauth"]
    key = RateLimitItemPerSecond(1, seconds, namespace="LLMAUTH").key_for(
        state.settings.ratelimit_key_prefix, "key", _ident(body["key_id"]), field)
    storage = state.limiter.limiter.storage
    return storage.get_expiry(key), amount - storage.get(key)


def slots_in_use(app: Flask, key_id: str, limit: int, kind: str = "key") -> int:
    """The parallel slots of a descriptor held now (request ids with a lease: a sorted set
    on Redis, a dict per key in memory; one counter per descriptor on the other storages)."""

    from flask_llmauth.ratelimits import (
        MemoryCounters,
        RedisClusterCounters,
        RedisCounters,
        _ident,
    )

    state = app.extensions["llmauth"]
    counters = state.ratelimits.counters
    key = counters.window_key(state.settings.ratelimit_parallel_lease, kind, _ident(key_id),
                              "slots")
    if isinstance(counters, MemoryCounters):
        return len(counters._slots.get(key, {}))
    if not isinstance(counters, (RedisCounters, RedisClusterCounters)):
        return counters.get(key)
    storage = counters.storage
    return int(storage.get_connection().zcard(storage.prefixed_key(key)))


@pytest.mark.redis
def test_a_redis_cluster_gets_the_counters_of_one_call_each(app_factory: Any,
                                                           redis_cluster_url: str) -> None:
    """The ``redis-cluster`` runs of this module test the counters of one call each (a
    request's keys may sit on different nodes), not the Lua scripts of a single Redis; its
    parallel slots are leased each on its own, by a script on the descriptor's one key."""
    from flask_llmauth.ratelimits import RedisClusterCounters

    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": redis_cluster_url}, routes=False)
    counters = app.extensions["llmauth"].ratelimits.counters
    assert type(counters) is RedisClusterCounters
    assert type(counters.storage).__name__ == "RedisClusterStorage"


def test_counters_are_limits_own_fixed_windows(make: Any) -> None:
    """The one-pass counters (memory) and scripts (Redis) write the keys limits' fixed-window
    strategy reads, with its numbers: the host's tools (``get_window_stats``,
    ``limiter.reset()``) see the same windows."""
    app = make()
    client = app.test_client()
    body = new_key(client, rpm_limit=100, tpm_limit=10_000, max_parallel_requests=5)
    started = time.time()
    for _ in range(3):
        assert chat(client, body["key"], tokens=7).status_code == 200
    reset, remaining = _window_stats(app, body, "rpm", 100, 60)
    assert remaining == 97
    assert started + 58 <= reset <= time.time() + 61
    assert _window_stats(app, body, "tpm", 10_000, 60)[1] == 10_000 - 21
    assert slots_in_use(app, body["key_id"], 5) == 0  # every slot released
    app.extensions["llmauth"].limiter.reset()
    # limits cannot reset memcached (it cannot list its keys; Flask-Limiter logs a warning)
    from flask_llmauth.ratelimits import MemcachedCounters

    resettable = not isinstance(app.extensions["llmauth"].ratelimits.counters, MemcachedCounters)
    assert _window_stats(app, body, "rpm", 100, 60)[1] == (100 if resettable else 97)


def test_a_refused_request_leaves_every_counter_as_it_was(make: Any) -> None:
    app = make()
    client = app.test_client()
    assert client.post("/team/new", json={"team_id": "t-par", "max_parallel_requests": 1},
                       headers=ADMIN).status_code == 200
    body = new_key(client, team_id="t-par", rpm_limit=50, max_parallel_requests=3)
    holder = new_key(client, team_id="t-par")["key"]
    stream = client.post(CHAT, json={"model": "gpt-4o", "stream": True},
                         headers=bearer(holder), buffered=False)  # the team's only slot
    refused = chat(client, body["key"])
    assert message(refused).startswith(
        "Rate limit exceeded for team: t-par. Limit type: max_parallel_requests.")
    # the key's rpm count and parallel slot, taken before the team's slot refused, undone
    assert _window_stats(app, body, "rpm", 50, 60)[1] == 50
    assert slots_in_use(app, body["key_id"], 3) == 0
    assert slots_in_use(app, "t-par", 1, "team") == 1  # the holder's
    next(iter(stream.response))
    stream.close()
    assert slots_in_use(app, "t-par", 1, "team") == 0
    assert chat(client, body["key"]).status_code == 200
    assert _window_stats(app, body, "rpm", 50, 60)[1] == 49


@pytest.mark.redis
def test_redis_decides_and_settles_a_request_in_one_round_trip_each(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": REDIS_URL,
                       "LLMAUTH_RATELIMIT_KEY_PREFIX": redis_prefix}, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    body = new_key(client, rpm_limit=100, tpm_limit=10_000, max_parallel_requests=5)
    counters = app.extensions["llmauth"].ratelimits.counters
    sent: list[Any] = []
    execute = counters._client.execute_command
    monkeypatch.setattr(counters._client, "execute_command",
                        lambda *args, **options: sent.append(args[0]) or execute(*args,
                                                                                   **options))
    response = chat(client, body["key"], tokens=7)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-requests"] == "99"
    assert response.headers["x-ratelimit-remaining-tokens"] == "10000"
    assert sent == ["EVALSHA", "EVALSHA"]  # admission (3 counters), settlement (2)
    assert _window_stats(app, body, "tpm", 10_000, 60)[1] == 10_000 - 7


@pytest.mark.redis
def test_redis_scripts_are_loaded_again_when_the_server_forgot_them(
        app_factory: Any, redis_prefix: str) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": REDIS_URL,
                       "LLMAUTH_RATELIMIT_KEY_PREFIX": redis_prefix}, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    key = new_key(client, rpm_limit=2, tpm_limit=10_000)["key"]
    counters = app.extensions["llmauth"].ratelimits.counters
    for script in (counters._acquire_script, counters._settle_script):
        script.sha = "0" * 40  # what a restarted Redis (empty script cache) answers to
    assert statuses(client, key, 3) == [200, 200, 429]
    assert counters._acquire_script.sha != "0" * 40


@pytest.mark.redis
@pytest.mark.parametrize("scheme", ["redis", "valkey"])
def test_the_scripts_know_their_clients_missing_script_error(
        app_factory: Any, redis_prefix: str, scheme: str) -> None:
    """``redis://`` and ``valkey://`` take the Lua scripts, each with its own client's
    ``NoScriptError`` (what tells a server that forgot a script)."""
    import importlib

    from flask_llmauth.ratelimits import RedisCounters

    assert REDIS_URL is not None
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": f"{scheme}:{REDIS_URL.split(':', 1)[1]}",
                       "LLMAUTH_RATELIMIT_KEY_PREFIX": redis_prefix}, routes=False)
    counters = app.extensions["llmauth"].ratelimits.counters
    assert type(counters) is RedisCounters
    assert counters._no_script is importlib.import_module(f"{scheme}.exceptions").NoScriptError


@pytest.mark.redis
def test_behind_a_sentinel_the_scripts_run_on_its_master_and_are_loaded_again(
        app_factory: Any, redis_sentinel_url: str) -> None:
    """``redis+sentinel://``: the Lua scripts of a single Redis on the master the Sentinel
    names; a master that forgot them (``SCRIPT FLUSH``, as after a restart or a failover)
    gets them again (limits' Sentinel storage has no ``dependency`` attribute: reading it
    failed every app at start-up)."""
    from flask_llmauth.ratelimits import RedisCounters

    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": redis_sentinel_url,
                       "LLMAUTH_RATELIMIT_KEY_PREFIX": f"llmauth-test-{uuid.uuid4().hex[:8]}"},
                      routes=False)
    add_llm_routes(app)
    client = app.test_client()
    counters = app.extensions["llmauth"].ratelimits.counters
    assert type(counters) is RedisCounters
    key = new_key(client, rpm_limit=3, tpm_limit=10_000)["key"]
    assert statuses(client, key, 1) == [200]
    counters._client.script_flush()  # the sentinel's own Redis: no other test uses it
    assert counters._client.script_exists(counters._acquire_script.sha) == [False]
    assert statuses(client, key, 3) == [200, 200, 429]
    assert counters._client.script_exists(counters._acquire_script.sha) == [True]


def test_memory_counters_restart_an_expired_window(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_WINDOW=1).test_client()
    key = new_key(client, rpm_limit=2, tpm_limit=25)["key"]
    assert statuses(client, key, 3, tokens=10) == [200, 200, 429]
    time.sleep(1.1)
    assert statuses(client, key, 3, tokens=10) == [200, 200, 429]
    assert statuses(client, key, 1, tokens=10) == [429]


def test_host_limit_hooks_start_when_the_host_declares_a_limit(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://"})
    hooks = app.extensions["llmauth"].host_limit_hooks
    assert hooks is not None and hooks.active is False  # nothing declared: one read
    limiter = app.extensions["llmauth"].limiter

    @app.get("/custom/later")
    @app.llmauth.route_group("llm_api_routes")
    @limiter.limit("1/minute")
    def later() -> Any:
        return jsonify(ok=True)

    assert hooks.active is True
    client = app.test_client()
    assert [client.get("/custom/later", headers=ADMIN).status_code
            for _ in range(2)] == [200, 429]


def test_memory_storage_purges_expired_keys_without_a_thread_per_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from limits.storage import MemoryStorage

    from flask_llmauth.ratelimits import quiet_memory_storage

    timers: list[Any] = []

    class CountedTimer(threading.Timer):
        def start(self) -> None:
            timers.append(self)
            super().start()

    monkeypatch.setattr(threading, "Timer", CountedTimer)

    def purges_of(storage: Any) -> list[Any]:
        """The purge threads ``storage`` started (not another storage of the process)."""
        return [t for t in timers if getattr(t.function, "__self__", None) is storage]

    plain, quiet = MemoryStorage(), MemoryStorage()
    quiet_memory_storage(quiet, interval=0.2)
    # limits' own: a purge thread every ~10 ms while keys are written (ten of them are
    # awaited rather than expected within a fixed time: a loaded machine starts them late)
    timers.clear()
    started = time.monotonic()
    while len(purges_of(plain)) < 10:
        assert time.monotonic() - started < 30, "limits started no purge threads"
        plain.incr(f"k{time.monotonic()}", 1, 1)
        time.sleep(0.001)
    timers.clear()
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        quiet.incr(f"k{time.monotonic()}", 1, 1)
        time.sleep(0.001)
    elapsed = time.monotonic() - started
    assert 1 <= len(purges_of(quiet)) <= elapsed // 0.2 + 1  # at most one per 0.2 s
    time.sleep(1.3)  # past the keys' expiry and the purge interval
    scheduled = purges_of(quiet)
    quiet.incr("trigger", 1, 1)
    purge = purges_of(quiet)[len(scheduled):]
    assert len(purge) == 1  # the purge was scheduled ...
    purge[0].join(timeout=10)
    assert set(quiet.storage) == {"trigger"}  # ... and it ran


@pytest.mark.parametrize("seconds,text", [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"),
                                          (360, "6m0s"), (3723, "1h2m3s")])
def test_openai_duration(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text


def test_reset_headers_of_a_new_window_with_the_duration_memo_cold_and_warm(make: Any) -> None:
    from flask_llmauth import ratelimits

    client = make().test_client()
    key = new_key(client, rpm_limit=5, tpm_limit=1000)["key"]
    ratelimits._WHOLE_SECONDS.clear()
    for _ in range(2):  # computed, then read from the memo
        response = chat(client, key)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-reset-requests"] in ("1m0s", "59s")
        assert response.headers["x-ratelimit-reset-tokens"] in ("1m0s", "59s")
    assert set(ratelimits._WHOLE_SECONDS.values()) <= {"1m0s", "59s"}
    assert ratelimits._WHOLE_SECONDS


@pytest.mark.redis
def test_the_redis_keys_are_laid_out_as_documented(app_factory: Any, redis_prefix: str) -> None:
    """docs/rate_limits.md: ``LLMAUTH_RATELIMIT_KEY_PREFIX`` comes after limits' own
    ``LIMITS:<namespace>/``, so an operator scans ``LIMITS:*/<prefix>/*``."""
    import redis

    assert REDIS_URL is not None
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": REDIS_URL,
                       "LLMAUTH_RATELIMIT_KEY_PREFIX": redis_prefix,
                       "LLMAUTH_AUTH_FAILURE_LIMIT": "30/minute"}, routes=False)
    server = redis.Redis.from_url(REDIS_URL)
    seen: list[str] = []

    @app.post("/v1/chat/completions")
    def chat_view() -> Any:
        seen.extend(k.decode() for k in server.scan_iter(f"LIMITS:*/{redis_prefix}/*"))
        return {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}

    client = app.test_client()
    body = new_key(client, rpm_limit=10, tpm_limit=1000, max_parallel_requests=2)
    assert chat(client, body["key"]).status_code == 200
    assert_error(client.get("/key/list", headers=bearer(random_key())), 401)
    keys = f"LIMITS:LLMAUTH/{redis_prefix}/key/{body['key_id']}"
    # during the request: its rpm window and its parallel slot (tpm is charged after it)
    assert sorted(seen) == [f"{keys}/rpm/1/60/second", f"{keys}/slots/1/600/second"], seen
    after = {k.decode() for k in server.scan_iter(f"LIMITS:*/{redis_prefix}/*")}
    assert after == {f"{keys}/rpm/1/60/second", f"{keys}/tpm/1/60/second",
                     f"LIMITS:LIMITER/{redis_prefix}/auth_failures/127.0.0.1/30/1/minute"}, after
    assert not {k.decode() for k in server.scan_iter(f"{redis_prefix}*")}  # never bare
    server.delete(*after)
