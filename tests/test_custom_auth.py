"""Custom auth hooks: every way a hook can answer, modes on/off/auto, loading from a module
path and from the YAML file, custom_key_validate, and the same authorization afterwards."""

from __future__ import annotations

import logging
import textwrap
from typing import Any

import pytest
from flask import Flask

from flask_llmauth import ConfigurationError, Forbidden, LLMAuthError, Principal, Role
from flask_llmauth.errors import TooManyRequests
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key, record_secret

TOKEN = record_secret("custom-token-" + "q7Zr0m9XbVw2LkPa")
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def make_app(app_factory: Any, hook: Any = None, **config: Any) -> Flask:
    app = app_factory({f"LLMAUTH_{k.upper()}": v for k, v in config.items()})
    if hook is not None:
        assert app.llmauth.custom_auth(hook) is hook  # the decorator returns the function
    return app


def chat(client: Any, token: str | None = TOKEN, model: str = "gpt-4o", **kw: Any) -> Any:
    headers = bearer(token) if token else {}
    return client.post("/v1/chat/completions", json={**CHAT, "model": model},
                       headers=headers, **kw)


def create_user(client: Any, user_id: str, role: str = "internal_user", **fields: Any) -> None:
    response = client.post("/user/new", json={"user_id": user_id, "user_role": role, **fields},
                           headers=ADMIN)
    assert response.status_code == 200, response.get_json()


def create_team(client: Any, team_id: str, **fields: Any) -> None:
    response = client.post("/team/new", json={"team_id": team_id, **fields}, headers=ADMIN)
    assert response.status_code == 200, response.get_json()


# -- what a hook may return --------------------------------------------------------------------


def test_hook_gets_request_and_extracted_key_and_returns_mapping(app_factory: Any) -> None:
    seen: list[tuple[str, str]] = []

    def hook(request: Any, api_key: str) -> Any:
        seen.append((request.path, api_key))
        return {"user_id": "alice", "user_email": "alice@example.com"} if api_key == TOKEN else None

    client = make_app(app_factory, hook).test_client()
    response = chat(client)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["principal"]["method"] == "custom"
    assert response.get_json()["principal"]["user_id"] == "alice"
    # no user row: a named user is an internal_user, as for a key
    assert response.get_json()["principal"]["role"] == "internal_user"
    # x-api-key is extracted like any credential; no credential is passed as ""
    client.post("/v1/chat/completions", json=CHAT, headers={"x-api-key": TOKEN})
    assert_error(client.post("/v1/chat/completions", json=CHAT), 401)
    assert seen == [("/v1/chat/completions", TOKEN)] * 2 + [("/v1/chat/completions", "")]


def test_mapping_role_comes_from_stored_user_unless_hook_names_one(app_factory: Any) -> None:
    answers: dict[str, Any] = {}
    app = make_app(app_factory)
    client = app.test_client()
    create_user(client, "bob", role="proxy_admin_viewer")
    app.llmauth.custom_auth(lambda request, api_key: answers["next"])
    answers["next"] = {"user_id": "bob"}
    r = client.get("/custom/internal", headers=bearer(TOKEN))
    assert r.status_code == 200 and r.get_json()["principal"]["role"] == "proxy_admin_viewer"
    answers["next"] = {"user_id": "bob", "role": "PROXY_ADMIN"}
    assert client.get("/custom/admin", headers=bearer(TOKEN)).status_code == 200
    create_team(client, "t-only")
    answers["next"] = {"team_id": "t-only"}
    r = chat(client)
    assert r.get_json()["principal"]["role"] == "team"


def test_principal_return_keeps_fields_but_method_becomes_custom(app_factory: Any) -> None:
    def hook(request: Any, api_key: str) -> Principal:
        return Principal(method="master_key", role=Role.INTERNAL_USER, user_id="carol",
                         models=("gpt-4o",))

    client = make_app(app_factory, hook).test_client()
    r = chat(client)
    assert r.status_code == 200
    assert r.get_json()["principal"] == {
        "method": "custom", "role": "internal_user", "user_id": "carol", "team_id": None,
        "key_id": None, "key_name": None}
    assert_error(chat(client, model="gpt-4o-mini"), 403)  # the principal's models apply
    assert_error(client.get("/custom/admin", headers=bearer(TOKEN)), 403)


