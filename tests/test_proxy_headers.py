"""OAuth2-proxy header auth: configuration checks, the trust boundary (direct peer only),
strict values, the privilege opt-in, and the same authorization as a key."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from flask_llmauth import ConfigurationError
from tests.helpers import ADMIN, assert_error, bearer, new_key, record_secret

PROXY = "10.20.0.7"
OUTSIDER = "203.0.113.9"
MAPPING = {"user_id": "X-Forwarded-User", "user_email": "X-Forwarded-Email",
           "team_id": "X-Team-Id", "models": "X-Models", "org_id": "X-Org"}
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def proxy_app(app_factory: Any, mapping: dict[str, str] | None = None,
              ranges: Any = ("10.20.0.0/16",), **config: Any) -> Flask:
    return app_factory({
        "LLMAUTH_ENABLE_OAUTH2_PROXY_AUTH": True,
        "LLMAUTH_OAUTH2_CONFIG_MAPPINGS": mapping or MAPPING,
        "LLMAUTH_TRUSTED_PROXY_RANGES": list(ranges),
        **{f"LLMAUTH_{k.upper()}": v for k, v in config.items()},
    })


def send(client: Any, headers: dict[str, str] | None = None, peer: str = PROXY,
         model: str = "gpt-4o", path: str = "/v1/chat/completions") -> Any:
    environ = {"REMOTE_ADDR": peer}
    if path == "/v1/chat/completions":
        return client.post(path, json={**CHAT, "model": model}, headers=headers or {},
                           environ_base=environ)
    return client.get(path, headers=headers or {}, environ_base=environ)


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"LLMAUTH_TRUSTED_PROXY_RANGES": []}, "LLMAUTH_TRUSTED_PROXY_RANGES: required"),
    ({"LLMAUTH_TRUSTED_PROXY_RANGES": ["0.0.0.0/0"]}, "trusts every address"),
    ({"LLMAUTH_TRUSTED_PROXY_RANGES": ["10.0.0.0/8", "::/0"]}, "trusts every address"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {}}, "LLMAUTH_OAUTH2_CONFIG_MAPPINGS: proxy-header"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"max_budget": "X-Custom-Budget"}},
     "'max_budget' is a privilege field"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": "X-User", "user_role": "X-User-Role"}},
     "'user_role' is a privilege field"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": "X-User", "tpm_limit": "X-Tpm"}},
     "'tpm_limit' is a privilege field"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"spend": "X-Spend"}}, "unknown field 'spend'"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": "X User"}}, "is not a header name"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": 5}}, "is not a header name"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": "Authorization"}}, "cannot carry"),
    ({"LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": "X-Forwarded-For"}}, "cannot carry"),
])
def test_unsafe_configuration_fails_init(app_factory: Any, config: dict[str, Any],
                                         message: str) -> None:
    base = {"LLMAUTH_ENABLE_OAUTH2_PROXY_AUTH": True,
            "LLMAUTH_OAUTH2_CONFIG_MAPPINGS": {"user_id": "X-Forwarded-User"},
            "LLMAUTH_TRUSTED_PROXY_RANGES": ["10.0.0.0/8"]}
    with pytest.raises(ConfigurationError, match=message):
        app_factory({**base, **config})


def test_disabled_by_default_headers_mean_nothing(app_factory: Any) -> None:
    client = app_factory({"LLMAUTH_TRUSTED_PROXY_RANGES": ["10.20.0.0/16"]}).test_client()
    assert_error(send(client, {"X-Forwarded-User": "alice"}), 401)
    assert "oauth2_proxy" not in client.application.extensions["llmauth"].authenticators


def test_litellm_yaml_config(app_factory: Any, tmp_path: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""
        general_settings:
          enable_oauth2_proxy_auth: true
          trusted_proxy_ranges: ["10.20.0.0/16"]
          oauth2_config_mappings:
            user_id: X-Forwarded-User
            user_email: X-Forwarded-Email
    """))
    client = app_factory({"LLMAUTH_CONFIG_FILE": str(path)}).test_client()
    r = send(client, {"X-Forwarded-User": "yaml-user"})
    assert r.status_code == 200 and r.get_json()["principal"]["user_id"] == "yaml-user"


