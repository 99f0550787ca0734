"""Configuration: every setting from every source, precedence, validation at init_app,
the master/salt key rules, show-config masking, and several apps in one process."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from flask import Flask

from flask_llmauth import LLMAuth
from flask_llmauth.config import (
    DEFAULT_AUTH_ORDER,
    PREFIX,
    Settings,
    check_secrets,
    load_settings,
    mask_secret,
)
from flask_llmauth.durations import Duration
from flask_llmauth.errors import ConfigurationError
from flask_llmauth.money import to_usd
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key, record_secret

OTHER_MASTER = record_secret("sk-other-" + "Zq8Xw2Lr5Tn7Vb0Mc4Kd9Fh1Jg3Hs6Pa")
SALT = record_secret("salt-" + "Pq7Wm2Xn4Rb8Tc1Vd5Ze9Yf3Ug6Sh0Ki")
LOADED_MASTER = record_secret("sk-loaded-" + "Fj3Kd8Ls2Qw7Ep5Rt1Yu9Io4Pa6Sd0Gh")
ENV_MASTER = record_secret("sk-env-" + "Lk4Jh7Gf2Ds9Ap5Oi1Uy8Tr3Ew6Qz0Xc")
YAML_MASTER = record_secret("sk-yaml-" + "Mn5Bv8Cx2Za7Sd4Fg1Hj9Kl3Qw6Er0Ty")
CTOR_MASTER = record_secret("sk-ctor-" + "Po9Iu4Yt7Re2Wq5As8Df1Gh3Jk6Lz0Xm")
DB_PASSWORD = record_secret("pgPassw0rd-" + "Ux7Rk2Vm9Lq4")
REDIS_PASSWORD = record_secret("redisPassw0rd-" + "Hy3Nc8Bt5")
PROVIDER_KEY = record_secret("sk-provider-" + "Aa1Bb2Cc3Dd4Ee5Ff6Gg7Hh8")

EMPTY_YAML = str(Path(__file__).parent / "data" / "empty_litellm_config.yaml")

# -- one valid, non-default value per setting ---------------------------------------------------
# ``(raw value as Flask config / constructor / YAML would give it, the parsed value)``.
# Environment variables are strings: ENV_SAMPLES overrides the raw value where it differs.

SAMPLES: dict[str, tuple[Any, Any]] = {
    "config_file": (EMPTY_YAML, EMPTY_YAML),
    "master_key": (OTHER_MASTER, OTHER_MASTER),
    "insecure_dev_mode": (True, True),
    "salt_key": (SALT, SALT),
    "proxy_admin_name": ("ops-admin", "ops-admin"),
    "master_key_alias": ("master-alias", "master-alias"),
    "database_url": ("postgresql://llmauth@db.internal:5432/llmauth",
                     "postgresql://llmauth@db.internal:5432/llmauth"),
    "auto_migrate": (False, False),
    "redis_url": ("redis://cache.internal:6379/2", "redis://cache.internal:6379/2"),
    "auth_order": (["virtual_key", "master_key"], ("virtual_key", "master_key")),
    "key_header_name": ("X-Gateway-Key", "X-Gateway-Key"),
    "max_credential_length": (4096, 4096),
    "public_routes": (["/status", "/docs/*", "LiteLLMRoutes.public_routes"],
                      ("/status", "/docs/*", "LiteLLMRoutes.public_routes")),
    "trusted_proxy_ranges": (["10.0.0.0/8"], ("10.0.0.0/8",)),
    "allowed_routes": (["openai_routes", "/key/info"], ("openai_routes", "/key/info")),
    "admin_only_routes": (["/admin/*"], ("/admin/*",)),
    "allowed_ips": (["192.168.1.0/24", "::1"], ("192.168.1.0/24", "::1/128")),
    "model_access_groups": ({"beta": ["gpt-5", "o3"]}, {"beta": ["gpt-5", "o3"]}),
    "model_alias_map": ({"fast": "gpt-4o-mini"}, {"fast": "gpt-4o-mini"}),
    "model_list": ([{"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}}],
                   ({"model_name": "gpt-4o", "litellm_params": {"model": "openai/gpt-4o"}},)),
    "default_team_member_permissions": (["/key/info", "/key/generate"],
                                        ("/key/info", "/key/generate")),
    "key_entropy_bytes": (48, 48),
    "key_rotation_grace_period": ("24h", "24h"),
    "cache_ttl": (5.5, 5.5),
    "cache_max_size": (500, 500),
    "negative_cache_ttl": (1.5, 1.5),
    "cache_sync_interval": (0.25, 0.25),
    "last_used_flush_interval": (10, 10.0),
    "store_audit_logs": (False, False),
    "api_enabled": (False, False),
    "api_prefix": ("/llm", "/llm"),
    "max_api_body_size": (65536, 65536),
    "max_request_size_mb": (2.5, 2.5),
    "cli_name": ("keys", "keys"),
    "custom_auth": ("hooks.auth.check", "hooks.auth.check"),
    "custom_auth_mode": ("auto", "auto"),
    "custom_key_validate": ("hooks.auth.validate", "hooks.auth.validate"),
    "enable_oauth2_proxy_auth": (True, True),
    "oauth2_config_mappings": ({"user_id": "X-Forwarded-User"}, {"user_id": "X-Forwarded-User"}),
    "oauth2_proxy_sets_privilege_headers": (True, True),
    "ratelimit_enabled": (False, False),
    "ratelimit_storage_uri": ("redis+sentinel://s1:26379,s2:26379/mymaster",
                              "redis+sentinel://s1:26379,s2:26379/mymaster"),
    "ratelimit_storage_options": ({"socket_timeout": 0.5}, {"socket_timeout": 0.5}),
    "ratelimit_key_prefix": ("gw", "gw"),
    "ratelimit_window": (30, 30),
    "ratelimit_global_rpm": (1000, 1000),
    "ratelimit_global_tpm": (500000, 500000),
    "ratelimit_global_max_parallel_requests": (64, 64),
    "ratelimit_token_type": ("output", "output"),
    "ratelimit_tpm_estimate": (True, True),
    "ratelimit_headers_enabled": (False, False),
    "ratelimit_storage_down": ("memory", "memory"),
    "ratelimit_retry_interval": (2.5, 2.5),
    "ratelimit_parallel_lease": (120, 120),
    "ratelimit_multiprocess_memory": ("refuse", "refuse"),
    "worker_processes": (4, 4),
    "auth_failure_limit": ("10/minute;100/hour", "10/minute;100/hour"),
    "auth_failure_ipv6_prefix": ("56", 56),
    "model_prices": ({"my-model": {"input_cost_per_token": "0.000001",
                                    "output_cost_per_token": 2e-06}},
                     {"my-model": {"input_cost_per_token": "0.000001",
                                   "output_cost_per_token": 2e-06}}),
    "unknown_model_price": ({"input_cost_per_token": 1e-06}, {"input_cost_per_token": 1e-06}),
    "default_max_tokens": (1024, 1024),
    "prompt_media_tokens": (1600, 1600),
    "spend_enabled": (False, False),
    "spend_flush_interval": (0.25, 0.25),
    "spend_batch_size": (100, 100),
    "spend_queue_limit": (5000, 5000),
    "budgets_enabled": (False, False),
    "max_budget": ("12.5", 12_500_000_000),
    "budget_duration": ("30d", "30d"),
    "end_user_budget_duration": ("7d", "7d"),
    "budget_reservation_ttl": (600, 600),
    "budget_reset_interval": (60.0, 60.0),
    "budget_lease_requests": (20, 20),
    "budget_lease_fraction": (0.5, 0.5),
    "budget_lease_idle": (2.5, 2.5),
    "enable_oauth2_auth": (True, True),
    "oauth2_token_info_endpoint": ("https://idp.example/oauth2/introspect",
                                   "https://idp.example/oauth2/introspect"),
    "oauth2_allow_insecure_http": (True, True),
    "oauth2_mode": ("token_info", "token_info"),
    "oauth2_client_id": ("gateway", "gateway"),
    "oauth2_audience": (["https://llm.example", "gw"], ("https://llm.example", "gw")),
    "oauth2_client_secret": (SALT, SALT),
    "oauth2_user_id_field_name": ("uid", "uid"),
    "oauth2_user_role_field_name": ("claims.role", "claims.role"),
    "oauth2_user_team_id_field_name": ("grp", "grp"),
    "oauth2_unknown_role_default": ("INTERNAL_USER_VIEWER", "internal_user_viewer"),
    "oauth2_cache_ttl": (30, 30.0),
    "oauth2_timeout": (2.5, 2.5),
    "enable_jwt_auth": (True, True),
    "jwt_public_key_url": (["https://idp.example/jwks", "https://idp2.example/.well-known/"
                            "openid-configuration"],
                           ("https://idp.example/jwks",
                            "https://idp2.example/.well-known/openid-configuration")),
    "jwt_audience": (["api://gateway", "gateway"], ("api://gateway", "gateway")),
    "jwt_issuer": ("https://idp.example", "https://idp.example"),
    "jwt_admin_scope": ("gateway.admin", "gateway.admin"),
    "jwt_admin_allowed_routes": (["management_routes", "openai_routes"],
                                 ("management_routes", "openai_routes")),
    "jwt_team_id_field": ("org.team_id", "org.team_id"),
    "jwt_team_ids_field": ("groups", "groups"),
    "jwt_team_id_default": ("team-default", "team-default"),
    "jwt_team_id_upsert": (True, True),
    "jwt_team_allowed_routes": (["openai_routes"], ("openai_routes",)),
    "jwt_enforce_team_based_model_access": (True, True),
    "jwt_user_id_field": ("sub", "sub"),
    "jwt_user_email_field": ("upn", "upn"),
    "jwt_user_allowed_email_domain": ("corp.example", "corp.example"),
    "jwt_user_id_upsert": (True, True),
    "jwt_require_verified_email": (False, False),
    "jwt_user_roles_field": ("realm_access.roles", "realm_access.roles"),
    "jwt_user_allowed_roles": (["llm-user"], ("llm-user",)),
    "jwt_org_id_field": ("org.id", "org.id"),
    "jwt_end_user_id_field": ("act.sub", "act.sub"),
    "jwt_roles_field": ("roles", "roles"),
    "jwt_role_mappings": ([{"role": "admins", "internal_role": "proxy_admin"}],
                          ({"role": "admins", "internal_role": "proxy_admin"},)),
    "jwt_object_id_field": ("oid", "oid"),
    "jwt_scope_mappings": ([{"scope": "llm.gpt", "models": ["gpt-4o"]}],
                           ({"scope": "llm.gpt", "models": ["gpt-4o"]},)),
    "jwt_enforce_scope_based_access": (True, True),
    "jwt_enforce_rbac": (True, True),
    "jwt_custom_validate": ("hooks.jwt.validate", "hooks.jwt.validate"),
    "jwt_issuers": ([{"issuer": "https://a.example", "audience": "gw"}],
                    ({"issuer": "https://a.example", "audience": "gw"},)),
    "jwt_public_key_ttl": (120, 120.0),
    "jwt_public_key_stale_ttl": (60, 60.0),
    "jwt_kid_refetch_cooldown": (5, 5.0),
    "jwt_fetch_failure_backoff": (2.5, 2.5),
    "jwt_http_timeout": (2, 2.0),
    "jwt_allow_insecure_http": (True, True),
    "jwt_algorithms": (["RS256", "ES256"], ("RS256", "ES256")),
    "jwt_leeway": (30, 30.0),
    "jwt_max_lifetime": (3600, 3600.0),
    "jwt_required_claims": (["exp", "iat", "sub"], ("exp", "iat", "sub")),
    "jwt_require_at_jwt_typ": (True, True),
    "jwt_max_token_length": (4096, 4096),
    "jwt_cache_ttl": (30, 30.0),
    "jwt_oidc_userinfo_enabled": (True, True),
    "jwt_oidc_userinfo_endpoint": ("https://idp.example/userinfo",
                                   "https://idp.example/userinfo"),
    "jwt_oidc_userinfo_cache_ttl": (60, 60.0),
    "user_header_mappings": ([{"header_name": "x-openwebui-user-id",
                               "litellm_user_role": "customer"}],
                             ({"header_name": "x-openwebui-user-id",
                               "litellm_user_role": "customer"},)),
    "user_header_name": ("x-end-user", "x-end-user"),
    "enforce_user_param": (True, True),
    "max_end_user_budget": ("2.5", 2_500_000_000),
}
ENV_SAMPLES: dict[str, str] = {
    "jwt_public_key_url": "https://idp.example/jwks,https://idp2.example/.well-known/"
                          "openid-configuration",
    "jwt_audience": "api://gateway,gateway",
    "insecure_dev_mode": "true",
    "key_entropy_bytes": "48",
    "store_audit_logs": "false",
    "ratelimit_window": "30",
    "default_max_tokens": "1024",
    "budgets_enabled": "false",
    "budget_reservation_ttl": "600",
    "budget_reset_interval": "60",
    "budget_lease_requests": "20",
    "budget_lease_fraction": "0.5",
    "budget_lease_idle": "2.5",
}
FIELDS = {f.name: f for f in Settings.table()}


def comparable(value: Any) -> Any:
    """A parsed value in the shape SAMPLES spells it (networks and durations as text)."""
    if isinstance(value, tuple):
        return tuple(comparable(v) for v in value)
    if isinstance(value, Duration):
        return value.text
    if hasattr(value, "with_prefixlen"):
        return str(value)
    return value


def test_every_setting_has_a_sample() -> None:
    missing = sorted(set(FIELDS) - set(SAMPLES))
    assert not missing, (
        f"add a sample value for {[PREFIX + m.upper() for m in missing]} to SAMPLES in "
        "tests/test_config.py (every setting has a test)")
    for name, (_, expected) in SAMPLES.items():
        assert comparable(FIELDS[name].default) != expected, f"{name}: sample equals default"


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_setting_from_flask_config_and_constructor(name: str) -> None:
    raw, expected = SAMPLES[name]
    key = PREFIX + name.upper()
    from_config = load_settings({key: raw}, environ={})
    assert comparable(getattr(from_config, name)) == expected
    assert from_config.source(name) == key
    from_ctor = load_settings({}, {name: raw}, environ={})
    assert comparable(getattr(from_ctor, name)) == expected
    assert from_ctor.source(name) == f"LLMAuth({name}=...)"
    untouched = next(n for n in FIELDS if n != name)
    assert from_config.source(untouched) == "default"
    assert getattr(from_config, untouched) == getattr(load_settings({}, environ={}), untouched)


YAML_FIELDS = sorted(n for n, f in FIELDS.items() if f.metadata["yaml"])


@pytest.mark.parametrize("name", YAML_FIELDS)
def test_setting_from_litellm_yaml(name: str, tmp_path: Path) -> None:
    raw, expected = SAMPLES[name]
    for path in FIELDS[name].metadata["yaml"]:
        doc: dict[str, Any] = {}
        node = doc
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = list(raw) if isinstance(raw, tuple) else raw
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump(doc))
        settings = load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
        assert comparable(getattr(settings, name)) == expected, path
        assert settings.source(name) == f"YAML {path}"


@pytest.mark.parametrize("name", sorted(n for n, f in FIELDS.items() if f.metadata["env"]))
def test_setting_from_litellm_environment_variable(name: str) -> None:
    raw, expected = SAMPLES[name]
    value = ENV_SAMPLES.get(name, raw if isinstance(raw, str) else json.dumps(raw))
    for env_name in FIELDS[name].metadata["env"]:
        settings = load_settings({}, environ={env_name: value})
        assert comparable(getattr(settings, name)) == expected, env_name
        assert settings.source(name) == f"environment {env_name}"
        # An empty variable counts as unset, as in a shell.
        assert load_settings({}, environ={env_name: ""}).source(name) == "default"


@pytest.mark.parametrize("name", sorted(n for n, f in FIELDS.items() if f.metadata["secret"]))
def test_secret_setting_from_secret_loader(name: str) -> None:
    raw, expected = SAMPLES[name]
    asked: list[str] = []

    def loader(key: str) -> str | None:
        asked.append(key)
        return raw if key == PREFIX + name.upper() else None

    settings = load_settings({}, environ={}, secret_loader=loader)
    assert getattr(settings, name) == expected
    assert settings.source(name) == "secret loader"
    # Only secrets are asked for, each once, by their Flask config key.
    secret_keys = sorted(PREFIX + n.upper() for n, f in FIELDS.items() if f.metadata["secret"])
    assert sorted(asked) == secret_keys


def test_non_secret_settings_never_ask_the_secret_loader() -> None:
    asked: list[str] = []
    load_settings({}, environ={}, secret_loader=lambda key: asked.append(key))
    assert asked and all(FIELDS[k[len(PREFIX):].lower()].metadata["secret"] for k in asked)
    assert "LLMAUTH_API_PREFIX" not in asked


def test_precedence_constructor_config_yaml_loader_environment_default(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"general_settings": {"master_key": YAML_MASTER}}))
    layers: list[tuple[str, str]] = [
        ("constructor", CTOR_MASTER), ("config", OTHER_MASTER), ("yaml", YAML_MASTER),
        ("loader", LOADED_MASTER), ("environment", ENV_MASTER),
    ]
    sources = {"constructor": "LLMAuth(master_key=...)", "config": "LLMAUTH_MASTER_KEY",
               "yaml": "YAML general_settings.master_key", "loader": "secret loader",
               "environment": "environment LITELLM_MASTER_KEY"}
    for top in range(len(layers) + 1):
        present = {name for name, _ in layers[top:]}
        config: dict[str, Any] = {}
        if "config" in present:
            config["LLMAUTH_MASTER_KEY"] = OTHER_MASTER
        if "yaml" in present:
            config["LLMAUTH_CONFIG_FILE"] = str(config_file)
        settings = load_settings(
            config, {"master_key": CTOR_MASTER} if "constructor" in present else {},
            environ={"LITELLM_MASTER_KEY": ENV_MASTER} if "environment" in present else {},
            secret_loader=(lambda key: LOADED_MASTER if key == "LLMAUTH_MASTER_KEY" else None)
            if "loader" in present else None,
        )
        if top == len(layers):
            assert settings.master_key is None and settings.source("master_key") == "default"
        else:
            name, value = layers[top]
            assert settings.master_key == value, name
            assert settings.source("master_key") == sources[name]


def test_none_counts_as_unset_in_every_layer(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("general_settings:\n  master_key: null\n")
    settings = load_settings({"LLMAUTH_MASTER_KEY": None, "LLMAUTH_CONFIG_FILE": str(config_file)},
                             {"master_key": None}, environ={"LITELLM_MASTER_KEY": ENV_MASTER})
    assert settings.master_key == ENV_MASTER


# -- through init_app -----------------------------------------------------------------------------


def make_app(tmp_path: Path, config: dict[str, Any] | None = None, *, name: str = "cfg",
             **options: Any) -> Flask:
    app = Flask(name, instance_path=str(tmp_path / "instance"))
    app.config["LLMAUTH_DATABASE_URL"] = f"sqlite:///{tmp_path}/{name}.db"
    app.config.update(config or {})
    LLMAuth(app, **options)

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        from flask_llmauth import current_principal
        return {"user_id": current_principal.user_id, "role": current_principal.role.value}

    return app


def close(app: Flask) -> None:
    app.extensions["llmauth"].close()


def test_litellm_environment_variables_configure_a_real_app(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_MASTER_KEY", ENV_MASTER)
    monkeypatch.setenv("LITELLM_SALT_KEY", SALT)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path}/from-env.db")
    app = Flask("envapp", instance_path=str(tmp_path / "instance"))
    LLMAuth(app)
    try:
        state = app.extensions["llmauth"]
        assert state.settings.source("master_key") == "environment LITELLM_MASTER_KEY"
        assert state.settings.source("salt_key") == "environment LITELLM_SALT_KEY"
        assert state.store.url == f"sqlite:///{tmp_path}/from-env.db"
        assert (tmp_path / "from-env.db").exists()
        client = app.test_client()
        assert client.get("/key/list", headers=bearer(ENV_MASTER)).status_code == 200
        assert_error(client.get("/key/list", headers=ADMIN), 401)
    finally:
        close(app)


def test_litellm_yaml_with_os_environ_references(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_MASTER", YAML_MASTER)
    monkeypatch.setenv("MY_DB", f"sqlite:///{tmp_path}/yaml.db")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY}\n"
        "general_settings:\n"
        "  master_key: os.environ/MY_MASTER\n"
        "  database_url: os.environ/MY_DB\n"
        "  public_routes: [\"LiteLLMRoutes.public_routes\", \"/status\"]\n"
        "  alerting: [slack]\n"            # a LiteLLM setting this library does not use
        "litellm_settings:\n"
        "  store_audit_logs: false\n"
    )
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
    app = Flask("yamlapp", instance_path=str(tmp_path / "instance"))
    app.config["LLMAUTH_CONFIG_FILE"] = str(config_file)
    LLMAuth(app)
    try:
        settings = app.extensions["llmauth"].settings
        assert settings.master_key == YAML_MASTER
        assert settings.database_url == f"sqlite:///{tmp_path}/yaml.db"
        assert settings.public_routes == ("LiteLLMRoutes.public_routes", "/status")
        assert settings.store_audit_logs is False
        assert app.test_client().get("/key/list", headers=bearer(YAML_MASTER)).status_code == 200
    finally:
        close(app)


def test_model_list_provider_credentials_are_kept_as_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LiteLLM config names its providers' keys (``api_key: os.environ/OPENAI_API_KEY``);
    this library never reads them, so a gateway sharing the file need not hold them: the
    references stay as written (set or not). The fields it reads are still resolved, and an
    unset one fails naming the entry."""
    monkeypatch.setenv("OPENAI_API_KEY", PROVIDER_KEY)
    monkeypatch.setenv("DEPLOYMENT", "openai/gpt-4o")
    monkeypatch.delenv("AZURE_API_KEY", raising=False)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "model_list:\n"
        "  - model_name: gpt-4o\n"
        "    litellm_params: {model: os.environ/DEPLOYMENT, api_key: os.environ/OPENAI_API_KEY}\n"
        "  - model_name: azure-gpt\n"
        "    litellm_params:\n"
        "      model: azure/gpt-4o\n"
        "      api_key: os.environ/AZURE_API_KEY\n"
        "      api_base: os.environ/AZURE_API_BASE\n"
        "      input_cost_per_token: 0.000001\n")
    settings = load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)})
    first, second = settings.model_list
    assert first["litellm_params"] == {"model": "openai/gpt-4o",
                                       "api_key": "os.environ/OPENAI_API_KEY"}
    assert second["litellm_params"]["api_key"] == "os.environ/AZURE_API_KEY"
    assert second["litellm_params"]["api_base"] == "os.environ/AZURE_API_BASE"
    assert second["litellm_params"]["input_cost_per_token"] == 0.000001
    monkeypatch.delenv("DEPLOYMENT")
    with pytest.raises(ConfigurationError) as info:
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)})
    assert str(info.value) == ("LLMAUTH_MODEL_LIST (from YAML model_list[0].litellm_params.model):"
                               " environment variable DEPLOYMENT is not set")


