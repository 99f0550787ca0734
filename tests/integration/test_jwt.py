"""JWT auth against the real OpenID provider: every ``litellm_jwtauth`` field, key rotation,
the stale copy and the 503, several issuers, and OIDC userinfo for opaque tokens."""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt
import pytest
from flask import Flask, jsonify

from flask_llmauth import current_principal
from flask_llmauth.authn.jwt import JWTAuthenticator
from flask_llmauth.errors import ConfigurationError, TooManyRequests
from flask_llmauth.signals import user_provisioned
from tests.helpers import ADMIN, assert_error, bearer, new_key, record_secret
from tests.idp_fixture import EDDSA, ES256, RS256, IdP

pytestmark = pytest.mark.integration
AUDIENCES = f"{RS256},{ES256},{EDDSA}"
CHAT = "/v1/chat/completions"


def jwt_config(idp: IdP, **extra: Any) -> dict[str, Any]:
    config = {"LLMAUTH_ENABLE_JWT_AUTH": True, "LLMAUTH_JWT_PUBLIC_KEY_URL": idp.discovery_url,
              "LLMAUTH_JWT_AUDIENCE": AUDIENCES, "LLMAUTH_JWT_ISSUER": idp.issuer}
    config.update({"LLMAUTH_JWT_" + k.upper(): v for k, v in extra.items()})
    return config


def add_echo(app: Flask) -> None:
    @app.post("/v1/messages")
    def messages() -> Any:
        return jsonify(role=current_principal.role.value)

    @app.post("/v1/responses")
    def responses() -> Any:
        p = current_principal
        return jsonify(method=p.method, role=p.role.value, user_id=p.user_id,
                       user_email=p.user_email, team_id=p.team_id, org_id=p.org_id,
                       end_user_id=p.end_user_id, scopes=sorted(p.scopes),
                       models=list(p.models), issuer=p.metadata.get("jwt_issuer"))


def call(client: Any, token: str, model: str = "gpt-4o", path: str = "/v1/responses",
         **headers: str) -> Any:
    return client.post(path, json={"model": model}, headers={**bearer(token), **headers})


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def new_team(client: Any, team_id: str, **fields: Any) -> None:
    response = client.post("/team/new", json={"team_id": team_id, **fields}, headers=ADMIN)
    assert response.status_code == 200, response.get_json()


# -- verification through the provider's keys --------------------------------------------------


@pytest.mark.parametrize("resource", [RS256, ES256, EDDSA])
def test_provider_tokens_of_each_algorithm_authenticate(make_app: Any, idp: IdP,
                                                        resource: str) -> None:
    client = make_app().test_client()
    token = idp.token(resource=resource, extra_claims={"email": "svc@corp.example"})
    body = ok(call(client, token))
    assert body["method"] == "jwt" and body["role"] == "internal_user"
    assert body["user_id"] == "svc@corp.example", "user id defaults to the email claim"
    assert body["issuer"] == idp.issuer


def test_jwks_url_and_comma_list_of_urls(make_app: Any, idp: IdP, idp_factory: Any) -> None:
    other = idp_factory()
    token = idp.token(extra_claims={"email": "a@corp.example"})
    direct = make_app(config={"LLMAUTH_JWT_PUBLIC_KEY_URL": idp.jwks_uri}).test_client()
    assert ok(call(direct, token))["user_id"] == "a@corp.example"
    listed = make_app(config={
        "LLMAUTH_JWT_PUBLIC_KEY_URL": f"{other.jwks_uri},{idp.discovery_url}"}).test_client()
    assert ok(call(listed, token))["user_id"] == "a@corp.example"
    only_other = make_app(config={"LLMAUTH_JWT_PUBLIC_KEY_URL": other.jwks_uri}).test_client()
    assert_error(call(only_other, token), 401)


def test_audience_and_issuer_are_verified(make_app: Any, idp: IdP) -> None:
    token = idp.token(resource=ES256, extra_claims={"email": "a@corp.example"})
    assert_error(call(make_app(audience=RS256).test_client(), token), 401)
    assert_error(call(make_app(issuer="http://127.0.0.1:1").test_client(), token), 401)
    assert ok(call(make_app(audience=ES256).test_client(), token))


