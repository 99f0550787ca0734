"""Escalation paths found by an adversarial reading of the key, user and team services.

Each test names the path it closes; each refusal must leave the database as it was.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import ADMIN, assert_error, bearer, record_secret
from tests.test_escalation import admin, admin_key, as_key, make_user, snapshot

CHAT = "/v1/chat/completions"
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def is_proxy_admin(client: Any, key: str) -> bool:
    """Whether ``key`` may do what only a proxy admin may: list every user."""
    return bool(client.get("/user/list", headers=bearer(key)).status_code == 200)


@SQLITE_ONLY
def test_regenerate_cannot_reassign_a_key_to_another_user(client: Any, app: Any) -> None:
    """``/key/regenerate`` accepts the key fields of ``/key/update``: giving a personal key
    to a proxy-admin user through it made its holder a proxy admin."""
    make_user(client, "root", role="proxy_admin")
    make_user(client, "mallory")
    own = admin_key(client, user_id="mallory")
    before = snapshot(app)
    error = assert_error(as_key(client, own["key"], "/key/regenerate", key=own["key_id"],
                                user_id="root"), 403)
    assert error["param"] == "user_id"
    assert_error(as_key(client, own["key"], f"/key/{own['key_id']}/regenerate",
                        user_id="root"), 403)
    assert snapshot(app) == before
    assert not is_proxy_admin(client, own["key"])


@SQLITE_ONLY
def test_regenerate_cannot_move_a_key_into_a_foreign_team(client: Any, app: Any) -> None:
    make_user(client, "mallory")
    admin(client, "/team/new", team_id="rich", max_budget=1000)
    own = admin_key(client, user_id="mallory")
    before = snapshot(app)
    error = assert_error(as_key(client, own["key"], "/key/regenerate", key=own["key_id"],
                                team_id="rich"), 403)
    assert error["param"] == "team_id"
    assert snapshot(app) == before


@SQLITE_ONLY
def test_regenerate_keeps_key_aliases_unique(client: Any, app: Any) -> None:
    make_user(client, "mallory")
    admin_key(client, user_id="mallory", key_alias="taken")
    own = admin_key(client, user_id="mallory")
    before = snapshot(app)
    error = assert_error(as_key(client, own["key"], "/key/regenerate", key=own["key_id"],
                                key_alias="taken"), 400)
    assert error["param"] == "key_alias"
    assert snapshot(app) == before


@SQLITE_ONLY
def test_team_admin_regenerate_follows_the_update_rules(client: Any, app: Any) -> None:
    """A team admin may give a team key to a team member through regenerate, as through
    update; never to an outsider."""
    for user_id in ("alice", "bob", "carol"):
        make_user(client, user_id)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    alice = admin_key(client, user_id="alice")["key"]
    team_key = admin_key(client, user_id="bob", team_id="t1")
    assert_error(as_key(client, alice, "/key/regenerate", key=team_key["key_id"],
                        user_id="carol"), 403)
    moved = as_key(client, alice, "/key/regenerate", key=team_key["key_id"], user_id="alice")
    assert moved.status_code == 200, moved.get_json()
    record_secret(moved.get_json()["key"])
    assert moved.get_json()["user_id"] == "alice"


@pytest.fixture
def admin_in_team(client: Any) -> dict[str, Any]:
    """Team t1: alice (internal user) its admin; root, a proxy-admin user, a plain member
    with a team key; vic, a proxy-admin viewer, a member too."""
    make_user(client, "alice")
    make_user(client, "root", role="proxy_admin")
    make_user(client, "vic", role="proxy_admin_viewer")
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "root", "role": "user"},
        {"user_id": "vic", "role": "user"}])
    return {"alice": admin_key(client, user_id="alice")["key"],
            "roots_team_key": admin_key(client, user_id="root", team_id="t1")}


@SQLITE_ONLY
def test_team_admin_cannot_mint_a_key_for_a_more_privileged_member(
        client: Any, app: Any, admin_in_team: Any) -> None:
    """A key of a user carries that user's role: a team admin minting one for a proxy-admin
    member held a proxy-admin key."""
    alice = admin_in_team["alice"]
    before = snapshot(app)
    for user_id in ("root", "vic"):
        error = assert_error(as_key(client, alice, "/key/generate", team_id="t1",
                                    user_id=user_id), 403)
        assert error["param"] == "user_id"
    assert snapshot(app) == before
    # Members of her own rank are still hers to serve.
    make_user(client, "bob")
    admin(client, "/team/member_add", team_id="t1", member={"user_id": "bob"})
    for_bob = as_key(client, alice, "/key/generate", team_id="t1", user_id="bob")
    assert for_bob.status_code == 200, for_bob.get_json()
    assert not is_proxy_admin(client, record_secret(for_bob.get_json()["key"]))


@SQLITE_ONLY
def test_team_admin_cannot_take_over_or_hand_out_a_privileged_members_key(
        client: Any, app: Any, admin_in_team: Any) -> None:
    alice, roots = admin_in_team["alice"], admin_in_team["roots_team_key"]
    own_team_key = admin_key(client, user_id="alice", team_id="t1")
    before = snapshot(app)
    # Regenerating root's team key would hand alice its new secret.
    assert_error(as_key(client, alice, "/key/regenerate", key=roots["key_id"]), 403)
    # Giving her own team key (whose secret she holds) to root, by update or regenerate.
    for path in ("/key/update", "/key/regenerate"):
        assert_error(as_key(client, alice, path, key=own_team_key["key_id"], user_id="root"),
                     403)
    assert snapshot(app) == before
    assert not is_proxy_admin(client, own_team_key["key"])
    # A proxy admin still may.
    moved = admin(client, "/key/update", key=own_team_key["key_id"], user_id="root")
    assert moved["user_id"] == "root"


@SQLITE_ONLY
def test_a_team_key_speaks_for_its_user_inside_its_team_only(client: Any, app: Any) -> None:
    """A team admin can add any existing user to its team and mint a team key for them (or
    regenerate their team key): with it, alice acted as carol everywhere, regenerating
    carol's personal key (and holding its secret), running carol's other team, changing
    carol's e-mail address."""
    for user_id in ("alice", "carol", "dave"):
        make_user(client, user_id)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}])
    admin(client, "/team/new", team_id="t2", members_with_roles=[
        {"user_id": "carol", "role": "admin"}, {"user_id": "dave", "role": "user"}])
    alice = admin_key(client, user_id="alice")["key"]
    carol_personal = admin_key(client, user_id="carol", models=["gpt-4o"])
    t2_key = admin_key(client, user_id="dave", team_id="t2")
    assert as_key(client, alice, "/team/member_add", team_id="t1",
                  member={"user_id": "carol"}).status_code == 200
    minted = as_key(client, alice, "/key/generate", team_id="t1", user_id="carol")
    assert minted.status_code == 200, minted.get_json()
    as_carol = record_secret(minted.get_json()["key"])
    before = snapshot(app)
    for path, body in (
        ("/key/regenerate", {"key": carol_personal["key_id"]}),
        ("/key/update", {"key": carol_personal["key_id"], "key_alias": "x"}),
        ("/key/delete", {"keys": [carol_personal["key_id"]]}),
        ("/key/generate", {}),
        ("/key/generate", {"team_id": "t2"}),
        ("/key/regenerate", {"key": t2_key["key_id"]}),
        ("/key/block", {"key": t2_key["key_id"]}),
        ("/team/member_add", {"team_id": "t2", "member": {"user_id": "alice",
                                                          "role": "admin"}}),
        ("/team/member_update", {"team_id": "t2", "user_id": "dave", "role": "admin"}),
        ("/user/update", {"user_email": "alice@evil.example"}),
    ):
        assert_error(as_key(client, as_carol, path, **body), 403)
    for path, query in (("/key/info", {"key": carol_personal["key_id"]}),
                        ("/key/info", {"key": t2_key["key_id"]}),
                        ("/team/info", {"team_id": "t2"})):
        assert_error(client.get(path, query_string=query, headers=bearer(as_carol)), 403)
    assert_error(client.get("/key/list", query_string={"team_id": "t2"},
                            headers=bearer(as_carol)), 403)
    assert snapshot(app) == before
    listed = client.get("/key/list", query_string={"include_team_keys": "true",
                                                   "return_full_object": "true"},
                        headers=bearer(as_carol)).get_json()["keys"]
    assert listed and {k["team_id"] for k in listed} == {"t1"}
    teams = client.get("/team/list", headers=bearer(as_carol)).get_json()
    assert [t["team_id"] for t in teams] == ["t1"]
    # Inside its team the key is carol's as before ...
    assert client.get("/team/info", query_string={"team_id": "t1"},
                      headers=bearer(as_carol)).status_code == 200
    # ... and carol's personal key still manages everything that is hers.
    carol = carol_personal["key"]
    assert client.get("/team/info", query_string={"team_id": "t2"},
                      headers=bearer(carol)).status_code == 200
    regenerated = as_key(client, carol, "/key/regenerate", key=t2_key["key_id"])
    assert regenerated.status_code == 200, regenerated.get_json()
    record_secret(regenerated.get_json()["key"])
    assert as_key(client, carol, "/user/update", user_alias="C").status_code == 200


