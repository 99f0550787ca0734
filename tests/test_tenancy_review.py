"""Cross-tenant paths found by a review of organization attribution and of what a team key
reads: each test names what a non-admin could do before, and each refusal leaves the
database as it was.
"""

from __future__ import annotations

from typing import Any

import pytest

from flask_llmauth.spend import flush
from flask_llmauth.store.tables import Team
from tests.helpers import ADMIN, assert_error, bearer, record_secret
from tests.test_escalation import admin, admin_key, as_key, make_user, snapshot

CHAT = "/v1/chat/completions"
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def teams_snapshot(app: Any) -> dict[str, Any]:
    with app.extensions["llmauth"].store.use():
        return {t.team_id: {**t.__data__} for t in Team.select()}


# -- organization_id ------------------------------------------------------------------------------


@pytest.fixture
def orgs(client: Any) -> dict[str, Any]:
    """Team t1 (organization org-a): alice its admin, bob a member; team t2 (org-c): alice
    its admin too. alice holds a personal key without organization and one an admin put in
    org-p; bob holds a team key of t1 (inherited org-a)."""
    for user_id in ("alice", "bob"):
        make_user(client, user_id)
    admin(client, "/team/new", team_id="t1", organization_id="org-a", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}],
          team_member_permissions=["/key/info", "/key/generate", "/key/update",
                                   "/key/regenerate"])
    admin(client, "/team/new", team_id="t2", organization_id="org-c", members_with_roles=[
        {"user_id": "alice", "role": "admin"}, {"user_id": "bob", "role": "user"}])
    return {"alice": admin_key(client, user_id="alice"),
            "alice_p": admin_key(client, user_id="alice", organization_id="org-p"),
            "bob_t1": admin_key(client, user_id="bob", team_id="t1")}


def test_a_non_admin_never_chooses_a_keys_organization(client: Any, app: Any,
                                                        orgs: Any) -> None:
    """A key's organization_id is what the spend log and the reports attribute its spend
    to: any non-admin set it to any value on the keys it generated, updated or regenerated,
    charging its spend to another organization."""
    alice, bob_t1 = orgs["alice"], orgs["bob_t1"]
    assert bob_t1["organization_id"] == "org-a"
    before, teams_before = snapshot(app), teams_snapshot(app)
    refused = [
        (alice["key"], "/key/generate", {"organization_id": "org-b"}),
        (alice["key"], "/key/generate", {"team_id": "t1", "organization_id": "org-b"}),
        (alice["key"], "/key/generate", {"team_id": "t1", "user_id": "bob",
                                         "organization_id": "org-b"}),
        (bob_t1["key"], "/key/generate", {"team_id": "t1", "organization_id": "org-b"}),
        (alice["key"], "/key/update", {"key": alice["key_id"], "organization_id": "org-b"}),
        (alice["key"], "/key/update", {"key": bob_t1["key_id"], "organization_id": "org-b"}),
        (alice["key"], "/key/update", {"key": bob_t1["key_id"], "organization_id": None}),
        (bob_t1["key"], "/key/update", {"key": bob_t1["key_id"], "organization_id": "org-b"}),
        (alice["key"], "/key/regenerate", {"key": alice["key_id"],
                                           "organization_id": "org-b"}),
        (alice["key"], f"/key/{bob_t1['key_id']}/regenerate", {"organization_id": "org-b"}),
        (bob_t1["key"], "/key/regenerate", {"key": bob_t1["key_id"],
                                            "organization_id": "org-b"}),
        # Moving a key to another team gives it that team's organization, no other.
        (alice["key"], "/key/update", {"key": bob_t1["key_id"], "team_id": "t2",
                                       "organization_id": "org-a"}),
    ]
    for credential, path, body in refused:
        error = assert_error(as_key(client, credential, path, **body), 403)
        assert error["param"] == "organization_id", (path, body)
        assert "organization_id" in error["message"]
    # Teams are a proxy admin's to create and change, organization included.
    assert_error(as_key(client, alice["key"], "/team/update", team_id="t1",
                        organization_id="org-b"), 403)
    assert_error(as_key(client, alice["key"], "/team/new", team_id="t9",
                        organization_id="org-b"), 403)
    assert snapshot(app) == before and teams_snapshot(app) == teams_before

    # Spend of bob's key still goes to its team's organization.
    assert client.post(CHAT, json={"model": "gpt-4o", "messages": []},
                       headers=bearer(bob_t1["key"])).status_code == 200
    flush(app)
    rows = client.get("/spend/logs", query_string={"api_key": bob_t1["key_id"]},
                      headers=ADMIN).get_json()
    assert rows and {r["organization_id"] for r in rows} == {"org-a"}


