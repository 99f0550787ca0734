"""The example gateway configured only through a LiteLLM-style YAML file for JWT auth (the
flat ``general_settings`` keys of LiteLLM's auth docs, and the nested ``litellm_jwtauth``
block with LiteLLM's environment variables), served by gunicorn and driven by the ``openai``
SDK with an IdP access token as ``api_key``. Also: how the YAML is read and refused."""

from __future__ import annotations

import secrets
import textwrap
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from flask_llmauth.errors import ConfigurationError
from tests.conftest import dump_database, find_leaks
from tests.helpers import ADMIN, record_secret
from tests.idp_fixture import ES256, RS256, IdP
from tests.integration.gateway import gunicorn

pytestmark = pytest.mark.integration
HELLO = [{"role": "user", "content": "hello"}]


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _check_no_leaks(workdir: Path, db: str, output: str) -> None:
    leaks = find_leaks(output) + find_leaks(dump_database(f"sqlite:///{db}"))
    assert not leaks, f"secrets in the gateway's output or database: {leaks}"


def test_flat_general_settings_keys(idp: IdP, tmp_path: Path) -> None:
    master = record_secret("sk-" + secrets.token_urlsafe(32))
    db = tmp_path / "gateway.db"
    config = _write(tmp_path / "litellm_config.yaml", f"""
        model_list:
          - model_name: gpt-4o
            litellm_params: {{model: openai/gpt-4o}}
          - model_name: gpt-4o-mini
            litellm_params: {{model: openai/gpt-4o-mini}}
        general_settings:
          master_key: os.environ/GATEWAY_MASTER_KEY
          database_url: sqlite:///{db}
          enable_jwt_auth: true
          jwt_public_key_url: os.environ/IDP_DISCOVERY_URL
          jwt_audience: {RS256}
          jwt_issuer: os.environ/IDP_ISSUER
          jwt_admin_scope: gateway.admin
          user_allowed_email_domain: corp.example
    """)
    env = {"LLMAUTH_CONFIG_FILE": str(config), "GATEWAY_MASTER_KEY": master,
           "IDP_DISCOVERY_URL": idp.discovery_url, "IDP_ISSUER": idp.issuer}
    # an idle keep-alive connection delays the server's graceful stop (~2 s): the SDK clients
    # close before it stops, a response kept until then came on a connection it closed
    with gunicorn(tmp_path / "flat", env, workers=1).start() as gateway, ExitStack() as sdk:
        base = gateway.base_url
        token = idp.token(extra_claims={"email": "dev@corp.example"})
        client = sdk.enter_context(
            openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0))
        reply = client.chat.completions.create(model="gpt-4o", messages=HELLO)
        assert reply.choices[0].message.content and reply.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=HELLO,
                                                     stream=True))
        assert any(c.choices and c.choices[0].delta.content for c in chunks)
        whoami = requests.get(base + "/v1/whoami", headers={"Authorization": f"Bearer {token}"},
                              timeout=10).json()
        assert whoami["method"] == "jwt" and whoami["user_id"] == "dev@corp.example"

        outsider = sdk.enter_context(openai.OpenAI(
            base_url=base + "/v1", max_retries=0,
            api_key=idp.token(extra_claims={"email": "x@evil.example"})))
        with pytest.raises(openai.PermissionDeniedError, match="Email domain not allowed"):
            outsider.chat.completions.create(model="gpt-4o", messages=HELLO)
        wrong_audience = sdk.enter_context(openai.OpenAI(
            base_url=base + "/v1", max_retries=0,
            api_key=idp.token(resource=ES256, extra_claims={"email": "dev@corp.example"})))
        with pytest.raises(openai.AuthenticationError):
            wrong_audience.chat.completions.create(model="gpt-4o", messages=HELLO)
        tampered = sdk.enter_context(openai.OpenAI(
            base_url=base + "/v1", max_retries=0, api_key=record_secret(token[:-6] + "AAAAAA")))
        with pytest.raises(openai.AuthenticationError):
            tampered.chat.completions.create(model="gpt-4o", messages=HELLO)

        # The admin scope named in the YAML makes a JWT proxy admin on management routes.
        admin = idp.token(scope="gateway.admin")
        generated = requests.post(base + "/key/generate", json={"models": ["gpt-4o"]},
                                  headers={"Authorization": f"Bearer {admin}",
                                           "Connection": "close"}, timeout=10)
        assert generated.status_code == 200, generated.text
        key = record_secret(generated.json()["key"])
        keyed = sdk.enter_context(
            openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0))
        assert keyed.chat.completions.create(model="gpt-4o", messages=HELLO).choices
        with pytest.raises(openai.PermissionDeniedError):
            sdk.enter_context(openai.OpenAI(base_url=base + "/v1", api_key=admin,
                                            max_retries=0)) \
                .chat.completions.create(model="gpt-4o", messages=HELLO)
        output = gateway.output()
    _check_no_leaks(tmp_path, str(db), output)


