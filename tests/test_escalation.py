"""Escalation guards: what a non-admin may do to keys and to itself.

LiteLLM issues #7336 (keys for other users), #8031 (reassigning a key), #8029 (keys for
models beyond one's own), CVE-2026-47101 (``allowed_routes`` not checked against the
creator) and CVE-2026-47102 (``/user/update`` mass assignment). Each refusal must leave the
database exactly as it was.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from flask_llmauth.store.tables import Key, TeamMembership, User
from tests.helpers import ADMIN, assert_error, bearer, record_secret
from tests.test_models_access import CONFIG, UNIVERSE, allowed

CHAT = "/v1/chat/completions"
#: Rule and validation tests need no second database; storage-heavy ones run on both.
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def admin(client: Any, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return response.get_json()  # type: ignore[no-any-return]


def make_user(client: Any, user_id: str, role: str = "internal_user", **fields: Any) -> None:
    admin(client, "/user/new", user_id=user_id, user_role=role, auto_create_key=False, **fields)


def admin_key(client: Any, **fields: Any) -> dict[str, Any]:
    body = admin(client, "/key/generate", **fields)
    record_secret(body["key"])
    return body


def as_key(client: Any, credential: str, path: str, /, **body: Any) -> Any:
    return client.post(path, json=body, headers=bearer(credential))


def snapshot(app: Any) -> dict[str, Any]:
    """Every key and user row, for "nothing changed" assertions."""
    with app.extensions["llmauth"].store.use():
        keys = {k.key_id: {**k.__data__} for k in Key.select()}
        users = {u.user_id: {**u.__data__} for u in User.select()}
    return {"keys": keys, "users": users}


@pytest.fixture
def alice(client: Any) -> dict[str, Any]:
    """An internal user with a plain personal key."""
    make_user(client, "alice")
    make_user(client, "bob")
    return admin_key(client, user_id="alice")


# -- whose keys ---------------------------------------------------------------------------------


@SQLITE_ONLY
def test_non_admin_creates_keys_only_for_itself(client: Any, app: Any, alice: Any) -> None:
    before = snapshot(app)
    error = assert_error(as_key(client, alice["key"], "/key/generate", user_id="bob"), 403)
    assert error["param"] == "user_id"
    assert "User can only create keys for themselves" in error["message"]
    assert snapshot(app) == before
    mine = as_key(client, alice["key"], "/key/generate").get_json()
    record_secret(mine["key"])
    assert mine["user_id"] == "alice" and mine["created_by"] == "alice"
    explicit = as_key(client, alice["key"], "/key/generate", user_id="alice")
    assert explicit.status_code == 200 and explicit.get_json()["user_id"] == "alice"


def test_non_admin_cannot_reassign_a_key(client: Any, app: Any, alice: Any) -> None:
    other = admin_key(client, user_id="alice")
    before = snapshot(app)
    for user_id in ("bob", None):
        error = assert_error(as_key(client, alice["key"], "/key/update", key=other["key_id"],
                                    user_id=user_id), 403)
        assert error["param"] == "user_id"
    assert snapshot(app) == before
    # Changing anything else of one's own key is fine.
    response = as_key(client, alice["key"], "/key/update", key=other["key_id"], key_alias="mine")
    assert response.status_code == 200 and response.get_json()["user_id"] == "alice"


@SQLITE_ONLY
def test_viewers_cannot_create_keys(client: Any, app: Any) -> None:
    for role in ("internal_user_viewer", "proxy_admin_viewer"):
        make_user(client, f"v-{role}", role)
        key = admin_key(client, user_id=f"v-{role}")["key"]
        before = snapshot(app)
        assert_error(as_key(client, key, "/key/generate"), 403)
        assert_error(as_key(client, key, "/key/generate", user_id=f"v-{role}"), 403)
        assert snapshot(app) == before


# -- models ---------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_key_models_never_exceed_the_creators(client: Any, app: Any, alice: Any) -> None:
    parent = admin_key(client, user_id="alice", models=["gpt-4o", "gpt-4o-mini"])["key"]
    before = snapshot(app)
    for models in (["gpt-5"], ["*"], ["all-proxy-models"], [], ["gpt-*"], ["gpt-4o", "o3"]):
        error = assert_error(as_key(client, parent, "/key/generate", models=models), 403)
        assert error["param"] == "models", models
    assert snapshot(app) == before
    narrower = as_key(client, parent, "/key/generate", models=["gpt-4o"]).get_json()
    assert narrower["models"] == ["gpt-4o"]
    inherited = as_key(client, parent, "/key/generate").get_json()
    assert inherited["models"] == ["gpt-4o", "gpt-4o-mini"]
    record_secret(narrower["key"])
    record_secret(inherited["key"])
    # Aliases may not smuggle a model in either.
    for aliases in ({"gpt-4o": "gpt-5"}, {"gpt-5": "gpt-4o"}):
        error = assert_error(as_key(client, parent, "/key/generate", models=["gpt-4o"],
                                    aliases=aliases), 403)
        assert error["param"] == "aliases"
    ok = as_key(client, parent, "/key/generate", aliases={"gpt-4o-mini": "gpt-4o"})
    assert ok.status_code == 200
    record_secret(ok.get_json()["key"])


@SQLITE_ONLY
def test_key_update_cannot_widen_models(client: Any, app: Any, alice: Any) -> None:
    parent = admin_key(client, user_id="alice", models=["gpt-4o", "gpt-4o-mini"])
    before = snapshot(app)
    assert_error(as_key(client, parent["key"], "/key/update", key=parent["key_id"],
                        models=["gpt-5"]), 403)
    assert_error(as_key(client, parent["key"], "/key/update", key=parent["key_id"], models=[]),
                 403)
    assert snapshot(app) == before
    response = as_key(client, parent["key"], "/key/update", key=parent["key_id"],
                      models=["gpt-4o"])
    assert response.status_code == 200 and response.get_json()["models"] == ["gpt-4o"]
    # Narrowed, it cannot widen itself back.
    assert_error(as_key(client, parent["key"], "/key/update", key=parent["key_id"],
                        models=["gpt-4o", "gpt-4o-mini"]), 403)
    # But an owner may narrow a key an admin made more generous than its own credential.
    generous = admin_key(client, user_id="alice", models=["gpt-4o", "gpt-5", "o3"])
    response = as_key(client, parent["key"], "/key/update", key=generous["key_id"],
                      models=["gpt-5"])
    assert response.status_code == 200 and response.get_json()["models"] == ["gpt-5"]


def test_property_granted_models_are_within_the_creators(app_factory: Any) -> None:
    """Random creators and requests: whenever a non-admin's key is created, every model it
    can call, the credential that created it can call too."""
    app = app_factory(config=CONFIG)
    client = app.test_client()
    pool = ["gpt-4o", "gpt-4o-mini", "gpt-5", "o3", "sonnet", "haiku", "openai/*", "gpt-*",
            "anthropic/*", "beta-models", "anthropic-models", "cheap-models", "cheap", "*",
            "all-team-models", "mistral-large"]
    rng = random.Random(20260801)
    accepted = refused = 0
    violations = []
    for case in range(40):
        user_id, team_id = f"p{case}", f"pt{case}"
        team_models = rng.sample(pool, rng.randint(0, 3))
        admin(client, "/team/new", team_id=team_id, models=team_models,
              members_with_roles=[{"user_id": user_id, "role": "admin"}])
        creator_fields: dict[str, Any] = {"user_id": user_id,
                                          "models": rng.sample(pool, rng.randint(0, 3))}
        if rng.random() < 0.5:
            creator_fields["team_id"] = team_id
        creator = admin_key(client, **creator_fields)["key"]
        request: dict[str, Any] = {"models": rng.sample(pool, rng.randint(0, 3))}
        if rng.random() < 0.3:
            del request["models"]
        if rng.random() < 0.4:
            request["team_id"] = team_id
        response = as_key(client, creator, "/key/generate", **request)
        if "team_id" in creator_fields and "team_id" not in request:
            # A team key creates keys of its own team only (test_security_review).
            assert_error(response, 403)
            assert response.get_json()["error"]["param"] == "team_id", response.get_json()
            continue
        if response.status_code == 403:
            refused += 1
            assert response.get_json()["error"]["param"] == "models", response.get_json()
            continue
        assert response.status_code == 200, response.get_json()
        accepted += 1
        child = record_secret(response.get_json()["key"])
        extra = (*UNIVERSE, "anthropic/claude-3-5-haiku", "gpt-4.1")
        granted, own = allowed(client, child, extra), allowed(client, creator, extra)
        if not granted <= own:
            violations.append((creator_fields, request, sorted(granted - own)))
    assert not violations, violations
    assert accepted >= 8 and refused >= 8, (accepted, refused)


# -- routes ---------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_routes_and_key_types_stay_within_the_creators_role(client: Any, app: Any,
                                                            alice: Any) -> None:
    before = snapshot(app)
    for fields in ({"allowed_routes": ["/*"]}, {"allowed_routes": ["/user/new"]},
                   {"allowed_routes": ["management_routes"]}, {"key_type": "management"},
                   {"allowed_routes": ["/key/*"]}, {"allowed_routes": ["/unclassified"]},
                   {"allowed_routes": ["LiteLLMRoutes.master_key_only_routes"]}):
        error = assert_error(as_key(client, alice["key"], "/key/generate", **fields), 403)
        assert error["param"] == "allowed_routes", fields
    assert snapshot(app) == before
    for fields in ({"key_type": "llm_api"}, {"key_type": "read_only"},
                   {"allowed_routes": ["/v1/chat/completions", "/key/generate"]},
                   {"allowed_routes": ["info_routes", "spend_tracking_routes"]}):
        response = as_key(client, alice["key"], "/key/generate", **fields)
        assert response.status_code == 200, (fields, response.get_json())
        record_secret(response.get_json()["key"])


@SQLITE_ONLY
def test_a_route_limited_key_creates_only_route_limited_keys(client: Any, alice: Any) -> None:
    parent = admin_key(client, user_id="alice",
                       allowed_routes=["/key/generate", "llm_api_routes"])["key"]
    inherited = as_key(client, parent, "/key/generate").get_json()
    record_secret(inherited["key"])
    assert inherited["allowed_routes"] == ["/key/generate", "llm_api_routes"]
    for fields in ({"allowed_routes": []}, {"key_type": "default"}, {"key_type": "read_only"},
                   {"allowed_routes": ["/key/list"]}):
        assert_error(as_key(client, parent, "/key/generate", **fields), 403)
    narrower = as_key(client, parent, "/key/generate", key_type="llm_api")
    assert narrower.status_code == 200
    child = record_secret(narrower.get_json()["key"])
    assert as_key(client, child, CHAT, model="m").status_code == 200
    assert_error(as_key(client, child, "/key/generate"), 403)


# -- spend, blocking, limits, expiry, IPs ------------------------------------------------------


@SQLITE_ONLY
def test_non_admin_cannot_set_spend_or_unblock(client: Any, app: Any, alice: Any) -> None:
    blocked = admin_key(client, user_id="alice")
    admin(client, "/key/block", key=blocked["key_id"])
    before = snapshot(app)
    error = assert_error(as_key(client, alice["key"], "/key/generate", spend=0), 403)
    assert error["param"] == "spend"
    assert_error(as_key(client, alice["key"], "/key/update", key=alice["key_id"], spend=0), 403)
    error = assert_error(as_key(client, alice["key"], "/key/update", key=blocked["key_id"],
                                blocked=False), 403)
    assert error["param"] == "blocked"
    assert_error(as_key(client, alice["key"], "/key/unblock", key=blocked["key_id"]), 403)
    assert_error(as_key(client, alice["key"], "/key/block", key=alice["key_id"]), 403)
    assert_error(as_key(client, alice["key"], "/key/regenerate", key=blocked["key_id"],
                        blocked=False), 403)
    assert snapshot(app) == before
    assert_error(as_key(client, blocked["key"], CHAT, model="m"), 401)


@SQLITE_ONLY
def test_budget_limits_ips_and_expiry_never_exceed_the_creators(client: Any, app: Any) -> None:
    make_user(client, "erin")
    parent = admin_key(client, user_id="erin", max_budget=10, rpm_limit=5, tpm_limit=100,
                       max_parallel_requests=2, duration="1d", budget_duration="30d",
                       allowed_ips=["10.0.0.0/8"], model_rpm_limit={"gpt-4o": 3})
    lan = {"REMOTE_ADDR": "10.1.2.3"}

    def generate(**body: Any) -> Any:
        return client.post("/key/generate", json=body, headers=bearer(parent["key"]),
                           environ_base=lan)

    before = snapshot(app)
    for field, value in (("max_budget", 20), ("max_budget", None), ("rpm_limit", 6),
                         ("tpm_limit", 1000), ("max_parallel_requests", 3), ("duration", "30d"),
                         ("duration", None), ("allowed_ips", ["0.0.0.0/0"]), ("allowed_ips", []),
                         ("allowed_ips", ["192.168.0.0/16"]), ("budget_duration", "1m"),
                         ("model_rpm_limit", {"gpt-4o": 300})):
        error = assert_error(generate(**{field: value}), 403)
        assert error["param"] == field, (field, value)
    assert snapshot(app) == before
    child = generate().get_json()
    record_secret(child["key"])
    assert (child["max_budget"], child["rpm_limit"], child["tpm_limit"],
            child["max_parallel_requests"]) == (10, 5, 100, 2)
    assert child["allowed_ips"] == ["10.0.0.0/8"] and child["budget_duration"] == "30d"
    assert child["model_rpm_limit"] == {"gpt-4o": 3}
    assert child["expires"] is not None and child["expires"] <= parent["expires"]
    smaller = generate(max_budget=1, rpm_limit=1, duration="1h", allowed_ips=["10.9.0.0/16"])
    assert smaller.status_code == 200, smaller.get_json()
    record_secret(smaller.get_json()["key"])
    assert smaller.get_json()["expires"] < parent["expires"]
    # The parent cannot loosen itself either.
    for field, value in (("max_budget", 11), ("duration", "7d"), ("allowed_ips", None)):
        response = client.post("/key/update", headers=bearer(parent["key"]), environ_base=lan,
                               json={"key": parent["key_id"], field: value})
        assert_error(response, 403)
    # An admin-made generous key of the same user may be tightened, not loosened, by its owner.
    generous = admin_key(client, user_id="erin", rpm_limit=1000)
    ok = client.post("/key/update", headers=bearer(parent["key"]), environ_base=lan,
                     json={"key": generous["key_id"], "rpm_limit": 500})
    assert ok.status_code == 200 and ok.get_json()["rpm_limit"] == 500
    assert_error(client.post("/key/update", headers=bearer(parent["key"]), environ_base=lan,
                             json={"key": generous["key_id"], "rpm_limit": 2000}), 403)


# -- /user/update mass assignment (CVE-2026-47102) ----------------------------------------------


@pytest.mark.parametrize("role", ["internal_user", "org_admin", "internal_user_viewer"])
def test_user_update_mass_assignment_changes_nothing(client: Any, app: Any, role: str) -> None:
    make_user(client, "mallory", role, models=["gpt-4o"], max_budget=5, tpm_limit=10)
    make_user(client, "victim")
    key = admin_key(client, user_id="mallory")["key"]
    before = snapshot(app)
    attempts: list[dict[str, Any]] = [
        {"user_role": "proxy_admin"}, {"user_role": "PROXY_ADMIN"}, {"max_budget": 1e6},
        {"max_budget": None}, {"soft_budget": 100}, {"models": ["*"]}, {"models": []},
        {"spend": 0}, {"tpm_limit": 10**9}, {"rpm_limit": 10**9},
        {"max_parallel_requests": 100}, {"budget_duration": "1s"}, {"blocked": False},
        {"metadata": {"role": "admin"}}, {"model_max_budget": {}},
        {"user_email": "m@example.com", "user_role": "proxy_admin"},
        {"user_id": "victim", "user_email": "owned@example.com"},
        {"user_id": "victim", "user_role": "internal_user_viewer"},
    ]
    for body in attempts:
        response = as_key(client, key, "/user/update", **body)
        assert_error(response, 403)
    for body in ({"team_id": "t"}, {"user_role": "superuser"}, {"organization_id": "o"}):
        assert_error(as_key(client, key, "/user/update", **body), 400)
    assert snapshot(app) == before
    assert_error(as_key(client, key, "/user/new", user_id="sock", user_role="proxy_admin"), 403)
    assert_error(as_key(client, key, "/user/delete", user_ids=["victim"]), 403)
    assert snapshot(app) == before
    if role != "internal_user_viewer":  # harmless self-service fields do change
        response = as_key(client, key, "/user/update", user_alias="Mal")
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["user_alias"] == "Mal"
        assert response.get_json()["user_role"] == role


# -- teams ----------------------------------------------------------------------------------------


@pytest.fixture
def team(client: Any) -> dict[str, str]:
    """Team t1: alice admin, bob member; carol outside. One key each."""
    for user_id in ("alice", "bob", "carol"):
        make_user(client, user_id)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    return {u: admin_key(client, user_id=u)["key"] for u in ("alice", "bob", "carol")}


def test_team_admin_manages_the_teams_keys(client: Any, app: Any, team: Any) -> None:
    for_bob = as_key(client, team["alice"], "/key/generate", team_id="t1", user_id="bob")
    assert for_bob.status_code == 200, for_bob.get_json()
    record_secret(for_bob.get_json()["key"])
    service = as_key(client, team["alice"], "/key/generate", team_id="t1")
    assert service.status_code == 200 and service.get_json()["user_id"] is None
    record_secret(service.get_json()["key"])
    error = assert_error(as_key(client, team["alice"], "/key/generate", team_id="t1",
                                user_id="carol"), 400)
    assert error["param"] == "user_id"
    bob_key = for_bob.get_json()["key_id"]
    for path, body in (("/key/update", {"key": bob_key, "key_alias": "bobs"}),
                       ("/key/block", {"key": bob_key}), ("/key/unblock", {"key": bob_key}),
                       ("/key/regenerate", {"key": bob_key})):
        response = as_key(client, team["alice"], path, **body)
        assert response.status_code == 200, (path, response.get_json())
        if "key" in response.get_json() and path == "/key/regenerate":
            record_secret(response.get_json()["key"])
    # ... reassign it inside the team, never outside.
    assert_error(as_key(client, team["alice"], "/key/update", key=bob_key, user_id="carol"), 403)
    assert as_key(client, team["alice"], "/key/update", key=bob_key,
                  user_id="alice").status_code == 200
    assert as_key(client, team["alice"], "/key/delete", keys=[bob_key]).status_code == 200
    # Not a personal key of another user, though.
    carol_key = admin_key(client, user_id="carol")["key_id"]
    assert_error(as_key(client, team["alice"], "/key/update", key=carol_key, key_alias="x"), 403)


@SQLITE_ONLY
def test_plain_members_follow_team_member_permissions(client: Any, app: Any, team: Any) -> None:
    bobs_team_key = admin_key(client, user_id="bob", team_id="t1")
    alices_team_key = admin_key(client, user_id="alice", team_id="t1")
    before = snapshot(app)
    error = assert_error(as_key(client, team["bob"], "/key/generate", team_id="t1"), 403,
                         "team_member_permission_error")
    assert "/key/generate" in error["message"]
    info = client.get("/key/info", query_string={"key": bobs_team_key["key_id"]},
                      headers=bearer(team["bob"]))
    assert info.status_code == 200
    for path, body in (("/key/update", {"key": bobs_team_key["key_id"], "key_alias": "b"}),
                       ("/key/delete", {"keys": [bobs_team_key["key_id"]]}),
                       ("/key/regenerate", {"key": bobs_team_key["key_id"]}),
                       ("/key/block", {"key": bobs_team_key["key_id"]})):
        assert_error(as_key(client, team["bob"], path, **body), 403)
    assert snapshot(app) == before
    admin(client, "/team/update", team_id="t1",
          team_member_permissions=["/key/info", "/key/generate", "/key/update"])
    created = as_key(client, team["bob"], "/key/generate", team_id="t1")
    assert created.status_code == 200 and created.get_json()["user_id"] == "bob"
    record_secret(created.get_json()["key"])
    assert_error(as_key(client, team["bob"], "/key/generate", team_id="t1", user_id="alice"), 403)
    assert as_key(client, team["bob"], "/key/update", key=bobs_team_key["key_id"],
                  key_alias="b").status_code == 200
    assert_error(as_key(client, team["bob"], "/key/update", key=alices_team_key["key_id"],
                        key_alias="a"), 403)
    assert_error(as_key(client, team["bob"], "/key/delete", keys=[bobs_team_key["key_id"]]), 403)


@SQLITE_ONLY
def test_outsiders_get_nothing_from_a_team(client: Any, team: Any) -> None:
    team_key = admin_key(client, user_id="bob", team_id="t1")["key_id"]
    assert_error(client.get("/key/info", query_string={"key": team_key},
                            headers=bearer(team["carol"])), 403)
    assert_error(as_key(client, team["carol"], "/key/generate", team_id="t1"), 403)
    assert_error(as_key(client, team["carol"], "/key/update", key=team_key, key_alias="x"), 403)
    assert_error(as_key(client, team["carol"], "/team/member_add", team_id="t1",
                        member={"user_id": "carol", "role": "admin"}), 403)
    assert_error(as_key(client, team["bob"], "/team/member_update", team_id="t1",
                        user_id="bob", role="admin"), 403)
    assert_error(as_key(client, team["alice"], "/team/update", team_id="t1", max_budget=1e6), 403)


def memberships(app: Any, team_id: str) -> dict[str, dict[str, Any]]:
    with app.extensions["llmauth"].store.use():
        return {m.user_id: {**m.__data__} for m in
                TeamMembership.select().where(TeamMembership.team_id == team_id)}


@pytest.mark.parametrize("ref,fields", [
    ({"user_id": "alice"}, {"max_budget_in_team": 1e6}),
    ({"user_id": "alice"}, {"rpm_limit": 100000}),
    ({"user_id": "alice"}, {"tpm_limit": 10**9}),
    ({"user_id": "alice"}, {"allowed_models": ["o3"]}),
    ({"user_id": "alice"}, {"budget_duration": "1s"}),
    ({"user_id": "alice"}, {"role": "user"}),
    ({"user_email": "alice@example.com"}, {"max_budget_in_team": 5.0, "rpm_limit": 1}),
])
def test_team_admin_cannot_change_its_own_membership(client: Any, app: Any, team: Any,
                                                     ref: dict[str, str],
                                                     fields: dict[str, Any]) -> None:
    """A team admin raised its own max_budget_in_team, limits or models through
    /team/member_update (by user_id, by e-mail, or with its team key)."""
    admin(client, "/user/update", user_id="alice", user_email="alice@example.com")
    team_key = admin_key(client, user_id="alice", team_id="t1")["key"]
    before = memberships(app, "t1")
    for key in (team["alice"], team_key):
        error = assert_error(as_key(client, key, "/team/member_update", team_id="t1",
                                    **ref, **fields), 403)
        assert "cannot change its own membership" in error["message"]
        assert error["param"] == next(iter(fields))
    assert memberships(app, "t1") == before
    # Other members are still the team admin's to manage, and a proxy admin manages hers.
    body = {**fields, "role": "user"} if "role" not in fields else {"role": "admin"}
    done = as_key(client, team["alice"], "/team/member_update", team_id="t1", user_id="bob",
                  **body)
    assert done.status_code == 200, done.get_json()
    assert memberships(app, "t1")["alice"] == before["alice"]
    admin(client, "/team/member_update", team_id="t1", user_id="alice", **fields)
    assert memberships(app, "t1")["alice"] != before["alice"]


@SQLITE_ONLY
def test_team_models_bound_team_keys_made_by_team_admins(client: Any, team: Any) -> None:
    admin(client, "/team/update", team_id="t1", models=["gpt-4o"])
    admin(client, "/team/member_update", team_id="t1", user_id="alice", allowed_models=["gpt-4o"])
    service = as_key(client, team["alice"], "/key/generate", team_id="t1")
    assert service.status_code == 200
    assert service.get_json()["models"] == ["gpt-4o"]  # the admin's member list, inherited
    record_secret(service.get_json()["key"])
    assert_error(as_key(client, team["alice"], "/key/generate", team_id="t1", models=["o3"]), 403)
    moved = admin_key(client, user_id="bob", models=["o3"])
    assert_error(as_key(client, team["alice"], "/key/update", key=moved["key_id"],
                        team_id="t1"), 403)


def test_key_delete_is_all_or_nothing(client: Any, app: Any) -> None:
    """api.md: "one key the caller may not delete refuses the whole request" — the caller's
    own keys listed beside another user's (or an unknown one) are not deleted either."""
    make_user(client, "dora")
    make_user(client, "eve")
    own = admin_key(client, user_id="dora")
    spare = admin_key(client, user_id="dora")
    theirs = admin_key(client, user_id="eve")
    before = snapshot(app)
    assert_error(as_key(client, own["key"], "/key/delete",
                        keys=[spare["key_id"], theirs["key_id"]]), 403)
    assert_error(as_key(client, own["key"], "/key/delete",
                        keys=[spare["key_id"], "00000000-0000-0000-0000-000000000000"]), 404)
    assert snapshot(app) == before
    assert client.get("/key/info", headers=bearer(spare["key"])).status_code == 200
    assert client.get("/key/info", headers=bearer(theirs["key"])).status_code == 200


def test_the_deleted_keys_list_is_scoped_like_the_live_one(client: Any, app: Any) -> None:
    """api.md: ``/key/list?status=deleted`` lists the deleted-keys table under the same
    scoping as the live keys — a non-admin sees its own deleted keys only."""
    make_user(client, "fay")
    make_user(client, "gus")
    mine = admin_key(client, user_id="fay")
    my_old = admin_key(client, user_id="fay")["key_id"]
    their_old = admin_key(client, user_id="gus")["key_id"]
    admin(client, "/key/delete", keys=[my_old, their_old])
    listed = client.get("/key/list", query_string={"status": "deleted",
                                                   "return_full_object": "true"},
                        headers=bearer(mine["key"]))
    assert listed.status_code == 200, listed.get_json()
    assert [k["key_id"] for k in listed.get_json()["keys"]] == [my_old]
    assert_error(client.get("/key/list", query_string={"status": "deleted", "user_id": "gus"},
                            headers=bearer(mine["key"])), 403)
    everything = client.get("/key/list", query_string={"status": "deleted"}, headers=ADMIN)
    assert set(everything.get_json()["keys"]) >= {my_old, their_old}
