"""OAuth2 introspection and token-info against the real OpenID provider: opaque tokens from
an opaque resource server and from a code flow, revocation, expiry, roles, field names,
the cache, the outage 503, and the same authorization as a key."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
import requests
from flask import Flask

from flask_llmauth import current_principal
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key
from tests.idp_fixture import OPAQUE, RS256, IdP

pytestmark = pytest.mark.integration

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def introspection_app(app_factory: Any, idp: IdP, **config: Any) -> Flask:
    app = app_factory({
        "LLMAUTH_ENABLE_OAUTH2_AUTH": True,
        "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT": idp.introspection_endpoint,
        "LLMAUTH_OAUTH2_CLIENT_ID": "llmauth-gateway",
        "LLMAUTH_OAUTH2_CLIENT_SECRET": idp.secret("llmauth-gateway"),
        "LLMAUTH_OAUTH2_USER_ID_FIELD_NAME": "user_id",
        **{f"LLMAUTH_{k.upper()}": v for k, v in config.items()},
    })
    seen = app.config.setdefault("SEEN", {})

    @app.get("/v1/whoami")
    def whoami() -> Any:
        p = current_principal
        seen.update(scopes=p.scopes, claims=dict(p.claims or {}), email=p.user_email)
        return {"method": p.method, "role": p.role.value, "user_id": p.user_id,
                "team_id": p.team_id}

    app.llmauth.route_group("info_routes")(whoami)
    return app


def opaque(idp: IdP, **claims: Any) -> str:
    ttl = claims.pop("_ttl", None)
    token = idp.token(resource=OPAQUE, scope="read write", extra_claims=claims, ttl=ttl)
    assert token.count(".") == 0
    return token


def chat(client: Any, token: str, model: str = "gpt-4o") -> Any:
    return client.post("/v1/chat/completions", json={**CHAT, "model": model},
                       headers=bearer(token))


def revoke(idp: IdP, token: str, client_id: str) -> None:
    response = requests.post(idp.url("/token/revocation"), data={"token": token},
                             auth=(client_id, idp.secret(client_id)), timeout=10)
    assert response.status_code == 200


# -- introspection ---------------------------------------------------------------------------------


def test_introspected_token_names_user_team_role_and_scopes(app_factory: Any, idp: IdP) -> None:
    app = introspection_app(app_factory, idp)
    client = app.test_client()
    assert client.post("/team/new", json={"team_id": "team-x"}, headers=ADMIN).status_code == 200
    token = opaque(idp, user_id="u-intro", team_id="team-x", role="internal_user",
                   email="intro@example.com")
    r = client.get("/v1/whoami", headers=bearer(token))
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {"method": "oauth2", "role": "internal_user", "user_id": "u-intro",
                            "team_id": "team-x"}
    seen = app.config["SEEN"]
    assert seen["scopes"] == frozenset({"read", "write"})
    assert seen["email"] == "intro@example.com"
    assert seen["claims"]["client_id"] == "llmauth-svc" and seen["claims"]["active"] is True
    with pytest.raises(TypeError):  # the cached principal's claims are read-only
        app.extensions["llmauth"].authenticators["oauth2"].cache.get(
            hashlib.sha256(token.encode()).hexdigest()).claims["role"] = "proxy_admin"
    assert chat(client, token).get_json()["principal"]["method"] == "oauth2"


def test_revoked_token_is_inactive_once_its_cache_entry_ends(app_factory: Any, idp: IdP) -> None:
    uncached = introspection_app(app_factory, idp, oauth2_cache_ttl=0).test_client()
    cached = introspection_app(app_factory, idp, oauth2_cache_ttl=4).test_client()
    token = opaque(idp, user_id="u-revoked")
    assert chat(uncached, token).status_code == 200
    assert chat(cached, token).status_code == 200
    filled = time.monotonic()  # the cache entry ends at most 4 s after this
    revoke(idp, token, "llmauth-svc")
    assert idp.introspect(token) == {"active": False}
    assert_error(chat(uncached, token), 401)       # asks the IdP each time: active:false
    assert chat(cached, token).status_code == 200  # the documented revocation window
    time.sleep(max(0.0, filled + 4.1 - time.monotonic()))
    assert_error(chat(cached, token), 401)


def test_expired_token_is_401_even_from_the_cache(app_factory: Any, idp: IdP) -> None:
    client = introspection_app(app_factory, idp, oauth2_cache_ttl=600).test_client()
    token = opaque(idp, user_id="u-short", _ttl=3)
    exp = idp.introspect(token)["exp"]
    assert chat(client, token).status_code == 200
    time.sleep(max(0.0, exp + 0.2 - time.time()))
    assert_error(chat(client, token), 401)


def test_roles_known_unknown_missing_and_default(app_factory: Any, idp: IdP) -> None:
    client = introspection_app(app_factory, idp).test_client()
    assert client.post("/user/new", json={"user_id": "u-stored", "user_role": "proxy_admin"},
                       headers=ADMIN).status_code == 200
    admin = opaque(idp, user_id="u-admin", role="proxy_admin")
    assert client.get("/v1/whoami", headers=bearer(admin)).get_json()["role"] == "proxy_admin"
    assert_error(client.get("/v1/whoami", headers=bearer(opaque(idp, user_id="u", role="god"))),
                 401)
    assert_error(client.get("/v1/whoami", headers=bearer(opaque(idp, user_id="u", role=["x"]))),
                 401)
    # no role in the response: derived as for a key (stored user's role, else internal_user)
    stored = opaque(idp, user_id="u-stored")
    assert client.get("/v1/whoami", headers=bearer(stored)).get_json()["role"] == "proxy_admin"
    plain = opaque(idp, user_id="u-plain")
    assert client.get("/v1/whoami", headers=bearer(plain)).get_json()["role"] == "internal_user"

    fallback = introspection_app(app_factory, idp,
                                 oauth2_unknown_role_default="internal_user_viewer")
    r = fallback.test_client().get("/v1/whoami", headers=bearer(opaque(idp, user_id="u",
                                                                       role="god")))
    assert r.status_code == 200 and r.get_json()["role"] == "internal_user_viewer"


def test_field_names_and_dot_paths(app_factory: Any, idp: IdP) -> None:
    client = introspection_app(
        app_factory, idp, oauth2_user_id_field_name="client_id",
        oauth2_user_role_field_name="perm.role", oauth2_user_team_id_field_name="org.team",
    ).test_client()
    assert client.post("/team/new", json={"team_id": "team-y"}, headers=ADMIN).status_code == 200
    token = opaque(idp, perm={"role": "internal_user_viewer"}, org={"team": "team-y"})
    assert client.get("/v1/whoami", headers=bearer(token)).get_json() == {
        "method": "oauth2", "role": "internal_user_viewer", "user_id": "llmauth-svc",
        "team_id": "team-y"}


def test_token_without_identity_or_with_a_bad_one_is_401(app_factory: Any, idp: IdP) -> None:
    client = introspection_app(app_factory, idp).test_client()
    assert_error(chat(client, opaque(idp, role="internal_user")), 401)    # no user_id/team_id
    assert_error(chat(client, opaque(idp, user_id="a,b")), 401)
    assert_error(chat(client, opaque(idp, user_id={"nested": 1})), 401)
    assert_error(chat(client, "never-issued-by-the-idp-123"), 401)


def test_only_llm_and_info_routes_and_only_opaque_tokens(app_factory: Any, idp: IdP) -> None:
    app = introspection_app(app_factory, idp)
    client = app.test_client()
    authenticator = app.extensions["llmauth"].authenticators["oauth2"]
    calls: list[str] = []
    original = authenticator._call
    authenticator._call = lambda token, digest: calls.append(digest) or original(token, digest)

    token = opaque(idp, user_id="u-routes", role="proxy_admin")
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    assert len(calls) == 1
    # management and host routes are not reachable with an OAuth2 token, even an admin's
    assert_error(client.post("/key/generate", json={}, headers=bearer(token)), 401)
    assert_error(client.get("/custom/admin", headers=bearer(token)), 401)
    # keys, the master key and JWTs are never sent to the IdP
    key = new_key(client)["key"]
    assert chat(client, key).get_json()["principal"]["method"] == "virtual_key"
    assert chat(client, MASTER_KEY).get_json()["principal"]["method"] == "master_key"
    assert_error(chat(client, idp.token(resource=RS256)), 401)  # JWT auth is not enabled
    assert len(calls) == 1


def test_cached_result_needs_no_idp_and_outage_is_503(app_factory: Any,
                                                      idp_factory: Any) -> None:
    provider = idp_factory()
    client = introspection_app(app_factory, provider).test_client()
    token = opaque(provider, user_id="u-cache")
    other = opaque(provider, user_id="u-other")
    assert chat(client, token).status_code == 200
    provider.stop()
    assert chat(client, token).status_code == 200  # from the cache: no network
    error = assert_error(chat(client, other), 503, "auth_provider_unavailable")
    assert error["message"] == "Authentication provider unavailable, try again later."
    assert_error(chat(client, other), 503)  # an outage is never cached as a refusal
    provider.start()
    # the restarted provider has forgotten its tokens: now a plain refusal
    assert_error(chat(client, other), 401)


def test_introspected_principal_goes_through_the_same_authorization(app_factory: Any,
                                                                    idp: IdP) -> None:
    client = introspection_app(app_factory, idp).test_client()
    assert client.post("/team/new", json={"team_id": "team-4o", "models": ["gpt-4o"]},
                       headers=ADMIN).status_code == 200
    for path in ("/team/new", "/team/block"):
        assert client.post(path, json={"team_id": "team-off"}, headers=ADMIN).status_code == 200
    member = opaque(idp, user_id="u-team", team_id="team-4o")
    assert chat(client, member).status_code == 200
    assert_error(chat(client, member, "gpt-4o-mini"), 403, "team_model_access_denied")
    assert client.get("/v1/models", headers=bearer(member)).get_json()["data"] == ["gpt-4o"]
    viewer = opaque(idp, user_id="u-viewer", role="proxy_admin_viewer")
    assert_error(chat(client, viewer), 403)
    assert_error(chat(client, opaque(idp, user_id="u-x", team_id="team-off")), 401)
    # a cached principal follows changes to its team at once, like a key
    assert client.post("/team/update", json={"team_id": "team-4o", "models": ["gpt-4o-mini"]},
                       headers=ADMIN).status_code == 200
    assert_error(chat(client, member), 403)
    assert chat(client, member, "gpt-4o-mini").status_code == 200
    assert client.post("/team/block", json={"team_id": "team-4o"}, headers=ADMIN).status_code == 200
    assert_error(chat(client, member), 401)
    assert client.post("/team/unblock", json={"team_id": "team-4o"},
                       headers=ADMIN).status_code == 200
    assert chat(client, member, "gpt-4o-mini").status_code == 200


# -- token-info ------------------------------------------------------------------------------


def test_token_info_from_litellm_environment_variables(app_factory: Any, idp: IdP,
                                                       monkeypatch: Any) -> None:
    monkeypatch.setenv("OAUTH_TOKEN_INFO_ENDPOINT", idp.userinfo_endpoint)
    monkeypatch.setenv("OAUTH_USER_ID_FIELD_NAME", "email")
    monkeypatch.setenv("OAUTH_USER_TEAM_ID_FIELD_NAME", "team")
    app = app_factory({"LLMAUTH_ENABLE_OAUTH2_AUTH": True, "LLMAUTH_OAUTH2_CACHE_TTL": 0})
    auth = app.extensions["llmauth"].authenticators["oauth2"]
    assert auth.introspection is False and auth.endpoint == idp.userinfo_endpoint
    assert (auth.id_field, auth.role_field, auth.team_field) == ("email", "role", "team")
    client = app.test_client()
    access = idp.code_flow("alice")["access_token"]
    assert access.count(".") == 0
    r = chat(client, access)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["principal"]["user_id"] == "alice@example.com"
    assert r.get_json()["principal"]["method"] == "oauth2"
    revoke(idp, access, "llmauth-web")
    assert idp.userinfo(access).status_code == 401
    assert_error(chat(client, access), 401)
