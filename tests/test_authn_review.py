"""Adversarial review of OAuth2 introspection/token-info and the chain around it: the error
paths a real provider cannot produce on demand, with requests-mock. The JWT side is in
``tests/integration/test_authn_methods_review.py``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jwt as pyjwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from flask_llmauth import current_principal
from tests.helpers import ADMIN, assert_error, bearer, record_secret
from tests.test_oauth2 import ENDPOINT, TOKEN, TOKEN_INFO, chat, oauth_app


@pytest.mark.parametrize("exp", [10 ** 400, -(10 ** 400)], ids=["huge", "huge_negative"])
def test_introspection_exp_beyond_a_float_is_a_plain_refusal(app_factory: Any,
                                                             requests_mock: Any, caplog: Any,
                                                             exp: int) -> None:
    """An ``exp`` integer too large for a float made the number check raise OverflowError:
    still a 401 (the chain's catch-all), but logged as an authenticator failure."""
    requests_mock.post(ENDPOINT, text=f'{{"active": true, "sub": "u-big", "exp": {exp}}}')
    client = oauth_app(app_factory).test_client()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flask_llmauth"):
        assert_error(chat(client), 401)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "oauth2_bad_exp" in caplog.text
    assert TOKEN not in caplog.text



# -- audience ------------------------------------------------------------------------------------


@pytest.mark.parametrize("aud, status", [
    ("https://llm.example", 200),
    (["https://other.example", "https://llm.example"], 200),
    ("https://other.example", 401),
    (["https://other.example"], 401),
    (None, 401),
    ([], 401),
    (["https://llm.example"[:-1]], 401),
    ({"aud": "https://llm.example"}, 401),
    ([["https://llm.example"]], 401),
])
def test_introspection_audience_when_configured(app_factory: Any, requests_mock: Any,
                                                aud: Any, status: int) -> None:
    answer: dict[str, Any] = {"active": True, "sub": "u-aud"}
    if aud is not None:
        answer["aud"] = aud
    requests_mock.post(ENDPOINT, json=answer)
    client = oauth_app(app_factory, oauth2_audience="https://llm.example").test_client()
    response = chat(client)
    if status == 200:
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["principal"]["user_id"] == "u-aud"
    else:
        assert_error(response, 401)


def test_token_info_audience_when_configured(app_factory: Any, requests_mock: Any) -> None:
    requests_mock.get(TOKEN_INFO, json={"sub": "u-ti", "aud": "other-client"})
    client = oauth_app(app_factory, TOKEN_INFO, oauth2_audience="gateway-client, llm"
                       ).test_client()
    assert_error(chat(client), 401)
    requests_mock.get(TOKEN_INFO, json={"sub": "u-ti", "aud": "llm"})
    assert chat(client, TOKEN + "2").status_code == 200


def test_no_audience_configured_is_warned_about(app_factory: Any, requests_mock: Any,
                                                caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        oauth_app(app_factory)
    assert "LLMAUTH_OAUTH2_AUDIENCE" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        oauth_app(app_factory, oauth2_audience="https://llm.example")
    assert "LLMAUTH_OAUTH2_AUDIENCE" not in caplog.text


# -- JWKS refetches: how often can random kids make us fetch? -------------------------------------

JWKS_URL = "https://idp.example/jwks"
ISSUER = "https://idp.example"


def _jwt_app(app_factory: Any, **config: Any) -> Any:
    base = {"LLMAUTH_ENABLE_JWT_AUTH": True, "LLMAUTH_JWT_PUBLIC_KEY_URL": JWKS_URL,
            "LLMAUTH_JWT_AUDIENCE": "gw", "LLMAUTH_JWT_ISSUER": ISSUER,
            "LLMAUTH_AUTH_FAILURE_LIMIT": ""}
    base.update(config)
    return app_factory(base)


def _signer() -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    return key, {**public, "kid": "k1", "alg": "RS256", "use": "sig"}


def _token(key: Any, kid: str | None, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "gw", "sub": "s", "iat": now, "exp": now + 60, **claims}
    headers = {"kid": kid} if kid is not None else {}
    return record_secret(pyjwt.encode(payload, key, algorithm="RS256", headers=headers))


def test_random_kids_cause_at_most_one_refetch_per_cooldown(app_factory: Any,
                                                            requests_mock: Any) -> None:
    key, jwk = _signer()
    second = {**_signer()[1], "kid": "k2"}
    requests_mock.get(JWKS_URL, json={"keys": [jwk, second]})
    app = _jwt_app(app_factory)
    keys = app.extensions["llmauth"].authenticators["jwt"].global_issuer.keys
    now = [1000.0]
    keys._clock = lambda: now[0]
    client = app.test_client()
    assert chat(client, _token(key, "k1")).status_code == 200
    assert requests_mock.call_count == 1

    def flood(tag: str) -> None:
        for i in range(100):  # random kids, and no kid with a two-key set
            assert_error(chat(client, _token(key, f"{tag}-{i}" if i % 3 else None)), 401)

    flood("a")
    assert requests_mock.call_count == 1  # within 30 s of the last fetch: none
    now[0] += 31
    flood("b")
    assert requests_mock.call_count == 2  # one refetch per cooldown, whatever the flood
    now[0] += 29
    flood("c")
    assert requests_mock.call_count == 2
    assert chat(client, _token(key, "k1", sub="s2")).status_code == 200
    assert requests_mock.call_count == 2


def test_key_documents_that_redirect_or_are_too_large_are_not_used(app_factory: Any,
                                                                    requests_mock: Any) -> None:
    """jwt.md's fetching rules: a JWKS URL answering a redirect is not followed (the keys
    where it points are never used), a document above 512 KiB is refused; either way no
    usable copy: 503, never a pass. A 5xx is tried once more."""
    key, jwk = _signer()
    elsewhere = "https://attacker.example/jwks"
    requests_mock.get(elsewhere, json={"keys": [jwk]})
    requests_mock.get(JWKS_URL, status_code=302, headers={"Location": elsewhere})
    token = _token(key, "k1")
    assert_error(chat(_jwt_app(app_factory).test_client(), token), 503,
                 "auth_provider_unavailable")
    assert not any(r.url == elsewhere for r in requests_mock.request_history)

    padded = json.dumps({"keys": [jwk], "pad": "x" * (512 * 1024)})
    requests_mock.get(JWKS_URL, text=padded)
    assert_error(chat(_jwt_app(app_factory).test_client(), token), 503)
    requests_mock.get(JWKS_URL, text=json.dumps({"keys": [jwk]}))
    assert chat(_jwt_app(app_factory).test_client(), token).status_code == 200

    requests_mock.reset_mock()
    requests_mock.get(JWKS_URL, [{"status_code": 502}, {"json": {"keys": [jwk]}}])
    assert chat(_jwt_app(app_factory).test_client(), token).status_code == 200
    assert requests_mock.call_count == 2  # the one retry after a 5xx


# -- OIDC userinfo answers that must never pass ---------------------------------------------------

USERINFO = "https://idp.example/userinfo"


@pytest.mark.parametrize("kwargs, status", [
    ({"status_code": 401, "json": {"error": "invalid_token"}}, 401),
    ({"status_code": 403, "text": ""}, 401),
    ({"status_code": 302, "headers": {"Location": "https://attacker.example/"}}, 503),
    ({"status_code": 500, "json": {"sub": "u"}}, 503),
    ({"text": "<html><body>login</body></html>"}, 503),
    ({"json": {"sub": 7}}, 503),
    ({"json": {"email": "a@corp.example"}}, 503),
    ({"json": ["sub", "u"]}, 503),
    ({"text": '{"sub": "u", "sub": "admin"}'}, 503),
    ({"text": '{"sub": "u", "pad": "' + "x" * 600_000 + '"}'}, 503),
    ({"exc": requests.exceptions.ReadTimeout}, 503),
], ids=repr)
def test_userinfo_answers_that_never_pass(app_factory: Any, requests_mock: Any,
                                          kwargs: dict[str, Any], status: int) -> None:
    requests_mock.get(JWKS_URL, json={"keys": [_signer()[1]]})
    requests_mock.get(USERINFO, **kwargs)
    requests_mock.get("https://attacker.example/", json={"sub": "attacker"})
    client = _jwt_app(app_factory, LLMAUTH_JWT_OIDC_USERINFO_ENABLED=True,
                      LLMAUTH_JWT_OIDC_USERINFO_ENDPOINT=USERINFO).test_client()
    error = assert_error(chat(client), status)
    assert TOKEN not in json.dumps(error)
    assert not any(r.url.startswith("https://attacker.example")
                   for r in requests_mock.request_history)


# -- OAuth2: an unverified email names no one -----------------------------------------------------


@pytest.mark.parametrize("verified", [False, "false", "FALSE"])
def test_unverified_email_is_not_an_oauth2_user_id(app_factory: Any, requests_mock: Any,
                                                   verified: Any) -> None:
    """With the email as the user id, a provider that lets anyone register any address
    (``email_verified: false``) would hand out the stored user of that address, role
    included."""
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "attacker-sub",
                                       "email": "admin@corp.example",
                                       "email_verified": verified})
    client = oauth_app(app_factory, oauth2_user_id_field_name="email").test_client()
    response = client.post("/user/new", json={"user_id": "admin@corp.example",
                                              "user_role": "proxy_admin"}, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    assert_error(chat(client), 401)


def _email_app(app_factory: Any) -> Any:
    app = oauth_app(app_factory)

    @app.get("/v1/whoami")
    def whoami() -> Any:
        return {"user_id": current_principal.user_id, "email": current_principal.user_email}

    app.llmauth.route_group("info_routes")(whoami)
    return app.test_client()


def test_unverified_email_is_dropped_when_another_field_names_the_user(
        app_factory: Any, requests_mock: Any) -> None:
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "u-sub",
                                       "email": "admin@corp.example",
                                       "email_verified": False})
    response = _email_app(app_factory).get("/v1/whoami", headers=bearer(TOKEN))
    assert response.get_json() == {"user_id": "u-sub", "email": None}
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "u-sub",
                                       "email": "u@corp.example", "email_verified": True})
    response = _email_app(app_factory).get("/v1/whoami", headers=bearer(TOKEN))
    assert response.get_json() == {"user_id": "u-sub", "email": "u@corp.example"}
