"""Users, teams and memberships: LiteLLM's field names and response shapes, data-level
scoping (IDOR), cascades, blocked teams, audit rows, and bad input on every endpoint.

Everything that writes runs on SQLite and (when configured) Postgres.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from flask_llmauth.store.tables import AuditLog, DeletedKey, Key, Team, TeamMembership, User
from tests.helpers import ADMIN, SECRETS, assert_error, bearer, record_secret

CHAT = "/v1/chat/completions"
#: Rule and validation tests need no second database; storage-heavy ones run on both.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def admin(client: Any, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 200, (path, response.get_json())
    return response.get_json()  # type: ignore[no-any-return]


def admin_get(client: Any, path: str, **query: Any) -> Any:
    response = client.get(path, query_string=query, headers=ADMIN)
    assert response.status_code == 200, (path, response.get_json())
    return response.get_json()


def new_key(client: Any, **fields: Any) -> dict[str, Any]:
    body = admin(client, "/key/generate", **fields)
    record_secret(body["key"])
    return body


def chat(client: Any, key: str) -> Any:
    return client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key))


def rows(app: Any) -> dict[str, Any]:
    """Every key, user, team and membership row (for "nothing changed")."""
    with app.extensions["llmauth"].store.use():
        return {
            "keys": sorted((k.key_id, k.user_id, k.team_id, k.key_alias, k.blocked, k.updated_at)
                           for k in Key.select()),
            "users": sorted((u.user_id, u.user_role, u.user_email, u.max_budget, u.updated_at)
                            for u in User.select()),
            "teams": sorted((t.team_id, t.blocked, t.max_budget, t.updated_at)
                            for t in Team.select()),
            "members": sorted((m.team_id, m.user_id, m.role, m.max_budget)
                              for m in TeamMembership.select()),
        }


# -- shapes --------------------------------------------------------------------------------------


def test_user_lifecycle_shapes(client: Any) -> None:
    admin(client, "/team/new", team_id="t1", team_alias="Team One")
    created = client.post("/user/new", headers=ADMIN, json={
        "user_id": "alice", "user_email": "alice@example.com", "user_role": "internal_user",
        "models": ["gpt-4o"], "max_budget": 12.5, "budget_duration": "30d", "tpm_limit": 1000,
        "teams": ["t1"], "key_alias": "alice-first", "duration": "7d"}).get_json()
    record_secret(created["key"])
    assert created["key"].startswith("sk-") and created["key_name"].startswith("sk-...")
    assert created["user_id"] == "alice" and created["user_role"] == "internal_user"
    assert created["user_email"] == "alice@example.com" and created["teams"] == ["t1"]
    assert created["models"] == ["gpt-4o"] and created["max_budget"] == 12.5
    assert created["budget_duration"] == "30d" and created["budget_reset_at"] is not None
    assert created["token"] == created["key_id"] and created["expires"] is not None
    assert created["key_alias"] == "alice-first"
    assert chat(client, created["key"]).status_code == 200

    info = admin_get(client, "/user/info", user_id="alice")
    assert set(info) == {"user_id", "user_info", "keys", "teams"}
    assert info["user_info"]["user_email"] == "alice@example.com"
    assert info["user_info"]["teams"] == ["t1"] and info["user_info"]["spend"] == 0.0
    assert [k["key_id"] for k in info["keys"]] == [created["key_id"]]
    assert [t["team_id"] for t in info["teams"]] == ["t1"]
    assert info["teams"][0]["team_alias"] == "Team One"
    assert "digest" not in json.dumps(info) and created["key"] not in json.dumps(info)

    updated = admin(client, "/user/update", user_id="alice", max_budget=20,
                    user_role="proxy_admin_viewer", models=[])
    assert (updated["max_budget"], updated["user_role"], updated["models"]) == (
        20.0, "proxy_admin_viewer", [])
    by_email = admin(client, "/user/update", user_email="alice@example.com", user_alias="Al")
    assert by_email["user_id"] == "alice" and by_email["user_alias"] == "Al"

    plain = admin(client, "/user/new", user_id="bob", auto_create_key=False)
    assert "key" not in plain and plain["user_role"] == "internal_user"

    listing = admin_get(client, "/user/list", page_size=1)
    assert set(listing) == {"users", "total", "page", "page_size", "total_pages"}
    assert (listing["total"], listing["page"], listing["page_size"], listing["total_pages"]) == (
        2, 1, 1, 2)
    assert [u["user_id"] for u in admin_get(client, "/user/list", role="internal_user")[
        "users"]] == ["bob"]
    assert [u["user_id"] for u in admin_get(client, "/user/list", user_ids="alice,nobody")[
        "users"]] == ["alice"]

    deleted = admin(client, "/user/delete", user_ids=["alice"])
    assert deleted == {"deleted_users": ["alice"], "deleted_keys": [created["key_id"]]}


def test_team_lifecycle_shapes(client: Any) -> None:
    admin(client, "/user/new", user_id="alice", user_email="alice@example.com",
          auto_create_key=False)
    team = admin(client, "/team/new", team_id="t1", team_alias="Core", models=["gpt-4o"],
                 max_budget=100, budget_duration="1mo", tpm_limit=10, rpm_limit=5,
                 team_member_permissions=["/key/info"], metadata={"cost_center": 42},
                 members_with_roles=[{"user_id": "alice", "role": "admin"}])
    assert team["team_id"] == "t1" and team["team_alias"] == "Core"
    assert team["members_with_roles"] == [{"user_id": "alice", "role": "admin"}]
    assert (team["max_budget"], team["budget_duration"], team["tpm_limit"]) == (100.0, "1mo", 10)
    assert team["team_member_permissions"] == ["/key/info"] and team["blocked"] is False
    assert team["metadata"] == {"cost_center": 42}

    generated = admin(client, "/team/new", team_alias="Generated id")
    assert generated["team_id"] and generated["team_id"] != "t1"

    added = admin(client, "/team/member_add", team_id="t1", max_budget_in_team=5,
                  member=[{"user_email": "new@example.com", "role": "user"},
                          {"user_id": "carol"}])
    assert [m["role"] for m in added["members_with_roles"]] == ["admin", "user", "user"]
    assert [m["max_budget_in_team"] for m in added["updated_team_memberships"]] == [5.0, 5.0]
    assert {u["user_email"] for u in added["updated_users"]} == {"new@example.com", None}
    new_user = next(u for u in added["updated_users"] if u["user_email"] == "new@example.com")

    member = admin(client, "/team/member_update", team_id="t1", user_id="carol", role="admin",
                   max_budget_in_team=7, tpm_limit=3, rpm_limit=2,
                   allowed_models=["gpt-4o"], budget_duration="1d")
    assert {k: member[k] for k in ("team_id", "user_id", "role", "max_budget_in_team",
                                   "tpm_limit", "rpm_limit", "allowed_models",
                                   "budget_duration")} == {
        "team_id": "t1", "user_id": "carol", "role": "admin", "max_budget_in_team": 7.0,
        "tpm_limit": 3, "rpm_limit": 2, "allowed_models": ["gpt-4o"], "budget_duration": "1d"}
    assert "user_email" in member
    by_email = admin(client, "/team/member_update", team_id="t1", user_email="new@example.com",
                     role="admin")
    assert by_email["user_id"] == new_user["user_id"]

    info = admin_get(client, "/team/info", team_id="t1")
    assert set(info) == {"team_id", "team_info", "keys", "team_memberships"}
    assert len(info["team_memberships"]) == 3

    after_delete = admin(client, "/team/member_delete", team_id="t1", user_id="carol")
    assert [m["user_id"] for m in after_delete["members_with_roles"]] == [
        "alice", new_user["user_id"]]
    admin(client, "/team/member_delete", team_id="t1", user_email="new@example.com")

    updated = admin(client, "/team/update", team_id="t1", max_budget=50, models=["gpt-4o",
                                                                                 "o3"])
    assert updated["max_budget"] == 50.0 and updated["models"] == ["gpt-4o", "o3"]
    assert admin(client, "/team/block", team_id="t1")["blocked"] is True
    assert admin(client, "/team/unblock", team_id="t1")["blocked"] is False

    listing = client.get("/team/list", headers=ADMIN).get_json()
    assert isinstance(listing, list) and {t["team_id"] for t in listing} == {
        "t1", generated["team_id"]}
    assert [t["team_id"] for t in admin_get(client, "/team/list", user_id="alice")] == ["t1"]
    deleted = admin(client, "/team/delete", team_ids=["t1", generated["team_id"]])
    assert sorted(deleted["deleted_teams"]) == sorted(["t1", generated["team_id"]])


# -- data-level scoping (IDOR) ---------------------------------------------------------------


@pytest.fixture
def two_users(client: Any) -> dict[str, Any]:
    """alice and bob, each in their own team, each with a personal and a team key."""
    out: dict[str, Any] = {}
    for name in ("alice", "bob"):
        admin(client, "/user/new", user_id=name, auto_create_key=False)
        admin(client, "/team/new", team_id=f"team-{name}",
              members_with_roles=[{"user_id": name, "role": "user"}])
        out[name] = new_key(client, user_id=name)
        out[f"{name}_team"] = new_key(client, user_id=name, team_id=f"team-{name}")
    return out


def test_user_a_cannot_touch_user_bs_objects(client: Any, app: Any, two_users: Any) -> None:
    alice = bearer(two_users["alice"]["key"])
    bob_key, bob_raw = two_users["bob"]["key_id"], two_users["bob"]["key"]
    before = rows(app)
    for ident in (bob_key, bob_raw, two_users["bob_team"]["key_id"]):
        assert_error(client.get("/key/info", query_string={"key": ident}, headers=alice), 403)
    writes = [("/key/update", {"key": bob_key, "key_alias": "pwned"}),
              ("/key/update", {"key": bob_raw, "max_budget": 1}),
              ("/key/delete", {"keys": [bob_key]}),
              ("/key/delete", {"keys": [two_users["alice"]["key_id"], bob_key]}),
              ("/key/regenerate", {"key": bob_key}),
              (f"/key/{bob_key}/regenerate", {}),
              ("/key/block", {"key": bob_key}),
              ("/user/update", {"user_id": "bob", "user_alias": "pwned"}),
              ("/team/member_add", {"team_id": "team-bob", "member": {"user_id": "alice"}}),
              ("/team/member_delete", {"team_id": "team-bob", "user_id": "bob"})]
    for path, body in writes:
        assert_error(client.post(path, json=body, headers=alice), 403)
    reads = [("/user/info", {"user_id": "bob"}), ("/team/info", {"team_id": "team-bob"}),
             ("/team/info", {"team_id": "no-such-team"}),  # no existence oracle for outsiders
             ("/key/list", {"user_id": "bob"}), ("/key/list", {"team_id": "team-bob"}),
             ("/team/list", {"user_id": "bob"})]
    for path, query in reads:
        assert_error(client.get(path, query_string=query, headers=alice), 403)
    assert rows(app) == before
    assert chat(client, bob_raw).status_code == 200
    # The same reads of one's own objects work.
    assert client.get("/user/info", headers=alice).get_json()["user_id"] == "alice"
    assert client.get("/team/info", query_string={"team_id": "team-alice"},
                      headers=alice).status_code == 200
    assert [t["team_id"] for t in client.get("/team/list", headers=alice).get_json()] == [
        "team-alice"]
    listed = client.get("/key/list", query_string={"key_hash": bob_key}, headers=alice)
    assert listed.get_json()["keys"] == []


def test_key_list_scoping_and_include_team_keys(client: Any, app: Any) -> None:
    for name in ("alice", "bob", "carol"):
        admin(client, "/user/new", user_id=name, auto_create_key=False)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    alice = new_key(client, user_id="alice")
    bob = new_key(client, user_id="bob")
    carol = new_key(client, user_id="carol")
    bob_team = new_key(client, user_id="bob", team_id="t1")
    service = new_key(client, team_id="t1")

    def listed(key: dict[str, Any], **query: Any) -> set[str]:
        response = client.get("/key/list", query_string=query, headers=bearer(key["key"]))
        assert response.status_code == 200, response.get_json()
        return set(response.get_json()["keys"])

    assert listed(bob) == {bob["key_id"], bob_team["key_id"]}
    assert listed(bob, include_team_keys="true") == {bob["key_id"], bob_team["key_id"],
                                                     service["key_id"]}
    assert listed(alice) == {alice["key_id"]}
    assert listed(alice, include_team_keys="true") == {alice["key_id"], bob_team["key_id"],
                                                       service["key_id"]}
    assert listed(alice, team_id="t1") >= {bob_team["key_id"], service["key_id"]}
    assert listed(carol, include_team_keys="true") == {carol["key_id"]}
    assert_error(client.get("/key/list", query_string={"team_id": "t1"},
                            headers=bearer(carol["key"])), 403)
    full = client.get("/key/list", query_string={"return_full_object": "true"},
                      headers=bearer(bob["key"])).get_json()
    assert all(k["user_id"] == "bob" for k in full["keys"])
    assert all("digest" not in k for k in full["keys"])
    # Team keys: a plain member sees the team's service keys and its own, an admin all.
    member_view = client.get("/team/info", query_string={"team_id": "t1"},
                             headers=bearer(bob["key"])).get_json()
    assert {k["key_id"] for k in member_view["keys"]} == {bob_team["key_id"], service["key_id"]}


# -- cascades, blocking, audit ---------------------------------------------------------------------


def test_deleting_a_user_deletes_its_keys_at_once(client: Any, app: Any) -> None:
    admin(client, "/team/new", team_id="t1")
    admin(client, "/user/new", user_id="alice", auto_create_key=False, teams=["t1"])
    personal, team_key = new_key(client, user_id="alice"), new_key(client, user_id="alice",
                                                                  team_id="t1")
    other = new_key(client, user_id="bob")
    for key in (personal, team_key, other):
        assert chat(client, key["key"]).status_code == 200  # now cached
    result = admin(client, "/user/delete", user_ids=["alice"])
    assert sorted(result["deleted_keys"]) == sorted([personal["key_id"], team_key["key_id"]])
    for key in (personal, team_key):
        assert_error(chat(client, key["key"]), 401)
    assert chat(client, other["key"]).status_code == 200
    with app.extensions["llmauth"].store.use():
        gone = {d.key_id: d for d in DeletedKey.select()}
        assert set(gone) == {personal["key_id"], team_key["key_id"]}
        assert all(d.deleted_by == "default_user_id" for d in gone.values())
        assert not TeamMembership.select().where(TeamMembership.user_id == "alice").exists()
    deleted_list = admin_get(client, "/key/list", status="deleted", return_full_object="true")
    assert {k["key_id"] for k in deleted_list["keys"]} == set(gone)
    assert_error(client.get("/user/info", query_string={"user_id": "alice"}, headers=ADMIN), 404)


def test_deleting_a_team_deletes_its_keys_at_once(client: Any, app: Any) -> None:
    admin(client, "/team/new", team_id="t1",
          members_with_roles=[{"user_id": "alice", "role": "admin"}])
    team_keys = [new_key(client, team_id="t1"), new_key(client, team_id="t1", user_id="alice")]
    personal = new_key(client, user_id="alice")
    for key in (*team_keys, personal):
        assert chat(client, key["key"]).status_code == 200
    result = admin(client, "/team/delete", team_ids=["t1"])
    assert sorted(result["deleted_keys"]) == sorted(k["key_id"] for k in team_keys)
    for key in team_keys:
        assert_error(chat(client, key["key"]), 401)
    assert chat(client, personal["key"]).status_code == 200
    with app.extensions["llmauth"].store.use():
        assert DeletedKey.select().count() == 2
        assert not TeamMembership.select().exists()
        assert User.select().where(User.user_id == "alice").exists()


def test_a_blocked_team_blocks_its_keys_at_once(client: Any) -> None:
    admin(client, "/team/new", team_id="t1",
          members_with_roles=[{"user_id": "alice", "role": "user"}])
    team_key = new_key(client, team_id="t1", user_id="alice")
    personal = new_key(client, user_id="alice")
    assert chat(client, team_key["key"]).status_code == 200
    admin(client, "/team/block", team_id="t1")
    error = assert_error(chat(client, team_key["key"]), 401)
    assert "t1" in error["message"] and "blocked" in error["message"]
    assert chat(client, personal["key"]).status_code == 200
    admin(client, "/team/unblock", team_id="t1")
    assert chat(client, team_key["key"]).status_code == 200


def test_every_change_writes_an_audit_row_without_secrets(client: Any, app: Any) -> None:
    admin(client, "/team/new", team_id="t1")
    user = client.post("/user/new", json={"user_id": "alice"}, headers=ADMIN).get_json()
    record_secret(user["key"])
    key = new_key(client, user_id="alice")
    admin(client, "/key/update", key=key["key_id"], key_alias="k")
    rotated = admin(client, "/key/regenerate", key=key["key_id"])
    record_secret(rotated["key"])
    admin(client, "/key/block", key=key["key_id"])
    admin(client, "/key/unblock", key=key["key_id"])
    admin(client, "/user/update", user_id="alice", max_budget=3)
    admin(client, "/team/update", team_id="t1", max_budget=9)
    admin(client, "/team/member_add", team_id="t1", member={"user_id": "alice"})
    admin(client, "/team/member_update", team_id="t1", user_id="alice", role="admin")
    admin(client, "/team/member_delete", team_id="t1", user_id="alice")
    admin(client, "/team/block", team_id="t1")
    admin(client, "/team/unblock", team_id="t1")
    admin(client, "/key/delete", keys=[key["key_id"]])
    admin(client, "/team/delete", team_ids=["t1"])
    admin(client, "/user/delete", user_ids=["alice"])
    with app.extensions["llmauth"].store.use():
        audit = list(AuditLog.select().order_by(AuditLog.id))
        digests = {d for (d,) in Key.select(Key.digest).tuples()}
    actions = [(a.object_type, a.action) for a in audit]
    expected = [("team", "created"), ("user", "created"), ("key", "created"),
                ("key", "created"), ("key", "updated"), ("key", "rotated"), ("key", "blocked"),
                ("key", "unblocked"), ("user", "updated"), ("team", "updated"),
                ("team", "member_added"), ("team", "member_updated"),
                ("team", "member_deleted"), ("team", "blocked"), ("team", "unblocked"),
                ("key", "deleted"), ("team", "deleted"), ("key", "deleted"),
                ("user", "deleted")]
    assert actions == expected
    assert {a.actor for a in audit} == {"default_user_id"}
    assert {a.actor_method for a in audit} == {"master_key"}
    text = "\n".join(f"{a.before} {a.after}" for a in audit)
    assert not [s for s in SECRETS if s in text]
    assert not [d for d in digests if d in text]
    assert "digest" not in text


# -- bad input ---------------------------------------------------------------------------------


BAD_POSTS = [
    ("/user/new", {"surname": "x"}, 400, "surname"),
    ("/user/new", {"user_role": "superuser"}, 400, "user_role"),
    ("/user/new", {"user_role": "team"}, 400, "user_role"),
    ("/user/new", {"user_role": None}, 400, "user_role"),
    ("/user/new", {"max_budget": -1}, 400, "max_budget"),
    ("/user/new", {"max_budget": "lots"}, 400, "max_budget"),
    ("/user/new", {"budget_duration": "forever"}, 400, "budget_duration"),
    ("/user/new", {"models": "gpt-4o"}, 400, "models"),
    ("/user/new", {"tpm_limit": -5}, 400, "tpm_limit"),
    ("/user/new", {"teams": ["no-such-team"]}, 400, "teams"),
    ("/user/new", {"user_email": 5}, 400, "user_email"),
    ("/user/new", {"user_id": ""}, 400, "user_id"),
    ("/user/new", {"user_id": "alice"}, 400, "user_id"),  # exists
    ("/user/new", {"user_email": "alice@example.com"}, 400, "user_email"),  # taken
    ("/user/new", {"duration": "0s"}, 400, "duration"),
    ("/user/update", {}, 400, "user_id"),
    ("/user/update", {"user_id": "nobody", "max_budget": 1}, 404, "user_id"),
    ("/user/update", {"user_email": "nobody@example.com"}, 404, "user_email"),
    ("/user/update", {"user_id": "alice", "max_budget": -1}, 400, "max_budget"),
    ("/user/update", {"user_id": "alice", "user_role": "owner"}, 400, "user_role"),
    ("/user/update", {"user_id": "alice", "password": "hunter2"}, 400, "password"),
    ("/user/update", {"user_id": "alice", "spend": "x"}, 400, "spend"),
    ("/user/update", {"user_id": "alice", "teams": ["t1"]}, 400, "teams"),
    ("/user/delete", {}, 400, "user_ids"),
    ("/user/delete", {"user_ids": "alice"}, 400, "user_ids"),
    ("/user/delete", {"user_ids": []}, 400, "user_ids"),
    ("/user/delete", {"user_ids": ["nobody"]}, 404, "user_ids"),
    ("/team/new", {"team_id": ""}, 400, "team_id"),
    ("/team/new", {"team_id": "t1"}, 400, "team_id"),  # exists
    ("/team/new", {"max_budget": -0.01}, 400, "max_budget"),
    ("/team/new", {"members_with_roles": [{"role": "admin"}]}, 400, "members_with_roles"),
    ("/team/new", {"members_with_roles": [{"user_id": "x", "role": "owner"}]}, 400,
     "members_with_roles"),
    ("/team/new", {"models": [1]}, 400, "models"),
    ("/team/new", {"budget_duration": "1y"}, 400, "budget_duration"),
    ("/team/new", {"tpm_limit": 1.5}, 400, "tpm_limit"),
    ("/team/new", {"team_member_permissions": "/key/info"}, 400, "team_member_permissions"),
    ("/team/new", {"color": "red"}, 400, "color"),
    ("/team/update", {}, 400, "team_id"),
    ("/team/update", {"team_id": "nope"}, 404, "team_id"),
    ("/team/update", {"team_id": "t1", "max_budget": -1}, 400, "max_budget"),
    ("/team/update", {"team_id": "t1", "blocked": "yes"}, 400, "blocked"),
    ("/team/delete", {}, 400, "team_ids"),
    ("/team/delete", {"team_ids": []}, 400, "team_ids"),
    ("/team/delete", {"team_ids": ["nope"]}, 404, "team_ids"),
    ("/team/block", {}, 400, "team_id"),
    ("/team/block", {"team_id": "nope"}, 404, "team_id"),
    ("/team/unblock", {"team_id": 7}, 400, "team_id"),
    ("/team/unblock", {"team_id": "nope"}, 404, "team_id"),
    ("/team/member_add", {}, 400, "team_id"),
    ("/team/member_add", {"team_id": "t1"}, 400, "member"),
    ("/team/member_add", {"team_id": "nope", "member": {"user_id": "x"}}, 404, "team_id"),
    ("/team/member_add", {"team_id": "t1", "member": {"role": "admin"}}, 400, "member"),
    ("/team/member_add", {"team_id": "t1", "member": {"user_id": "x", "role": "owner"}}, 400,
     "member"),
    ("/team/member_add", {"team_id": "t1", "member": []}, 400, "member"),
    ("/team/member_add", {"team_id": "t1", "member": {"user_id": "x"},
                          "max_budget_in_team": -1}, 400, "max_budget_in_team"),
    ("/team/member_add", {"team_id": "t1", "member": {"user_id": "alice"}}, 400, "member"),
    ("/team/member_delete", {"team_id": "t1"}, 400, "user_id"),
    ("/team/member_delete", {"team_id": "t1", "user_id": "nobody"}, 404, "user_id"),
    ("/team/member_delete", {"team_id": "nope", "user_id": "alice"}, 404, "team_id"),
    ("/team/member_update", {"team_id": "t1", "user_id": "alice", "role": "owner"}, 400, "role"),
    ("/team/member_update", {"team_id": "t1", "user_id": "alice", "max_budget_in_team": -1},
     400, "max_budget_in_team"),
    ("/team/member_update", {"team_id": "t1", "user_id": "nobody", "role": "admin"}, 404,
     "user_id"),
    ("/key/generate", {"team_id": "nope"}, 400, "team_id"),
    ("/key/generate", {"user_id": 5}, 400, "user_id"),
    ("/key/generate", {"key": "not-a-key"}, 400, "key"),
    ("/key/generate", {"duration": "-1d"}, 400, "duration"),
    ("/key/update", {}, 400, "key"),
    ("/key/update", {"key": "nope"}, 404, "key"),
    ("/key/update", {"key": "nope", "max_budget": -1}, 400, "max_budget"),
    ("/key/delete", {}, 400, "keys"),
    ("/key/delete", {"keys": ["nope"]}, 404, "key"),
    ("/key/delete", {"key_aliases": ["nope"]}, 404, "key_aliases"),
    ("/key/regenerate", {}, 400, "key"),
    ("/key/regenerate", {"key": "nope"}, 404, "key"),
    ("/key/nope/regenerate", {}, 404, "key"),
    ("/key/regenerate", {"key": "nope", "grace_period": "soon"}, 400, "grace_period"),
    ("/key/block", {}, 400, "key"),
    ("/key/block", {"key": "nope"}, 404, "key"),
    ("/key/unblock", {"key": ["x"]}, 400, "key"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_POSTS,
                         ids=[f"{p}-{'-'.join(b) or 'empty'}" for p, b, _, _ in BAD_POSTS])
@SQLITE_ONLY
def test_bad_input_is_a_clear_4xx_naming_the_field(client: Any, app: Any, path: str,
                                                   body: dict[str, Any], status: int,
                                                   param: str) -> None:
    admin(client, "/team/new", team_id="t1", members_with_roles=[{"user_id": "alice"}])
    admin(client, "/user/update", user_id="alice", user_email="alice@example.com")
    before = rows(app)
    error = assert_error(client.post(path, json=body, headers=ADMIN), status)
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "llmauth_" not in error["message"]
    assert rows(app) == before


BAD_GETS = [
    ("/user/info", {"user_id": "nobody"}, 404, "user_id"),
    ("/user/info", {"user": "x"}, 400, "user"),
    ("/user/list", {"page": 0}, 400, "page"),
    ("/user/list", {"page_size": 1000}, 400, "page_size"),
    ("/user/list", {"role": "superuser"}, 400, "role"),
    ("/team/info", {}, 400, "team_id"),
    ("/team/info", {"team_id": "nope"}, 404, "team_id"),
    ("/team/list", {"page": "x"}, 400, "page"),
    ("/key/info", {"key": "nope"}, 404, "key"),
    ("/key/list", {"status": "active"}, 400, "status"),
    ("/key/list", {"include_team_keys": "perhaps"}, 400, "include_team_keys"),
]


@pytest.mark.parametrize("path,query,status,param", BAD_GETS,
                         ids=[f"{p}-{'-'.join(q) or 'empty'}" for p, q, _, _ in BAD_GETS])
@SQLITE_ONLY
def test_bad_queries_are_a_clear_4xx_naming_the_field(client: Any, path: str,
                                                      query: dict[str, Any], status: int,
                                                      param: str) -> None:
    error = assert_error(client.get(path, query_string=query, headers=ADMIN), status)
    assert error["param"] == param, error


@pytest.mark.parametrize("path", ["/user/new", "/user/update", "/team/new", "/team/member_add",
                                  "/key/generate"])
@SQLITE_ONLY
def test_bodies_that_are_not_json_objects(client: Any, path: str) -> None:
    for data, content_type in (("[1]", "application/json"), ("{oops", "application/json"),
                               ('"text"', "application/json"), ("a=b", "text/plain")):
        assert_error(client.post(path, data=data, headers={**ADMIN,
                                                          "Content-Type": content_type}), 400)


@SQLITE_ONLY
def test_non_admins_get_403_not_400_on_admin_only_endpoints(client: Any) -> None:
    admin(client, "/user/new", user_id="alice", auto_create_key=False)
    key = new_key(client, user_id="alice")["key"]
    for path in ("/user/new", "/user/delete", "/team/new", "/team/update", "/team/delete",
                 "/team/block", "/team/unblock", "/user/list"):
        method = client.get if path == "/user/list" else client.post
        response = method(path, json={"bogus": 1}, headers=bearer(key)) if method is \
            client.post else method(path, headers=bearer(key))
        assert_error(response, 403)


def test_team_admins_add_existing_users_only(client: Any, app: Any) -> None:
    admin(client, "/user/new", user_id="dora", user_email="dora@example.com",
          auto_create_key=False)
    admin(client, "/team/new", team_id="t1",
          members_with_roles=[{"user_id": "lead", "role": "admin"}])
    lead = bearer(new_key(client, user_id="lead")["key"])
    before = rows(app)
    for member in ({"user_id": "ghost"}, {"user_email": "ghost@example.com"}):
        error = assert_error(client.post("/team/member_add", headers=lead,
                                         json={"team_id": "t1", "member": member}), 404)
        assert error["param"] == "member"
    assert rows(app) == before  # no user row was created on the way
    added = client.post("/team/member_add", headers=lead,
                        json={"team_id": "t1", "member": {"user_email": "dora@example.com"}})
    assert added.status_code == 200, added.get_json()
    assert [u["user_id"] for u in added.get_json()["updated_users"]] == ["dora"]
    updated = client.post("/team/member_update", headers=lead,
                          json={"team_id": "t1", "user_id": "dora", "role": "admin"})
    assert updated.status_code == 200 and updated.get_json()["user_email"] == "dora@example.com"
    assert client.post("/team/member_delete", headers=lead,
                       json={"team_id": "t1", "user_id": "dora"}).status_code == 200


def test_creating_a_team_is_seen_at_once_by_a_process_that_looked_it_up_before(
        client: Any, app: Any) -> None:
    """A team (and a member user) looked up while absent — a JWT listing the team, a custom
    auth hook naming it — is seen as soon as ``/team/new`` returns, not after
    ``LLMAUTH_CACHE_TTL``."""
    identities = app.extensions["llmauth"].identities
    user, team = 0, 1  # positions in the loaded records
    assert identities.load(None, "t-late")[team] is None
    assert identities.load("late-admin", None)[user] is None
    admin(client, "/team/new", team_id="t-late",
          members_with_roles=[{"user_id": "late-admin", "role": "admin"}])
    assert identities.load(None, "t-late")[team].team_id == "t-late"
    assert identities.load("late-admin", None)[user].user_id == "late-admin"


@pytest.mark.parametrize("per_query", [1, 2, 500])
def test_team_list_shows_each_team_s_members_as_team_info_does(client: Any, monkeypatch: Any,
                                                               per_query: int) -> None:
    """``/team/list`` reads the memberships of many teams per query: every team still lists
    exactly its own members, in order, as ``/team/info`` shows them."""
    from flask_llmauth import teams

    monkeypatch.setattr(teams, "_MEMBERS_PER_QUERY", per_query)
    for user in ("m1", "m2", "m3"):
        admin(client, "/user/new", user_id=user)
    members = {"lt1": ["m2", "m1"], "lt2": [], "lt3": ["m3"], "lt4": ["m1", "m3", "m2"],
               "lt5": ["m1"]}
    for team_id, users in members.items():
        admin(client, "/team/new", team_id=team_id,
              members_with_roles=[{"user_id": u, "role": "user"} for u in users])
    listing = {t["team_id"]: t for t in client.get("/team/list", headers=ADMIN).get_json()}
    assert set(listing) == set(members)
    for team_id, users in members.items():
        info = admin_get(client, "/team/info", team_id=team_id)
        shown = info.get("team_info", info)["members_with_roles"]
        assert listing[team_id]["members_with_roles"] == shown
        assert [m["user_id"] for m in shown] == users


def test_a_team_named_twice_in_user_new_teams_is_joined_once(client: Any, app: Any) -> None:
    """``/user/new`` with ``"teams": ["t", "t"]`` used to insert the membership twice: the
    unique index answered with a 500. The repeat is ignored, as a repeated key id is on
    ``/key/delete``."""
    admin(client, "/team/new", team_id="twice")
    body = admin(client, "/user/new", user_id="echo", teams=["twice", "twice"],
                 auto_create_key=False)
    assert body["teams"] == ["twice"]
    info = admin_get(client, "/team/info", team_id="twice")
    assert [m["user_id"] for m in info["team_info"]["members_with_roles"]] == ["echo"]
    assert admin_get(client, "/user/info", user_id="echo")["user_info"]["teams"] == ["twice"]


def test_key_list_include_created_by_keys(client: Any, app: Any) -> None:
    """LiteLLM's ``include_created_by_keys``: a caller also sees the keys it created, while
    it is still a member of the key's team (LiteLLM's UI sends it on every listing)."""
    for name in ("alice", "bob"):
        admin(client, "/user/new", user_id=name, auto_create_key=False)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    alice = new_key(client, user_id="alice")
    made = client.post("/key/generate", json={"user_id": "bob", "team_id": "t1"},
                       headers=bearer(alice["key"]))
    assert made.status_code == 200, made.get_json()
    record_secret(made.get_json()["key"])
    bobs = made.get_json()["key_id"]
    assert made.get_json()["created_by"] == "alice"
    other = new_key(client, user_id="bob", team_id="t1")  # made by the master key

    def listed(**query: Any) -> set[str]:
        response = client.get("/key/list", query_string=query, headers=bearer(alice["key"]))
        assert response.status_code == 200, response.get_json()
        return set(response.get_json()["keys"])

    admin(client, "/team/member_update", team_id="t1", user_id="alice", role="user")
    assert listed() == {alice["key_id"]}
    assert listed(include_created_by_keys="true") == {alice["key_id"], bobs}
    assert other["key_id"] not in listed(include_created_by_keys="true", include_team_keys="true")
    admin(client, "/team/member_delete", team_id="t1", user_id="alice")
    assert listed(include_created_by_keys="true") == {alice["key_id"]}
    assert_error(client.get("/key/list", query_string={"include_created_by_keys": "maybe"},
                            headers=ADMIN), 400)


def test_created_by_keys_are_only_those_a_user_created(app_factory: Any) -> None:
    """A credential with a team but no user (here a custom-auth proxy admin) records its
    team id as ``created_by``. A user whose id is that team id, in the team, matched those
    keys with ``include_created_by_keys``; only keys a user principal created match now."""
    app = app_factory({"LLMAUTH_CUSTOM_AUTH_MODE": "auto"})
    team_admin_token = record_secret("team-admin-" + "Vb7Qx2Lm9Rt4")

    @app.llmauth.custom_auth
    def hook(request: Any, api_key: str) -> Any:
        return {"team_id": "t1", "role": "PROXY_ADMIN"} if api_key == team_admin_token else None

    client = app.test_client()
    for name in ("t1", "bob"):
        admin(client, "/user/new", user_id=name, auto_create_key=False)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "t1", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    made = client.post("/key/generate", json={"team_id": "t1", "user_id": "bob"},
                       headers=bearer(team_admin_token))
    assert made.status_code == 200, made.get_json()
    record_secret(made.get_json()["key"])
    assert made.get_json()["created_by"] == "t1"  # the label is unchanged
    by_team = made.get_json()["key_id"]
    user_t1 = new_key(client, user_id="t1")
    by_user = client.post("/key/generate", json={"user_id": "bob", "team_id": "t1"},
                          headers=bearer(user_t1["key"]))
    assert by_user.status_code == 200, by_user.get_json()
    record_secret(by_user.get_json()["key"])
    admin(client, "/team/member_update", team_id="t1", user_id="t1", role="user")
    response = client.get("/key/list", query_string={"include_created_by_keys": "true"},
                          headers=bearer(user_t1["key"]))
    assert response.status_code == 200, response.get_json()
    assert set(response.get_json()["keys"]) == {user_t1["key_id"],
                                                by_user.get_json()["key_id"]}
    assert by_team not in response.get_json()["keys"]


def test_include_created_by_keys_never_lists_the_master_keys_keys(client: Any, app: Any) -> None:
    """Keys the master key makes record ``created_by`` = ``LLMAUTH_PROXY_ADMIN_NAME``: a
    non-admin user who happens to have that ``user_id`` did not create them, and
    ``include_created_by_keys`` does not show it the other members' keys of its team."""
    name = app.extensions["llmauth"].settings.proxy_admin_name
    for user in (name, "bob"):
        admin(client, "/user/new", user_id=user, auto_create_key=False)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": name, "role": "user"}, {"user_id": "bob", "role": "user"}])
    own = new_key(client, user_id=name)
    bobs = new_key(client, user_id="bob", team_id="t1")
    assert bobs["created_by"] == name
    response = client.get("/key/list", query_string={"include_created_by_keys": "true"},
                          headers=bearer(own["key"]))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["keys"] == [own["key_id"]]
    assert_error(client.get("/key/info", query_string={"key": bobs["key_id"]},
                            headers=bearer(own["key"])), 403)
