# ruff: noqa: F811 - the spend reports' `world` fixture, imported from tests.test_reports, is a parameter here
"""Adversarial review of the spend reports, the customer API, how a request names its end
user, and who may reset or raise spend and budgets — as a caller holding a non-admin
credential (an internal user's personal or team key, a team admin, viewers, a team's
service-account key, a customer-role key).

Each test is one family of attacks; every refusal must leave the data as it was, and no
answer may carry a raw key or its digest.
"""

from __future__ import annotations

from typing import Any

import pytest

from flask_llmauth.spend import flush
from flask_llmauth.store.tables import Customer, Key, SpendLog, TeamMembership
from tests.helpers import ADMIN, assert_error, bearer, new_key, record_secret, role_keys
from tests.test_reports import get, ids, ok, world  # noqa: F401 - the fixture

CHAT = "/v1/chat/completions"
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
REPORTS = ("/spend/logs", "/spend/keys", "/spend/users", "/spend/teams", "/global/spend")


def secrets_of(app: Any, world: dict[str, Any]) -> list[str]:
    """Every raw key of the world and its digest: none may appear in any answer."""
    digester = app.extensions["llmauth"].digester
    raws = [k["key"] for k in world["keys"].values()]
    return raws + [digester.digest(raw) for raw in raws]


def assert_no_secret(response: Any, secrets: list[str]) -> None:
    text = response.get_data(as_text=True) + repr(sorted(response.headers.items()))
    leaked = [s[:12] for s in secrets if s in text]
    assert not leaked, leaked


# -- 1. spend reports ------------------------------------------------------------------------------


def test_a_non_admin_reads_no_one_elses_spend_through_any_filter(
        app: Any, client: Any, world: dict[str, Any]) -> None:
    keys, as_ = world["keys"], world["as"]
    secrets = secrets_of(app, world)
    for who in ("alice2", "alice"):  # alice's personal key, then her key of team t1
        me = as_[who]
        forbidden = [
            ("/spend/logs", {"user_id": "bob"}), ("/spend/logs", {"user_id": "Bob"}),
            ("/spend/logs", {"user_id": "alice "}), ("/spend/logs", {"user_id": ""}),
            ("/spend/logs", {"api_key": keys["bob"]["key_id"]}),
            ("/spend/logs", {"api_key": keys["bob"]["key"]}),
            ("/spend/logs", {"api_key": keys["bob"]["key_id"].upper()}),
            ("/spend/logs", {"api_key": keys["service"]["key_id"]}),
            ("/spend/logs", {"api_key": "sk-" + "x" * 40}),
            ("/spend/logs", {"api_key": "bob"}),
            ("/spend/logs", {"api_key": app.extensions["llmauth"].digester.digest(
                keys["bob"]["key"])}),
            ("/spend/users", {"user_id": "bob"}),
            ("/spend/teams", {"team_id": "t2"}),
        ]
        for path, query in forbidden:
            response = get(client, path, me, **query)
            assert response.status_code in (400, 403), (who, path, query, response.get_json())
            assert_no_secret(response, secrets)
        # filters that name others' rows narrow the caller's own rows: nothing of theirs
        for query in ({"team_id": "t2"}, {"end_user_id": "c1"}, {"request_id": "r4"},
                      {"request_id": "r5"}, {"model": "gpt-4o"}, {},
                      {"model": "x' OR '1'='1"}, {"team_id": "t1') OR ('1'='1"},
                      {"end_user_id": "%"}, {"model": "gpt-4%"}):
            response = get(client, "/spend/logs", me, **query)
            rows = ok(response)
            assert {r["user"] for r in rows} <= {"alice"}, (who, query, rows)
            assert_no_secret(response, secrets)
        days = ok(get(client, "/spend/logs", me, start_date="2026-11-01",
                      end_date="2026-11-30"))
        assert all(set(d["users"]) <= {"alice"} for d in days), days
        assert all(set(d["api_keys"]) <= {keys["alice"]["key_id"], keys["alice2"]["key_id"]}
                   for d in days), days
        listed = ok(get(client, "/spend/keys", me, start_date="2026-11-01"))
        assert {k["user_id"] for k in listed} == {"alice"}
        assert ok(get(client, "/global/spend", me))["spend"] == 1.333333334
    # alice's team key does not even see her personal keys, nor her total over teams
    listed = ok(get(client, "/spend/keys", as_["alice"]))
    assert [k["key_id"] for k in listed] == [keys["alice"]["key_id"]]
    assert_error(get(client, "/spend/users", as_["alice"]), 403)
    # an internal_user_viewer (carol) sees only her own (nothing)
    assert ok(get(client, "/spend/logs", as_["carol"])) == []
    assert ok(get(client, "/global/spend", as_["carol"]))["spend"] == 0
    # a team's service-account key is kept away from every report
    for path in REPORTS:
        assert_error(get(client, path, as_["service"]), 403)
    # filter values are values: no SQL, no LIKE patterns
    for query in ({"model": "x' OR '1'='1"}, {"model": "gpt-4%"}, {"end_user_id": "%"},
                  {"user_id": "alice' --"}):
        assert ok(get(client, "/spend/logs", ADMIN, **query)) == [], query
    # a digest names no key, not even to an admin (no digest -> rows oracle)
    digest = app.extensions["llmauth"].digester.digest(keys["bob"]["key"])
    assert ok(get(client, "/spend/logs", ADMIN, api_key=digest)) == []
    # a proxy admin viewer sees everything, and still no secret
    for path in REPORTS:
        response = get(client, path, as_["vera"], api_key=keys["bob"]["key"]) \
            if path == "/spend/logs" else get(client, path, as_["vera"])
        assert response.status_code == 200, (path, response.get_json())
        assert_no_secret(response, secrets)