def test_a_non_admin_may_name_the_organization_its_key_has_anyway(
        client: Any, app: Any, orgs: Any) -> None:
    alice, alice_p, bob_t1 = orgs["alice"], orgs["alice_p"], orgs["bob_t1"]

    def generated(credential: str, **body: Any) -> dict[str, Any]:
        response = as_key(client, credential, "/key/generate", **body)
        assert response.status_code == 200, response.get_json()
        record_secret(response.get_json()["key"])
        return response.get_json()  # type: ignore[no-any-return]

    # A team key inherits its team's organization, named or not (null: not named).
    for body in ({}, {"organization_id": "org-a"}, {"organization_id": None}):
        assert generated(alice["key"], team_id="t1", **body)["organization_id"] == "org-a"
    assert generated(bob_t1["key"], team_id="t1")["organization_id"] == "org-a"
    # A personal key takes the organization of the key that creates it.
    assert generated(alice["key"])["organization_id"] is None
    assert generated(alice["key"], organization_id=None)["organization_id"] is None
    assert generated(alice_p["key"])["organization_id"] == "org-p"
    for body in ({"organization_id": "org-p"}, {"organization_id": None}):
        assert generated(alice_p["key"], **body)["organization_id"] == "org-p"
    # The stored value is accepted on update and regenerate; the key keeps it.
    for path, body in (("/key/update", {"key": bob_t1["key_id"], "organization_id": "org-a"}),
                       ("/key/update", {"key": alice_p["key_id"], "organization_id": "org-p",
                                        "key_alias": "p"}),
                       ("/key/update", {"key": alice["key_id"], "organization_id": None}),
                       ("/key/regenerate", {"key": bob_t1["key_id"],
                                            "organization_id": "org-a"})):
        response = as_key(client, alice["key"], path, **body)
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["organization_id"] == body["organization_id"]
        if path == "/key/regenerate":
            record_secret(response.get_json()["key"])
    # A key a team admin moves to another of its teams takes that team's organization.
    moved = as_key(client, alice["key"], "/key/update", key=bob_t1["key_id"], team_id="t2")
    assert moved.status_code == 200, moved.get_json()
    assert moved.get_json()["organization_id"] == "org-c"
    into_team = as_key(client, alice["key"], "/key/update", key=alice_p["key_id"],
                       team_id="t1", organization_id="org-a")
    assert into_team.status_code == 200, into_team.get_json()
    assert into_team.get_json()["organization_id"] == "org-a"
    # A proxy admin sets what it likes.
    for body in ({"organization_id": "org-z"}, {"organization_id": None}):
        assert admin(client, "/key/update", key=alice["key_id"], **body)[
            "organization_id"] == body["organization_id"]
    assert admin(client, "/team/update", team_id="t1",
                 organization_id="org-b")["organization_id"] == "org-b"


# -- what a team key reads ------------------------------------------------------------------------


@pytest.fixture
def carol(client: Any, app: Any) -> dict[str, Any]:
    """carol, a member of t1 and t2, with a personal key and a key in each team; alice, t1's
    admin, added her and minted her t1 key (so alice holds it). Each key made one request."""
    for user_id in ("alice", "carol"):
        make_user(client, user_id, user_email=f"{user_id}@example.com", max_budget=50,
                  metadata={"private": "yes"})
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}])
    admin(client, "/team/new", team_id="t2", members_with_roles=[
        {"user_id": "carol", "role": "user"}])
    alice = admin_key(client, user_id="alice")["key"]
    assert as_key(client, alice, "/team/member_add", team_id="t1",
                  member={"user_id": "carol"}).status_code == 200
    minted = as_key(client, alice, "/key/generate", team_id="t1", user_id="carol").get_json()
    keys = {"t1": {**minted, "key": record_secret(minted["key"])},
            "personal": admin_key(client, user_id="carol"),
            "t2": admin_key(client, user_id="carol", team_id="t2")}
    for key in keys.values():
        assert client.post(CHAT, json={"model": "gpt-4o", "messages": [
            {"role": "user", "content": "hello " * 50}]},
                           headers=bearer(key["key"])).status_code == 200
    assert flush(app) == 3
    return keys