@pytest.mark.parametrize("answer", [
    None,
    0,
    [],
    ["alice"],
    b"alice",
    object(),
    {},
    {"user_email": "only-an-email@example.com"},
    {"user_id": ""},
    {"user_id": 7},
    {"user_id": "a" * 256},
    {"user_id": "alice,admin"},
    {"user_id": "al\nice"},
    {"user_id": "alice", "role": "god"},
    {"user_id": "alice", "role": 1},
    {"user_id": "alice", "role": "internal_user", "user_role": "proxy_admin"},
    {"user_id": "alice", "models": "gpt-4o"},
    {"user_id": "alice", "models": [""]},
    {"user_id": "alice", "allowed_routes": [1]},
    {"user_id": "alice", "metadata": "x"},
    {"user_id": "alice", "max_budget": -1},
    {"user_id": "alice", "max_budget": "nan"},
    {"user_id": "alice", "tpm_limit": True},
    {"user_id": "alice", "rpm_limit": 1.5},
    {"user_id": "alice", "budget_duration": "forever"},
    {"user_id": "alice", "api_key": "sk-whatever"},
    {"user_id": "alice", "is_admin": True},
    Principal(method="custom", role=Role.PROXY_ADMIN),
], ids=repr)
def test_malformed_or_empty_answers_are_401_never_anonymous(app_factory: Any,
                                                            answer: Any) -> None:
    client = make_app(app_factory, lambda request, api_key: answer).test_client()
    error = assert_error(chat(client), 401, "auth_error")
    assert error["message"] == "Authentication Error, invalid API key."
    # not even the master key gets past a hook in mode "on": the hook decides alone
    assert_error(chat(client, MASTER_KEY), 401)


@pytest.mark.parametrize("exc", [ValueError, KeyError, RuntimeError, AttributeError, TypeError])
def test_hook_that_raises_is_401_and_its_message_is_not_logged(app_factory: Any, caplog: Any,
                                                               exc: type) -> None:
    secret = record_secret("custom-secret-" + exc.__name__ + "-9b8c7d6e5f")

    def hook(request: Any, api_key: str) -> Any:
        raise exc(f"bad key {api_key} {secret}")

    client = make_app(app_factory, hook).test_client()
    with caplog.at_level(logging.DEBUG, logger="flask_llmauth"):
        body = assert_error(chat(client, secret), 401)
    assert secret not in str(body)
    assert "custom_auth_raised" in caplog.text and secret not in caplog.text


def test_hook_raising_auth_error_passes_status_body_and_headers(app_factory: Any) -> None:
    errors = {
        "nope": LLMAuthError("Invalid API key", error_type="invalid_request_error",
                             param="api_key", status=401),
        "teapot": LLMAuthError("Custom refusal", error_type="custom", status=418),
        "forbidden": Forbidden("Your org is suspended", error_type="org_suspended"),
        "slow": TooManyRequests("Slow down", headers={"Retry-After": "7"}),
    }

    def hook(request: Any, api_key: str) -> Any:
        raise errors[api_key]

    client = make_app(app_factory, hook).test_client()
    for token, error in errors.items():
        r = chat(client, token)
        assert r.status_code == error.status
        assert r.get_json() == error.to_dict()
    assert chat(client, "slow").headers["Retry-After"] == "7"


def test_async_hook_is_awaited(app_factory: Any) -> None:
    async def hook(request: Any, api_key: str) -> Any:
        return {"user_id": "async-user"} if api_key == TOKEN else None

    client = make_app(app_factory, hook).test_client()
    assert chat(client).get_json()["principal"]["user_id"] == "async-user"
    assert_error(chat(client, "other-token-xyz"), 401)


def test_blocked_team_or_user_named_by_hook_is_refused(app_factory: Any) -> None:
    answers: dict[str, Any] = {}
    app = make_app(app_factory)
    client = app.test_client()
    create_team(client, "blocked-team")
    create_user(client, "blocked-user")
    assert client.post("/team/block", json={"team_id": "blocked-team"},
                       headers=ADMIN).status_code == 200
    assert client.post("/user/update", json={"user_id": "blocked-user", "blocked": True},
                       headers=ADMIN).status_code == 200
    app.llmauth.custom_auth(lambda request, api_key: answers["next"])
    answers["next"] = {"user_id": "x", "team_id": "blocked-team"}
    assert_error(chat(client), 401)
    answers["next"] = {"user_id": "blocked-user"}
    assert_error(chat(client), 401)