def test_every_role_sees_only_what_it_may(app: Any, client: Any,
                                         world: dict[str, Any]) -> None:
    """One key per role (users ``u-<role>``, who spent nothing): admins read everyone's
    rows, the other roles the spend routes admit read their own (none), and the roles
    they do not admit (team service accounts, customers) are refused."""
    keys = role_keys(client, app)
    everyone = ok(get(client, "/spend/logs"))
    for role, key in keys.items():
        for path in REPORTS:
            response = get(client, path, bearer(key))
            if role in ("team", "customer"):
                assert_error(response, 403)
                continue
            body = ok(response)
            if role in ("proxy_admin", "proxy_admin_viewer"):
                if path == "/spend/logs":
                    assert body == everyone
                continue
            if path == "/global/spend":
                assert body["spend"] == 0, (role, body)
            elif path == "/spend/teams":
                assert body == [], (role, body)
            else:
                assert all(r.get("user_id", r.get("user")) == f"u-{role}" for r in body), (
                    role, path, body)
                if path == "/spend/logs":
                    assert body == []


def test_the_next_page_link_never_echoes_a_raw_key(app: Any, client: Any,
                                                    world: dict[str, Any]) -> None:
    """``api_key`` may be the raw key (looked up by its digest): the ``Link`` to the next
    page names the key by its id instead, so the secret never travels back in a header
    (which proxies and browser tools log)."""
    keys = world["keys"]
    secrets = secrets_of(app, world)
    for headers, key in ((ADMIN, keys["bob"]), (world["as"]["alice2"], keys["alice"])):
        response = get(client, "/spend/logs", headers, api_key=key["key"], page_size=1)
        assert len(ok(response)) == 1
        assert_no_secret(response, secrets)
        link = response.headers["Link"]
        assert f"api_key={key['key_id']}" in link and "page=2" in link, link
        # the link answers the same query's next page
        target = link[1:link.index(">")]
        following = client.get(target, headers=headers)
        assert len(ok(following)) == 1
        assert ids(ok(following)) != ids(ok(response))


