"""Privilege-escalation review of the management API, as a non-admin attacker tries it.

* a key's ``allowed_routes`` (and ``key_type``) group names cover their group's routes only,
  never unclassified host routes below an LLM or info path;
* a non-admin granting a plain path grants the routes below it too: each must be one its
  role (and the key's role) reaches.
"""

from __future__ import annotations

from typing import Any

import pytest
from flask import jsonify

from tests.helpers import assert_error, bearer, record_secret
from tests.test_escalation import admin_key, as_key, make_user, snapshot

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
