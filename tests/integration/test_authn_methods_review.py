"""Adversarial review of the authentication methods other than virtual keys: JWT (several
issuers, custom_validate, hostile numbers), OIDC userinfo, OAuth2 introspection/token-info,
and how they share the chain with virtual keys. Each test names the hole it closes; the
hostile-JWT catalogue itself lives in ``test_jwt_hostile.py``."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jwt
import pytest

from tests.helpers import ADMIN, assert_error, bearer, new_key, record_secret
from tests.idp_fixture import DEFAULT_SCOPES, OPAQUE, IdP, default_config
from tests.integration.test_jwt import call, ok
from tests.integration.test_jwt_hostile import b64, segment

pytestmark = pytest.mark.integration
OTHER_API = "urn:llmauth:another-api"


def _jwk(provider: IdP, kty: str = "RSA") -> dict[str, Any]:
    assert provider.keys_file is not None
    return next(k for k in json.loads(provider.keys_file.read_text())["keys"] if k["kty"] == kty)


def signed(provider: IdP, claims: dict[str, Any]) -> str:
    """A token signed with the provider's own RSA key (``keep_keys`` providers only)."""
    jwk = _jwk(provider)
    return record_secret(jwt.encode(claims, jwt.PyJWK(jwk).key, algorithm="RS256",
                                    headers={"kid": jwk["kid"]}))


def raw_signed(provider: IdP, payload_text: str) -> str:
    """A token over exactly this payload text, signed with the provider's RSA key."""
    jwk = _jwk(provider)
    signing_input = f"{segment({'alg': 'RS256', 'kid': jwk['kid']})}.{segment(payload_text)}"
    signature = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256).sign(
        signing_input.encode(), jwt.PyJWK(jwk).key)
    return record_secret(f"{signing_input}.{b64(signature)}")


def claims_for(provider: IdP, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": provider.issuer, "aud": "https://llm.example", "sub": "svc-review",
            "iat": now - 5, "exp": now + 300}
    base.update(changes)
    return base


# -- custom_validate: only `True` lets a token through ---------------------------------------------


@pytest.mark.parametrize("answer", [{"valid": False}, "no", 1, [False], object()])
def test_custom_validate_answer_other_than_true_refuses(make_app: Any, idp: IdP,
                                                        answer: Any) -> None:
    """A validator that answers something other than a bool (a result object, a string) was
    taken as a pass when truthy: it must refuse, as ``custom_key_validate`` does."""
    app = make_app()

    @app.llmauth.jwt_claims_validator
    def validator(claims: dict[str, Any]) -> Any:
        return answer

    token = idp.token(extra_claims={"email": "v@corp.example"})
    error = assert_error(call(app.test_client(), token), 403)
    assert error["message"] == "Invalid JWT token"


def test_custom_validate_true_and_false(make_app: Any, idp: IdP) -> None:
    app = make_app()
    verdict = {"value": True}

    @app.llmauth.jwt_claims_validator
    def validator(claims: dict[str, Any]) -> bool:
        return verdict["value"]

    client = app.test_client()
    assert ok(call(client, idp.token(extra_claims={"email": "t@corp.example"})))["user_id"] \
        == "t@corp.example"
    verdict["value"] = False
    assert_error(call(client, idp.token(extra_claims={"email": "f@corp.example"})), 403)


# -- several issuers: one issuer never names another issuer's users --------------------------------


def test_unprefixed_issuer_cannot_name_a_prefixed_issuers_user(make_app: Any,
                                                               idp_factory: Any) -> None:
    """The global issuer's user ids carry no prefix, so its token could assert
    ``<issuer A>#alice`` and become A's alice (and her stored role)."""
    main, other = idp_factory(keep_keys=True), idp_factory(keep_keys=True)
    issuers = [{"issuer": other.issuer, "audience": "https://llm.example",
                "user_id_jwt_field": "sub"}]
    app = make_app(main, issuers=issuers, config={
        "LLMAUTH_JWT_AUDIENCE": "https://llm.example", "LLMAUTH_JWT_USER_ID_FIELD": "sub"})
    client = app.test_client()
    victim = f"{other.issuer}#alice"
    response = client.post("/user/new", json={"user_id": victim, "user_role": "proxy_admin"},
                           headers=ADMIN)
    assert response.status_code == 200, response.get_json()

    # A's own token for alice is her: a proxy admin.
    genuine = signed(other, claims_for(other, sub="alice"))
    assert client.get("/user/list", headers=bearer(genuine)).status_code == 200
    # The global issuer naming the same id is refused, not made A's admin.
    forged = signed(main, claims_for(main, sub=victim))
    assert_error(client.get("/user/list", headers=bearer(forged)), 401)
    assert_error(call(client, forged), 401)
    # Its ordinary users are unaffected.
    assert ok(call(client, signed(main, claims_for(main, sub="bob"))))["user_id"] == "bob"