def get_json(client: Any, path: str, credential: str, **query: Any) -> Any:
    response = client.get(path, query_string=query, headers=bearer(credential))
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_user_info_through_a_team_key_shows_that_team_only(client: Any, carol: Any) -> None:
    """/user/info called with a team key listed its user's personal keys and keys of other
    teams, its other teams and its personal account (spend over every team, budget,
    models, metadata): alice, who minted carol's t1 key, read all of it."""
    team_key = carol["t1"]["key"]
    body = get_json(client, "/user/info", team_key)
    assert [k["key_id"] for k in body["keys"]] == [carol["t1"]["key_id"]]
    assert body["user_info"]["teams"] == ["t1"]
    assert [t["team_id"] for t in body["teams"]] == ["t1"]
    shown = body["user_info"]
    assert shown["user_id"] == "carol" and shown["user_email"] == "carol@example.com"
    for name in ("spend", "max_budget", "models", "metadata", "budget_duration", "tpm_limit"):
        assert name not in shown, name
    # carol's personal key still sees everything that is hers.
    whole = get_json(client, "/user/info", carol["personal"]["key"])
    assert {k["key_id"] for k in whole["keys"]} == {k["key_id"] for k in carol.values()}
    assert sorted(whole["user_info"]["teams"]) == ["t1", "t2"]
    assert whole["user_info"]["spend"] > 0 and whole["user_info"]["max_budget"] == 50
    assert whole["user_info"]["metadata"] == {"private": "yes"}


def test_spend_reports_through_a_team_key_stay_inside_its_team(client: Any,
                                                                carol: Any) -> None:
    """The spend reports scoped a team key by its user: it read the user's spend log rows,
    keys and teams everywhere, and the user's total spend."""
    team_key, t1_id = carol["t1"]["key"], carol["t1"]["key_id"]
    rows = get_json(client, "/spend/logs", team_key)
    assert [r["api_key"] for r in rows] == [t1_id] and rows[0]["team_id"] == "t1"
    days = get_json(client, "/spend/logs", team_key, start_date="2000-01-01",
                    end_date="2999-12-31")
    assert [set(d["api_keys"]) for d in days] == [{t1_id}]
    assert get_json(client, "/global/spend", team_key)["spend"] == rows[0]["spend"]
    assert [k["key_id"] for k in get_json(client, "/spend/keys", team_key)] == [t1_id]
    assert [t["team_id"] for t in get_json(client, "/spend/teams", team_key)] == ["t1"]
    for path, query in (("/spend/logs", {"api_key": carol["personal"]["key_id"]}),
                        ("/spend/logs", {"api_key": carol["t2"]["key_id"]}),
                        ("/spend/logs", {"api_key": carol["personal"]["key"]}),
                        ("/spend/teams", {"team_id": "t2"}),
                        ("/spend/users", {}),
                        ("/spend/users", {"user_id": "carol"}),
                        ("/customer/info", {"end_user_id": "carol"}),
                        ("/key/info", {"key": carol["personal"]["key_id"]}),
                        ("/team/info", {"team_id": "t2"})):
        assert_error(client.get(path, query_string=query, headers=bearer(team_key)), 403)
    own = get_json(client, "/spend/logs", team_key, api_key=t1_id)
    assert [r["api_key"] for r in own] == [t1_id]
    # The same user's personal key reads all of its spend, as before.
    personal = carol["personal"]["key"]
    everything = get_json(client, "/spend/logs", personal)
    assert {r["api_key"] for r in everything} == {k["key_id"] for k in carol.values()}
    assert len(get_json(client, "/spend/keys", personal)) == 3
    assert sorted(t["team_id"] for t in get_json(client, "/spend/teams", personal)) == [
        "t1", "t2"]
    assert get_json(client, "/spend/users", personal)[0]["user_id"] == "carol"
    assert get_json(client, "/global/spend", personal)["spend"] == pytest.approx(
        sum(r["spend"] for r in everything))


