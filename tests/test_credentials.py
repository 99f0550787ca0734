"""Where the credential is read from, in LiteLLM's order, and what a malformed one gets."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask

from flask_llmauth import credentials as credentials_module
from flask_llmauth.credentials import MALFORMED_AUTHORIZATION, read_credentials
from flask_llmauth.crypto import KeyDigester
from flask_llmauth.errors import Unauthenticated
from tests.helpers import ADMIN, assert_error, new_key, random_key, record_secret

CHAT = "/v1/chat/completions"
GEMINI = "/v1beta/models/gemini-pro:generateContent"
NO_KEY = "Authentication Error, No api key passed in."
INVALID = "Authentication Error, invalid API key."


@pytest.fixture
def app(app_factory: Any) -> Flask:
    return app_factory()


@pytest.fixture
def keys(app: Flask) -> dict[str, dict[str, Any]]:
    client = app.test_client()
    return {name: new_key(client, user_id=name) for name in ("alice", "bob", "carol", "dave",
                                                               "erin", "frank")}


def caller(response: Any) -> str | None:
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["principal"]["user_id"]


def chat(client: Any, headers: dict[str, str], query: str = "") -> Any:
    return client.post(CHAT + query, json={"model": "gpt-4o"}, headers=headers)


@pytest.mark.parametrize("header,template", [
    ("x-litellm-api-key", "{key}"),
    ("x-litellm-api-key", "Bearer {key}"),
    ("Authorization", "Bearer {key}"),
    ("Authorization", "bearer {key}"),
    ("Authorization", "BEARER   {key}  "),
    ("api-key", "{key}"),
    ("x-api-key", "{key}"),
    ("x-goog-api-key", "{key}"),
    ("X-Api-Key", " {key} "),
])
def test_each_standard_header_carries_the_key(app: Flask, keys: Any, header: str,
                                              template: str) -> None:
    key = keys["alice"]["key"]
    response = chat(app.test_client(), {header: template.format(key=key)})
    assert caller(response) == "alice"


def test_headers_are_read_in_litellm_order(app: Flask, keys: Any) -> None:
    client = app.test_client()
    order = [("x-litellm-api-key", "alice"), ("Authorization", "bob"), ("api-key", "carol"),
             ("x-api-key", "dave"), ("x-goog-api-key", "erin")]

    def value(name: str, user: str) -> str:
        key = keys[user]["key"]
        return f"Bearer {key}" if name == "Authorization" else key

    for top in range(len(order)):
        headers = {name: value(name, user) for name, user in order[top:]}
        assert caller(chat(client, headers)) == order[top][1], headers.keys()


def test_query_key_only_on_gemini_generate_content_routes(app: Flask, keys: Any) -> None:
    client = app.test_client()
    key = keys["alice"]["key"]
    response = client.post(f"{GEMINI}?key={key}", json={})
    assert caller(response) == "alice"
    # A header still wins over the query parameter.
    response = client.post(f"{GEMINI}?key={key}", json={},
                           headers={"x-goog-api-key": keys["bob"]["key"]})
    assert caller(response) == "bob"
    # Anywhere else ?key= is not a credential at all.
    error = assert_error(chat(client, {}, f"?key={key}"), 401, "auth_error")
    assert error["message"] == NO_KEY
    error = assert_error(client.get(f"/key/list?key={key}"), 401)
    assert error["message"] == NO_KEY


def test_custom_header_is_the_only_header_read(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_KEY_HEADER_NAME": "X-Gateway-Key"})
    client = app.test_client()
    master = ADMIN["Authorization"].split(" ", 1)[1]
    response = client.post("/key/generate", json={"user_id": "alice"},
                           headers={"x-gateway-key": master})
    assert response.status_code == 200, response.get_json()
    key = record_secret(response.get_json()["key"])
    for value in (key, f"Bearer {key}", f"bearer  {key} "):
        assert caller(chat(client, {"X-GATEWAY-KEY": value})) == "alice"
    # With the custom header configured, the standard headers are not credentials.
    for header, value in (("Authorization", f"Bearer {key}"), ("x-litellm-api-key", key),
                          ("x-api-key", key), ("api-key", key)):
        error = assert_error(chat(client, {header: value}), 401)
        assert error["message"] == NO_KEY
    # ...and they do not override it either.
    response = chat(client, {"X-Gateway-Key": key, "Authorization": "Bearer sk-other"})
    assert caller(response) == "alice"


@pytest.mark.parametrize("authorization", [
    "Basic dXNlcjpwYXNz", "Token {key}", "{key}", "Bearer", "Bearer    ", "Bearer\t",
    "Bearerr {key}", "Digest username=x",
])
def test_malformed_authorization_gets_litellms_message(app: Flask, keys: Any,
                                                       authorization: str) -> None:
    value = authorization.format(key=keys["alice"]["key"])
    error = assert_error(chat(app.test_client(), {"Authorization": value}), 401, "auth_error")
    assert error["message"] == MALFORMED_AUTHORIZATION


def test_missing_credential(app: Flask) -> None:
    client = app.test_client()
    for headers in ({}, {"Authorization": ""}, {"x-api-key": "   "}, {"x-litellm-api-key": ""}):
        response = chat(client, headers)
        error = assert_error(response, 401, "auth_error")
        assert error["message"] == NO_KEY
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_oversize_credential_is_refused_before_parsing(app_factory: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_factory({"LLMAUTH_MAX_CREDENTIAL_LENGTH": 64})
    client = app.test_client()
    digested: list[str] = []
    original = KeyDigester.digest
    monkeypatch.setattr(KeyDigester, "digest",
                        lambda self, raw: digested.append(raw) or original(self, raw))
    chain_ran: list[bool] = []
    chain = app.extensions["llmauth"].chain
    original_authenticate = chain.authenticate
    monkeypatch.setattr(chain, "authenticate",
                        lambda ctx: chain_ran.append(True) or original_authenticate(ctx))
    parsed: list[str] = []
    original_strip = credentials_module._strip_bearer
    monkeypatch.setattr(credentials_module, "_strip_bearer",
                        lambda value: parsed.append(value) or original_strip(value))
    unknown = record_secret("sk-" + "Qz7" * 40)  # 123 characters
    bodies = set()
    for headers in ({"Authorization": f"Bearer {unknown}"}, {"x-api-key": unknown},
                    {"x-litellm-api-key": "x" * (1 << 20)},
                    {"Authorization": "Bearer " + "y" * 80}):
        response = chat(client, headers)
        bodies.add(response.get_data())
        assert_error(response, 401, "auth_error")
    assert digested == [] and chain_ran == []
    assert parsed == ["Bearer " + "y" * 80]  # only the one within the raw allowance
    # A credential of exactly the limit is read (and is simply unknown).
    at_limit = record_secret("sk-" + "Wm4" * 20 + "x")
    assert len(at_limit) == 64
    response = chat(client, {"Authorization": f"Bearer {at_limit}"})
    bodies.add(response.get_data())
    assert_error(response, 401)
    assert set(digested) == {at_limit} and chain_ran == [True]
    assert len(bodies) == 1  # oversize and unknown look the same to the caller


@pytest.mark.parametrize("token", [
    "not-a-virtual-key-but-long-enough", "abcd1234abcd1234abcd1234abcd1234",
    "Sk-uppercase-prefix-0123456789abcdef", "sk_underscore_0123456789abcdefghij",
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
])
def test_non_sk_token_reaching_key_auth_is_a_plain_401(app: Flask, token: str) -> None:
    client = app.test_client()
    unknown = chat(client, {"Authorization": f"Bearer {random_key()}"})
    response = chat(client, {"Authorization": f"Bearer {token}"})
    assert_error(response, 401, "auth_error")
    assert response.get_data() == unknown.get_data()
    assert token not in response.get_data(as_text=True)


@pytest.mark.parametrize("token", ["sk-tab\there-0123456789abcdefghijk",
                                   "sk-nul\x00byte-0123456789abcdefgh",
                                   "sk-bell\x07-0123456789abcdefghijklmn"])
def test_control_characters_in_a_token_are_refused(app: Flask, token: str) -> None:
    response = chat(app.test_client(), {"x-api-key": token})
    assert_error(response, 401, "auth_error")


def test_read_credentials_reports_the_source(app: Flask) -> None:
    cases = [
        ({"x-litellm-api-key": "Bearer sk-a"}, "", "x-litellm-api-key"),
        ({"Authorization": "Bearer sk-a"}, "", "Authorization"),
        ({"api-key": "sk-a"}, "", "api-key"),
        ({"x-api-key": "sk-a"}, "", "x-api-key"),
        ({"x-goog-api-key": "sk-a"}, "", "x-goog-api-key"),
        ({}, "?key=sk-a", "query"),
    ]
    for headers, query, source in cases:
        with app.test_request_context("/" + query, headers=headers):
            from flask import request
            credentials = read_credentials(request, max_length=100, query_key_allowed=True)
        assert (credentials.token, credentials.source) == ("sk-a", source)
    with app.test_request_context("/", headers={"Authorization": "Basic x"}):
        from flask import request
        with pytest.raises(Unauthenticated) as info:
            read_credentials(request, max_length=100)
        assert info.value.reason == "malformed_authorization"