def test_yaml_reference_to_a_missing_variable_fails_naming_key_and_path(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("general_settings:\n  master_key: os.environ/NOT_SET_ANYWHERE\n")
    with pytest.raises(ConfigurationError) as info:
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    assert str(info.value) == ("LLMAUTH_MASTER_KEY (from YAML general_settings.master_key): "
                               "environment variable NOT_SET_ANYWHERE is not set")


@pytest.mark.parametrize("content,fragment", [
    ("general_settings: [1, 2\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("general_settings: 3\n", "general_settings must be a mapping"),
    ("litellm_settings: [max_budget]\n", "litellm_settings must be a mapping"),
])
def test_bad_yaml_file_fails(tmp_path: Path, content: str, fragment: str) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(content)
    with pytest.raises(ConfigurationError, match="LLMAUTH_CONFIG_FILE") as info:
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    assert fragment in str(info.value)
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_settings({"LLMAUTH_CONFIG_FILE": str(tmp_path / "missing.yaml")}, environ={})


def test_a_misspelt_yaml_key_is_a_warning_naming_the_key_meant(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A key flask_llmauth does not read is LiteLLM's business and stays quiet (INFO); one
    that looks like a misspelling of a key it reads leaves that setting unset, so it warns."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(
        "general_settings:\n  master_kye: sk-x\n  public_route: [/x]\n"
        "  max_parallel_requests: 3\n  alerting: [slack]\n"
        "litellm_settings:\n  max_budgt: 10\n  drop_params: true\n  max_budget: 5\n")
    with caplog.at_level(logging.INFO, logger="flask_llmauth"):
        settings = load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    assert to_usd(settings.max_budget) == 5
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == [
        "llmauth: general_settings.master_kye in LLMAUTH_CONFIG_FILE is not read "
        "(did you mean general_settings.master_key?)",
        "llmauth: general_settings.public_route in LLMAUTH_CONFIG_FILE is not read "
        "(did you mean general_settings.public_routes?)",
        "llmauth: litellm_settings.max_budgt in LLMAUTH_CONFIG_FILE is not read "
        "(did you mean litellm_settings.max_budget?)",
    ]
    assert "sk-x" not in caplog.text


def test_a_relative_config_file_is_read_from_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative LLMAUTH_CONFIG_FILE is opened from the working directory (as LiteLLM's
    ``--config``), not the app's folder; when it is missing the message says where it
    looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError) as info:
        load_settings({"LLMAUTH_CONFIG_FILE": "config.yaml"}, environ={})
    assert str(info.value) == (
        "LLMAUTH_CONFIG_FILE: cannot read 'config.yaml' (from the working directory: "
        f"{tmp_path / 'config.yaml'}): No such file or directory")
    (tmp_path / "config.yaml").write_text("general_settings: {}\n")
    load_settings({"LLMAUTH_CONFIG_FILE": "config.yaml"}, environ={})


def test_secret_loader_argument_and_decorator_before_init_app(tmp_path: Path) -> None:
    vault = {"LLMAUTH_MASTER_KEY": LOADED_MASTER, "LLMAUTH_SALT_KEY": SALT}
    app = make_app(tmp_path, name="loader_arg", secret_loader=vault.get)
    try:
        assert app.extensions["llmauth"].settings.source("master_key") == "secret loader"
        assert app.test_client().get("/key/list",
                                     headers=bearer(LOADED_MASTER)).status_code == 200
    finally:
        close(app)

    llmauth = LLMAuth()
    asked: list[str] = []

    @llmauth.secret_loader
    def from_vault(key: str) -> str | None:
        asked.append(key)
        return vault.get(key)

    assert from_vault("LLMAUTH_SALT_KEY") == SALT  # the decorator returns the function
    app = Flask("loader_deco", instance_path=str(tmp_path / "instance"))
    app.config["LLMAUTH_DATABASE_URL"] = f"sqlite:///{tmp_path}/deco.db"
    llmauth.init_app(app)
    try:
        assert "LLMAUTH_MASTER_KEY" in asked
        state = app.extensions["llmauth"]
        assert state.settings.master_key == LOADED_MASTER
        assert state.settings.salt_key == SALT
    finally:
        close(app)


def test_failing_secret_loader_fails_init_app_without_its_message(tmp_path: Path) -> None:
    def loader(key: str) -> str | None:
        raise KeyError(f"vault said no for {LOADED_MASTER}")

    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, secret_loader=loader)
    assert str(info.value) == ("LLMAUTH_MASTER_KEY (from secret loader): the secret loader "
                               "failed with KeyError")