@SQLITE_ONLY
def test_deleted_and_reassigned_keys_reveal_nothing(app: Any, client: Any,
                                                    world: dict[str, Any]) -> None:
    keys, as_ = world["keys"], world["as"]
    ok(client.post("/key/delete", json={"keys": [keys["bob"]["key_id"]]}, headers=ADMIN))
    # a deleted key of another user: 403 as for one that never existed
    assert_error(get(client, "/spend/logs", as_["alice2"], api_key=keys["bob"]["key_id"]),
                 403)
    # its raw secret no longer finds it either (and never answers another's rows)
    assert_error(get(client, "/spend/logs", as_["alice2"], api_key=keys["bob"]["key"]), 403)
    # a key an admin hands from alice to bob: bob's reports of it hold his rows only
    ok(client.post("/key/update", json={"key": keys["alice2"]["key_id"], "user_id": "bob"},
                   headers=ADMIN))
    state = app.extensions["llmauth"]
    with state.store.use():
        SpendLog.update(key_id=keys["alice2"]["key_id"]).where(
            SpendLog.request_id == "r1").execute()
    bob = bearer(new_key(client, user_id="bob")["key"])
    assert ok(get(client, "/spend/logs", bob, api_key=keys["alice2"]["key_id"])) == []
    # and alice, who made r1 with it, no longer names the key (not hers any more)
    assert_error(get(client, "/spend/logs", as_["alice"], api_key=keys["alice2"]["key_id"]),
                 403)


@SQLITE_ONLY
@pytest.mark.parametrize("query", [
    {"start_date": "2026-13-01"}, {"start_date": "2026-02-30"}, {"start_date": "26-11-01"},
    {"start_date": "2026-11-01\n"}, {"start_date": "2026-11-01T25:00:00"},
    {"start_date": "2026-11-01T10:00:00+25:00"}, {"start_date": "0000-01-01"},
    {"start_date": "0001-01-01"}, {"start_date": "1969-12-31T23:59:59Z"},
    {"start_date": "1970-01-01T00:30:00+01:00"}, {"end_date": "9999-12-31"},
    {"end_date": "9999-12-31T23:59:59-14:00"}, {"end_date": "9999-12-31T23:59:59+14:00"},
    {"start_date": "2026-11-01T" + "0" * 5000}, {"start_date": "now"},
    {"start_date": "2026-11-01\x00"}, {"start_date": "1e9"}, {"start_date": "NaN"},
    {"start_date": "2026-11-02", "end_date": "2026-11-01"},
    {"start_date": "2026-11-01T00:00:00", "end_date": "2026-10-31T23:59:59.999999"},
    {"start_date": "2026-11-02T00:00:00+01:00", "end_date": "2026-11-01T22:59:59Z"},
])
def test_hostile_dates_are_400s_naming_the_parameter(client: Any, world: dict[str, Any],
                                                     query: dict[str, str]) -> None:
    for path in REPORTS:
        for headers in (ADMIN, world["as"]["alice2"]):
            error = assert_error(get(client, path, headers, **query), 400)
            assert error["param"] in ("start_date", "end_date"), (path, query, error)


@SQLITE_ONLY
def test_unusual_but_valid_dates_mean_what_they_say(client: Any, world: dict[str, Any]) -> None:
    def between(start: str, end: str) -> list[str]:
        return ids(ok(get(client, "/spend/logs", start_date=start, end_date=end,
                          summarize="false")))

    assert between("1970-01-01", "9999-12-30T00:00:00") == ["r5", "r4", "r3", "r2", "r1"]
    # the same instant written with two offsets: one row exactly at it
    assert between("2026-11-02T09:00:00+09:00", "2026-11-01T19:00:00-05:00") == ["r3"]
    assert between("2026-11-02", "2026-11-02") == ["r3"]
    # digits of another script are digits to the parser: the same day, not a 500
    response = get(client, "/spend/logs", start_date="２０２６-１１-０３", summarize="false")
    assert response.status_code in (200, 400), response.get_data()
    if response.status_code == 200:
        assert ids(response.get_json()) == ["r5", "r4"]