# -- oracles and personal accounts through the team endpoints ------------------------------------


def same_refusal(first: Any, second: Any, names: tuple[str, str]) -> None:
    """Two refusals a caller cannot tell apart (besides the name it sent itself)."""
    a, b = first.get_json(), second.get_json()
    assert first.status_code == second.status_code, (a, b)
    assert a["error"]["message"].replace(names[0], "X") == b["error"]["message"].replace(
        names[1], "X"), (a, b)
    assert (a["error"]["type"], a["error"]["param"]) == (b["error"]["type"],
                                                         b["error"]["param"])


@pytest.fixture
def outsiders(client: Any) -> dict[str, Any]:
    """alice admins t1; root (a proxy admin with a budget and spend) and bob (an internal
    user) are in no team of hers; team t2 exists, team nope does not."""
    make_user(client, "alice")
    make_user(client, "bob")
    make_user(client, "root", role="proxy_admin", max_budget=1000, models=["gpt-4o"])
    admin(client, "/user/update", user_id="root", spend=123)
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}])
    admin(client, "/team/new", team_id="t2")
    alice = admin_key(client, user_id="alice")
    return {"alice": alice["key"], "alice_key_id": alice["key_id"],
            "team_key": admin_key(client, user_id="alice", team_id="t1")}


@SQLITE_ONLY
def test_a_team_admin_cannot_probe_other_users_roles(client: Any, app: Any,
                                                     outsiders: Any) -> None:
    """The role check ran before the membership check: minting a t1 key for root (in no
    team of hers) was a 403 naming root's higher role, for bob a 400 — so any internal user
    could find out who the proxy admins are (and through /key/update of its own key)."""
    alice = outsiders["alice"]
    before = snapshot(app)
    for path, body in (("/key/generate", {"team_id": "t1"}),
                       ("/key/update", {"key": outsiders["alice_key_id"]}),
                       ("/key/update", {"key": outsiders["team_key"]["key_id"]})):
        answers = {user: as_key(client, alice, path, **body, user_id=user)
                   for user in ("root", "bob", "ghost")}
        same_refusal(answers["root"], answers["bob"], ("root", "bob"))
        same_refusal(answers["root"], answers["ghost"], ("root", "ghost"))
        assert "role" not in answers["root"].get_json()["error"]["message"]
    assert snapshot(app) == before


@SQLITE_ONLY
def test_a_non_admin_cannot_probe_which_teams_exist(client: Any, app: Any,
                                                    outsiders: Any) -> None:
    """/team/info refuses an unknown team as it refuses a foreign one, so team ids cannot be
    probed — but /key/generate, a key's move to another team and /team/member_* answered
    400/404 "Team not found" for an unknown team and 403 for an existing one."""
    alice, team_key = outsiders["alice"], outsiders["team_key"]
    before, teams_before = snapshot(app), teams_snapshot(app)
    for credential, path, body in (
            (alice, "/key/generate", {}),
            (team_key["key"], "/key/generate", {}),
            (alice, "/key/update", {"key": outsiders["alice_key_id"]}),
            (alice, "/key/regenerate", {"key": team_key["key_id"]}),
            (alice, "/team/member_add", {"member": {"user_id": "bob"}}),
            (alice, "/team/member_update", {"user_id": "bob", "role": "admin"}),
            (alice, "/team/member_delete", {"user_id": "bob"})):
        answers = [as_key(client, credential, path, **body, team_id=team_id)
                   for team_id in ("t2", "nope")]
        assert answers[0].status_code == 403, (path, answers[0].get_json())
        same_refusal(answers[0], answers[1], ("t2", "nope"))
    assert snapshot(app) == before and teams_snapshot(app) == teams_before
    # A proxy admin is still told the team does not exist.
    assert_error(client.post("/key/generate", json={"team_id": "nope"}, headers=ADMIN), 400)
    assert_error(client.post("/team/member_add", json={
        "team_id": "nope", "member": {"user_id": "bob"}}, headers=ADMIN), 404)