def test_verified_token_is_cached_by_full_token_hash(make_app: Any, idp: IdP,
                                                     monkeypatch: Any) -> None:
    calls: list[int] = []
    original = JWTAuthenticator.verify

    def counting(self: JWTAuthenticator, token: str) -> Any:
        calls.append(1)
        return original(self, token)

    monkeypatch.setattr(JWTAuthenticator, "verify", counting)
    client = make_app().test_client()
    first = idp.token(extra_claims={"email": "a@corp.example"})
    second = idp.token(extra_claims={"email": "b@corp.example"})
    assert first[:40] == second[:40], "same header: a prefix-keyed cache would confuse them"
    for _ in range(3):
        assert ok(call(client, first))["user_id"] == "a@corp.example"
    assert ok(call(client, second))["user_id"] == "b@corp.example"
    assert len(calls) == 2


def test_resolved_principal_is_reused_per_route_and_dropped_when_its_team_changes(
        make_app: Any, idp: IdP, monkeypatch: Any) -> None:
    resolved: list[int] = []
    original = JWTAuthenticator._resolve

    def counting(self: JWTAuthenticator, verified: Any, ctx: Any) -> Any:
        resolved.append(1)
        return original(self, verified, ctx)

    monkeypatch.setattr(JWTAuthenticator, "_resolve", counting)
    client = make_app(team_id_field="team").test_client()
    new_team(client, "t-reuse", models=["gpt-4o"])
    token = idp.token(extra_claims={"team": "t-reuse", "email": "r@corp.example"})
    for _ in range(3):
        assert ok(call(client, token, path=CHAT))
    assert len(resolved) == 1, "same token, route and header: resolved once"
    # another route is resolved (and refused) on its own, never served from the cache
    error = assert_error(call(client, token, path="/v1/messages"), 403)
    assert "Team not allowed to access this route" in error["message"]
    assert len(resolved) == 2
    assert ok(call(client, token, path=CHAT)) and len(resolved) == 2
    # a team change applies to the very next request of the cached token
    updated = client.post("/team/update", json={"team_id": "t-reuse", "models": ["claude-3"]},
                          headers=ADMIN)
    assert updated.status_code == 200, updated.get_json()
    assert_error(call(client, token, path=CHAT), 403, "team_model_access_denied")
    assert ok(call(client, token, model="claude-3", path=CHAT))
    blocked = client.post("/team/block", json={"team_id": "t-reuse"}, headers=ADMIN)
    assert blocked.status_code == 200
    assert_error(call(client, token, model="claude-3", path=CHAT), 401)


def test_resolved_user_principal_follows_the_stored_user(make_app: Any, idp: IdP) -> None:
    client = make_app(admin_allowed_routes=["info_routes", "openai_routes"]).test_client()
    created = client.post("/user/new", json={"user_id": "later-admin@corp.example",
                                             "auto_create_key": False}, headers=ADMIN)
    assert created.status_code == 200, created.get_json()
    token = idp.token(extra_claims={"email": "later-admin@corp.example"})
    assert ok(call(client, token))["role"] == "internal_user"
    updated = client.post("/user/update", json={"user_id": "later-admin@corp.example",
                                                "user_role": "proxy_admin"}, headers=ADMIN)
    assert updated.status_code == 200, updated.get_json()
    assert ok(call(client, token))["role"] == "proxy_admin"


def test_user_created_after_the_token_was_seen_applies_at_once(make_app: Any, idp: IdP) -> None:
    client = make_app(admin_allowed_routes=["info_routes", "openai_routes"]).test_client()
    token = idp.token(extra_claims={"email": "newcomer@corp.example"})
    assert ok(call(client, token))["role"] == "internal_user"  # no user row yet (cached)
    created = client.post("/user/new", json={"user_id": "newcomer@corp.example",
                                             "user_role": "proxy_admin",
                                             "auto_create_key": False}, headers=ADMIN)
    assert created.status_code == 200, created.get_json()
    assert ok(call(client, token))["role"] == "proxy_admin"


def test_typ_at_jwt_can_be_required(make_app: Any, idp: IdP) -> None:
    client = make_app(require_at_jwt_typ=True).test_client()
    assert ok(call(client, idp.token(extra_claims={"email": "a@corp.example"})))


# -- admin ------------------------------------------------------------------------------------


def test_admin_scope_and_admin_allowed_routes(make_app: Any, idp: IdP) -> None:
    client = make_app().test_client()
    admin = idp.token(scope="litellm_proxy_admin")
    response = client.get("/key/list", headers=bearer(admin))
    assert response.status_code == 200, response.get_json()
    error = assert_error(call(client, admin, path=CHAT), 403)
    assert "Admin not allowed to access this route" in error["message"]
    assert_error(client.post("/user/new", json={}, headers=bearer(idp.token(scope="read"))), 403)

    llm_admin = make_app(admin_allowed_routes=["openai_routes"]).test_client()
    body = ok(call(llm_admin, admin))
    assert body["role"] == "proxy_admin" and body["user_id"] == "llmauth-svc"
    assert_error(llm_admin.get("/key/list", headers=bearer(admin)), 403)

    custom_scope = make_app(admin_scope="gateway.admin").test_client()
    assert_error(custom_scope.post("/user/new", json={}, headers=bearer(admin)), 403)


