"""A second, adversarial reading of the management API's authorization: what a malicious
tenant tried with real requests and the rules it found missing. Each refusal must leave the
database exactly as it was."""

from __future__ import annotations

from typing import Any

import pytest

from flask_llmauth.store.tables import Customer, Team, TeamMembership
from tests.helpers import ADMIN, assert_error, bearer, record_secret
from tests.test_escalation import admin, admin_key, as_key, make_user, snapshot

#: Rule and validation tests need no second database.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def memberships(app: Any) -> dict[tuple[str, str], dict[str, Any]]:
    with app.extensions["llmauth"].store.use():
        return {(m.team_id, m.user_id): {**m.__data__} for m in TeamMembership.select()}


# -- a privileged member's key ------------------------------------------------------------------


@pytest.fixture
def root_in_team(client: Any) -> dict[str, Any]:
    """Team t1: alice its admin, bob a plain member, root a proxy admin who is a member."""
    make_user(client, "alice")
    make_user(client, "bob")
    make_user(client, "root", "proxy_admin")
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"},
        {"user_id": "root", "role": "user"}])
    return {"alice": admin_key(client, user_id="alice")["key"],
            "roots_team_key": admin_key(client, user_id="root", team_id="t1"),
            "bobs_team_key": admin_key(client, user_id="bob", team_id="t1")}


@SQLITE_ONLY
def test_a_team_admin_cannot_take_a_privileged_members_key_by_handing_it_over(
        client: Any, app: Any, root_in_team: Any) -> None:
    """Regenerating root's team key is refused (alice would hold a proxy admin's secret);
    handing the key to herself first (or to a member, or to nobody: a service account)
    and regenerating it then gave her root's key all the same."""
    alice, roots = root_in_team["alice"], root_in_team["roots_team_key"]
    before = snapshot(app)
    for user_id in ("alice", "bob", None):
        for path in ("/key/update", "/key/regenerate"):
            error = assert_error(as_key(client, alice, path, key=roots["key_id"],
                                        user_id=user_id), 403)
            assert error["param"] == "user_id", (path, user_id, error)
    assert_error(as_key(client, alice, "/key/regenerate", key=roots["key_id"]), 403)
    assert snapshot(app) == before
    # What a team admin may do to a member's key stays as it was.
    bobs = root_in_team["bobs_team_key"]
    moved = as_key(client, alice, "/key/update", key=bobs["key_id"], user_id="alice")
    assert moved.status_code == 200 and moved.get_json()["user_id"] == "alice"
    rotated = as_key(client, alice, "/key/regenerate", key=bobs["key_id"])
    assert rotated.status_code == 200
    record_secret(rotated.get_json()["key"])
    # A proxy admin still hands root's key over.
    assert admin(client, "/key/update", key=roots["key_id"], user_id="bob")["user_id"] == "bob"


# -- viewers are read-only, team admins or not ----------------------------------------------------


@SQLITE_ONLY
def test_a_viewer_team_admin_reads_its_team_but_never_changes_it(client: Any, app: Any) -> None:
    """An ``internal_user_viewer`` made admin of a team already could not create, update
    or delete its team's keys; it still changed the team's members, and with a key granted
    the key-management routes it blocked and unblocked the team's keys."""
    make_user(client, "vic", "internal_user_viewer")
    make_user(client, "bob")
    make_user(client, "carol")
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "vic", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    plain = admin_key(client, user_id="vic")["key"]
    managing = admin_key(client, user_id="vic", key_type="management")["key"]
    bobs = admin_key(client, user_id="bob", team_id="t1")
    before, members = snapshot(app), memberships(app)
    for credential, path, body in (
        (plain, "/team/member_add", {"team_id": "t1", "member": {"user_id": "carol"}}),
        (plain, "/team/member_update", {"team_id": "t1", "user_id": "bob", "role": "admin"}),
        (plain, "/team/member_update", {"team_id": "t1", "user_id": "bob",
                                        "max_budget_in_team": 1000}),
        (plain, "/team/member_delete", {"team_id": "t1", "user_id": "bob"}),
        (managing, "/key/block", {"key": bobs["key_id"]}),
        (managing, "/key/unblock", {"key": bobs["key_id"]}),
        (managing, "/key/update", {"key": bobs["key_id"], "blocked": True}),
    ):
        assert_error(as_key(client, credential, path, **body), 403)
    assert snapshot(app) == before and memberships(app) == members
    # Reading stays: the team, with every key of it, as its admin sees them.
    info = client.get("/team/info", query_string={"team_id": "t1"}, headers=bearer(plain))
    assert info.status_code == 200
    assert bobs["key_id"] in {k["key_id"] for k in info.get_json()["keys"]}
    # An internal user in the same seat still manages the team.
    admin(client, "/user/update", user_id="vic", user_role="internal_user")
    assert as_key(client, plain, "/team/member_update", team_id="t1", user_id="bob",
                  role="admin").status_code == 200