def test_unprefixed_issuer_cannot_name_a_prefixed_user_by_email(make_app: Any,
                                                                idp_factory: Any) -> None:
    main, other = idp_factory(keep_keys=True), idp_factory(keep_keys=True)
    issuers = [{"issuer": other.issuer, "audience": "https://llm.example"}]
    client = make_app(main, issuers=issuers, config={
        "LLMAUTH_JWT_AUDIENCE": "https://llm.example"}).test_client()
    forged = signed(main, claims_for(main, email=f"{other.issuer}#carol@corp.example"))
    assert_error(call(client, forged), 401)
    assert ok(call(client, signed(main, claims_for(main, email="carol@corp.example"))))[
        "user_id"] == "carol@corp.example"


# -- hostile numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_time_claim_too_large_for_a_float_is_a_plain_refusal(make_app: Any, idp_factory: Any,
                                                             caplog: Any, claim: str) -> None:
    """An integer time claim beyond a float's range made the number check itself raise
    (OverflowError): the chain turned that into a 401, but as an authenticator failure
    logged at ERROR level, which any caller could trigger at will."""
    provider = idp_factory(keep_keys=True)
    client = make_app(provider, config={"LLMAUTH_JWT_AUDIENCE": "https://llm.example"}
                      ).test_client()
    values = claims_for(provider)
    values[claim] = 0
    payload = json.dumps(values).replace(f'"{claim}": 0', f'"{claim}": 1{"0" * 400}')
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flask_llmauth"):
        assert_error(call(client, raw_signed(provider, payload)), 401)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert f"jwt_{claim}_not_numeric" in caplog.text


# -- a chosen virtual key that happens to hold two dots ------------------------------------------


def test_a_virtual_key_with_two_dots_is_not_taken_for_a_jwt(make_app: Any, idp: IdP) -> None:
    """``sk-...`` can never be a JWS (its first segment decodes to no JSON object), so JWT
    auth must leave it to the virtual-key authenticator instead of refusing it."""
    client = make_app().test_client()
    chosen = record_secret("sk-" + "Ab3dE.fG5hIjK7lMn.oP9qRsTuVwXyZ012345")
    new_key(client, key=chosen)
    response = client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                           headers=bearer(chosen))
    assert response.status_code == 200, response.get_json()
    # A forged "JWT" dressed as a key is still refused.
    assert_error(client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                             headers=bearer("sk-eyJhbGciOiJub25lIn0.e30.")), 401)


def test_a_master_key_with_two_dots_is_not_taken_for_a_jwt(make_app: Any) -> None:
    master = record_secret("mk." + "Qz8vR2wX5yB1nC4m.K7pL0sD3fG6hJ9aT")
    client = make_app(config={"LLMAUTH_MASTER_KEY": master}).test_client()
    response = client.get("/key/list", headers=bearer(master))
    assert response.status_code == 200, response.get_json()


# -- OAuth2 introspection: a token issued for another API ----------------------------------------


def test_introspected_token_for_another_api_is_refused_when_audience_is_set(
        app_factory: Any, idp_factory: Any) -> None:
    """The provider says a token is active whatever API it was issued for: without an
    audience check a token meant for another resource server authenticates here."""
    config = default_config()
    config["resource_servers"][OTHER_API] = {"format": "opaque", "scope": DEFAULT_SCOPES}
    provider = idp_factory(config)
    ours = provider.token(resource=OPAQUE, scope="read")
    theirs = provider.token(resource=OTHER_API, scope="read")
    assert ours.count(".") == 0 and theirs.count(".") == 0
    assert provider.introspect(theirs)["aud"] == OTHER_API

    def app(**extra: Any) -> Any:
        return app_factory({
            "LLMAUTH_ENABLE_OAUTH2_AUTH": True,
            "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT": provider.introspection_endpoint,
            "LLMAUTH_OAUTH2_CLIENT_ID": "llmauth-gateway",
            "LLMAUTH_OAUTH2_CLIENT_SECRET": provider.secret("llmauth-gateway"),
            "LLMAUTH_OAUTH2_USER_ID_FIELD_NAME": "client_id", **extra,
        }).test_client()

    def chat(client: Any, token: str) -> Any:
        return client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                           headers=bearer(token))

    checked = app(LLMAUTH_OAUTH2_AUDIENCE=OPAQUE)
    assert chat(checked, ours).status_code == 200
    assert_error(chat(checked, theirs), 401)
    # LiteLLM's behaviour when no audience is configured (warned about at init_app).
    assert chat(app(), theirs).status_code == 200