@SQLITE_ONLY
@pytest.mark.parametrize("budgets", [
    {"gpt-4o": {"budget_limit": "x"}}, {"gpt-4o": {"budget_limit": -5}}, {"gpt-4o": 5},
    {"gpt-4o": {}}, {"gpt-4o": {"budget_limit": 1, "time_period": "zz"}},
    {"gpt-4o": {"budget_limt": 1}}, {"gpt-4o": {"budget_limit": 1, "rpm_limit": "many"}},
])
def test_malformed_model_budgets_are_refused(client: Any, app: Any, budgets: Any) -> None:
    """A malformed per-model budget was stored and then silently not enforced."""
    before = snapshot(app)
    error = assert_error(client.post("/key/generate", json={"model_max_budget": budgets},
                                     headers=ADMIN), 400)
    assert error["param"] == "model_max_budget"
    assert snapshot(app) == before


@SQLITE_ONLY
def test_well_formed_model_budgets_are_kept_as_given(client: Any) -> None:
    budgets = {"gpt-4o": {"budget_limit": 5.0, "time_period": "1d", "rpm_limit": 3},
               "o3": {"max_budget": 1, "budget_duration": "30d", "tpm_limit": 100}}
    assert admin_key(client, model_max_budget=budgets)["model_max_budget"] == budgets