@SQLITE_ONLY
def test_a_team_admin_never_grants_a_key_routes_beyond_its_own_role(
        client: Any, app: Any) -> None:
    """A key's ``allowed_routes`` lift its role's denials (LiteLLM step 12), which only a
    proxy admin may do: a team admin checked the routes it granted against its own role
    only, so a viewer member's team key, or a service account's, got an internal user's
    routes (key management; the spend reports for a service account)."""
    make_user(client, "alice")
    make_user(client, "vic", "internal_user_viewer")
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "vic", "role": "user"}])
    alice = admin_key(client, user_id="alice")["key"]
    vics = admin_key(client, user_id="vic", team_id="t1")
    before = snapshot(app)
    for user_id, routes in (("vic", ["/key/generate"]), ("vic", ["key_management_routes"]),
                            (None, ["spend_tracking_routes"]), (None, ["/key/update"])):
        body = {"team_id": "t1", "allowed_routes": routes}
        if user_id is not None:
            body["user_id"] = user_id
        error = assert_error(as_key(client, alice, "/key/generate", **body), 403)
        assert error["param"] == "allowed_routes", (user_id, routes, error)
    for path in ("/key/update", "/key/regenerate"):
        assert_error(as_key(client, alice, path, key=vics["key_id"],
                            allowed_routes=["/key/delete"]), 403)
    assert snapshot(app) == before
    # Routes the key's role reaches anyway are a restriction, granted as before.
    for user_id in ("vic", None):
        body = {"team_id": "t1", "allowed_routes": ["llm_api_routes", "/key/info"]}
        if user_id is not None:
            body["user_id"] = user_id
        minted = as_key(client, alice, "/key/generate", **body)
        assert minted.status_code == 200, minted.get_json()
        record_secret(minted.get_json()["key"])
    # A proxy admin still grants them.
    granted = admin_key(client, team_id="t1", allowed_routes=["/spend/logs"])
    assert client.get("/spend/logs", headers=bearer(granted["key"])).status_code == 200


def _chat_statuses(client: Any, key: str, count: int = 3) -> list[int]:
    return [client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                        headers=bearer(key)).status_code for _ in range(count)]


@SQLITE_ONLY
def test_a_per_model_limit_kept_in_metadata_binds_the_keys_its_key_creates(
        client: Any, app: Any) -> None:
    """The rate limiter reads a key's per-model limits from ``model_rpm_limit`` /
    ``model_tpm_limit`` and from the same maps in its ``metadata`` (where LiteLLM keeps
    them); a key limited through its metadata minted keys with no per-model limit at all."""
    make_user(client, "alice")
    parent = admin_key(client, user_id="alice", metadata={
        "model_rpm_limit": {"gpt-4o": 1}, "model_tpm_limit": {"gpt-4o": 500}})["key"]
    assert _chat_statuses(client, parent) == [200, 429, 429]
    before = snapshot(app)
    for fields in ({"model_rpm_limit": {"gpt-4o": 1000}}, {"model_rpm_limit": {}},
                   {"model_tpm_limit": {"gpt-4o": 10**6}}):
        error = assert_error(as_key(client, parent, "/key/generate", **fields), 403)
        assert error["param"] in fields, (fields, error)
    assert snapshot(app) == before
    # Inherited as the fields (which the limiter reads first: the child's own metadata
    # cannot lift them).
    minted = as_key(client, parent, "/key/generate",
                    metadata={"model_rpm_limit": {"gpt-4o": 1000}})
    assert minted.status_code == 200, minted.get_json()
    child = minted.get_json()
    record_secret(child["key"])
    assert child["model_rpm_limit"] == {"gpt-4o": 1}
    assert child["model_tpm_limit"] == {"gpt-4o": 500}
    assert _chat_statuses(client, child["key"]) == [200, 429, 429]
    # Nor does the key lift its own limit (or another of its user's keys') by rewriting the
    # metadata that holds it.
    parent_id = client.get("/key/info", headers=bearer(parent)).get_json()["key"]
    sibling = admin_key(client, user_id="alice", metadata={"model_rpm_limit": {"gpt-4o": 1}})
    before = snapshot(app)
    for target, metadata in ((parent_id, {}), (parent_id, {"model_rpm_limit": {"gpt-4o": 99}}),
                             (sibling["key_id"], {"purpose": "lifted"})):
        error = assert_error(as_key(client, parent, "/key/update", key=target,
                                    metadata=metadata), 403)
        assert error["param"] == "model_rpm_limit", error
    assert snapshot(app) == before
    kept = as_key(client, parent, "/key/update", key=sibling["key_id"], metadata={
        "purpose": "kept", "model_rpm_limit": {"gpt-4o": 1}})
    assert kept.status_code == 200, kept.get_json()