@SQLITE_ONLY
def test_pages_are_bounded_for_every_report(client: Any, world: dict[str, Any]) -> None:
    for path, size in (("/spend/logs", "page_size"), ("/spend/keys", "limit"),
                       ("/spend/users", "limit"), ("/spend/teams", "limit")):
        for bad in ({size: "1001"}, {size: "0"}, {size: "-1"}, {size: "1e3"}, {size: "5_0"},
                    {size: "99999999999999999999999"}, {"page": "0"}, {"page": "1000001"},
                    {"page": "1.5"}, {"sort_by": "spend"}, {"order": "desc"},
                    {"user_id": "alice", "team_id": "t1"} if path == "/spend/keys" else
                    {"limit": "10"} if path == "/spend/logs" else {"page_size": "10"}):
            error = assert_error(get(client, path, ADMIN, **bad), 400)
            assert error["param"] in bad, (path, bad, error)
        assert ok(get(client, path, ADMIN, page="1000000", **{size: "1000"})) == []
    # repeated parameters are refused, not resolved one way by us and another by a proxy
    response = client.get("/spend/logs?user_id=alice&user_id=bob", headers=ADMIN)
    assert_error(response, 400)
    response = client.get("/spend/logs?user_id=alice&user_id=bob",
                          headers=world["as"]["alice2"])
    assert response.status_code in (400, 403)


# -- 2. customers ----------------------------------------------------------------------------------


def test_no_non_admin_credential_changes_a_customer(app: Any, client: Any) -> None:
    """Every role but proxy_admin, a team admin, and a key an admin granted the customer
    routes explicitly: never creates, raises, unblocks, deletes or reads customers
    (viewers read)."""
    ok(client.post("/customer/new", headers=ADMIN, json={
        "user_id": "acme", "max_budget": 1, "tpm_limit": 10}))
    ok(client.post("/customer/block", headers=ADMIN, json={"user_ids": ["spammer"]}))
    keys = role_keys(client, app)
    ok(client.post("/team/new", headers=ADMIN, json={"team_id": "tc"}))
    ok(client.post("/team/member_add", headers=ADMIN, json={
        "team_id": "tc", "member": {"user_id": "u-internal_user", "role": "admin"}}))
    credentials = {role: k for role, k in keys.items() if role != "proxy_admin"}
    credentials["team_admin"] = new_key(client, user_id="u-internal_user", team_id="tc")["key"]
    credentials["granted"] = new_key(client, user_id="u-internal_user", allowed_routes=[
        "/customer/new", "/customer/update", "/customer/unblock", "/customer/delete",
        "/customer/info", "/customer/list", "/end_user/new"])["key"]
    state = app.extensions["llmauth"]

    def rows() -> list[dict[str, Any]]:
        with state.store.use():
            return [dict(c.__data__) for c in Customer.select().order_by(Customer.id)]

    before = rows()
    writes = [("/customer/new", {"user_id": "mine", "max_budget": 1000}),
              ("/end_user/new", {"user_id": "mine"}),
              ("/customer/update", {"user_id": "acme", "max_budget": 1000}),
              ("/customer/update", {"user_id": "acme", "max_budget": None}),
              ("/customer/update", {"user_id": "acme", "spend": 0}),
              ("/customer/update", {"user_id": "acme", "budget_duration": "1s"}),
              ("/customer/update", {"user_id": "spammer", "blocked": False}),
              ("/customer/unblock", {"user_ids": ["spammer"]}),
              ("/customer/block", {"user_ids": ["acme"]}),
              ("/customer/delete", {"user_ids": ["spammer"]})]
    for role, key in credentials.items():
        for path, body in writes:
            response = client.post(path, json=body, headers=bearer(key))
            assert_error(response, 403)
        for path, query in (("/customer/info", {"end_user_id": "acme"}),
                            ("/customer/list", {})):
            response = client.get(path, query_string=query, headers=bearer(key))
            if role == "proxy_admin_viewer":
                assert response.status_code == 200
            else:
                assert_error(response, 403)
    assert rows() == before
    # the blocked end user stays blocked for every key
    for key in (keys["internal_user"], credentials["team_admin"], credentials["granted"]):
        response = client.post(CHAT, json={"model": "gpt-4o", "user": "spammer"},
                               headers=bearer(key))
        assert_error(response, 403, "permission_error")


# -- 3. who the end user is ------------------------------------------------------------------------