def test_nested_litellm_jwtauth_block_with_litellm_environment(idp: IdP, tmp_path: Path) -> None:
    master = record_secret("sk-" + secrets.token_urlsafe(32))
    db = tmp_path / "gateway.db"
    config = _write(tmp_path / "litellm_config.yaml", f"""
        model_list:
          - model_name: gpt-4o
            litellm_params: {{model: openai/gpt-4o}}
          - model_name: claude-3-5-sonnet
            litellm_params: {{model: anthropic/claude-3-5-sonnet}}
        general_settings:
          master_key: os.environ/GATEWAY_MASTER_KEY
          database_url: sqlite:///{db}
          enable_jwt_auth: true
          litellm_jwtauth:
            user_id_jwt_field: sub
            user_id_upsert: true
            team_ids_jwt_field: groups
            team_allowed_routes: ["openai_routes", "info_routes"]
            public_key_ttl: 300
            leeway: 5
    """)
    env = {"LLMAUTH_CONFIG_FILE": str(config), "GATEWAY_MASTER_KEY": master,
           "JWT_PUBLIC_KEY_URL": f"{idp.jwks_uri}", "JWT_AUDIENCE": f"{RS256},{ES256}",
           "JWT_ISSUER": idp.issuer}
    with gunicorn(tmp_path / "nested", env, workers=1).start() as gateway, ExitStack() as sdk:
        base = gateway.base_url
        admin = {"Authorization": f"Bearer {master}", "Connection": "close"}
        for team, models in (("team-claude", ["claude-3-5-sonnet"]), ("team-gpt", ["gpt-4o"])):
            created = requests.post(base + "/team/new", json={"team_id": team,
                                                              "models": models},
                                    headers=admin, timeout=10)
            assert created.status_code == 200, created.text

        token = idp.token(resource=ES256, extra_claims={"groups": ["team-claude", "team-gpt"]})
        client = sdk.enter_context(
            openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0))
        assert client.chat.completions.create(model="gpt-4o", messages=HELLO).choices
        assert client.chat.completions.create(model="claude-3-5-sonnet", messages=HELLO).choices
        with pytest.raises(openai.PermissionDeniedError, match="No team has access"):
            client.chat.completions.create(model="gemini-pro", messages=HELLO)
        whoami = requests.get(base + "/v1/whoami", timeout=10,
                              headers={"Authorization": f"Bearer {token}"}).json()
        assert whoami["role"] == "team" and whoami["team_id"] == "team-claude"
        assert whoami["user_id"] == "llmauth-svc"
        user = requests.get(base + "/user/info?user_id=llmauth-svc", headers=admin, timeout=10)
        assert user.status_code == 200, "user_id_upsert created the user"
        user_token = idp.token(resource=ES256)
        solo = sdk.enter_context(
            openai.OpenAI(base_url=base + "/v1", api_key=user_token, max_retries=0))
        assert solo.chat.completions.create(model="claude-3-5-sonnet", messages=HELLO).choices
        output = gateway.output()
    _check_no_leaks(tmp_path, str(db), output)


# -- how the YAML is read (in process) ----------------------------------------------------------


def _yaml_app(app_factory: Any, tmp_path: Path, body: str) -> Any:
    config = _write(tmp_path / "config.yaml", body)
    return app_factory({"LLMAUTH_CONFIG_FILE": str(config)})


def test_nested_values_from_os_environ(app_factory: Any, idp: IdP, tmp_path: Path,
                                       monkeypatch: Any) -> None:
    monkeypatch.setenv("TEAM_CLAIM", "org.team")
    monkeypatch.setenv("KEYS_AT", idp.jwks_uri)
    app = _yaml_app(app_factory, tmp_path, f"""
        general_settings:
          enable_jwt_auth: true
          jwt_public_key_url: os.environ/KEYS_AT
          jwt_audience: {RS256}
          litellm_jwtauth:
            team_id_jwt_field: os.environ/TEAM_CLAIM
    """)
    settings = app.extensions["llmauth"].settings
    assert settings.jwt_team_id_field == "org.team"
    assert settings.jwt_public_key_url == (idp.jwks_uri,)
    assert settings.source("jwt_team_id_field") == (
        "YAML general_settings.litellm_jwtauth.team_id_jwt_field")
    client = app.test_client()
    assert client.post("/team/new", json={"team_id": "t9"}, headers=ADMIN).status_code == 200
    response = client.post(
        "/v1/chat/completions", json={"model": "gpt-4o"},
        headers={"Authorization": "Bearer " + idp.token(extra_claims={"org": {"team": "t9"}})})
    assert response.status_code == 200
    assert response.get_json()["principal"]["team_id"] == "t9"


@pytest.mark.parametrize("block,fragment", [
    ("team_id_jwt_fieldd: groups", "Invalid arguments provided: ['team_id_jwt_fieldd']"),
    ("virtual_key_claim_field: sub", "not supported by flask_llmauth"),
    ("team_alias_jwt_field: team", "not supported by flask_llmauth"),
    ("admin_allowed_routes: [managment_routes]", "is neither a path"),
    ("issuers: [{issuer: 'https://a.example'}]", "set `audience`"),
])
def test_bad_litellm_jwtauth_blocks_fail_at_init(app_factory: Any, tmp_path: Path,
                                                 block: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        _yaml_app(app_factory, tmp_path, f"""
            general_settings:
              enable_jwt_auth: true
              jwt_public_key_url: https://idp.example/jwks
              litellm_jwtauth:
                {block}
        """)
    assert fragment in str(info.value)


def test_plain_http_key_url_off_loopback_is_refused(app_factory: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="must use https"):
        _yaml_app(app_factory, tmp_path, """
            general_settings:
              enable_jwt_auth: true
              jwt_public_key_url: http://idp.example/jwks
              jwt_audience: gateway
        """)


def test_missing_key_url_and_warning_without_aud_or_iss(app_factory: Any, tmp_path: Path,
                                                        caplog: Any) -> None:
    with pytest.raises(ConfigurationError, match="JWT_PUBLIC_KEY_URL"):
        app_factory({"LLMAUTH_ENABLE_JWT_AUTH": True})
    with caplog.at_level("WARNING", logger="flask_llmauth"):
        app_factory({"LLMAUTH_ENABLE_JWT_AUTH": True,
                     "LLMAUTH_JWT_PUBLIC_KEY_URL": "https://idp.example/jwks"})
    assert any("verifies neither `aud` nor `iss`" in r.getMessage() for r in caplog.records)