# -- bad input ------------------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for level in range(depth):
        value = {"a": value} if level % 2 else [value]
    return value


@SQLITE_ONLY
def test_deeply_nested_metadata_is_a_400_not_a_500(client: Any, app: Any) -> None:
    """A ``metadata`` object a few hundred levels deep is small (a few kB) and valid JSON,
    but writing its audit row ran out of stack: a 500 (an exception under TESTING)."""
    make_user(client, "alice")
    admin(client, "/team/new", team_id="t1")
    admin(client, "/customer/new", user_id="c1")
    key = admin_key(client, user_id="alice")
    deep = {"deep": _nested(500)}
    before = snapshot(app)
    with app.extensions["llmauth"].store.use():
        teams, customers = Team.select().count(), Customer.select().count()
    for path, body, param in (
        ("/key/generate", {"user_id": "alice", "metadata": deep}, "metadata"),
        ("/key/update", {"key": key["key_id"], "metadata": deep}, "metadata"),
        ("/key/regenerate", {"key": key["key_id"], "metadata": deep}, "metadata"),
        ("/user/new", {"user_id": "u2", "metadata": deep}, "metadata"),
        ("/user/update", {"user_id": "alice", "metadata": deep}, "metadata"),
        ("/user/update", {"user_id": "alice", "model_max_budget": deep}, "model_max_budget"),
        ("/team/new", {"team_id": "t2", "metadata": deep}, "metadata"),
        ("/team/update", {"team_id": "t1", "metadata": deep}, "metadata"),
        ("/customer/new", {"user_id": "c2", "metadata": deep}, "metadata"),
        ("/customer/update", {"user_id": "c1", "metadata": deep}, "metadata"),
    ):
        error = assert_error(client.post(path, json=body, headers=ADMIN), 400)
        assert error["param"] == param and "nested" in error["message"], (path, error)
    # An internal user's own key, too.
    error = assert_error(as_key(client, key["key"], "/key/generate", metadata=deep), 400)
    assert error["param"] == "metadata"
    assert snapshot(app) == before
    with app.extensions["llmauth"].store.use():
        assert (Team.select().count(), Customer.select().count()) == (teams, customers)
    # Nesting as deep as the limit is kept as given; one level more is refused.
    assert_error(client.post("/key/update", json={"key": key["key_id"],
                                                  "metadata": {"deep": _nested(32)}},
                             headers=ADMIN), 400)
    fine = {"deep": _nested(31)}
    updated = admin(client, "/key/update", key=key["key_id"], metadata=fine)
    assert updated["metadata"] == fine


def test_a_write_that_loses_a_race_is_a_409_not_a_500(client: Any, app: Any,
                                                       monkeypatch: Any) -> None:
    """Two requests creating the same object at once (a key alias, a team member) both pass
    the service's "already exists?" check on Postgres, and the second insert breaks a
    unique constraint: that was a 500. The race is played here by skipping the check."""
    from flask_llmauth.keys import KeyService
    from flask_llmauth.teams import TeamService

    make_user(client, "alice")
    admin(client, "/team/new", team_id="t1", members_with_roles=[{"user_id": "alice"}])
    admin_key(client, key_alias="taken")
    monkeypatch.setattr(KeyService, "_check_alias_free", lambda self, *args: None)
    monkeypatch.setattr(TeamService, "_membership", lambda self, *args: None)
    before = snapshot(app)
    for path, body in (("/key/generate", {"key_alias": "taken"}),
                       ("/team/member_add", {"team_id": "t1", "member": {"user_id": "alice"}})):
        error = assert_error(client.post(path, json=body, headers=ADMIN), 409)
        assert "retry" in error["message"], error
    assert snapshot(app) == before



def test_an_unknown_role_stored_on_a_user_counts_as_internal_user(client: Any,
                                                                  app: Any) -> None:
    """authorization.md: "An unknown role string found in the database counts as
    `internal_user`" — never more (no admin routes), and not less (its own key management)."""
    from flask_llmauth.store.tables import User

    assert client.post("/user/new", headers=ADMIN, json={
        "user_id": "odd", "auto_create_key": False}).status_code == 200
    key = record_secret(client.post("/key/generate", json={"user_id": "odd"},
                                    headers=ADMIN).get_json()["key"])
    state = app.extensions["llmauth"]
    with state.store.use():
        User.update(user_role="superuser").where(User.user_id == "odd").execute()
    state.invalidate("user:odd")
    mine = client.post("/key/generate", json={"user_id": "odd"}, headers=bearer(key))
    assert mine.status_code == 200, mine.get_json()
    record_secret(mine.get_json()["key"])
    assert_error(client.get("/user/list", headers=bearer(key)), 403)
    assert_error(client.post("/key/generate", json={"user_id": "someone-else"},
                             headers=bearer(key)), 403)