# -- the trust boundary ------------------------------------------------------------------------


def test_trusted_peer_names_the_caller(app_factory: Any) -> None:
    client = proxy_app(app_factory).test_client()
    r = send(client, {"X-Forwarded-User": "alice", "X-Forwarded-Email": "alice@example.com"})
    assert r.status_code == 200
    assert r.get_json()["principal"] == {
        "method": "oauth2_proxy", "role": "internal_user", "user_id": "alice", "team_id": None,
        "key_id": None, "key_name": None}


def test_email_is_the_user_id_when_no_user_header(app_factory: Any) -> None:
    client = proxy_app(app_factory).test_client()
    r = send(client, {"X-Forwarded-Email": "erin@example.com"})
    assert r.get_json()["principal"]["user_id"] == "erin@example.com"


@pytest.mark.parametrize("peer", [OUTSIDER, "10.21.0.7", "127.0.0.1", "::1", ""])
def test_identity_headers_from_untrusted_peer_are_401(app_factory: Any, peer: str) -> None:
    client = proxy_app(app_factory).test_client()
    key = new_key(client)["key"]
    for headers in ({"X-Forwarded-User": "admin"}, {"X-Team-Id": "t"}, {"X-Models": "*"},
                    {"X-Forwarded-User": ""}):
        assert_error(send(client, headers, peer=peer), 401)
        # a valid key does not launder forged identity headers
        assert_error(send(client, {**headers, **bearer(key)}, peer=peer), 401)
    # without identity headers the other methods decide
    assert send(client, bearer(key), peer=peer).get_json()["principal"]["method"] == "virtual_key"


def test_x_forwarded_for_never_makes_a_peer_trusted(app_factory: Any) -> None:
    client = proxy_app(app_factory).test_client()
    headers = {"X-Forwarded-User": "admin", "X-Forwarded-For": PROXY}
    assert_error(send(client, headers, peer=OUTSIDER), 401)


def test_proxy_fix_rewrite_does_not_move_the_trust_boundary(app_factory: Any) -> None:
    app = proxy_app(app_factory)
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    client = app.test_client()
    # an outsider claims, via X-Forwarded-For, to come from the proxy's address
    headers = {"X-Forwarded-User": "admin", "X-Forwarded-For": PROXY}
    assert_error(send(client, headers, peer=OUTSIDER), 401)
    # the real proxy, passing the client's address on, is still trusted
    r = send(client, {"X-Forwarded-User": "alice", "X-Forwarded-For": OUTSIDER}, peer=PROXY)
    assert r.status_code == 200


def test_trusted_peer_without_identity_headers_falls_through(app_factory: Any) -> None:
    client = proxy_app(app_factory).test_client()
    key = new_key(client)["key"]
    assert send(client, bearer(key)).get_json()["principal"]["method"] == "virtual_key"
    assert send(client, {"X-Forwarded-User": "  ", **bearer(key)}).get_json()[
        "principal"]["method"] == "virtual_key"
    assert_error(send(client), 401)


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-User": "alice,admin"},
    {"X-Forwarded-User": "al\x01ice"},
    {"X-Forwarded-User": "a" * 256},
    {"X-Forwarded-User": "alice", "X-Models": "gpt-4o,,claude"},
    {"X-Forwarded-User": "alice", "X-Models": ","},
    {"X-Forwarded-User": "alice", "X-Team-Id": "t1,t2"},
    {"X-Models": "gpt-4o"},
    {"X-Org": "org-1"},
], ids=repr)
def test_malformed_or_identity_less_headers_are_401(app_factory: Any,
                                                    headers: dict[str, str]) -> None:
    client = proxy_app(app_factory).test_client()
    assert_error(send(client, headers), 401)