def promote(client: Any, user_id: str, role: str = "proxy_admin") -> None:
    admin(client, "/user/update", user_id=user_id, user_role=role)


def test_a_key_a_team_admin_made_for_a_member_never_gains_a_later_promotion(
        client: Any, app: Any) -> None:
    """A team admin mints a team key for bob (or regenerates bob's key, or hands its own
    key to bob) and keeps the secret; bob is promoted to proxy admin later: the key it
    holds was a proxy-admin key. Such a key is capped at the role of whoever gave out its
    secret, and keys it mints for its user inherit the cap."""
    for user_id in ("alice", "bob"):
        make_user(client, user_id)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}],
          team_member_permissions=["/key/info", "/key/generate"])
    alice = admin_key(client, user_id="alice")["key"]
    minted = as_key(client, alice, "/key/generate", team_id="t1", user_id="bob").get_json()
    assert minted["max_role"] == "internal_user" and minted["created_by"] == "alice"
    record_secret(minted["key"])
    bobs_admin_made = admin_key(client, user_id="bob", team_id="t1")  # a proxy admin's
    assert bobs_admin_made["max_role"] is None
    renamed = as_key(client, alice, "/key/update", key=bobs_admin_made["key_id"],
                     key_alias="bob-t1")  # no secret changes hands: no cap
    assert renamed.status_code == 200 and renamed.get_json()["max_role"] is None
    regenerated = admin_key(client, user_id="bob", team_id="t1")
    rotated = as_key(client, alice, "/key/regenerate", key=regenerated["key_id"]).get_json()
    assert rotated["max_role"] == "internal_user"
    record_secret(rotated["key"])
    handed = admin_key(client, user_id="alice", team_id="t1")
    moved = as_key(client, alice, "/key/update", key=handed["key_id"], user_id="bob")
    assert moved.status_code == 200 and moved.get_json()["max_role"] == "internal_user"
    # bob's capped key mints a team key for bob: the cap goes with it.
    child = as_key(client, minted["key"], "/key/generate", team_id="t1").get_json()
    assert child["user_id"] == "bob" and child["max_role"] == "internal_user"
    record_secret(child["key"])

    for key in (minted["key"], rotated["key"], handed["key"], child["key"]):
        assert not is_proxy_admin(client, key)
    promote(client, "bob")
    assert is_proxy_admin(client, bobs_admin_made["key"])  # minted by a proxy admin
    before = snapshot(app)
    for key in (minted["key"], rotated["key"], handed["key"], child["key"]):
        assert not is_proxy_admin(client, key)
        assert_error(as_key(client, key, "/user/update", user_id="alice",
                            user_role="proxy_admin"), 403)
        assert client.post(CHAT, json={"model": "gpt-4o"},
                           headers=bearer(key)).status_code == 200  # still bob's key
    assert snapshot(app) == before
    # A demotion below the cap still applies at once.
    promote(client, "bob", "internal_user_viewer")
    assert client.get("/key/info", query_string={"key": minted["key_id"]},
                      headers=bearer(minted["key"])).status_code == 200
    assert_error(as_key(client, minted["key"], "/key/generate", team_id="t1"), 403)