# -- validation ------------------------------------------------------------------------------------


def test_unknown_key_fails_with_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_CAHCE_TTL": 5})
    assert str(info.value) == ("LLMAUTH_CAHCE_TTL: unknown setting "
                               "(did you mean LLMAUTH_CACHE_TTL?)")
    with pytest.raises(ConfigurationError, match=r"^LLMAUTH_ZZZZZZZZ: unknown setting$"):
        load_settings({"LLMAUTH_ZZZZZZZZ": 1}, environ={})
    with pytest.raises(ConfigurationError, match="unknown option.*cache_tll"):
        LLMAuth(cache_tll=5).init_app(Flask("x"))
    # Other extensions' keys and the test harness's keys are not ours to judge.
    load_settings({"SQLALCHEMY_DATABASE_URI": "x", "LLMAUTH_TEST_ANYTHING": 1}, environ={})


BAD_VALUES: list[tuple[str, Any, str]] = [
    ("master_key", 12345, "must be a string"),
    ("insecure_dev_mode", "maybe", "must be a boolean"),
    ("proxy_admin_name", "  ", "must be a non-empty string"),
    ("master_key_alias", "", "must be a non-empty string"),
    ("database_url", "mysql://u@h/db", "must be a sqlite:///path or postgresql://"),
    ("database_url", "nonsense", "must be a sqlite:///path or postgresql://"),
    ("database_url", "postgresql://u@h/", "has no database name"),
    ("database_url", "", "is empty: give a database URL"),
    ("database_url", "  ", "is empty: give a database URL"),
    ("redis_url", "", "is empty: give a Redis URL (redis://host:6379/0), or leave the key out"),
    ("redis_url", " ", "is empty: give a Redis URL"),
    ("salt_key", "", "is empty: give at least 32 random characters, or leave the key out"),
    ("auto_migrate", "sometimes", "must be a boolean"),
    ("auth_order", [], "must name at least one authenticator"),
    ("auth_order", "master_key,virtual_key,master_key", "names master_key more than once"),
    ("auth_order", [1], "must be a list of strings"),
    ("key_header_name", "X Key", "must be an HTTP header name"),
    ("max_credential_length", 10, "must be at least 64"),
    ("max_credential_length", 100.5, "must be an integer"),
    ("max_credential_length", "lots", "must be an integer"),
    ("public_routes", ["LiteLLMRoutes.publik_routes"], "is neither a path"),
    ("public_routes", "[1, 2]", "must be a list of strings"),
    ("trusted_proxy_ranges", ["10.0.0.0/33"], "is not an IP address or CIDR range"),
    ("allowed_routes", ["openai_route"], "is neither a path"),
    ("admin_only_routes", ["admin/*"], "is neither a path"),
    ("allowed_ips", ["not-an-ip"], "is not an IP address or CIDR range"),
    ("model_access_groups", {"g": "gpt-4o"}, "must map each group name to a list"),
    ("model_access_groups", "{not json", "Expecting property name"),
    ("model_alias_map", {"fast": 3}, "must map strings to strings"),
    ("model_list", [{"litellm_params": {}}], "entry 0 has no model_name string"),
    ("model_list", [{"model_name": "x", "model_info": []}], "model_info must be a mapping"),
    ("default_team_member_permissions", ["key/info"], "is neither a path"),
    ("key_entropy_bytes", 16, "must be at least 24"),
    ("key_rotation_grace_period", "forever", "invalid duration"),
    ("cache_ttl", float("nan"), "must be a finite number"),
    ("cache_ttl", -1, "must be at least 0"),
    ("cache_max_size", 0, "must be at least 1"),
    ("negative_cache_ttl", "inf", "must be a finite number"),
    ("cache_sync_interval", 0, "must be at least 0.05"),
    ("last_used_flush_interval", True, "must be a finite number"),
    ("store_audit_logs", 2, "must be a boolean"),
    ("api_enabled", "enabled", "must be a boolean"),
    ("api_prefix", "llm", "must be empty or a path"),
    ("api_prefix", "/llm/", "must be empty or a path"),
    ("max_api_body_size", 10, "must be at least 1024"),
    ("max_request_size_mb", 0, "must be at least 0.000976562 (1 KiB)"),
    ("cli_name", "Key Tool", "must be a lower-case command name"),
    ("custom_auth", 3, 'must be "module.function" or a callable'),
    ("custom_auth_mode", "sometimes", "must be one of on, off, auto"),
    ("custom_key_validate", ["x"], 'must be "module.function" or a callable'),
    ("enable_oauth2_proxy_auth", "maybe", "must be a boolean"),
    ("oauth2_config_mappings", ["X-Forwarded-User"], "must be a mapping"),
    ("oauth2_proxy_sets_privilege_headers", 2, "must be a boolean"),
    ("ratelimit_enabled", "yes please", "must be a boolean"),
    ("ratelimit_storage_uri", "postgres://db/x", "must be a `limits` storage URI"),
    ("ratelimit_storage_uri", "localhost:6379", "must be a `limits` storage URI"),
    ("ratelimit_storage_options", ["socket_timeout"], "must be a mapping"),
    ("ratelimit_key_prefix", " ", "must be a non-empty string"),
    ("ratelimit_window", 0, "must be at least 1"),
    ("ratelimit_global_rpm", "many", "must be an integer"),
    ("ratelimit_global_tpm", 0, "must be at least 1"),
    ("ratelimit_global_max_parallel_requests", 2.5, "must be an integer"),
    ("ratelimit_token_type", "prompt", "must be one of total, input, output"),
    ("ratelimit_tpm_estimate", "2", "must be a boolean"),
    ("ratelimit_headers_enabled", 3, "must be a boolean"),
    ("ratelimit_storage_down", "retry", "must be one of closed, open, memory"),
    ("ratelimit_retry_interval", 0, "must be at least 0.05"),
    ("ratelimit_parallel_lease", -5, "must be at least 1"),
    ("ratelimit_multiprocess_memory", "ignore", "must be one of warn, refuse"),
    ("worker_processes", 0, "must be at least 1"),
    ("auth_failure_limit", "lots", "is not a rate limit string"),
    ("auth_failure_limit", 30, "must be a rate limit string"),
    ("auth_failure_ipv6_prefix", 129, "must be a prefix length from 1 to 128"),
    ("auth_failure_ipv6_prefix", "wide", "must be an integer"),
    ("enable_oauth2_auth", "maybe", "must be a boolean"),
    ("oauth2_token_info_endpoint", "idp.example/introspect", "must be an http(s) URL"),
    ("oauth2_allow_insecure_http", "perhaps", "must be a boolean"),
    ("oauth2_mode", "both", "must be one of auto, introspection, token_info"),
    ("oauth2_client_id", 7, "must be a string"),
    ("oauth2_audience", [1], "must be a list of strings"),
    ("oauth2_client_secret", ["x"], "must be a string"),
    ("oauth2_user_id_field_name", 1, "must be a string"),
    ("oauth2_user_role_field_name", " ", "must be a non-empty string"),
    ("oauth2_user_team_id_field_name", {}, "must be a string"),
    ("oauth2_unknown_role_default", "god", "unknown role"),
    ("oauth2_cache_ttl", -1, "must be at least 0"),
    ("oauth2_timeout", 0, "must be at least 0.1"),
    ("enable_jwt_auth", "jwt", "must be a boolean"),
    ("jwt_public_key_url", "ftp://idp.example/jwks", "must be an http(s) URL"),
    ("jwt_audience", [1], "must be a list of strings"),
    ("jwt_issuer", 7, "must be a string"),
    ("jwt_admin_scope", ["a"], "must be a string"),
    ("jwt_admin_allowed_routes", ["management_route"], "is neither a path"),
    ("jwt_team_id_field", "roles.0", "list indexes"),
    ("jwt_team_ids_field", "groups[0]", "list indexes"),
    ("jwt_team_id_default", 3, "must be a string"),
    ("jwt_team_id_upsert", "always", "must be a boolean"),
    ("jwt_team_allowed_routes", ["openai"], "is neither a path"),
    ("jwt_enforce_team_based_model_access", 5, "must be a boolean"),
    ("jwt_user_id_field", "a..b", "not a claim name or dot path"),
    ("jwt_user_email_field", 1, "must be a string"),
    ("jwt_user_allowed_email_domain", "bob@corp.example", "must be an email domain"),
    ("jwt_user_id_upsert", "perhaps", "must be a boolean"),
    ("jwt_require_verified_email", "perhaps", "must be a boolean"),
    ("jwt_user_roles_field", "roles.[0]", "list indexes"),
    ("jwt_user_allowed_roles", [None], "must be a list of strings"),
    ("jwt_org_id_field", ".org", "not a claim name or dot path"),
    ("jwt_end_user_id_field", [], "must be a string"),
    ("jwt_roles_field", "roles.1", "list indexes"),
    ("jwt_role_mappings", [{"role": "a", "internal_role": "god"}],
     "internal_role must be one of"),
    ("jwt_role_mappings", [{"role": "a"}], "needs a `internal_role` string"),
    ("jwt_object_id_field", "x.0", "list indexes"),
    ("jwt_scope_mappings", [{"scope": "s", "model": ["x"]}], "unknown field(s) ['model']"),
    ("jwt_scope_mappings", [{"scope": "s", "routes": ["nope"]}], "is neither a path"),
    ("jwt_enforce_scope_based_access", "on-ish", "must be a boolean"),
    ("jwt_enforce_rbac", 9, "must be a boolean"),
    ("jwt_custom_validate", 3, 'must be "module.function" or a callable'),
    ("jwt_issuers", [{"issuer": "https://a.example"}], "set `audience`"),
    ("jwt_issuers", [{"issuer": "https://a.example", "audience": "x", "aud": "y"}],
     "unknown field(s) ['aud']"),
    ("jwt_issuers", [{"issuer": "https://a", "audience": "x"},
                     {"issuer": "https://a", "audience": "y"}], "listed twice"),
    ("jwt_issuers", [{"audience": "x"}], "needs a `issuer` string"),
    ("jwt_public_key_ttl", 0, "must be at least 1"),
    ("jwt_public_key_stale_ttl", -5, "must be at least 0"),
    ("jwt_kid_refetch_cooldown", "soon", "must be a finite number"),
    ("jwt_fetch_failure_backoff", -1, "must be at least 0"),
    ("jwt_http_timeout", 0, "must be at least 0.1"),
    ("jwt_allow_insecure_http", "sure", "must be a boolean"),
    ("jwt_algorithms", ["RS256", "HS256"], "only asymmetric algorithms"),
    ("jwt_algorithms", ["none"], "only asymmetric algorithms"),
    ("jwt_leeway", 3600, "must be at most 300 seconds"),
    ("model_prices", {"m": {"input_cost_per_token": -1}}, "model 'm': input_cost_per_token"),
    ("model_prices", {"m": {"input_price": 1e-06}}, "unknown price field(s) input_price"),
    ("model_prices", {"m": {"output_cost_per_token": "cheap"}}, "must be a number"),
    ("model_prices", {"m": 0.5}, "must be a mapping with input_cost_per_token"),
    ("unknown_model_price", {"input_cost_per_token": "nan"}, "non-negative finite number"),
    ("unknown_model_price", {}, "needs input_cost_per_token and/or output_cost_per_token"),
    ("default_max_tokens", -5, "must be at least 0"),
    ("prompt_media_tokens", -1, "must be at least 0"),
    ("prompt_media_tokens", "lots", "must be"),
    ("spend_enabled", "perhaps", "must be a boolean"),
    ("spend_flush_interval", 0, "must be at least 0.01"),
    ("spend_batch_size", 0, "must be at least 1"),
    ("spend_queue_limit", 10, "must be at least 100"),
    ("jwt_max_lifetime", -1, "must be at least 0"),
    ("jwt_required_claims", ["exp", "role"], "unknown registered claim(s) ['role']"),
    ("jwt_require_at_jwt_typ", "at+jwt", "must be a boolean"),
    ("jwt_max_token_length", 100, "must be at least 256"),
    ("jwt_cache_ttl", -3, "must be at least 0"),
    ("jwt_oidc_userinfo_enabled", "y-e-s", "must be a boolean"),
    ("jwt_oidc_userinfo_endpoint", "idp.example/userinfo", "must be an http(s) URL"),
    ("jwt_oidc_userinfo_cache_ttl", float("inf"), "must be a finite number"),
    ("user_header_mappings", [{"header_name": "x user", "litellm_user_role": "customer"}],
     "header_name must be an HTTP header name"),
    ("user_header_mappings", [{"header_name": "x-user", "litellm_user_role": "proxy_admin"}],
     "litellm_user_role must be customer or internal_user"),
    ("user_header_mappings", [{"header_name": "x-user"}], "needs a `litellm_user_role`"),
    ("user_header_name", "x user", "must be an HTTP header name"),
    ("enforce_user_param", "sometimes", "must be a boolean"),
    ("max_end_user_budget", -1, "must not be negative"),
    ("max_end_user_budget", "lots", "must be a number"),
    ("max_budget", -1, "must not be negative"),
    ("budget_duration", "3 fortnights", "invalid duration"),
    ("end_user_budget_duration", "0d", "greater than zero"),
    ("budget_reservation_ttl", 5, "must be at least 10"),
    ("budget_reset_interval", -1, "must be at least 0"),
    ("budget_lease_requests", -1, "must be at least 0"),
    ("budget_lease_fraction", 0, "above 0 and at most 1"),
    ("budget_lease_fraction", 2, "above 0 and at most 1"),
    ("budget_lease_idle", 0, "must be at least 0.05"),
    ("budgets_enabled", "maybe", "must be a boolean"),
]