def test_admin_with_team_header_gets_the_team_context(make_app: Any, idp: IdP) -> None:
    client = make_app(admin_allowed_routes=["openai_routes"]).test_client()
    new_team(client, "team-gpt", models=["gpt-4o"])
    admin = idp.token(scope="litellm_proxy_admin")
    body = ok(call(client, admin, **{"x-litellm-team-id": "team-gpt"}))
    assert body["team_id"] == "team-gpt" and body["role"] == "proxy_admin"
    assert_error(call(client, admin, model="claude-3-5-sonnet",
                      **{"x-litellm-team-id": "team-gpt"}), 403, "team_model_access_denied")
    assert_error(call(client, admin, **{"x-litellm-team-id": "no-such-team"}), 403)


# -- teams ------------------------------------------------------------------------------------


def test_team_id_field_nested_list_default_and_missing(make_app: Any, idp: IdP) -> None:
    client = make_app(team_id_field="org.teams").test_client()
    new_team(client, "t-one", models=["gpt-4o"])
    token = idp.token(extra_claims={"org": {"teams": ["t-one", "t-two"]}})
    body = ok(call(client, token))
    assert body["role"] == "team" and body["team_id"] == "t-one"
    assert_error(call(client, token, model="claude-3-5-sonnet"), 403, "team_model_access_denied")
    missing = idp.token(extra_claims={"email": "a@corp.example"})
    error = assert_error(call(client, missing), 401)
    assert "No team found in token" in error["message"]

    with_default = make_app(team_id_field="org.teams", team_id_default="t-one").test_client()
    assert ok(call(with_default, missing))["team_id"] == "t-one"


def test_team_allowed_routes(make_app: Any, idp: IdP) -> None:
    client = make_app(team_id_field="team").test_client()
    new_team(client, "t-routes")
    token = idp.token(extra_claims={"team": "t-routes"})
    assert ok(call(client, token, path=CHAT))
    error = assert_error(call(client, token, path="/v1/messages"), 403)
    assert "Team not allowed to access this route" in error["message"]
    assert_error(client.post("/key/generate", json={}, headers=bearer(token)), 403)
    wider = make_app(team_id_field="team",
                     team_allowed_routes=["openai_routes", "anthropic_routes"]).test_client()
    assert ok(call(wider, token, path="/v1/messages"))["role"] == "team"


def test_a_team_named_by_the_token_must_exist(make_app: Any, idp: IdP) -> None:
    """Without ``team_id_upsert`` a team the token (or ``team_id_default``) names that does
    not exist is refused, as LiteLLM's get_team_object does: such a principal would carry
    none of a team's model list, budget or limits."""
    client = make_app(team_id_field="team").test_client()
    new_team(client, "t-real", models=["gpt-4o"])
    ghost = idp.token(extra_claims={"team": "t-ghost"})
    error = assert_error(call(client, ghost, model="any-model", path=CHAT), 403)
    assert "Team doesn't exist" in error["message"] and "t-ghost" in error["message"]
    assert client.get("/team/info?team_id=t-ghost", headers=ADMIN).status_code == 404
    real = idp.token(extra_claims={"team": "t-real"})
    assert ok(call(client, real))["team_id"] == "t-real"
    assert_error(call(client, real, model="any-model"), 403, "team_model_access_denied")

    unnamed = idp.token(extra_claims={"email": "a@corp.example"})
    default_ghost = make_app(team_id_field="team", team_id_default="t-nowhere").test_client()
    error = assert_error(call(default_ghost, unnamed), 403)
    assert "Team doesn't exist" in error["message"] and "t-nowhere" in error["message"]
    default_real = make_app(team_id_field="team", team_id_default="t-real").test_client()
    assert ok(call(default_real, unnamed))["team_id"] == "t-real"

    listed = make_app(team_ids_field="groups").test_client()
    groups = idp.token(extra_claims={"groups": ["t-real", "t-ghost"]})
    error = assert_error(call(listed, groups, **{"x-litellm-team-id": "t-ghost"}), 403)
    assert "Team doesn't exist" in error["message"]
    assert ok(call(listed, groups, **{"x-litellm-team-id": "t-real"}))["team_id"] == "t-real"


