"""What the per-request path skips when nothing is configured, and that it still does the work
once something is (the cost itself is measured by bench/run.py, never asserted here)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Blueprint, jsonify
from flask_limiter import Limiter

from tests.helpers import ADMIN, bearer, new_key

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": []}


@pytest.fixture
def limiter_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every run of Flask-Limiter's own before-request check, by endpoint."""
    calls: list[str] = []
    original = Limiter._check_request_limit

    def counting(self: Limiter, *args: Any, **kwargs: Any) -> Any:
        from flask import request
        calls.append(request.endpoint or "")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Limiter, "_check_request_limit", counting)
    return calls


def test_flask_limiter_hooks_idle_until_a_limit_is_declared(app_factory: Any,
                                                            limiter_checks: list[str]) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://"})
    blueprint = Blueprint("host", __name__)

    @blueprint.get("/host/ping")
    def ping() -> Any:
        return jsonify(pong=True)

    app.register_blueprint(blueprint)
    client = app.test_client()
    key = new_key(client, rpm_limit=2)["key"]
    # the extension's own limits work without Flask-Limiter's middleware
    assert [client.post(CHAT, json=BODY, headers=bearer(key)).status_code
            for _ in range(3)] == [200, 200, 429]
    assert [client.get("/host/ping", headers=ADMIN).status_code for _ in range(3)] == [200] * 3
    assert limiter_checks == []

    # a limit declared later (checked by the middleware) takes effect on the next request
    app.extensions["llmauth"].limiter.limit("1/minute")(blueprint)
    assert [client.get("/host/ping", headers=ADMIN).status_code for _ in range(2)] == [200, 429]
    assert "host.ping" in limiter_checks


def test_default_limits_from_config_still_apply(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://",
                       "RATELIMIT_DEFAULT": "2/minute"})
    client = app.test_client()
    assert [client.get("/v1/models", headers=ADMIN).status_code
            for _ in range(3)] == [200, 200, 429]


def test_failed_auth_block_is_checked_before_the_credential(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://",
                       "LLMAUTH_AUTH_FAILURE_LIMIT": "2/minute"})
    client = app.test_client()
    failures = app.extensions["llmauth"].auth_failures
    assert not failures.blocking
    bad = bearer("sk-" + "b" * 43)
    statuses = [client.post(CHAT, json=BODY, headers=bad).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]
    assert failures.blocking
    # blocked before the credential is read: even the master key is refused from that IP
    assert client.post(CHAT, json=BODY, headers=ADMIN).status_code == 429


def test_key_digest_is_hmac_sha256_under_the_derived_secret() -> None:
    import hmac
    import secrets

    from flask_llmauth.crypto import KeyDigester, derive_secret

    for length in (32, 45, 64, 90):
        server_secret = secrets.token_urlsafe(length)
        digester = KeyDigester(server_secret)
        secret = derive_secret(server_secret, "virtual-key-digest")
        for key in ("sk-" + secrets.token_urlsafe(32), "", "sk-é\udc80", "x" * 5000):
            expected = hmac.digest(secret, key.encode("utf-8", "surrogatepass"), "sha256").hex()
            assert digester.digest(key) == expected


def test_looked_up_records_never_share_mutable_values(app: Any) -> None:
    client = app.test_client()
    created = new_key(client)  # models, aliases, metadata... all empty
    store = app.extensions["llmauth"].store
    first, second = store.key_by_id(created["key_id"]), store.key_by_id(created["key_id"])
    assert first is not None and second is not None
    assert first.key.models == () and first.key.metadata == {}  # arrays as tuples: immutable
    assert first.key.metadata is not second.key.metadata
    assert first.key.aliases is not second.key.aliases


def test_key_cache_is_keyed_by_its_own_mac_not_the_stored_digest(app_factory: Any) -> None:
    """The in-process key cache is keyed by a keyed BLAKE2s under a secret of its own: the
    stored HMAC digest is not what the cache holds, and a server secret change changes it."""
    from flask_llmauth.crypto import CacheKeyer, KeyDigester

    app = app_factory()
    client = app.test_client()
    key = new_key(client)["key"]
    assert client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                       headers=bearer(key)).status_code == 200
    state = app.extensions["llmauth"]
    cache_keys = list(state.key_cache._data)
    assert cache_keys == [state.cache_keyer(key)]
    assert state.digester.digest(key) not in cache_keys
    assert key.encode() not in cache_keys[0] and len(cache_keys[0]) == 32
    assert CacheKeyer("another server secret")(key) != cache_keys[0]
    assert KeyDigester("s").digest(key) != CacheKeyer("s")(key).hex()


def test_requests_work_through_the_public_proxies_too(app_factory: Any, monkeypatch: Any) -> None:
    """The hook reads the request and ``g`` from Flask's context variables; on a Flask
    without them it falls back to the public proxies, with the same answers."""
    import flask_llmauth.extension as extension

    app = app_factory()
    client = app.test_client()
    key = new_key(client)["key"]
    monkeypatch.setattr(extension, "_cv_request", None)
    monkeypatch.setattr(extension, "_cv_app", None)
    chat = "/v1/chat/completions"
    assert client.post(chat, json={"model": "gpt-4o"}, headers=bearer(key)).status_code == 200
    assert client.post(chat, json={"model": "gpt-4o"}).status_code == 401


def test_a_new_principals_verdict_leaves_the_collector_little_to_traverse(
        app_factory: Any) -> None:
    """Every cold key keeps a verdict and a guards' plan: the models it allowed are a dict
    of strings (untracked by the cyclic garbage collector; a set always is tracked), and
    plans naming the same guards share their tuples of guards."""
    import gc

    app = app_factory()
    client = app.test_client()
    keys = [new_key(client)["key"] for _ in range(2)]
    for key in keys:
        assert client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                           headers=bearer(key)).status_code == 200
    state = app.extensions["llmauth"]
    verdicts = [v for v in state._verdicts.values()
                if v.principal.key_id is not None and v.check_models]
    assert len(verdicts) == 2
    first, second = verdicts
    assert first.principal is not second.principal
    gc.collect()
    for verdict in verdicts:
        assert verdict.models == {"gpt-4o": True} and not gc.is_tracked(verdict.models)
    plans = [first.plan, second.plan]
    assert all(plan is not None for plan in plans)
    assert first.plan.by_end_user and first.plan.by_end_user is second.plan.by_end_user
    assert first.plan.wanted is second.plan.wanted
