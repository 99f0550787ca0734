"""Helpers shared by the tests (import them from ``tests.helpers``)."""

from __future__ import annotations

import secrets
from typing import Any

MASTER_KEY = "sk-master-" + "T3stMasterKey0123456789abcdefghijklmnop"
#: Every secret of the run; the session-end leak check searches logs and tables for them.
SECRETS: set[str] = {MASTER_KEY}


def record_secret(value: str) -> str:
    """Register a secret that no log line or table may ever contain."""
    SECRETS.add(value)
    return value


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN = bearer(MASTER_KEY)


def new_key(client: Any, **fields: Any) -> dict[str, Any]:
    """Generate a key as the master key; return the whole response (with ``key``)."""
    response = client.post("/key/generate", json=fields, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    record_secret(body["key"])
    return body


def random_key() -> str:
    return record_secret("sk-" + secrets.token_urlsafe(32))


def assert_error(response: Any, status: int, error_type: str | None = None) -> dict[str, Any]:
    """The response is the JSON error envelope with this status (and type)."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True))
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == str(status)
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    return body["error"]


#: LiteLLM's seven roles, in the order the authorization tests walk them.
ROLES = ("proxy_admin", "proxy_admin_viewer", "org_admin", "internal_user",
         "internal_user_viewer", "team", "customer")


def role_keys(client: Any, app: Any, prefix: str = "") -> dict[str, str]:
    """One virtual key per role, created through the management API as the master key.

    Each key belongs to a user ``u-<role>`` holding that role, except ``team`` (a team
    service-account key: a key of team ``t-team`` with no user) and ``customer`` (the API
    never stores that role on a user, so the row is given it directly).
    """
    from flask_llmauth.store.tables import User

    keys: dict[str, str] = {}
    for role in ROLES:
        if role == "team":
            response = client.post(f"{prefix}/team/new", json={"team_id": "t-team"},
                                   headers=ADMIN)
            assert response.status_code == 200, response.get_json()
            body = {"team_id": "t-team"}
        else:
            stored = "internal_user" if role == "customer" else role
            response = client.post(f"{prefix}/user/new", headers=ADMIN, json={
                "user_id": f"u-{role}", "user_role": stored, "auto_create_key": False})
            assert response.status_code == 200, response.get_json()
            body = {"user_id": f"u-{role}"}
        response = client.post(f"{prefix}/key/generate", json=body, headers=ADMIN)
        assert response.status_code == 200, response.get_json()
        keys[role] = record_secret(response.get_json()["key"])
    state = app.extensions["llmauth"]
    with state.store.use():
        User.update(user_role="customer").where(User.user_id == "u-customer").execute()
    state.invalidate("user:u-customer")
    return keys