def test_team_id_upsert_creates_the_team_once(make_app: Any, idp: IdP) -> None:
    plain = make_app(team_id_field="team").test_client()
    token = idp.token(extra_claims={"team": "t-upserted"})
    assert "doesn't exist" in assert_error(call(plain, token), 403)["message"]
    assert plain.get("/team/info?team_id=t-upserted", headers=ADMIN).status_code == 404

    client = make_app(team_id_field="team", team_id_upsert=True).test_client()
    assert ok(call(client, token))["team_id"] == "t-upserted"
    assert ok(call(client, token))["team_id"] == "t-upserted"
    info = client.get("/team/info?team_id=t-upserted", headers=ADMIN)
    assert info.status_code == 200, info.get_json()
    blocked = client.post("/team/block", json={"team_id": "t-upserted"}, headers=ADMIN)
    assert blocked.status_code == 200
    assert_error(call(client, token), 401)


def test_team_ids_field_picks_the_first_team_that_may_serve(make_app: Any, idp: IdP) -> None:
    client = make_app(team_ids_field="groups").test_client()
    new_team(client, "g-claude", models=["claude-3-5-sonnet"])
    new_team(client, "g-gpt", models=["gpt-4o"])
    token = idp.token(extra_claims={"groups": ["g-missing", "g-claude", "g-gpt"]})
    assert ok(call(client, token, model="gpt-4o"))["team_id"] == "g-gpt"
    assert ok(call(client, token, model="claude-3-5-sonnet"))["team_id"] == "g-claude"
    error = assert_error(call(client, token, model="gemini-pro"), 403)
    assert "No team has access to the requested model" in error["message"]
    header = {"x-litellm-team-id": "g-gpt"}
    assert ok(call(client, token, model="gpt-4o", **header))["team_id"] == "g-gpt"
    assert_error(call(client, token, model="claude-3-5-sonnet", **header), 403,
                 "team_model_access_denied")
    error = assert_error(call(client, token, **{"x-litellm-team-id": "g-other"}), 403)
    assert "does not resolve to a team id" in error["message"]
    blocked = client.post("/team/block", json={"team_id": "g-gpt"}, headers=ADMIN)
    assert blocked.status_code == 200
    assert_error(call(client, token, model="gpt-4o"), 403)


def test_team_ids_field_on_a_route_without_a_model_names_the_reason(make_app: Any,
                                                                   idp: IdP) -> None:
    client = make_app(team_ids_field="groups").test_client()
    token = idp.token(extra_claims={"groups": ["g-missing", "g-gone"]})
    error = assert_error(client.get("/user/info", headers=bearer(token)), 403)
    assert "None of the teams listed in the token exists" in error["message"]
    assert "None" not in error["message"].replace("None of the teams", "")
    assert "g-missing" in error["message"]
    new_team(client, "g-gone")
    blocked = client.post("/team/block", json={"team_id": "g-gone"}, headers=ADMIN)
    assert blocked.status_code == 200
    error = assert_error(client.get("/user/info", headers=bearer(token)), 403)
    assert "Every team listed in the token that exists is blocked" in error["message"]
    error = assert_error(client.post("/key/generate", json={}, headers=bearer(token)), 403)
    assert "Team not allowed to access this route. Route=/key/generate" in error["message"]
    new_team(client, "g-live", models=["gpt-4o"])
    live = idp.token(extra_claims={"groups": ["g-missing", "g-live"]})
    assert client.get("/user/info", headers=bearer(live)).status_code != 403
    error = assert_error(call(client, live, model="gemini-pro"), 403)
    assert "No team has access to the requested model: gemini-pro" in error["message"]


def test_enforce_team_based_model_access(make_app: Any, idp: IdP) -> None:
    client = make_app(team_ids_field="groups", enforce_team_based_model_access=True).test_client()
    error = assert_error(call(client, idp.token(extra_claims={"email": "a@corp.example"})), 403)
    assert "No teams found in token" in error["message"]


# -- users ------------------------------------------------------------------------------------


def test_user_id_and_email_fields(make_app: Any, idp: IdP) -> None:
    client = make_app(user_id_field="sub", user_email_field="profile.mail").test_client()
    body = ok(call(client, idp.token(extra_claims={"profile": {"mail": "m@corp.example"}})))
    assert body["user_id"] == "llmauth-svc" and body["user_email"] == "m@corp.example"
    by_email = make_app(user_email_field="profile.mail").test_client()
    body = ok(call(by_email, idp.token(extra_claims={"profile": {"mail": "m@corp.example"}})))
    assert body["user_id"] == "m@corp.example"