def test_team_named_by_hook_must_exist(app_factory: Any) -> None:
    def hook(request: Any, api_key: str) -> Any:
        return {"team_id": "t-ghost"} if api_key == TOKEN else None

    client = make_app(app_factory, hook, custom_auth_mode="auto").test_client()
    error = assert_error(chat(client), 403)
    assert "Team doesn't exist in db. Team=t-ghost." in error["message"]
    create_team(client, "t-ghost")
    assert chat(client).get_json()["principal"]["team_id"] == "t-ghost"


def test_public_routes_never_call_the_hook(app_factory: Any) -> None:
    calls: list[str] = []
    client = make_app(app_factory, lambda request, api_key: calls.append("x")).test_client()
    assert client.get("/public/ping").status_code == 200
    assert client.get("/health/liveliness").status_code == 200
    assert calls == []


# -- modes -------------------------------------------------------------------------------------


def test_mode_on_refuses_a_returned_string(app_factory: Any) -> None:
    app = make_app(app_factory)
    client = app.test_client()
    key = new_key(client)["key"]  # created with the master key before the hook exists
    app.llmauth.custom_auth(lambda request, api_key: key)
    assert_error(chat(client), 401)


def test_mode_auto_validates_returned_string_as_virtual_key(app_factory: Any) -> None:
    app = make_app(app_factory, custom_auth_mode="auto")
    client = app.test_client()
    key = new_key(client, user_id="dave", models=["gpt-4o"])
    mapping = {TOKEN: key["key"], "master": MASTER_KEY,
               "bogus": record_secret("sk-" + "n0tAR3alKey" * 4)}
    app.llmauth.custom_auth(lambda request, api_key: mapping.get(api_key))

    r = chat(client)
    assert r.status_code == 200
    assert r.get_json()["principal"]["method"] == "virtual_key"
    assert r.get_json()["principal"]["key_id"] == key["key_id"]
    assert_error(chat(client, model="gpt-4o-mini"), 403)  # the key's models apply
    assert_error(chat(client, "bogus"), 401)  # a string that is no valid key
    assert_error(chat(client, "master"), 401)  # never the master key through the hook


def test_mode_auto_none_lets_the_other_methods_decide(app_factory: Any) -> None:
    calls: list[str] = []

    def hook(request: Any, api_key: str) -> Any:
        calls.append(api_key)
        return {"user_id": "eve"} if api_key == TOKEN else None

    client = make_app(app_factory, hook, custom_auth_mode="auto").test_client()
    key = new_key(client)["key"]
    assert chat(client).get_json()["principal"]["method"] == "custom"
    assert chat(client, key).get_json()["principal"]["method"] == "virtual_key"
    assert chat(client, MASTER_KEY).get_json()["principal"]["method"] == "master_key"
    assert_error(chat(client, "unknown-token-abc"), 401)
    assert_error(chat(client, None), 401)
    assert calls.count(TOKEN) == 1 and key in calls


def test_mode_auto_still_refuses_when_the_hook_raises(app_factory: Any) -> None:
    def hook(request: Any, api_key: str) -> Any:
        raise RuntimeError("backend down")

    client = make_app(app_factory, hook, custom_auth_mode="auto").test_client()
    # a broken hook is a refusal, not a reason to skip it: not even the master key passes
    assert_error(chat(client, MASTER_KEY), 401)


def test_mode_off_never_calls_the_hook(app_factory: Any) -> None:
    calls: list[str] = []
    client = make_app(app_factory, lambda request, api_key: calls.append("x"),
                      custom_auth_mode="off").test_client()
    key = new_key(client)["key"]
    assert chat(client, key).status_code == 200
    assert calls == []
    assert "custom" not in client.application.extensions["llmauth"].authenticators


def test_custom_after_master_key_in_auth_order(app_factory: Any) -> None:
    calls: list[str] = []

    def hook(request: Any, api_key: str) -> Any:
        calls.append(api_key)
        return {"user_id": "frank"}

    client = make_app(app_factory, hook,
                      auth_order=["master_key", "custom", "virtual_key"]).test_client()
    assert chat(client, MASTER_KEY).get_json()["principal"]["method"] == "master_key"
    assert calls == []
    assert chat(client).get_json()["principal"]["method"] == "custom"
    assert calls == [TOKEN]


# -- authorization is the same as for a key ----------------------------------------------------