# -- authorization, records --------------------------------------------------------------------


def test_header_principal_goes_through_the_same_authorization(app_factory: Any) -> None:
    client = proxy_app(app_factory).test_client()
    assert client.post("/team/new", json={"team_id": "t-4o", "models": ["gpt-4o"]},
                       headers=ADMIN).status_code == 200
    assert client.post("/user/new", json={"user_id": "boss", "user_role": "proxy_admin"},
                       headers=ADMIN).status_code == 200
    assert client.post("/user/new", json={"user_id": "vic", "user_role": "internal_user_viewer"},
                       headers=ADMIN).status_code == 200

    team = {"X-Forwarded-User": "tina", "X-Team-Id": "t-4o"}
    assert send(client, team).status_code == 200
    assert send(client, team).get_json()["principal"]["team_id"] == "t-4o"
    assert_error(send(client, team, model="gpt-4o-mini"), 403, "team_model_access_denied")

    limited = {"X-Forwarded-User": "tina", "X-Models": "gpt-4o-mini, claude-3-5-sonnet"}
    assert send(client, limited, model="claude-3-5-sonnet").status_code == 200
    assert_error(send(client, limited, model="gpt-4o"), 403, "credential_model_access_denied")
    assert send(client, limited, path="/v1/models").get_json()["data"] == [
        "gpt-4o-mini", "claude-3-5-sonnet"]

    # the stored user's role applies: admin routes for an admin, never for others
    assert send(client, {"X-Forwarded-User": "boss"}, path="/custom/admin").status_code == 200
    assert_error(send(client, {"X-Forwarded-User": "tina"}, path="/custom/admin"), 403)
    assert_error(client.post("/key/generate", json={}, headers={"X-Forwarded-User": "vic"},
                             environ_base={"REMOTE_ADDR": PROXY}), 403)
    own = client.post("/key/generate", json={}, headers={"X-Forwarded-User": "tina"},
                      environ_base={"REMOTE_ADDR": PROXY})
    assert own.status_code == 200 and own.get_json()["user_id"] == "tina"
    record_secret(own.get_json()["key"])


def test_blocked_user_or_team_named_by_headers_is_401(app_factory: Any) -> None:
    client = proxy_app(app_factory).test_client()
    client.post("/team/new", json={"team_id": "t-blocked"}, headers=ADMIN)
    client.post("/team/block", json={"team_id": "t-blocked"}, headers=ADMIN)
    client.post("/user/new", json={"user_id": "mallory"}, headers=ADMIN)
    client.post("/user/update", json={"user_id": "mallory", "blocked": True}, headers=ADMIN)
    assert_error(send(client, {"X-Forwarded-User": "x", "X-Team-Id": "t-blocked"}), 401)
    assert_error(send(client, {"X-Forwarded-User": "mallory"}), 401)
    assert send(client, {"X-Forwarded-User": "someone-else"}).status_code == 200


def test_team_named_by_headers_must_exist(app_factory: Any) -> None:
    """A team header naming no team is a 403 (never a team principal without the team's
    models, budget and limits); once the team is created the same headers work."""
    client = proxy_app(app_factory).test_client()
    ghost = {"X-Forwarded-User": "tina", "X-Team-Id": "t-ghost"}
    error = assert_error(send(client, ghost, model="any-model"), 403)
    assert error["message"] == ("Team doesn't exist in db. Team=t-ghost. Create team via "
                                "`/team/new` call.")
    assert_error(send(client, {"X-Team-Id": "t-ghost"}), 403)  # a team alone, too
    assert client.get("/team/info?team_id=t-ghost", headers=ADMIN).status_code == 404
    assert client.post("/team/new", json={"team_id": "t-ghost", "models": ["gpt-4o"]},
                       headers=ADMIN).status_code == 200
    assert send(client, ghost).get_json()["principal"]["team_id"] == "t-ghost"
    assert_error(send(client, ghost, model="any-model"), 403, "team_model_access_denied")