def test_user_allowed_email_domain(make_app: Any, idp: IdP) -> None:
    client = make_app(user_allowed_email_domain="corp.example").test_client()
    assert ok(call(client, idp.token(extra_claims={"email": "a@corp.example"})))
    error = assert_error(call(client, idp.token(extra_claims={"email": "a@evil.example"})), 403)
    assert "Email domain not allowed" in error["message"]
    sneaky = idp.token(extra_claims={"email": "a@corp.example@evil.example"})
    assert_error(call(client, sneaky), 403)
    assert_error(call(client, idp.token()), 403)  # no email at all
    for near in ("a@sub.corp.example", "a@evilcorp.example", "a@corp.example.evil"):
        assert_error(call(client, idp.token(extra_claims={"email": near})), 403)
    assert ok(call(client, idp.token(extra_claims={"email": "b@Corp.Example"})))


def test_an_unverified_email_does_not_identify_the_user(make_app: Any, idp: IdP) -> None:
    """OIDC's ``email_verified: false`` (an address anyone may have typed at the provider)
    never names a user: refused where the email is the user id or passes the domain check,
    ignored (not stored) where ``sub`` names the user; a missing claim changes nothing."""
    by_email = make_app().test_client()
    for unverified in (False, "false", "FALSE"):
        token = idp.token(extra_claims={"email": "boss@corp.example",
                                        "email_verified": unverified})
        error = assert_error(call(by_email, token), 403)
        assert "not verified" in error["message"]
    for verified in ({"email_verified": True}, {}):
        token = idp.token(extra_claims={"email": "boss@corp.example", **verified})
        assert ok(call(by_email, token))["user_id"] == "boss@corp.example"
    by_sub = make_app(user_id_field="sub").test_client()
    body = ok(call(by_sub, idp.token(extra_claims={"email": "boss@corp.example",
                                                   "email_verified": False})))
    assert body["user_id"] == "llmauth-svc" and body["user_email"] is None
    gated = make_app(user_id_field="sub", user_allowed_email_domain="corp.example")
    assert_error(call(gated.test_client(), idp.token(extra_claims={
        "email": "boss@corp.example", "email_verified": False})), 403)
    other_claim = make_app(user_email_field="profile.mail").test_client()  # not OIDC's email
    body = ok(call(other_claim, idp.token(extra_claims={"profile": {"mail": "m@corp.example"},
                                                        "email_verified": False})))
    assert body["user_id"] == "m@corp.example"
    legacy = make_app(require_verified_email=False).test_client()
    body = ok(call(legacy, idp.token(extra_claims={"email": "boss@corp.example",
                                                   "email_verified": False})))
    assert body["user_id"] == "boss@corp.example"


def test_user_id_upsert_provisions_once(make_app: Any, idp: IdP) -> None:
    app = make_app(user_id_upsert=True)
    client = app.test_client()
    seen: list[str] = []

    def on_provisioned(sender: Any, user_id: str, source: str) -> None:
        seen.append(f"{source}:{user_id}")

    token = idp.token(extra_claims={"email": "new@corp.example"})
    with user_provisioned.connected_to(on_provisioned):
        assert ok(call(client, token))["user_id"] == "new@corp.example"
        assert ok(call(client, token))["user_id"] == "new@corp.example"
    assert seen == ["jwt:new@corp.example"]
    info = client.get("/user/info?user_id=new@corp.example", headers=ADMIN)
    assert info.status_code == 200
    assert info.get_json()["user_info"]["user_role"] == "internal_user"
    assert info.get_json()["user_info"]["user_email"] == "new@corp.example"
    update = client.post("/user/update", json={"user_id": "new@corp.example",
                                               "models": ["claude-3-5-sonnet"]}, headers=ADMIN)
    assert update.status_code == 200
    assert_error(call(client, token, model="gpt-4o"), 403, "user_model_access_denied")


def test_stored_user_role_applies(make_app: Any, idp: IdP) -> None:
    client = make_app(admin_allowed_routes=["info_routes", "openai_routes"]).test_client()
    created = client.post("/user/new", json={"user_id": "boss@corp.example",
                                             "user_role": "proxy_admin",
                                             "auto_create_key": False}, headers=ADMIN)
    assert created.status_code == 200, created.get_json()
    body = ok(call(client, idp.token(extra_claims={"email": "boss@corp.example"})))
    assert body["role"] == "proxy_admin"