def test_hook_principals_go_through_routes_and_models(app_factory: Any) -> None:
    answers: dict[str, Any] = {}
    app = make_app(app_factory)
    client = app.test_client()
    create_team(client, "team-4o", models=["gpt-4o"])
    create_user(client, "viewer", role="internal_user_viewer")
    app.llmauth.custom_auth(lambda request, api_key: answers["next"])

    answers["next"] = {"user_id": "gina", "team_id": "team-4o"}
    assert chat(client).status_code == 200
    error = assert_error(chat(client, model="gpt-4o-mini"), 403)
    assert error["type"] == "team_model_access_denied"

    answers["next"] = {"user_id": "gina", "models": ["gpt-4o-mini"]}
    assert chat(client, model="gpt-4o-mini").status_code == 200
    assert_error(chat(client, model="claude-3-5-sonnet"), 403)
    models = client.get("/v1/models", headers=bearer(TOKEN)).get_json()["data"]
    assert models == ["gpt-4o-mini"]

    answers["next"] = {"user_id": "gina", "allowed_routes": ["/v1/embeddings"]}
    assert_error(chat(client), 403)
    assert client.post("/v1/embeddings", json={"model": "gpt-4o"},
                       headers=bearer(TOKEN)).status_code == 200

    answers["next"] = {"user_id": "viewer"}
    assert_error(client.post("/key/generate", json={}, headers=bearer(TOKEN)), 403)
    assert_error(client.get("/custom/admin", headers=bearer(TOKEN)), 403)
    answers["next"] = {"user_id": "gina", "role": "proxy_admin_viewer"}
    assert_error(chat(client), 403)  # admin viewers may not call LLM routes


def test_limits_and_scopes_reach_the_principal(app_factory: Any) -> None:
    app = make_app(app_factory, lambda request, api_key: {
        "user_id": "hank", "max_budget": "12.5", "tpm_limit": 1000, "rpm_limit": "60",
        "budget_duration": "30d", "scopes": "read write", "team_alias": "blue",
        "metadata": {"source": "hook"}})
    seen: dict[str, Any] = {}

    @app.get("/v1/whoami")
    def whoami() -> Any:
        from flask_llmauth import current_principal as p
        seen.update(limits=dict(p.limits), scopes=p.scopes, metadata=dict(p.metadata))
        return {}

    app.llmauth.route_group("info_routes")(whoami)
    assert app.test_client().get("/v1/whoami", headers=bearer(TOKEN)).status_code == 200
    assert seen["limits"] == {"max_budget": 12_500_000_000, "tpm_limit": 1000, "rpm_limit": 60,
                              "budget_duration": "30d"}
    assert seen["scopes"] == frozenset({"read", "write"})
    assert seen["metadata"] == {"source": "hook", "team_alias": "blue"}


# -- loading the hook by name ------------------------------------------------------------------

HOOK_SOURCE = textwrap.dedent('''
    def authenticate(request, api_key):
        if api_key == "{token}":
            return {{"user_id": "{user}"}}
        return None

    def validate(request, principal):
        return principal.key_alias != "refused"
''')


def test_custom_auth_from_module_path(app_factory: Any, tmp_path: Any, monkeypatch: Any) -> None:
    package = tmp_path / "hookpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "auth.py").write_text(HOOK_SOURCE.format(token=TOKEN, user="from-module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    client = make_app(app_factory, custom_auth="hookpkg.auth.authenticate").test_client()
    assert chat(client).get_json()["principal"]["user_id"] == "from-module"
    assert_error(chat(client, "wrong-token-123"), 401)


def test_custom_auth_from_yaml_resolved_next_to_the_config_file(app_factory: Any,
                                                                 tmp_path: Any) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "my_custom_auth.py").write_text(HOOK_SOURCE.format(token=TOKEN, user="from-yaml"))
    (conf / "config.yaml").write_text(textwrap.dedent("""
        general_settings:
          custom_auth: my_custom_auth.authenticate
          custom_auth_settings:
            mode: auto
    """))
    app = make_app(app_factory, config_file=str(conf / "config.yaml"))
    settings = app.extensions["llmauth"].settings
    assert settings.custom_auth == "my_custom_auth.authenticate"
    assert settings.custom_auth_mode == "auto"
    client = app.test_client()
    assert chat(client).get_json()["principal"]["user_id"] == "from-yaml"
    # mode auto: the module's None lets the master key through
    assert chat(client, MASTER_KEY).get_json()["principal"]["method"] == "master_key"