@pytest.mark.parametrize("name,value,fragment", BAD_VALUES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_VALUES)])
def test_bad_value_fails_naming_key_and_source(name: str, value: Any, fragment: str) -> None:
    key = PREFIX + name.upper()
    with pytest.raises(ConfigurationError) as info:
        load_settings({key: value}, environ={})
    message = str(info.value)
    assert message.startswith(f"{key} (from {key}): "), message
    assert fragment in message


def test_every_setting_has_a_bad_value_test_or_takes_any_string() -> None:
    free_text = {"config_file", "redis_url", "salt_key"}  # any string is a valid value
    covered = {name for name, _, _ in BAD_VALUES} | free_text
    assert set(FIELDS) - covered == set(), "add a bad value to BAD_VALUES"


def test_bad_value_from_the_environment_names_the_variable() -> None:
    with pytest.raises(ConfigurationError) as info:
        load_settings({}, environ={"LENGTH_OF_LITELLM_GENERATED_KEY": "16"})
    assert str(info.value) == ("LLMAUTH_KEY_ENTROPY_BYTES (from environment "
                               "LENGTH_OF_LITELLM_GENERATED_KEY): must be at least 24")


def test_an_empty_database_url_fails_instead_of_hiding_database_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``FLASK_LLMAUTH_DATABASE_URL=`` in a deploy script, an empty YAML value or an empty
    variable the example gateway copies: init_app fails naming the key, rather than start
    on an empty SQLite file in the instance folder and ignore ``DATABASE_URL``."""
    exported = f"sqlite:///{tmp_path}/exported.db"
    monkeypatch.setenv("DATABASE_URL", exported)
    monkeypatch.setenv("FLASK_LLMAUTH_DATABASE_URL", "")
    app = Flask("empty", instance_path=str(tmp_path / "instance"))
    app.config.from_prefixed_env()
    app.config["LLMAUTH_MASTER_KEY"] = MASTER_KEY
    with pytest.raises(ConfigurationError) as info:
        LLMAuth(app)
    assert str(info.value).startswith(
        "LLMAUTH_DATABASE_URL (from LLMAUTH_DATABASE_URL): is empty: give a database URL")
    assert not (tmp_path / "instance").exists()
    config_file = tmp_path / "config.yaml"
    config_file.write_text("general_settings:\n  database_url: os.environ/EMPTY\n")
    with pytest.raises(ConfigurationError, match=r"^LLMAUTH_DATABASE_URL \(from YAML "
                       r"general_settings.database_url\): is empty"):
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={"EMPTY": ""})
    from example_app import create_app
    monkeypatch.setenv("GATEWAY_INSTANCE_PATH", str(tmp_path / "gateway"))
    monkeypatch.setenv("LLMAUTH_MASTER_KEY", MASTER_KEY)
    monkeypatch.setenv("LLMAUTH_DATABASE_URL", "")
    with pytest.raises(ConfigurationError, match="^LLMAUTH_DATABASE_URL .*: is empty"):
        create_app()
    # Left out, the exported DATABASE_URL applies (and an empty one counts as unset).
    assert load_settings({}, environ={"DATABASE_URL": exported}).database_url == exported
    assert load_settings({}, environ={"DATABASE_URL": ""}).source("database_url") == "default"


def test_an_empty_redis_url_or_salt_key_fails_instead_of_hiding_the_environment() -> None:
    """An empty ``LLMAUTH_REDIS_URL`` counted per process and hid ``REDIS_URL``; an empty
    ``LLMAUTH_SALT_KEY`` hid ``LITELLM_SALT_KEY`` and so changed every key hash."""
    environ = {"REDIS_URL": "redis://127.0.0.1:6379/0", "LITELLM_SALT_KEY": "s" * 40}
    for name in ("LLMAUTH_REDIS_URL", "LLMAUTH_SALT_KEY"):
        with pytest.raises(ConfigurationError, match=f"^{name} \\(from {name}\\): is empty"):
            load_settings({name: ""}, environ=environ)
    # Left out, the environment applies; an empty environment variable counts as unset.
    settings = load_settings({}, environ=environ)
    assert (settings.redis_url, settings.salt_key) == (environ["REDIS_URL"], "s" * 40)
    settings = load_settings({}, environ={"REDIS_URL": "", "LITELLM_SALT_KEY": ""})
    assert (settings.redis_url, settings.salt_key) == (None, None)


def test_database_url_errors_never_repeat_the_url() -> None:
    url = f"mysql://admin:{DB_PASSWORD}@db/x"
    with pytest.raises(ConfigurationError) as info:
        load_settings({"LLMAUTH_DATABASE_URL": url}, environ={})
    assert DB_PASSWORD not in str(info.value)


def test_bad_config_fails_at_init_app_before_the_database_is_touched(tmp_path: Path) -> None:
    database = tmp_path / "never.db"
    for config in (
        {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_AUTH_ORDER": ["master_key", "kerberos"]},
        {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_CACHE_TTL": "soon"},
        {"LLMAUTH_MASTER_KEY": "sk-1234"},
    ):
        app = Flask("bad", instance_path=str(tmp_path / "instance"))
        app.config.update(config, LLMAUTH_DATABASE_URL=f"sqlite:///{database}")
        with pytest.raises(ConfigurationError):
            LLMAuth(app)
        assert "llmauth" not in app.extensions
        assert not database.exists()


def test_unknown_authenticator_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY,
                            "LLMAUTH_AUTH_ORDER": "master_key,kerberos"})
    assert str(info.value).startswith(
        "LLMAUTH_AUTH_ORDER (from LLMAUTH_AUTH_ORDER): unknown authenticator(s) kerberos; "
        "known: custom, oauth2_proxy, jwt, oauth2, master_key, virtual_key")


def test_unreachable_database_fails_init_app_naming_the_setting(tmp_path: Path) -> None:
    url = f"postgresql://llmauth:{DB_PASSWORD}@127.0.0.1:9/llmauth"  # port 9: discard, closed
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": url})
    message = str(info.value)
    assert message.startswith("LLMAUTH_DATABASE_URL (from LLMAUTH_DATABASE_URL): the database "
                              "is unreachable")
    assert DB_PASSWORD not in message


@pytest.mark.parametrize("auto_migrate", [True, False])
def test_missing_postgres_driver_fails_init_app_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, auto_migrate: bool) -> None:
    import peewee

    monkeypatch.setattr(peewee, "psycopg", None)
    monkeypatch.setattr(peewee, "psycopg2", None)
    url = f"postgresql://llmauth:{DB_PASSWORD}@127.0.0.1:9/llmauth"
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": url,
                            "LLMAUTH_AUTO_MIGRATE": auto_migrate})
    assert str(info.value) == (
        "LLMAUTH_DATABASE_URL (from LLMAUTH_DATABASE_URL): the Postgres driver (psycopg) is "
        "not installed: pip install 'flask-llmauth[postgres]'")


@pytest.mark.parametrize("config,setting", [
    ({"LLMAUTH_REDIS_URL": "redis://127.0.0.1:6379/0"}, "LLMAUTH_REDIS_URL"),
    ({"LLMAUTH_RATELIMIT_STORAGE_URI": "redis+sentinel://127.0.0.1:26379/main"},
     "LLMAUTH_RATELIMIT_STORAGE_URI"),
    ({"LLMAUTH_REDIS_URL": "memory://", "LLMAUTH_RATELIMIT_STORAGE_URI": "rediss://h:6380/0"},
     "LLMAUTH_RATELIMIT_STORAGE_URI"),
])
def test_missing_redis_package_fails_init_app_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any],
        setting: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # import redis: ImportError
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, **config})
    assert str(info.value) == (
        f"{setting} (from {setting}): a Redis storage needs the redis package: "
        "pip install 'flask-llmauth[redis]'")
    assert not (tmp_path / "cfg.db").exists()  # refused before the database is touched
    make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY})  # memory:// needs no package


@pytest.mark.parametrize("uri,kind,package", [
    ("memcached://127.0.0.1:11211", "memcached", "pymemcache"),
    ("valkey://127.0.0.1:6379/0", "Valkey", "valkey"),
    ("valkeys://127.0.0.1:6380/0", "Valkey", "valkey"),
    ("mongodb://127.0.0.1:27017", "MongoDB", "pymongo"),
])
def test_missing_storage_client_fails_init_app_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uri: str, kind: str,
        package: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # import <package>: ImportError
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY,
                            "LLMAUTH_RATELIMIT_STORAGE_URI": uri})
    extra = {"pymemcache": "memcached", "pymongo": "mongodb"}.get(package, package)
    assert str(info.value) == (
        f"LLMAUTH_RATELIMIT_STORAGE_URI (from LLMAUTH_RATELIMIT_STORAGE_URI): a {kind} "
        f"storage needs the {package} package: pip install 'flask-llmauth[{extra}]'")
    assert not (tmp_path / "cfg.db").exists()  # refused before the database is touched


# -- master key and salt key ---------------------------------------------------------------------


@pytest.mark.parametrize("weak,why", [
    ("sk-1234", "well-known example"),
    ("sk-1234567890abcdefghijklmnopqrstuvwxyz", "well-known example"),
    ("sk-" + "Ab3" * 5, "shorter than 32"),
    ("sk-" + "ab" * 20, "not random"),
    ("", "no master key"),
])
def test_weak_or_missing_master_key_is_refused(tmp_path: Path, weak: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": weak})
    message = str(info.value)
    assert message.startswith("LLMAUTH_MASTER_KEY")
    assert why in message and "LLMAUTH_INSECURE_DEV_MODE" in message
    if weak:
        assert weak not in message


def test_llmauth_environment_variables_are_named_as_unread(
        caplog: pytest.LogCaptureFixture) -> None:
    """``LLMAUTH_*`` are Flask config keys; exported in the shell they are not read, and
    init_app says so (an exported ``LLMAUTH_DATABASE_URL`` left the app on SQLite silently),
    and the missing-master-key message says which name is a config key and which a
    variable."""
    environ = {"LLMAUTH_MASTER_KEY": OTHER_MASTER, "LLMAUTH_DATABASE_URL": "sqlite:///x.db",
               "LLMAUTH_TEST_POSTGRES_URL": "postgresql://db/test", "LLMAUTH_REDIS_URL": "x"}
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        settings = load_settings({"LLMAUTH_REDIS_URL": None}, environ=environ)
    assert settings.master_key is None and settings.database_url is None
    warnings = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert len(warnings) == 1
    assert "LLMAUTH_DATABASE_URL, LLMAUTH_MASTER_KEY not read" in warnings[0]
    assert "LLMAUTH_TEST_" not in warnings[0] and "LLMAUTH_REDIS_URL" not in warnings[0]
    assert OTHER_MASTER not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        load_settings({"LLMAUTH_MASTER_KEY": OTHER_MASTER}, {"database_url": "sqlite:///y"},
                      environ=environ)
    assert "LLMAUTH_DATABASE_URL" not in caplog.text and "LLMAUTH_MASTER_KEY" not in caplog.text
    with pytest.raises(ConfigurationError) as info:
        check_secrets(load_settings({}, environ=environ))
    assert ("the Flask config key LLMAUTH_MASTER_KEY or the environment variable "
            "LITELLM_MASTER_KEY") in str(info.value)


def test_weak_master_key_from_the_environment_names_its_source(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_MASTER_KEY", "sk-1234")
    with pytest.raises(ConfigurationError,
                       match=r"^LLMAUTH_MASTER_KEY \(from environment LITELLM_MASTER_KEY\)"):
        make_app(tmp_path)


def test_dev_mode_allows_a_weak_master_key_with_a_loud_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weak = "sk-" + "ab" * 20
    with caplog.at_level(logging.DEBUG):
        app = make_app(tmp_path, {"LLMAUTH_MASTER_KEY": weak, "LLMAUTH_INSECURE_DEV_MODE": True})
    try:
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                    and "INSECURE DEV MODE" in r.getMessage()]
        assert len(warnings) == 1
        assert "not random" in warnings[0].getMessage()
        assert weak not in caplog.text
        response = app.test_client().post("/v1/chat/completions", json={}, headers=bearer(weak))
        assert response.get_json() == {"user_id": "default_user_id", "role": "proxy_admin"}
    finally:
        close(app)


def test_dev_mode_without_master_key_has_no_admin(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        app = make_app(tmp_path, {"LLMAUTH_INSECURE_DEV_MODE": "1"})
    try:
        assert "INSECURE DEV MODE" in caplog.text and "no master key" in caplog.text
        client = app.test_client()
        assert_error(client.get("/key/list"), 401)
        assert_error(client.get("/key/list", headers=bearer("sk-1234")), 401)
    finally:
        close(app)


@pytest.mark.parametrize("salt", ["short-salt", "x" * 64])
def test_weak_salt_key_is_refused_even_in_dev_mode(tmp_path: Path, salt: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_SALT_KEY": salt,
                            "LLMAUTH_INSECURE_DEV_MODE": True})
    assert str(info.value).startswith("LLMAUTH_SALT_KEY (from LLMAUTH_SALT_KEY): the salt key")
    assert salt not in str(info.value)


def test_salt_key_lets_the_master_key_rotate_without_losing_keys(tmp_path: Path) -> None:
    shared = {"LLMAUTH_SALT_KEY": SALT, "LLMAUTH_DATABASE_URL": f"sqlite:///{tmp_path}/s.db"}
    first = make_app(tmp_path, {**shared, "LLMAUTH_MASTER_KEY": MASTER_KEY}, name="before")
    try:
        key = new_key(first.test_client())["key"]
    finally:
        close(first)
    second = make_app(tmp_path, {**shared, "LLMAUTH_MASTER_KEY": OTHER_MASTER}, name="after")
    try:
        client = second.test_client()
        assert client.post("/v1/chat/completions", json={}, headers=bearer(key)).status_code == 200
        assert_error(client.get("/key/list", headers=ADMIN), 401)  # the old master key is gone
    finally:
        close(second)
    # Without a salt key the digests are derived from the master key: rotating it orphans keys.
    unsalted = {"LLMAUTH_DATABASE_URL": f"sqlite:///{tmp_path}/u.db"}
    first = make_app(tmp_path, {**unsalted, "LLMAUTH_MASTER_KEY": MASTER_KEY}, name="u1")
    try:
        key = new_key(first.test_client())["key"]
    finally:
        close(first)
    second = make_app(tmp_path, {**unsalted, "LLMAUTH_MASTER_KEY": OTHER_MASTER}, name="u2")
    try:
        assert_error(second.test_client().post("/v1/chat/completions", json={},
                                               headers=bearer(key)), 401)
    finally:
        close(second)


# -- show-config -----------------------------------------------------------------------------------


def test_mask_secret_shapes() -> None:
    assert mask_secret(MASTER_KEY) == f"sk-...{MASTER_KEY[-4:]}"
    assert mask_secret("short") == "****"
    assert mask_secret(f"postgresql://llmauth:{DB_PASSWORD}@db:5432/llmauth?sslmode=require") \
        == "postgresql://****@db:5432/llmauth?sslmode=require"
    assert mask_secret(f"postgresql://db/llmauth?user=svc&password={DB_PASSWORD}") \
        == "postgresql://db/llmauth?user=****&password=****"
    assert mask_secret(f"redis://:{REDIS_PASSWORD}@cache:6379/0") == "redis://****@cache:6379/0"
    assert mask_secret("sqlite:////var/lib/llmauth.db") == "sqlite:////var/lib/llmauth.db"


def test_show_config_masks_every_secret(tmp_path: Path) -> None:
    app = make_app(tmp_path, {
        "LLMAUTH_MASTER_KEY": MASTER_KEY,
        "LLMAUTH_SALT_KEY": SALT,
        "LLMAUTH_REDIS_URL": f"redis://:{REDIS_PASSWORD}@cache:6379/0",
        "LLMAUTH_MODEL_LIST": [{"model_name": "gpt-4o",
                                "litellm_params": {"model": "openai/gpt-4o",
                                                   "api_key": PROVIDER_KEY,
                                                   "api_base": "https://api.openai.com"}},
                               {"model_name": "claude",
                                "litellm_params": {"api_key": "os.environ/ANTHROPIC_KEY"}}],
    })
    try:
        result = app.test_cli_runner().invoke(args=["llmauth", "show-config"])
        assert result.exit_code == 0, result.output
        for secret in (MASTER_KEY, SALT, REDIS_PASSWORD, PROVIDER_KEY):
            assert secret not in result.output
        shown = json.loads(result.output)
        assert shown["LLMAUTH_MASTER_KEY"] == f"sk-...{MASTER_KEY[-4:]}"
        assert shown["LLMAUTH_REDIS_URL"] == "redis://****@cache:6379/0"
        params = shown["LLMAUTH_MODEL_LIST"][0]["litellm_params"]
        assert params["api_key"] == f"sk-...{PROVIDER_KEY[-4:]}"
        assert params["api_base"] == "https://api.openai.com"
        # A reference is not a secret and tells the operator where the value comes from.
        assert shown["LLMAUTH_MODEL_LIST"][1]["litellm_params"]["api_key"] == \
            "os.environ/ANTHROPIC_KEY"
        assert shown["LLMAUTH_AUTH_ORDER"] == list(DEFAULT_AUTH_ORDER)
        assert set(shown) == {PREFIX + name.upper() for name in FIELDS}
    finally:
        close(app)


def test_show_config_names_the_default_database_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without LLMAUTH_DATABASE_URL the extension opens the instance folder's SQLite file:
    show-config names that file (the effective setting), not null."""
    for name in ("LLMAUTH_DATABASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    app = Flask("defaultdb", instance_path=str(tmp_path / "instance"))
    app.config["LLMAUTH_MASTER_KEY"] = MASTER_KEY
    LLMAuth(app)
    try:
        assert app.extensions["llmauth"].settings.database_url is None
        result = app.test_cli_runner().invoke(args=["llmauth", "show-config"])
        assert result.exit_code == 0, result.output
        path = Path(app.instance_path) / "llmauth.db"
        assert json.loads(result.output)["LLMAUTH_DATABASE_URL"] == f"sqlite:///{path}"
        assert path.exists()
    finally:
        close(app)


def test_show_config_prints_money_in_usd(tmp_path: Path) -> None:
    """Budgets are held as integer units; show-config prints the USD amounts configured."""
    app = make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_MAX_BUDGET": 100,
                              "LLMAUTH_MAX_END_USER_BUDGET": "0.25"})
    try:
        result = app.test_cli_runner().invoke(args=["llmauth", "show-config"])
        assert result.exit_code == 0, result.output
        shown = json.loads(result.output)
        assert shown["LLMAUTH_MAX_BUDGET"] == 100
        assert shown["LLMAUTH_MAX_END_USER_BUDGET"] == 0.25
        again = load_settings({key: shown[key] for key in ("LLMAUTH_MAX_BUDGET",
                                                           "LLMAUTH_MAX_END_USER_BUDGET")},
                              environ={})
        assert again.max_budget == app.extensions["llmauth"].settings.max_budget
        assert again.max_end_user_budget == app.extensions["llmauth"].settings.max_end_user_budget
    finally:
        close(app)