def test_user_roles_field_and_allowed_roles(make_app: Any, idp: IdP) -> None:
    client = make_app(user_roles_field="realm.roles",
                      user_allowed_roles=["llm-user", "llm-power"]).test_client()
    allowed = idp.token(extra_claims={"email": "a@corp.example", "realm": {"roles": ["llm-user"]}})
    assert ok(call(client, allowed))["role"] == "internal_user"
    no_email = idp.token(extra_claims={"realm": {"roles": ["llm-power"]}})
    assert ok(call(client, no_email))["user_id"] == "llmauth-svc"
    refused = idp.token(extra_claims={"email": "a@corp.example", "realm": {"roles": ["guest"]}})
    assert_error(call(client, refused), 403)
    with pytest.raises(ConfigurationError, match="must be set together"):
        make_app(user_roles_field="realm.roles")


def test_org_and_end_user_fields(make_app: Any, idp: IdP) -> None:
    client = make_app(org_id_field="org.id", end_user_id_field="act.sub").test_client()
    token = idp.token(extra_claims={"email": "a@corp.example", "org": {"id": "org-1"},
                                    "act": {"sub": "customer-9"}})
    body = ok(call(client, token))
    assert body["org_id"] == "org-1" and body["end_user_id"] == "customer-9"


# -- roles, scopes, rbac, custom_validate ----------------------------------------------------------


def test_roles_field_and_role_mappings(make_app: Any, idp: IdP) -> None:
    mappings = [{"role": "gw-admin", "internal_role": "proxy_admin"},
                {"role": "gw-team", "internal_role": "team"},
                {"role": "gw-user", "internal_role": "internal_user"}]
    client = make_app(roles_field="resource_access.roles", role_mappings=mappings,
                      object_id_field="oid",
                      admin_allowed_routes=["info_routes", "openai_routes"]).test_client()

    def token(roles: list[str]) -> str:
        return idp.token(extra_claims={"resource_access": {"roles": roles}, "oid": "obj-7"})

    new_team(client, "obj-7")
    assert ok(call(client, token(["x", "gw-admin"])))["role"] == "proxy_admin"
    team = ok(call(client, token(["gw-team", "gw-user"])))
    assert team["role"] == "team" and team["team_id"] == "obj-7"
    user = ok(call(client, token(["gw-user"])))
    assert user["role"] == "internal_user" and user["user_id"] == "obj-7"
    with pytest.raises(ConfigurationError, match="internal_role"):
        make_app(roles_field="roles", role_mappings=[{"role": "a", "internal_role": "god"}])


def test_a_team_from_role_mappings_must_exist(make_app: Any, idp: IdP) -> None:
    """A team role's team (``object_id_jwt_field``, else ``sub``) that does not exist is a
    403, as for ``team_id_jwt_field``; it is never created."""
    client = make_app(roles_field="roles", object_id_field="oid",
                      role_mappings=[{"role": "gw-team", "internal_role": "team"}]).test_client()
    ghost = idp.token(extra_claims={"roles": ["gw-team"], "oid": "obj-ghost"})
    error = assert_error(call(client, ghost, model="any-model"), 403)
    assert "Team doesn't exist" in error["message"] and "obj-ghost" in error["message"]
    assert client.get("/team/info?team_id=obj-ghost", headers=ADMIN).status_code == 404
    by_subject = idp.token(extra_claims={"roles": ["gw-team"]})  # the team is the sub
    assert "Team doesn't exist" in assert_error(call(client, by_subject), 403)["message"]
    new_team(client, "obj-ghost")
    assert ok(call(client, ghost))["team_id"] == "obj-ghost"


def test_enforce_rbac(make_app: Any, idp: IdP) -> None:
    anonymous = idp.token()  # no email, team, role or admin scope
    loose = make_app().test_client()
    body = ok(call(loose, anonymous))
    assert body["role"] == "internal_user" and body["user_id"] == "llmauth-svc"
    strict = make_app(enforce_rbac=True).test_client()
    error = assert_error(call(strict, anonymous), 403)
    assert "enforce_rbac" in error["message"]
    assert ok(call(strict, idp.token(extra_claims={"email": "a@corp.example"})))


def test_scope_mappings_and_enforce_scope_based_access(make_app: Any, idp: IdP) -> None:
    client = make_app(
        enforce_scope_based_access=True,
        scope_mappings=[{"scope": "models.gpt", "models": ["gpt-4o", "gpt-4o-mini"],
                         "routes": ["openai_routes"]},
                        {"scope": "models.claude", "models": ["claude-3-5-sonnet"]}],
    ).test_client()
    gpt = idp.token(scope="models.gpt", extra_claims={"email": "a@corp.example"})
    body = ok(call(client, gpt))
    assert body["models"] == ["gpt-4o", "gpt-4o-mini"] and body["scopes"] == ["models.gpt"]
    assert_error(call(client, gpt, model="claude-3-5-sonnet"), 403)
    both = idp.token(scope="models.gpt models.claude", extra_claims={"email": "a@corp.example"})
    assert ok(call(client, both, model="claude-3-5-sonnet"))
    assert_error(call(client, idp.token(scope="read", extra_claims={"email": "a@c.example"})), 403)
    error = assert_error(client.get("/key/list", headers=bearer(gpt)), 403)
    assert "scopes do not allow route" in error["message"]
    with pytest.raises(ConfigurationError, match="set together"):
        make_app(enforce_scope_based_access=True)


