"""Privilege-escalation review of the management API, as a non-admin attacker tries it.

* a key's ``allowed_routes`` (and ``key_type``) group names cover their group's routes only,
  never unclassified host routes below an LLM or info path;
* a non-admin granting a plain path grants the routes below it too: each must be one its
  role (and the key's role) reaches;
* removing a member from a team revokes the user's keys of that team, and a team key is
  never handed to a user outside its team.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import jsonify

from flask_llmauth.store.tables import DeletedKey, Key
from tests.helpers import ADMIN, ROLES, assert_error, bearer, record_secret, role_keys
from tests.test_escalation import admin, admin_key, as_key, make_user, snapshot

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def host_app(app_factory: Any, db_url: str) -> Any:
    """The test app plus two admin-only host routes below classified paths."""
    app = app_factory(db_url=db_url)

    @app.post("/v1/chat/completions/admin")
    def chat_admin() -> Any:
        return jsonify(done="chat-admin")

    @app.post("/v1/models/<model_id>/purge")
    def purge(model_id: str) -> Any:
        return jsonify(done="purge", model=model_id)

    return app


BELOW = (("/v1/chat/completions/admin", "/v1/chat/completions/admin"),
         ("/v1/models/gpt-4o/purge", "/v1/models/{model_id}/purge"))


@SQLITE_ONLY
@pytest.mark.parametrize("fields", [{"key_type": "llm_api"}, {"key_type": "read_only"},
                                    {"allowed_routes": ["openai_routes", "info_routes"]},
                                    {"allowed_routes": ["LiteLLMRoutes.llm_api_routes"]}])
def test_a_group_name_never_covers_unclassified_routes_below_its_paths(
        app_factory: Any, db_url: str, fields: dict[str, Any]) -> None:
    app = host_app(app_factory, db_url)
    client = app.test_client()
    make_user(client, "alice")
    # An internal user's own unrestricted key: the host routes are admin-only.
    plain = admin_key(client, user_id="alice")["key"]
    for path, _ in BELOW:
        assert_error(client.post(path, headers=bearer(plain)), 403)
    # A key restricted to route groups (by a proxy admin) is no less restricted there.
    limited = admin_key(client, user_id="alice", **fields)["key"]
    for path, route in BELOW:
        error = assert_error(client.post(path, headers=bearer(limited)), 403)
        assert f"Tried to call route: {route}" in error["message"]
    # What the groups do hold stays open.
    if fields.get("key_type") != "read_only":
        response = client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                               headers=bearer(limited))
        assert response.status_code == 200, response.get_json()
    assert client.get("/v1/models", headers=bearer(limited)).status_code == 200


@SQLITE_ONLY
def test_a_non_admin_never_grants_the_routes_below_a_path_it_cannot_call(
        app_factory: Any, db_url: str) -> None:
    app = host_app(app_factory, db_url)
    client = app.test_client()
    make_user(client, "alice")
    alice = admin_key(client, user_id="alice")
    own = admin_key(client, user_id="alice", allowed_routes=["/v1/embeddings"])
    before = snapshot(app)
    for entry, below in (("/v1/models", "/v1/models/{model_id}/purge"),
                         ("/v1/models/*", "/v1/models/{model_id}/purge"),
                         ("/v1/models/{model_id}", "/v1/models/{model_id}/purge"),
                         ("/v1/chat/completions", "/v1/chat/completions/admin")):
        for path, body in (("/key/generate", {}),
                           ("/key/update", {"key": own["key_id"]}),
                           ("/key/regenerate", {"key": own["key_id"]})):
            error = assert_error(as_key(client, alice["key"], path, allowed_routes=[entry],
                                        **body), 403)
            assert error["param"] == "allowed_routes", (entry, path)
            assert f"the route {below}" in error["message"], (entry, path)
    assert snapshot(app) == before
    # A path with nothing of the app below it is granted as before, and limits the key.
    response = as_key(client, alice["key"], "/key/generate", allowed_routes=["/v1/embeddings"])
    assert response.status_code == 200, response.get_json()
    narrow = record_secret(response.get_json()["key"])
    assert client.post("/v1/embeddings", json={"model": "m"},
                       headers=bearer(narrow)).status_code == 200
    assert_error(client.post("/v1/chat/completions", json={"model": "m"},
                             headers=bearer(narrow)), 403)
    # A proxy admin still grants a path with what lies below it (LiteLLM's prefix rule).
    granted = admin_key(client, user_id="alice", allowed_routes=["/v1/models"])["key"]
    response = client.post("/v1/models/gpt-4o/purge", headers=bearer(granted))
    assert response.status_code == 200 and response.get_json()["done"] == "purge"


@pytest.fixture
def members(client: Any) -> dict[str, Any]:
    """Team t1: alice admin, bob member limited to gpt-4o-mini; team t2: bob member.
    Bob holds a key of each team and a personal key."""
    for user_id in ("alice", "bob", "carol"):
        make_user(client, user_id)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    admin(client, "/team/new", team_id="t2", members_with_roles=[
        {"user_id": "bob", "role": "user"}])
    admin(client, "/team/member_update", team_id="t1", user_id="bob",
          allowed_models=["gpt-4o-mini"])
    return {
        "alice": admin_key(client, user_id="alice")["key"],
        "t1": admin_key(client, user_id="bob", team_id="t1"),
        "t2": admin_key(client, user_id="bob", team_id="t2"),
        "personal": admin_key(client, user_id="bob"),
    }


def chat(client: Any, key: str, model: str = "gpt-4o-mini") -> Any:
    return client.post("/v1/chat/completions", json={"model": model}, headers=bearer(key))


def test_removing_a_member_revokes_its_keys_of_that_team(client: Any, app: Any,
                                                         members: Any) -> None:
    t1 = members["t1"]
    assert chat(client, t1["key"]).status_code == 200
    # the member's own limit binds the team key while the membership lasts
    assert_error(chat(client, t1["key"], "gpt-4o"), 403)
    response = as_key(client, members["alice"], "/team/member_delete", team_id="t1",
                      user_id="bob")
    assert response.status_code == 200, response.get_json()
    # The key acted for a member bob no longer is: revoked, not freed of his limits.
    for model in ("gpt-4o-mini", "gpt-4o"):
        assert_error(chat(client, t1["key"], model), 401)
    assert_error(client.get("/team/info?team_id=t1", headers=bearer(t1["key"])), 401)
    with app.extensions["llmauth"].store.use():
        assert Key.get_or_none(Key.key_id == t1["key_id"]) is None
        gone = DeletedKey.get(DeletedKey.key_id == t1["key_id"])
        assert gone.deleted_by == "alice" and gone.team_id == "t1"
    # Bob's other keys are untouched; joining again does not bring the old key back.
    assert chat(client, members["t2"]["key"], "gpt-4o").status_code == 200
    assert chat(client, members["personal"]["key"], "gpt-4o").status_code == 200
    admin(client, "/team/member_add", team_id="t1", member={"user_id": "bob"})
    assert_error(chat(client, t1["key"]), 401)


@SQLITE_ONLY
def test_a_team_key_is_never_handed_to_a_user_outside_its_team(client: Any, app: Any,
                                                               members: Any) -> None:
    t1 = members["t1"]["key_id"]
    before = snapshot(app)
    error = assert_error(client.post("/key/update", json={"key": t1, "user_id": "carol"},
                                     headers=ADMIN), 400)
    assert error["param"] == "user_id" and "not assigned to team=t1" in error["message"]
    error = assert_error(client.post("/key/regenerate", json={"key": t1, "user_id": "carol"},
                                     headers=ADMIN), 400)
    assert error["param"] == "user_id"
    assert snapshot(app) == before
    # To a member, or to nobody (a service account), a proxy admin may.
    for user_id in ("alice", None):
        response = client.post("/key/update", json={"key": t1, "user_id": user_id},
                               headers=ADMIN)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["user_id"] == user_id


@SQLITE_ONLY
@pytest.mark.parametrize("role", [r for r in ROLES if r != "proxy_admin"])
def test_unclassified_host_routes_below_the_mcp_prefixes_are_admin_only(
        app_factory: Any, db_url: str, role: str) -> None:
    """LiteLLM lets every role through ``/v1/mcp/*`` and ``/mcp-rest/*`` because its own
    MCP endpoints check the caller; a host's route there that belongs to no group is an
    unclassified route like any other: proxy admins only."""
    app = app_factory(db_url=db_url)

    @app.post("/v1/mcp/servers/<server_id>/delete")
    def delete_server(server_id: str) -> Any:
        return jsonify(deleted=server_id)

    @app.get("/mcp-rest/admin/config")
    def mcp_config() -> Any:
        return jsonify(config="secret-ish")

    @app.post("/mcp-rest/tools/call")
    def tools_call() -> Any:
        return jsonify(called=True)

    client = app.test_client()
    key = role_keys(client, app)[role]
    for method, path, route in (("POST", "/v1/mcp/servers/s1/delete",
                                 "/v1/mcp/servers/{server_id}/delete"),
                                ("GET", "/mcp-rest/admin/config", "/mcp-rest/admin/config")):
        error = assert_error(client.open(path, method=method, headers=bearer(key)), 403)
        assert f"Route={route}" in error["message"], error
        assert client.open(path, method=method, headers=ADMIN).status_code == 200
    # The MCP routes LiteLLM names are LLM routes, open to every role that calls models.
    expected = 403 if role == "proxy_admin_viewer" else 200
    assert client.post("/mcp-rest/tools/call", json={}, headers=bearer(key)).status_code \
        == expected