@SQLITE_ONLY
def test_member_add_shows_a_team_admin_no_personal_account(client: Any,
                                                          outsiders: Any) -> None:
    """A team admin can add any existing user to its team: /team/member_add answered with
    that user's models, budget and spend over every team (root's, a proxy admin's)."""
    added = as_key(client, outsiders["alice"], "/team/member_add", team_id="t1",
                   member={"user_id": "root"})
    assert added.status_code == 200, added.get_json()
    [summary] = added.get_json()["updated_users"]
    assert summary["user_id"] == "root"
    for name in ("models", "max_budget", "spend"):
        assert name not in summary, name
    # A proxy admin sees the whole summary.
    [full] = admin(client, "/team/member_add", team_id="t2",
                   member={"user_id": "root"})["updated_users"]
    assert (full["models"], full["max_budget"], full["spend"]) == (["gpt-4o"], 1000, 123)


# -- caller-chosen key secrets -----------------------------------------------------------------


def strong_secret() -> str:
    import secrets

    return record_secret("sk-" + secrets.token_urlsafe(32))


def test_only_a_proxy_admin_chooses_a_keys_secret(client: Any, app: Any) -> None:
    """`key` on /key/generate and `new_key` on /key/regenerate: any key creator chose the
    secret, and a duplicate was refused as "already in use" — an existence oracle for weak
    human-chosen secrets. Now a 403 naming the field, before anything is looked up, whether
    the value is in use or not; the database is left as it was."""
    make_user(client, "alice")
    make_user(client, "root", role="proxy_admin")
    admin(client, "/team/new", team_id="t1", members_with_roles=[
        {"user_id": "alice", "role": "admin"}])
    alice = admin_key(client, user_id="alice")
    alice_t1 = admin_key(client, user_id="alice", team_id="t1")  # a team admin's team key
    taken = strong_secret()
    assert admin(client, "/key/generate", user_id="root", key=taken)["key"] == taken
    before, teams_before = snapshot(app), teams_snapshot(app)
    answers = []
    for credential in (alice["key"], alice_t1["key"]):
        for chosen in (taken, strong_secret()):
            team = {"team_id": "t1"} if credential == alice_t1["key"] else {}
            answers.append((as_key(client, credential, "/key/generate", key=chosen, **team),
                            "key"))
            answers.append((as_key(client, credential, "/key/regenerate",
                                   key=alice["key_id"], new_key=chosen), "new_key"))
    for response, field in answers:
        error = assert_error(response, 403, "permission_error")
        assert error["param"] == field
        assert error["message"] == (f"Only a proxy admin can choose a key's secret: leave out "
                                    f"'{field}' and a generated key is returned.")
    assert snapshot(app) == before and teams_snapshot(app) == teams_before
    # Without the field, the same callers get generated keys.
    generated = as_key(client, alice["key"], "/key/generate")
    assert generated.status_code == 200 and len(generated.get_json()["key"]) == 3 + 43
    record_secret(generated.get_json()["key"])
    # A proxy admin (the master key or a proxy_admin user's key) chooses, and is told about
    # a duplicate.
    root = admin_key(client, user_id="root")["key"]
    chosen = strong_secret()
    rotated = as_key(client, root, "/key/regenerate", key=alice["key_id"], new_key=chosen)
    assert rotated.status_code == 200 and rotated.get_json()["key"] == chosen
    assert client.get("/key/info", headers=bearer(chosen)).status_code == 200
    duplicate = assert_error(as_key(client, root, "/key/generate", key=taken), 400)
    assert duplicate["param"] == "key" and "already in use" in duplicate["message"]


