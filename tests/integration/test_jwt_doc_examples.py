"""docs/jwt.md's configuration examples, as written, against the real OpenID provider: every
YAML block and the Flask config snippet start an app, and the examples that promise an
outcome (groups as teams, Keycloak realm roles, scopes as model grants) deliver it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from flask_llmauth import LLMAuth
from tests.conftest import MASTER_KEY
from tests.helpers import assert_error
from tests.idp_fixture import RS256, IdP
from tests.integration.test_jwt import add_echo, call, new_team, ok

pytestmark = pytest.mark.integration
DOC = (Path(__file__).resolve().parents[2] / "docs" / "jwt.md").read_text(encoding="utf-8")
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", DOC, re.S)


def _general_settings(block: str) -> dict[str, Any]:
    """A block's ``general_settings`` (the examples that show only ``litellm_jwtauth:`` sit
    under it, with JWT auth on)."""
    data = yaml.safe_load(block)
    if "litellm_jwtauth" in data:
        return {"enable_jwt_auth": True, **data}
    return dict(data["general_settings"])


def _block(marker: str) -> str:
    found = [b for b in YAML_BLOCKS if marker in b]
    assert len(found) == 1, (marker, found)
    return found[0]


@pytest.fixture
def doc_app(app_factory: Any, idp: IdP, tmp_path: Path, monkeypatch: Any) -> Any:
    """``doc_app(block)``: an app configured by that YAML block through
    ``LLMAUTH_CONFIG_FILE``, LiteLLM's environment variables naming the test provider."""
    for name, value in {"JWT_PUBLIC_KEY_URL": idp.discovery_url, "JWT_AUDIENCE": RS256,
                        "JWT_ISSUER": idp.issuer, "IDP_DISCOVERY_URL": idp.discovery_url,
                        "LITELLM_MASTER_KEY": MASTER_KEY}.items():
        monkeypatch.setenv(name, value)

    def make(block: str) -> Flask:
        path = tmp_path / f"config_{len(list(tmp_path.glob('config_*')))}.yaml"
        path.write_text(yaml.safe_dump({"general_settings": _general_settings(block)}))
        app = app_factory({"LLMAUTH_CONFIG_FILE": str(path)})
        add_echo(app)
        return app
    return make


def test_every_yaml_block_starts_an_app(doc_app: Any) -> None:
    assert len(YAML_BLOCKS) == 7, "a new example: give it a check here"
    for block in YAML_BLOCKS:
        state = doc_app(block).extensions["llmauth"]
        assert state.settings.enable_jwt_auth, block


def test_nested_block_with_litellm_environment(doc_app: Any, idp: IdP) -> None:
    client = doc_app(_block("public_key_ttl: 600")).test_client()
    body = ok(call(client, idp.token(extra_claims={"email": "dev@corp.example"})))
    assert body["method"] == "jwt" and body["user_id"] == "llmauth-svc"  # sub
    assert body["user_email"] == "dev@corp.example"


def test_flask_config_snippet_names_real_settings(tmp_path: Path) -> None:
    snippet = next(b for b in PYTHON_BLOCKS if "app.config.update" in b)
    app = Flask("jwt_doc_snippet")
    app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY, LLMAUTH_DATABASE_URL=f"sqlite:///{tmp_path}/snippet.db")
    exec(compile(snippet, "docs/jwt.md", "exec"), {"app": app})  # noqa: S102
    LLMAuth(app)
    settings = app.extensions["llmauth"].settings
    assert settings.jwt_public_key_url == (
        "https://login.example.com/.well-known/openid-configuration",)
    assert settings.jwt_audience == ("api://llm-gateway",)
    assert settings.jwt_issuer == "https://login.example.com/"
    assert settings.jwt_team_ids_field == "groups"
    app.extensions["llmauth"].close()


def test_groups_as_teams_example(doc_app: Any, idp: IdP) -> None:
    client = doc_app(_block("team_ids_jwt_field: groups\n  user_id_upsert")).test_client()
    new_team(client, "team-claude", models=["claude-3-5-sonnet"])
    new_team(client, "team-gpt", models=["gpt-4o"])
    token = idp.token(extra_claims={"groups": ["team-claude", "team-gpt"]})
    assert ok(call(client, token, model="gpt-4o"))["team_id"] == "team-gpt"
    assert ok(call(client, token, model="claude-3-5-sonnet"))["team_id"] == "team-claude"


def test_keycloak_realm_roles_example(doc_app: Any, idp: IdP) -> None:
    client = doc_app(_block("realm_access.roles")).test_client()

    def token(*roles: str) -> str:
        return idp.token(scope="litellm_proxy_admin",  # no admin scope: it is switched off
                         extra_claims={"realm_access": {"roles": list(roles)}})

    assert ok(call(client, token("llm-user")))["role"] == "internal_user"
    admin = token("llm-admin")
    assert client.get("/user/list", headers={"Authorization": f"Bearer {admin}"}).status_code \
        == 200
    error = assert_error(call(client, admin), 403)  # LLM routes are not an admin's default
    assert "Admin not allowed to access this route" in error["message"]
    assert "Unmatched token" in assert_error(call(client, token("other")), 403)["message"]


def test_scopes_as_model_grants_example(doc_app: Any, idp: IdP) -> None:
    client = doc_app(_block("scope_mappings")).test_client()
    gpt = idp.token(scope="models.gpt", extra_claims={"email": "a@corp.example"})
    assert ok(call(client, gpt, model="gpt-4o"))["models"] == ["gpt-4o", "gpt-4o-mini"]
    assert_error(call(client, gpt, model="claude-3-5-sonnet"), 403)
    claude = idp.token(scope="models.claude", extra_claims={"email": "a@corp.example"})
    assert ok(call(client, claude, model="claude-3-5-sonnet", path="/v1/messages"))
    assert_error(call(client, claude, model="claude-3-5-sonnet"), 403)  # route not mapped
    assert_error(call(client, idp.token(scope="read"), model="gpt-4o"), 403)


def test_several_issuers_example_needs_no_fetch_to_start(doc_app: Any) -> None:
    state = doc_app(_block("issuers:")).extensions["llmauth"]
    entries = {e["issuer"]: e for e in state.settings.jwt_issuers}
    assert set(entries) == {"https://login.microsoftonline.com/<tenant>/v2.0",
                            "https://accounts.google.com"}
    assert entries["https://accounts.google.com"]["user_id_prefix"] == "google:"