def chat(client: Any, key: str, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return client.post(CHAT, json={"model": "gpt-4o", **body},
                       headers={**bearer(key), **(headers or {})})


@SQLITE_ONLY
def test_end_user_ids_are_exact_and_malformed_ones_are_400s(app: Any, client: Any) -> None:
    """An end-user id is matched exactly (LiteLLM's rule): a key holder names whichever end
    user it likes — or none — so a look-alike id is simply another end user, not a way
    past a block. What could make two ids look alike to a person but differ to the
    database (invisible or control characters) is refused outright."""
    key = new_key(client)["key"]
    ok(client.post("/customer/block", headers=ADMIN, json={"user_ids": ["acme"]}))
    for value in ("acme\u200b", "\u200bacme", "acme\u00ad", "\u00a0acme", "acme\x00",
                  "acme\t", "acme\u2028", "acme\ufeff", "\u202eemca", "x" * 256, 0, 1.5,
                  True, False, [], ["acme"], {}, {"id": "acme"}):
        for body, param in (({"user": value}, "user"),
                            ({"metadata": {"user_id": value}}, "metadata.user_id"),
                            ({"litellm_metadata": {"user": value}}, "litellm_metadata.user"),
                            ({"safety_identifier": value}, "safety_identifier")):
            error = assert_error(chat(client, key, **body), 400)
            assert error["param"] == param, (body, error)
    for value in ("\u200bacme", "acme\u00ad", "x" * 256):
        error = assert_error(chat(client, key, {"x-litellm-customer-id": value}), 400)
        assert error["param"] == "x-litellm-customer-id"
    # the blocked id in every place, also after an empty or null earlier field
    for body in ({"user": "acme"}, {"user": "", "metadata": {"user_id": "acme"}},
                 {"user": None, "safety_identifier": "acme"},
                 {"metadata": "not an object", "safety_identifier": "acme"}):
        assert_error(chat(client, key, **body), 403, "permission_error")
    # look-alikes are other end users
    for value in ("ACME", "acme ", " acme", "ａｃｍｅ", "acme\u0301", "x" * 255):
        assert chat(client, key, user=value).status_code == 200, value
    with app.extensions["llmauth"].store.use():
        assert Customer.select().count() == 1  # none of them got a row


@SQLITE_ONLY
def test_duplicate_json_fields_and_two_sources_name_one_end_user(app: Any,
                                                                 client: Any) -> None:
    """The guard and the view read one parse of the body, so a duplicated ``user`` names
    the same end user to both (the last one, as Python's JSON reader has it); a header
    and a body naming two end users: the header's is the end user (LiteLLM's order) — it
    is the one checked, limited and written to the spend log."""
    key = new_key(client)["key"]
    ok(client.post("/customer/block", headers=ADMIN, json={"user_ids": ["acme"]}))

    def raw(text: str, **headers: str) -> Any:
        return client.post(CHAT, data=text, headers={**bearer(key), **headers,
                                                     "Content-Type": "application/json"})

    assert_error(raw('{"model": "gpt-4o", "user": "fine", "user": "acme"}'), 403)
    assert_error(raw('{"model": "gpt-4o", "metadata": {"user_id": "x", "user_id": "acme"}}'),
                 403)
    assert raw('{"model": "gpt-4o", "user": "acme", "user": "dup-fine"}').status_code == 200
    assert raw('{"model": "gpt-4o", "user": "acme"}',
               **{"x-litellm-customer-id": "hdr-fine"}).status_code == 200
    assert_error(raw('{"model": "gpt-4o", "user": "fine"}',
                     **{"x-litellm-end-user-id": "acme"}), 403)
    flush(app)
    with app.extensions["llmauth"].store.use():
        logged = sorted(r.end_user_id for r in SpendLog.select())
    assert logged == ["dup-fine", "hdr-fine"]


def test_many_end_user_ids_grow_no_table_and_no_unbounded_cache(app_factory: Any) -> None:
    """A key holder naming a new end user in every request makes no customer row, and
    the per-process cache of end-user rows (and their absence) stays within its bound."""
    app = app_factory(config={"LLMAUTH_CACHE_MAX_SIZE": 50})
    client = app.test_client()
    key = new_key(client)["key"]
    state = app.extensions["llmauth"]
    for n in range(300):
        assert chat(client, key, user=f"u-{n}-" + "x" * 240).status_code == 200
    assert len(state.customer_cache) <= 50
    with state.store.use():
        assert Customer.select().count() == 0


# -- 4. resetting and raising spend and budgets ----------------------------------------------------


@pytest.fixture
def budgeted(app: Any, client: Any) -> dict[str, Any]:
    """alice: an internal user, admin of team tb (where bob is a plain member), holding a
    personal key without a budget, and a key an admin gave her for gpt-4o with a budget
    (her own key is for the cheap model only)."""
    ok(client.post("/team/new", headers=ADMIN, json={"team_id": "tb", "max_budget": 10}))
    for user in ("alice", "bob"):
        ok(client.post("/user/new", headers=ADMIN, json={
            "user_id": user, "user_role": "internal_user", "auto_create_key": False}))
    for user, role in (("alice", "admin"), ("bob", "user")):
        ok(client.post("/team/member_add", headers=ADMIN, json={
            "team_id": "tb", "member": {"user_id": user, "role": role},
            "max_budget_in_team": 1}))
    out = {
        "own": new_key(client, user_id="alice", models=["gpt-4o-mini"]),
        "budgeted": new_key(client, user_id="alice", models=["gpt-4o"], max_budget=1,
                            budget_duration="30d", tpm_limit=100, rpm_limit=5,
                            max_parallel_requests=1, duration="30d",
                            allowed_ips=["127.0.0.0/8"],
                            model_max_budget={"gpt-4o": {"budget_limit": 0.5,
                                                         "time_period": "1d"}}),
        "team_admin": new_key(client, user_id="alice", team_id="tb"),
        "bob_team": new_key(client, user_id="bob", team_id="tb", max_budget=1),
    }
    state = app.extensions["llmauth"]
    with state.store.use():
        for name in ("budgeted", "bob_team"):
            Key.update(spend=900_000_000).where(Key.key_id == out[name]["key_id"]).execute()
    return out


def key_row(app: Any, key_id: str) -> dict[str, Any]:
    with app.extensions["llmauth"].store.use():
        return dict(Key.get(Key.key_id == key_id).__data__)


def test_only_a_proxy_admin_resets_a_keys_spend(app: Any, client: Any,
                                                budgeted: dict[str, Any]) -> None:
    keys = role_keys(client, app)
    target = budgeted["budgeted"]["key_id"]
    before = key_row(app, target)
    credentials = [budgeted["own"]["key"], budgeted["budgeted"]["key"],
                   budgeted["team_admin"]["key"],
                   *(k for role, k in keys.items() if role != "proxy_admin")]
    for credential in credentials:
        for key in (target, budgeted["bob_team"]["key_id"], budgeted["budgeted"]["key"]):
            response = client.post(f"/key/{key}/reset_spend", json={"reset_to": 0},
                                   headers=bearer(credential))
            assert_error(response, 403)
    assert key_row(app, target) == before
    assert key_row(app, budgeted["bob_team"]["key_id"])["spend"] == 900_000_000


def test_an_owner_never_lifts_a_budget_an_admin_set_on_a_key_beyond_its_credential(
        app: Any, client: Any, budgeted: dict[str, Any]) -> None:
    """alice's own credential is unbudgeted but limited to gpt-4o-mini; the key an admin
    gave her reaches gpt-4o within a budget. Loosening that key's budget or limits with
    her own credential would give her unbounded gpt-4o: a key's limits are loosened only
    by a credential that could grant everything the key has. Narrowing always passes."""
    target = budgeted["budgeted"]
    secret = target["key"]
    before = key_row(app, target["key_id"])
    own = bearer(budgeted["own"]["key"])
    for field, value in (("max_budget", None), ("max_budget", 100), ("tpm_limit", None),
                         ("rpm_limit", 500), ("max_parallel_requests", None),
                         ("budget_duration", "1s"), ("budget_duration", "29d"),
                         ("model_max_budget", {"gpt-4o": {"budget_limit": 1}}),
                         ("duration", None), ("allowed_ips", None), ("soft_budget", None)):
        for path in ("/key/update", "/key/regenerate"):
            response = client.post(path, headers=own, json={"key": target["key_id"],
                                                            field: value})
            if field == "soft_budget":  # advisory only: never a limit
                assert response.status_code == 200, response.get_json()
                if path == "/key/regenerate":
                    secret = record_secret(response.get_json()["key"])
                continue
            error = assert_error(response, 403)
            assert error["param"] == field, (field, error)
    after = key_row(app, target["key_id"])
    assert {k: after[k] for k in ("max_budget", "tpm_limit", "rpm_limit",
                                  "max_parallel_requests", "budget_duration", "spend")} == {
        k: before[k] for k in ("max_budget", "tpm_limit", "rpm_limit",
                               "max_parallel_requests", "budget_duration", "spend")}
    # narrowing passes
    for body in ({"max_budget": 0.95, "rpm_limit": 1}, {"budget_duration": "60d"},
                 {"budget_duration": None}, {"duration": "1d"},
                 {"allowed_ips": ["127.0.0.1/32"]},
                 {"model_max_budget": {"gpt-4o": {"budget_limit": 0.25, "time_period": "1d"},
                                       "o3": {"budget_limit": 1}}}):
        response = client.post("/key/update", headers=own, json={"key": target["key_id"],
                                                                 **body})
        assert response.status_code == 200, (body, response.get_json())
    # a key within her own models: hers to loosen (as if she made a new one)
    mine = new_key(client, user_id="alice", models=["gpt-4o-mini"], max_budget=1)
    response = client.post("/key/update", headers=own, json={
        "key": mine["key_id"], "max_budget": None})
    assert response.status_code == 200, response.get_json()
    # a team admin loosens its team's keys with its team key (which reaches the team's
    # models), not with a personal credential narrower than the key
    bob_team = budgeted["bob_team"]["key_id"]
    assert_error(client.post("/key/update", headers=own, json={
        "key": bob_team, "max_budget": 5}), 403)
    response = client.post("/key/update", headers=bearer(budgeted["team_admin"]["key"]),
                           json={"key": bob_team, "max_budget": 5})
    assert response.status_code == 200 and response.get_json()["max_budget"] == 5
    # the key's own credential cannot loosen itself either (unchanged rule)
    assert_error(client.post("/key/update", headers=bearer(secret), json={
        "key": target["key_id"], "max_budget": 2}), 403)


def test_budget_fields_of_users_teams_and_members(app: Any, client: Any,
                                                  budgeted: dict[str, Any]) -> None:
    state = app.extensions["llmauth"]
    alice_admin = bearer(budgeted["team_admin"]["key"])
    alice_own = bearer(budgeted["own"]["key"])
    bob = bearer(budgeted["bob_team"]["key"])

    def snapshot() -> Any:
        with state.store.use():
            return [dict(m.__data__) for m in TeamMembership.select().order_by(
                TeamMembership.id)]

    before = snapshot()
    for headers in (alice_admin, alice_own, bob):
        for body in ({"user_id": "alice", "max_budget": 100}, {"user_id": "alice", "spend": 0},
                     {"user_id": "alice", "budget_duration": "1s"},
                     {"user_id": "bob", "max_budget": None}):
            assert_error(client.post("/user/update", json=body, headers=headers), 403)
        for body in ({"team_id": "tb", "max_budget": 1000}, {"team_id": "tb", "spend": 0},
                     {"team_id": "tb", "budget_duration": "1s"},
                     {"team_id": "tb", "team_member_budget": 1000}):
            response = client.post("/team/update", json=body, headers=headers)
            assert response.status_code in (400, 403), (body, response.get_json())
    # a team admin changes other members' budgets, never its own; a member changes none
    for headers, body in (
            (alice_admin, {"team_id": "tb", "user_id": "alice", "max_budget_in_team": 100}),
            (alice_admin, {"team_id": "tb", "user_id": "alice", "budget_duration": "1s"}),
            (alice_own, {"team_id": "tb", "user_id": "alice", "max_budget_in_team": None}),
            (bob, {"team_id": "tb", "user_id": "bob", "max_budget_in_team": 100}),
            (bob, {"team_id": "tb", "user_id": "alice", "max_budget_in_team": 100})):
        assert_error(client.post("/team/member_update", json=body, headers=headers), 403)
    for body in ({"team_id": "tb", "user_id": "bob", "spend": 0},):
        assert_error(client.post("/team/member_update", json=body, headers=alice_admin), 400)
    assert snapshot() == before