def test_show_config_masks_a_postgres_password(tmp_path: Path, postgres_url: str) -> None:
    user, rest = postgres_url.split("://", 1)[1].split("@", 1)
    url = f"postgresql://{user}:{DB_PASSWORD}@{rest}"  # trust auth ignores the password
    app = make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": url})
    try:
        result = app.test_cli_runner().invoke(args=["llmauth", "show-config"])
        assert result.exit_code == 0, result.output
        assert DB_PASSWORD not in result.output
        assert json.loads(result.output)["LLMAUTH_DATABASE_URL"] == f"postgresql://****@{rest}"
    finally:
        close(app)


# -- several apps in one process -------------------------------------------------------------------


def test_apps_with_different_databases_are_independent(tmp_path: Path, db_url: str) -> None:
    first = make_app(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": db_url},
                     name="first")
    second = make_app(tmp_path, {"LLMAUTH_MASTER_KEY": OTHER_MASTER}, name="second")
    try:
        one, two = first.test_client(), second.test_client()
        key_one = new_key(one, key_alias="same-alias")["key"]
        response = two.post("/key/generate", json={"key_alias": "same-alias"},
                            headers=bearer(OTHER_MASTER))
        assert response.status_code == 200  # the alias is free in the other database
        key_two = record_secret(response.get_json()["key"])
        chat = "/v1/chat/completions"
        assert one.post(chat, json={}, headers=bearer(key_one)).status_code == 200
        assert two.post(chat, json={}, headers=bearer(key_two)).status_code == 200
        assert_error(one.post(chat, json={}, headers=bearer(key_two)), 401)
        assert_error(two.post(chat, json={}, headers=bearer(key_one)), 401)
        assert_error(two.get("/key/list", headers=ADMIN), 401)
        listed_one = one.get("/key/list", headers=ADMIN).get_json()["keys"]
        listed_two = two.get("/key/list", headers=bearer(OTHER_MASTER)).get_json()["keys"]
        assert len(listed_one) == len(listed_two) == 1 and listed_one != listed_two
        # The CLI of each app works on its own database too.
        out = second.test_cli_runner().invoke(args=["llmauth", "list-keys"]).output
        assert listed_two[0] in out and listed_one[0] not in out
        assert os.path.exists(tmp_path / "second.db")
    finally:
        close(first)
        close(second)