_VALIDATED: list[dict[str, Any]] = []


def only_corp(claims: dict[str, Any]) -> bool:
    """A custom_validate hook referenced by module path."""
    _VALIDATED.append(claims)
    return str(claims.get("email", "")).endswith("@corp.example")


def test_custom_validate_by_path_and_decorator(make_app: Any, idp: IdP) -> None:
    client = make_app(custom_validate=f"{__name__}.only_corp").test_client()
    good = idp.token(extra_claims={"email": "a@corp.example", "_litellm_user_id": "spoof"})
    assert ok(call(client, good))["user_id"] == "a@corp.example"
    assert "_litellm_user_id" not in _VALIDATED[-1], "internal claims are stripped"
    error = assert_error(call(client, idp.token(extra_claims={"email": "a@x.example"})), 403)
    assert error["message"] == "Invalid JWT token"

    app = make_app()

    @app.llmauth.jwt_claims_validator
    def explode(claims: dict[str, Any]) -> bool:
        raise RuntimeError("hook bug")

    assert_error(call(app.test_client(), good), 401)

    app = make_app()

    @app.llmauth.jwt_claims_validator
    def throttle(claims: dict[str, Any]) -> bool:
        raise TooManyRequests("Slow down, corp.", headers={"Retry-After": "7"})

    response = call(app.test_client(), good)
    assert_error(response, 429)  # an LLMAuthError the hook raises is sent as it is
    assert response.get_json()["error"]["message"] == "Slow down, corp."
    assert response.headers["Retry-After"] == "7"
    with pytest.raises(ConfigurationError, match="LLMAUTH_JWT_CUSTOM_VALIDATE"):
        make_app(custom_validate="tests.no_such_module.func")


# -- several issuers -------------------------------------------------------------------------------


def test_two_issuers_same_sub_are_different_principals(make_app: Any, idp_factory: Any) -> None:
    a, b = idp_factory(), idp_factory(keep_keys=True)
    issuers = [{"issuer": a.issuer, "audience": RS256},
               {"issuer": b.issuer, "audience": [RS256], "user_id_jwt_field": "sub"}]
    client = make_app(a, config={"LLMAUTH_JWT_PUBLIC_KEY_URL": ""}, issuers=issuers).test_client()
    from_a = ok(call(client, a.token(extra_claims={"email": "same@corp.example"})))
    from_b = ok(call(client, b.token(extra_claims={"email": "same@corp.example"})))
    assert from_a["user_id"] == f"{a.issuer}#same@corp.example"
    assert from_b["user_id"] == f"{b.issuer}#llmauth-svc"
    assert from_a["issuer"] == a.issuer and from_b["issuer"] == b.issuer

    # B's key cannot vouch for A: a token signed by B claiming A's issuer is refused.
    keys = __import__("json").loads(b.keys_file.read_text())["keys"]
    rsa = next(k for k in keys if k["kty"] == "RSA")
    now = int(time.time())
    forged = record_secret(jwt.encode(
        {"iss": a.issuer, "aud": RS256, "sub": "llmauth-svc", "iat": now, "exp": now + 60,
         "scope": "litellm_proxy_admin"},
        jwt.PyJWK(rsa).key, algorithm="RS256", headers={"kid": rsa["kid"]}))
    assert_error(call(client, forged), 401)
    genuine_b = record_secret(jwt.encode(
        {"iss": b.issuer, "aud": RS256, "sub": "svc-2", "iat": now, "exp": now + 60},
        jwt.PyJWK(rsa).key, algorithm="RS256", headers={"kid": rsa["kid"]}))
    assert ok(call(client, genuine_b))["user_id"] == f"{b.issuer}#svc-2"
    unknown = record_secret(jwt.encode(
        {"iss": "http://127.0.0.1:1", "aud": RS256, "sub": "x", "iat": now, "exp": now + 60},
        jwt.PyJWK(rsa).key, algorithm="RS256", headers={"kid": rsa["kid"]}))
    assert_error(call(client, unknown), 401)