def test_auth_order_can_put_keys_first(app_factory: Any) -> None:
    client = proxy_app(app_factory, auth_order=["master_key", "virtual_key",
                                                "oauth2_proxy"]).test_client()
    key = new_key(client)["key"]
    r = send(client, {"X-Forwarded-User": "alice", **bearer(key)})
    assert r.get_json()["principal"]["method"] == "virtual_key"
    # with no credential at all, the headers are the next decisive method
    assert send(client, {"X-Forwarded-User": "alice"}).get_json()["principal"]["method"] == (
        "oauth2_proxy")


# -- privilege fields with the opt-in ----------------------------------------------------------

PRIVILEGED = {"user_id": "X-Forwarded-User", "user_role": "X-User-Role",
              "max_budget": "X-Custom-Budget", "tpm_limit": "X-Tpm", "rpm_limit": "X-Rpm",
              "max_parallel_requests": "X-Parallel", "budget_duration": "X-Budget-Duration",
              "soft_budget": "X-Soft-Budget"}


def privileged_app(app_factory: Any) -> Flask:
    app = proxy_app(app_factory, PRIVILEGED, oauth2_proxy_sets_privilege_headers=True)
    seen = app.config.setdefault("SEEN", {})

    @app.get("/v1/whoami")
    def whoami() -> Any:
        from flask_llmauth import current_principal as p
        seen.update(limits=dict(p.limits), role=p.role.value)
        return {}

    app.llmauth.route_group("info_routes")(whoami)
    return app


def test_privilege_headers_with_opt_in_are_parsed(app_factory: Any) -> None:
    app = privileged_app(app_factory)
    client = app.test_client()
    headers = {"X-Forwarded-User": "pat", "X-User-Role": "proxy_admin",
               "X-Custom-Budget": "12.50", "X-Tpm": "1000", "X-Rpm": "60", "X-Parallel": "2",
               "X-Budget-Duration": "30d", "X-Soft-Budget": "0"}
    assert send(client, headers, path="/v1/whoami").status_code == 200
    assert app.config["SEEN"] == {
        "role": "proxy_admin",
        "limits": {"max_budget": 12_500_000_000, "tpm_limit": 1000, "rpm_limit": 60,
                   "max_parallel_requests": 2, "budget_duration": "30d", "soft_budget": 0}}
    assert send(client, {"X-Forwarded-User": "pat", "X-User-Role": "PROXY_ADMIN"},
                path="/custom/admin").status_code == 200
    assert_error(send(client, {"X-Forwarded-User": "pat", "X-User-Role": "internal_user"},
                      path="/custom/admin"), 403)


@pytest.mark.parametrize("header, value", [
    ("X-Custom-Budget", "-1"), ("X-Custom-Budget", "1e3"), ("X-Custom-Budget", "nan"),
    ("X-Custom-Budget", "inf"), ("X-Custom-Budget", "12,5"), ("X-Custom-Budget", "0x10"),
    ("X-Custom-Budget", "+5"), ("X-Custom-Budget", "1.0000000001"),
    ("X-Custom-Budget", "9" * 13), ("X-Tpm", "1.5"), ("X-Tpm", "-3"), ("X-Tpm", "ten"),
    ("X-Rpm", "1_000"), ("X-Parallel", "\u00b2"), ("X-Budget-Duration", "forever"),
    ("X-Budget-Duration", "0d"), ("X-User-Role", "superuser"), ("X-User-Role", "admin"),
])
def test_malformed_privilege_value_is_401(app_factory: Any, header: str, value: str) -> None:
    client = privileged_app(app_factory).test_client()
    assert_error(send(client, {"X-Forwarded-User": "pat", header: value}, path="/v1/whoami"), 401)