# -- LiteLLM settings flask_llmauth does not implement ------------------------------------------

#: ``(section, key, a value that turns the protection on)``: LiteLLM enforces each of these;
#: flask_llmauth does not, so a config that sets one must not start as if it did.
UNIMPLEMENTED_PROTECTIONS = [
    ("general_settings", "reject_clientside_metadata_tags", True),
    ("general_settings", "max_response_size_mb", 2),
    ("general_settings", "role_permissions", [{"role": "team", "models": ["gpt-4o"]}]),
    ("general_settings", "custom_key_generate", "hooks.check_key"),
    ("general_settings", "custom_key_update", "hooks.check_update"),
    ("general_settings", "custom_key_policy", "hooks.key_policy"),
    ("general_settings", "enforce_fallback_model_access", True),
    ("general_settings", "pass_through_endpoints", [{"path": "/lf", "target": "http://x"}]),
    ("litellm_settings", "upperbound_key_generate_params", {"max_budget": 10}),
    ("litellm_settings", "key_generation_settings",
     {"personal_key_generation": {"allowed_user_roles": ["proxy_admin"]}}),
    ("litellm_settings", "max_internal_user_budget", 10),
]


def test_every_litellm_protection_flask_llmauth_lacks_is_tested() -> None:
    from flask_llmauth.config import UNIMPLEMENTED_PROTECTIONS as refused

    assert {f"{section}.{name}" for section, name, _ in UNIMPLEMENTED_PROTECTIONS} == set(refused)