def test_issuer_entry_needs_an_audience(make_app: Any, idp: IdP) -> None:
    with pytest.raises(ConfigurationError, match="audience"):
        make_app(issuers=[{"issuer": idp.issuer}])
    with pytest.raises(ConfigurationError, match="unknown field"):
        make_app(issuers=[{"issuer": idp.issuer, "audience": RS256, "aud": "x"}])
    app = make_app(config={"LLMAUTH_JWT_PUBLIC_KEY_URL": ""},
                   issuers=[{"issuer": idp.issuer, "disable_audience_validation": True,
                             "user_id_prefix": ""}])
    token = idp.token(resource=ES256, extra_claims={"email": "a@corp.example"})
    assert ok(call(app.test_client(), token))["user_id"] == "a@corp.example"


# -- key rotation, outages ------------------------------------------------------------------------


def test_restarted_provider_new_kid_is_refetched_within_cooldown_rules(
        make_app: Any, idp_factory: Any) -> None:
    provider = idp_factory()
    fast = make_app(provider, kid_refetch_cooldown=0).test_client()
    slow = make_app(provider, kid_refetch_cooldown=3600).test_client()
    before = provider.token(extra_claims={"email": "a@corp.example"})
    assert ok(call(fast, before)) and ok(call(slow, before))
    provider.restart()
    after = provider.token(extra_claims={"email": "b@corp.example"})
    assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]
    assert ok(call(fast, after))["user_id"] == "b@corp.example"
    assert_error(call(slow, after), 401)  # unknown kid, refetch held back by the cooldown


def test_stale_keys_while_provider_is_down_then_503(make_app: Any, idp_factory: Any,
                                                    caplog: Any) -> None:
    provider = idp_factory(keep_keys=True)  # the same keys when it comes back
    client = make_app(provider, public_key_ttl=1, public_key_stale_ttl=2,
                      fetch_failure_backoff=0).test_client()
    tokens = [provider.token(extra_claims={"email": f"u{i}@corp.example"}) for i in range(3)]
    assert ok(call(client, tokens[0]))
    provider.stop()
    time.sleep(1.2)  # past the TTL: the refresh fails, the stale copy answers
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        assert ok(call(client, tokens[1]))["user_id"] == "u1@corp.example"
    assert any("serving the cached copy" in r.getMessage() for r in caplog.records)
    time.sleep(2.0)  # past TTL + stale TTL
    error = assert_error(call(client, tokens[2]), 503, "auth_provider_unavailable")
    assert "unavailable" in error["message"]
    provider.start()
    assert ok(call(client, tokens[2]))["user_id"] == "u2@corp.example"


def test_no_copy_at_all_is_503_and_other_methods_still_work(make_app: Any, idp_factory: Any,
                                                           idp: IdP) -> None:
    provider = idp_factory()
    token = provider.token(extra_claims={"email": "a@corp.example"})
    provider.stop()
    client = make_app(provider).test_client()
    response = call(client, token)
    assert_error(response, 503, "auth_provider_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    key = new_key(client, models=["gpt-4o"])["key"]
    assert ok(call(client, key))["method"] == "virtual_key"


# -- OIDC userinfo for opaque tokens ---------------------------------------------------------------


def test_userinfo_for_opaque_tokens(make_app: Any, idp_factory: Any) -> None:
    provider = idp_factory()
    client = make_app(provider, oidc_userinfo_enabled=True,
                      oidc_userinfo_endpoint=provider.userinfo_endpoint,
                      team_ids_field="groups").test_client()
    new_team(client, "team-a", models=["gpt-4o"])
    access = provider.code_flow("alice")["access_token"]
    body = ok(call(client, access))
    assert body["user_id"] == "alice@example.com" and body["team_id"] == "team-a"
    assert_error(call(client, access + "x"), 401)
    key = new_key(client)["key"]
    provider.stop()  # cached by sha256(token): no round trip; keys never go to the IdP
    assert ok(call(client, access))["user_id"] == "alice@example.com"
    assert ok(call(client, key))["method"] == "virtual_key"
    assert ok(client.post("/v1/responses", json={"model": "gpt-4o"}, headers=ADMIN))
    record_secret("opaque-never-seen-token-123456")
    assert_error(call(client, "opaque-never-seen-token-123456"), 503, "auth_provider_unavailable")


def test_userinfo_needs_its_endpoint(make_app: Any) -> None:
    with pytest.raises(ConfigurationError, match="USERINFO_ENDPOINT"):
        make_app(oidc_userinfo_enabled=True)