@pytest.mark.parametrize("ref, message", [
    ("nodots", "must be 'module.function'"),
    ("no_such_module_xyz.fn", "cannot import module"),
    ("json.no_such_function", "has no function"),
    ("json.__doc__", "has no function"),
])
def test_bad_hook_reference_fails_init_naming_the_setting(app_factory: Any, ref: str,
                                                          message: str) -> None:
    with pytest.raises(ConfigurationError, match="LLMAUTH_CUSTOM_AUTH") as info:
        app_factory({"LLMAUTH_CUSTOM_AUTH": ref})
    assert message in str(info.value)


def test_hook_module_that_fails_to_load_fails_init(app_factory: Any, tmp_path: Any) -> None:
    (tmp_path / "broken_hook.py").write_text("raise ImportError('missing dependency')\n")
    (tmp_path / "config.yaml").write_text("general_settings:\n  custom_auth: broken_hook.f\n")
    with pytest.raises(ConfigurationError, match="LLMAUTH_CUSTOM_AUTH.*loading"):
        app_factory({"LLMAUTH_CONFIG_FILE": str(tmp_path / "config.yaml")})


def test_bad_mode_fails_init(app_factory: Any) -> None:
    with pytest.raises(ConfigurationError, match="LLMAUTH_CUSTOM_AUTH_MODE"):
        app_factory({"LLMAUTH_CUSTOM_AUTH_MODE": "sometimes"})


def test_decorator_replaces_configured_hook(app_factory: Any, tmp_path: Any,
                                            monkeypatch: Any) -> None:
    (tmp_path / "cfg_hook.py").write_text(HOOK_SOURCE.format(token=TOKEN, user="configured"))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app(app_factory, custom_auth="cfg_hook.authenticate")
    client = app.test_client()
    assert chat(client).get_json()["principal"]["user_id"] == "configured"
    app.llmauth.custom_auth(lambda request, api_key: {"user_id": "decorated"})
    assert chat(client).get_json()["principal"]["user_id"] == "decorated"


# -- custom_key_validate -----------------------------------------------------------------------


def test_custom_key_validate_can_refuse_a_valid_key(app_factory: Any) -> None:
    verdicts: dict[str, Any] = {}
    app = make_app(app_factory)
    client = app.test_client()
    key = new_key(client, key_alias="checked")

    @app.llmauth.custom_key_validate
    def validate(request: Any, principal: Principal) -> Any:
        assert principal.key_id == key["key_id"] and request.path == "/v1/chat/completions"
        if verdicts["next"] == "raise":
            raise RuntimeError("policy store down")
        if verdicts["next"] == "refuse-429":
            raise TooManyRequests("try later")
        return verdicts["next"]

    verdicts["next"] = True
    assert chat(client, key["key"]).status_code == 200
    for verdict in (False, None, "yes", 1, "raise"):
        verdicts["next"] = verdict
        error = assert_error(chat(client, key["key"]), 403, "permission_error")
        assert "validation policy" in error["message"]
    verdicts["next"] = "refuse-429"
    assert_error(chat(client, key["key"]), 429)
    # the master key is not a virtual key: never validated
    assert chat(client, MASTER_KEY).status_code == 200


def test_custom_key_validate_from_config(app_factory: Any, tmp_path: Any,
                                         monkeypatch: Any) -> None:
    (tmp_path / "validate_hook.py").write_text(HOOK_SOURCE.format(token=TOKEN, user="x"))
    monkeypatch.syspath_prepend(str(tmp_path))
    client = make_app(app_factory, custom_key_validate="validate_hook.validate").test_client()
    good = new_key(client, key_alias="fine")["key"]
    bad = new_key(client, key_alias="refused")["key"]
    assert chat(client, good).status_code == 200
    assert_error(chat(client, bad), 403)


def test_custom_key_validate_also_checks_keys_returned_by_a_hook(app_factory: Any) -> None:
    app = make_app(app_factory, custom_auth_mode="auto")
    client = app.test_client()
    key = new_key(client, key_alias="via-hook")
    app.llmauth.custom_auth(lambda request, api_key: key["key"] if api_key == TOKEN else None)
    verdicts = {"next": True}
    app.llmauth.custom_key_validate(lambda request, principal: verdicts["next"])
    assert chat(client).get_json()["principal"]["key_id"] == key["key_id"]
    verdicts["next"] = False
    assert_error(chat(client), 403)