@pytest.mark.parametrize(("section", "name", "value"), UNIMPLEMENTED_PROTECTIONS)
def test_a_litellm_protection_flask_llmauth_lacks_refuses_to_start(
        tmp_path: Path, section: str, name: str, value: Any) -> None:
    """Ignoring ``enforce_user_param: true`` (and the like) would run without a protection
    the operator configured: init_app refuses, naming the key; its off value is fine."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({section: {name: value}}))
    with pytest.raises(ConfigurationError) as info:
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    message = str(info.value)
    assert f"{section}.{name}" in message and "not supported by flask_llmauth" in message
    for off in (None, False, [], {}):
        config_file.write_text(yaml.safe_dump({section: {name: off}}))
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})


@pytest.mark.parametrize("name", ["allow_requests_on_db_unavailable",
                                  "allow_client_side_credentials", "use_x_forwarded_for"])
def test_a_litellm_loosening_flask_llmauth_lacks_is_a_warning(
        tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A LiteLLM setting that relaxes a check is not honoured (the check stays): said once
    at WARNING, naming the key, so the operator is not surprised by the stricter answer."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"general_settings": {name: True}}))
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"general_settings.{name}" in warnings[0] and "not supported" in warnings[0]


def test_litellm_redis_host_port_password_give_the_redis_url(
        caplog: pytest.LogCaptureFixture) -> None:
    """LiteLLM deployments name their Redis with REDIS_HOST/REDIS_PORT/REDIS_PASSWORD; left
    unread, rate limits would silently count per process."""
    password = "p@ss/w:rd" + REDIS_PASSWORD
    environ = {"REDIS_HOST": "cache.internal", "REDIS_PORT": "6380",
               "REDIS_PASSWORD": password}
    with caplog.at_level(logging.DEBUG):
        settings = load_settings({}, environ=environ)
    assert settings.redis_url == ("redis://:p%40ss%2Fw%3Ard" + REDIS_PASSWORD
                                  + "@cache.internal:6380/0")
    assert settings.source("redis_url") == "environment REDIS_HOST"
    assert REDIS_PASSWORD not in caplog.text
    assert settings.masked()["LLMAUTH_REDIS_URL"] == "redis://****@cache.internal:6380/0"
    assert load_settings({}, environ={"REDIS_HOST": "cache"}).redis_url == "redis://cache:6379/0"
    both = {**environ, "REDIS_URL": "redis://other:6379/1"}
    assert load_settings({}, environ=both).redis_url == "redis://other:6379/1"
    assert load_settings({"LLMAUTH_REDIS_URL": "redis://cfg:6379/2"},
                         environ=environ).redis_url == "redis://cfg:6379/2"
    assert load_settings({}, environ={"REDIS_HOST": ""}).redis_url is None
    with pytest.raises(ConfigurationError, match="REDIS_PORT"):
        load_settings({}, environ={"REDIS_HOST": "cache", "REDIS_PORT": "x"})


def test_a_quiet_look_at_the_settings_still_refuses_a_bad_config(tmp_path: Path,
                                                                 caplog: Any) -> None:
    """``load_settings(warn=False)`` (the example gateway's look for a master key before
    ``LLMAuth(app)``) leaves the warnings to ``init_app``, not the errors."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"general_settings": {
        "allow_requests_on_db_unavailable": True, "master_kye": "x"}}))
    caplog.set_level(logging.WARNING, logger="flask_llmauth")
    load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={"LLMAUTH_X": "1"},
                  warn=False)
    assert [r for r in caplog.records if r.name == "flask_llmauth"] == []
    for doc in ({"general_settings": {"role_permissions": [{"role": "team"}]}},
                {"general_settings": ["not", "a", "mapping"]}):
        config_file.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigurationError):
            load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={}, warn=False)