@pytest.mark.parametrize("tail, why", [
    ("x" * 0, "nothing after sk-"),
    ("aZ3-_9qLm0PpR7tUvW2yX", "21 characters, one short of a LiteLLM-generated key"),
    ("ab" * 20, "40 characters, 2 distinct"),
    ("012345678" * 2 + "012", "21 characters"),
    ("aZ3-_9qLm0PpR7tUvW2yX b4cDe5fGh6iJ", "a space"),
    ("aZ3-_9qLm0PpR7tUvW2yX\nb4cDe5fGh6iJ", "a newline"),
    ("aZ3-_9qLm0PpR7tUvW2yXb4cDe5fGh6iJ" * 8, "over 256 in all"),
])
def test_a_chosen_secret_must_be_as_unguessable_as_a_generated_one(
        client: Any, tail: str, why: str) -> None:
    """'sk-' + at least 22 printable characters (128 bits as url-safe base64, what LiteLLM
    generates), not a pattern. The message never holds the value."""
    value = "sk-" + tail
    for path, field, extra in (("/key/generate", "key", {}),
                               ("/key/regenerate", "new_key", {"key": "k"})):
        response = client.post(path, json={field: value, **extra}, headers=ADMIN)
        error = assert_error(response, 400, "invalid_request_error")
        assert error["param"] == field, why
        if "\n" in value or len(value) > 256:  # the field's own check, as for every field
            continue
        assert error["message"].startswith("Invalid key format. A chosen key must be as "
                                           "unguessable as a generated one: 'sk-' followed "
                                           "by at least 22 random printable characters")
        if tail:
            assert tail[:20] not in error["message"]
    for value in ("pk-" + "aZ3-_9qLm0PpR7tUvW2yXb4cDe5fGh6iJ", 12345):
        assert_error(client.post("/key/generate", json={"key": value}, headers=ADMIN), 400)


def test_a_proxy_admin_imports_litellm_generated_keys_as_they_are(client: Any) -> None:
    """Migrating from LiteLLM: its keys ('sk-' + token_urlsafe(16), 22 characters after
    'sk-') are accepted as chosen secrets and then authenticate."""
    import secrets

    for _ in range(20):  # token_urlsafe(16) always has 22 characters; most have 10+ distinct
        litellm_key = "sk-" + secrets.token_urlsafe(16)
        if len(set(litellm_key[3:])) >= 10:
            break
    record_secret(litellm_key)
    assert len(litellm_key) == 25
    body = admin(client, "/key/generate", key=litellm_key)
    assert body["key"] == litellm_key and body["key_name"] == f"sk-...{litellm_key[-4:]}"
    assert client.get("/key/info", headers=bearer(litellm_key)).status_code == 200


@SQLITE_ONLY
def test_what_a_key_creator_learns_about_a_raw_secret(app_factory: Any, db_url: str) -> None:
    """Kept as documented (docs/security.md, caller-chosen keys): /key/info tells an
    unknown key (404) from another user's (403), and it is not a failed authentication —
    harmless now that every secret is generated or a proxy admin's at least as long. A key
    creator is no longer told that a chosen value is in use: choosing is a proxy admin's."""
    app = app_factory(db_url=db_url, config={"LLMAUTH_AUTH_FAILURE_LIMIT": "1/hour"})
    client = app.test_client()
    make_user(client, "alice")
    alice = admin_key(client, user_id="alice")["key"]
    chosen = record_secret("sk-chosen-by-a-person-0001-with-more-text")
    assert admin(client, "/key/generate", user_id="bob", key=chosen)["user_id"] == "bob"
    for attempt in range(3):
        error = assert_error(as_key(client, alice, "/key/generate", key=chosen), 403)
        assert error["param"] == "key" and "already in use" not in error["message"]
        assert_error(client.get("/key/info", query_string={"key": chosen},
                                headers=bearer(alice)), 403)
        unknown = record_secret(f"sk-chosen-by-a-person-{attempt:04d}-with-other-text")
        assert_error(client.get("/key/info", query_string={"key": unknown},
                                headers=bearer(alice)), 404)
    assert client.get("/key/info", headers=bearer(alice)).status_code == 200  # not blocked
    # A wrong credential, by contrast, is counted: the second one is refused with 429.
    assert client.get("/key/info", headers=bearer(unknown)).status_code == 401
    assert client.get("/key/info", headers=bearer(unknown)).status_code == 429