def test_litellm_yaml_redis_settings_give_the_redis_url(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """LiteLLM configs name their Redis under ``litellm_settings.cache_params`` or
    ``router_settings.redis_*``; left unread, rate limits would count per process. They
    apply when no Redis is named by LLMAUTH_REDIS_URL, REDIS_URL or REDIS_HOST."""
    password = "p@ss/w:rd" + REDIS_PASSWORD
    config_file = tmp_path / "config.yaml"

    def load(doc: dict[str, Any], config: dict[str, Any] | None = None,
             environ: dict[str, str] | None = None) -> Settings:
        config_file.write_text(yaml.safe_dump(doc))
        return load_settings({"LLMAUTH_CONFIG_FILE": str(config_file), **(config or {})},
                             environ=environ or {})

    cache = {"litellm_settings": {"cache": True, "cache_params": {
        "type": "redis", "host": "cache.internal", "port": 6380, "password": password}}}
    with caplog.at_level(logging.DEBUG):
        settings = load(cache)
    assert settings.redis_url == ("redis://:p%40ss%2Fw%3Ard" + REDIS_PASSWORD
                                  + "@cache.internal:6380/0")
    assert settings.source("redis_url") == "YAML litellm_settings.cache_params"
    assert settings.masked()["LLMAUTH_REDIS_URL"] == "redis://****@cache.internal:6380/0"
    assert REDIS_PASSWORD not in caplog.text
    from flask_llmauth.ratelimits import storage_uri
    assert storage_uri(settings) == settings.redis_url
    router = {"router_settings": {"redis_host": "router.internal", "redis_port": "6390",
                                  "redis_password": "os.environ/ROUTER_REDIS_PASSWORD"}}
    settings = load(router, environ={"ROUTER_REDIS_PASSWORD": password})
    assert settings.redis_url == ("redis://:p%40ss%2Fw%3Ard" + REDIS_PASSWORD
                                  + "@router.internal:6390/0")
    assert settings.source("redis_url") == "YAML router_settings.redis_host"
    assert load({"router_settings": {"redis_host": "r"}}).redis_url == "redis://r:6379/0"
    assert load({**router, **cache}, environ={"ROUTER_REDIS_PASSWORD": "x"}
                ).source("redis_url") == "YAML litellm_settings.cache_params"
    # Any Redis named otherwise wins; a cache that is not Redis names none.
    assert load(cache, {"LLMAUTH_REDIS_URL": "redis://cfg:6379/2"}).redis_url == \
        "redis://cfg:6379/2"
    assert load(cache, environ={"REDIS_URL": "redis://env:6379/1"}).redis_url == \
        "redis://env:6379/1"
    assert load(cache, environ={"REDIS_HOST": "host"}).redis_url == "redis://host:6379/0"
    assert load({"litellm_settings": {"cache_params": {"type": "local", "host": "x"}}}
                ).redis_url is None
    for bad in ({"litellm_settings": {"cache_params": {"type": "redis", "host": "h",
                                                       "port": "x", "password": password}}},
                {"router_settings": {"redis_host": "h", "redis_port": 70000}},
                {"router_settings": {"redis_host": ["h"]}}):
        with pytest.raises(ConfigurationError, match="LLMAUTH_REDIS_URL") as info:
            load(bad)
        assert REDIS_PASSWORD not in str(info.value)


def test_a_redis_named_in_config_yaml_counts_rate_limits_across_apps(
        app_factory: Any, tmp_path: Path) -> None:
    """Two apps (two processes' worth) configured only by a LiteLLM config whose
    ``cache_params`` names the test Redis share one rate-limit count."""
    from tests.conftest import REDIS_URL, missing_peer

    if not REDIS_URL:
        missing_peer("LLMAUTH_TEST_REDIS_URL is not set")
    parts = urlsplit(REDIS_URL)
    if parts.path not in ("", "/", "/0") or parts.password:
        pytest.skip("the test Redis is not on database 0 without a password")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"litellm_settings": {"cache_params": {
        "type": "redis", "host": parts.hostname, "port": parts.port or 6379}}}))
    config = {"LLMAUTH_CONFIG_FILE": str(config_file),
              "LLMAUTH_RATELIMIT_KEY_PREFIX": f"yaml-redis-{os.getpid()}-{id(config_file)}"}
    first = app_factory(config)
    second = app_factory(config, db_url=first.config["LLMAUTH_DATABASE_URL"])
    assert first.extensions["llmauth"].settings.redis_url.startswith("redis://")
    key = new_key(first.test_client(), rpm_limit=2, models=["gpt-4o"])["key"]
    chat = {"model": "gpt-4o", "messages": []}
    assert first.test_client().post("/v1/chat/completions", json=chat,
                                    headers=bearer(key)).status_code == 200
    assert second.test_client().post("/v1/chat/completions", json=chat,
                                     headers=bearer(key)).status_code == 200
    assert_error(second.test_client().post("/v1/chat/completions", json=chat,
                                           headers=bearer(key)), 429)


@pytest.mark.parametrize("host", ["cache:6380", "redis://cache", "cache/1", "ca che",
                                  "user@cache", ":" + REDIS_PASSWORD + "@cache", "[cache]"])
def test_a_redis_host_that_is_not_a_host_refuses_to_start_without_echoing_it(
        tmp_path: Path, host: str) -> None:
    """REDIS_HOST is a host name or IP address: anything else (a port, a URL, a path) would
    make a URL that names another Redis, or fail at start with a bare ValueError. The error
    names the variable, not its value (a URL pasted there may hold a password); the same
    for LiteLLM's YAML ``router_settings.redis_host``."""
    with pytest.raises(ConfigurationError, match="REDIS_HOST") as info:
        load_settings({}, environ={"REDIS_HOST": host, "REDIS_PASSWORD": "pw"})
    assert host not in str(info.value) and REDIS_PASSWORD not in str(info.value)
    with pytest.raises(ConfigurationError, match="router_settings.redis_host") as info:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(yaml.safe_dump({"router_settings": {"redis_host": host}}))
        load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    assert host not in str(info.value) and REDIS_PASSWORD not in str(info.value)


@pytest.mark.parametrize("host", ["::1", "[::1]", "fd00::6379"])
def test_an_ipv6_redis_host_is_bracketed_once(host: str) -> None:
    bare = host.strip("[]")
    assert load_settings({}, environ={"REDIS_HOST": host}).redis_url == (
        f"redis://[{bare}]:6379/0")
