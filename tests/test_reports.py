"""Spend reports: /spend/logs, /spend/keys, /spend/users, /spend/teams, /global/spend —
LiteLLM's shapes, exact sums, date ranges (day and instant bounds), pagination, every bad
parameter a 400, and data-level scoping: a non-admin sees only its own spend (IDOR)."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from flask_llmauth.durations import utcnow
from flask_llmauth.spend import flush
from flask_llmauth.store.tables import BudgetCounter, Key, SpendLog, Team, User
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
USD = Decimal(1_000_000_000)


def get(client: Any, path: str, headers: dict[str, str] = ADMIN, **query: Any) -> Any:
    return client.get(path, query_string=query, headers=headers)


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def usd(units: int) -> float:
    return float(Decimal(units) / USD)


@pytest.fixture
def world(app: Any, client: Any) -> dict[str, Any]:
    """alice (team t1) and bob (internal users), a viewer, an internal_user_viewer (carol),
    a service-account key of team t2, and four spend-log rows over three days."""
    for body in ({"team_id": "t1"}, {"team_id": "t2"}):
        ok(client.post("/team/new", json=body, headers=ADMIN))
    for user, role in (("alice", "internal_user"), ("bob", "internal_user"),
                       ("vera", "proxy_admin_viewer"), ("carol", "internal_user_viewer")):
        ok(client.post("/user/new", headers=ADMIN, json={
            "user_id": user, "user_role": role, "auto_create_key": False}))
    ok(client.post("/team/member_add", headers=ADMIN,
                   json={"team_id": "t1", "member": {"user_id": "alice", "role": "user"}}))
    keys = {"alice": new_key(client, user_id="alice", team_id="t1"),
            "alice2": new_key(client, user_id="alice"),
            "bob": new_key(client, user_id="bob"),
            "vera": new_key(client, user_id="vera"),
            "carol": new_key(client, user_id="carol"),
            "service": new_key(client, team_id="t2")}
    rows = [
        ("r1", "alice", "alice", "t1", None, "gpt-4o", 1_000_000_001, "2026-11-01 10:00:00"),
        ("r2", "alice", "alice", "t1", None, "claude", 333_333_333, "2026-11-01 23:59:59.5"),
        ("r3", "bob", "bob", None, None, "gpt-4o", 7, "2026-11-02 00:00:00"),
        ("r4", "bob", "bob", None, "c1", "gpt-4o", 2_000_000_000, "2026-11-03 12:00:00"),
        ("r5", "service", None, "t2", None, "gpt-4o", 5, "2026-11-03 13:00:00"),
    ]
    state = app.extensions["llmauth"]
    with state.store.use():
        for request_id, key, user, team, end_user, model, spend, when in rows:
            at = datetime.fromisoformat(when)
            SpendLog.create(request_id=request_id, created_at=at, started_at=at,
                            key_id=keys[key]["key_id"], user_id=user, team_id=team,
                            end_user_id=end_user, model=model, route="/v1/chat/completions",
                            auth_method="virtual_key", prompt_tokens=10, completion_tokens=5,
                            spend=spend, estimated=False, status="success")
            Key.update(spend=Key.spend + spend).where(
                Key.key_id == keys[key]["key_id"]).execute()
            if user:
                User.update(spend=User.spend + spend).where(User.user_id == user).execute()
            if team:
                Team.update(spend=Team.spend + spend).where(Team.team_id == team).execute()
    return {"keys": keys, "as": {name: bearer(k["key"]) for name, k in keys.items()}}


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["request_id"] for r in rows]


# -- /spend/logs ----------------------------------------------------------------------------------


def test_logs_shapes_filters_and_pagination(client: Any, world: dict[str, Any]) -> None:
    keys = world["keys"]
    response = get(client, "/spend/logs")
    rows = ok(response)
    assert ids(rows) == ["r5", "r4", "r3", "r2", "r1"]  # newest first
    assert response.headers["X-Total-Count"] == "5"
    first = rows[-1]
    assert first == {
        "request_id": "r1", "call_type": "/v1/chat/completions",
        "api_key": keys["alice"]["key_id"], "spend": 1.000000001, "total_tokens": 15,
        "prompt_tokens": 10, "completion_tokens": 5,
        "startTime": "2026-11-01T10:00:00+00:00", "endTime": "2026-11-01T10:00:00+00:00",
        "model": "gpt-4o", "user": "alice", "team_id": "t1", "organization_id": None,
        "end_user": None, "auth_method": "virtual_key", "status": "success",
        "estimated": False}
    assert ids(ok(get(client, "/spend/logs", user_id="alice"))) == ["r2", "r1"]
    assert ids(ok(get(client, "/spend/logs", api_key=keys["bob"]["key_id"]))) == ["r4", "r3"]
    assert ids(ok(get(client, "/spend/logs", api_key=keys["bob"]["key"]))) == ["r4", "r3"]
    assert ids(ok(get(client, "/spend/logs", team_id="t1"))) == ["r2", "r1"]
    assert ids(ok(get(client, "/spend/logs", end_user_id="c1"))) == ["r4"]
    assert ids(ok(get(client, "/spend/logs", model="claude"))) == ["r2"]
    assert ids(ok(get(client, "/spend/logs", request_id="r3"))) == ["r3"]
    assert ok(get(client, "/spend/logs", api_key="sk-no-such-key-0123456789abcdef")) == []
    page = get(client, "/spend/logs", page=2, page_size=2)
    assert ids(ok(page)) == ["r3", "r2"] and page.headers["X-Total-Count"] == "5"
    assert ok(get(client, "/spend/logs", page=4, page_size=2)) == []


def test_logs_date_ranges(client: Any, world: dict[str, Any]) -> None:
    def between(start: str, end: str) -> list[str]:
        return ids(ok(get(client, "/spend/logs", start_date=start, end_date=end,
                          summarize="false")))

    # a day as end_date includes the whole day, up to its last fraction of a second
    assert between("2026-11-01", "2026-11-01") == ["r2", "r1"]
    assert between("2026-11-01", "2026-11-02") == ["r3", "r2", "r1"]
    assert between("2026-11-02", "2026-11-02") == ["r3"]
    # instants: both ends included; an offset is converted to UTC
    assert between("2026-11-01T23:00:00Z", "2026-11-02T00:00:00") == ["r3", "r2"]
    assert between("2026-11-02T01:00:00+01:00", "2026-11-02T00:00:00+00:00") == ["r3"]
    assert between("2026-11-04", "2026-12-31") == []
    # one bound alone
    assert ids(ok(get(client, "/spend/logs", start_date="2026-11-03"))) == ["r5", "r4"]
    assert ids(ok(get(client, "/spend/logs", end_date="2026-11-01"))) == ["r2", "r1"]


def test_logs_daily_summary_sums_exactly(client: Any, world: dict[str, Any]) -> None:
    keys = world["keys"]
    days = ok(get(client, "/spend/logs", start_date="2026-11-01", end_date="2026-11-03"))
    assert [d["startTime"] for d in days] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert days[0]["spend"] == usd(1_333_333_334) == 1.333333334
    assert days[0]["users"] == {"alice": 1.333333334}
    assert days[0]["models"] == {"gpt-4o": 1.000000001, "claude": 0.333333333}
    assert days[0]["api_keys"] == {keys["alice"]["key_id"]: 1.333333334}
    assert days[1]["spend"] == usd(7) and days[2]["spend"] == usd(2_000_000_005)
    assert days[2]["users"] == {"bob": 2.0}  # the service key's row has no user
    # filters apply to the summary too
    bob = ok(get(client, "/spend/logs", start_date="2026-11-01", end_date="2026-11-03",
                 user_id="bob"))
    assert [(d["startTime"], d["spend"]) for d in bob] == [("2026-11-02", usd(7)),
                                                            ("2026-11-03", 2.0)]


def test_non_admins_see_only_their_own_logs(client: Any, world: dict[str, Any]) -> None:
    keys, as_ = world["keys"], world["as"]
    assert ids(ok(get(client, "/spend/logs", as_["alice"]))) == ["r2", "r1"]
    # the same rows through her other key (spend is the user's)
    assert ids(ok(get(client, "/spend/logs", as_["alice2"]))) == ["r2", "r1"]
    assert ids(ok(get(client, "/spend/logs", as_["alice"], user_id="alice"))) == ["r2", "r1"]
    assert ids(ok(get(client, "/spend/logs", as_["alice"],
                      api_key=keys["alice"]["key_id"]))) == ["r2", "r1"]
    assert ok(get(client, "/spend/logs", as_["alice"], team_id="t2")) == []
    for query in ({"user_id": "bob"}, {"api_key": keys["bob"]["key_id"]},
                  {"api_key": keys["bob"]["key"]},
                  {"api_key": "00000000-0000-0000-0000-000000000000"},
                  {"api_key": "sk-not-a-key-anyone-has-0123456789"}):
        assert_error(get(client, "/spend/logs", as_["alice"], **query), 403)
    # the summary is scoped too
    days = ok(get(client, "/spend/logs", as_["bob"], start_date="2026-11-01",
                  end_date="2026-11-03"))
    assert [d["startTime"] for d in days] == ["2026-11-02", "2026-11-03"]
    assert days[1]["spend"] == 2.0  # not the service key's row of that day
    # an internal_user_viewer reads its own (none); the role table keeps a team key away
    assert ok(get(client, "/spend/logs", as_["carol"])) == []
    assert_error(get(client, "/spend/logs", as_["service"]), 403)
    # an admin viewer sees everything
    assert ids(ok(get(client, "/spend/logs", as_["vera"]))) == ["r5", "r4", "r3", "r2", "r1"]


# -- /spend/keys, /spend/users, /spend/teams ------------------------------------------------------


def test_spend_keys(client: Any, world: dict[str, Any]) -> None:
    keys, as_ = world["keys"], world["as"]
    listed = ok(get(client, "/spend/keys"))
    assert [k["key_id"] for k in listed[:3]] == [keys["bob"]["key_id"],
                                                keys["alice"]["key_id"],
                                                keys["service"]["key_id"]]
    assert listed[0]["spend"] == usd(2_000_000_007) and len(listed) == 6
    assert all("key" not in k and "digest" not in k for k in listed)
    assert len(ok(get(client, "/spend/keys", limit=2))) == 2
    dated = ok(get(client, "/spend/keys", start_date="2026-11-01", end_date="2026-11-02"))
    assert [(k["key_id"], k["spend"]) for k in dated[:2]] == [
        (keys["alice"]["key_id"], 1.333333334), (keys["bob"]["key_id"], usd(7))]
    assert {k["spend"] for k in dated[2:]} == {0.0}
    mine = ok(get(client, "/spend/keys", as_["alice2"]))
    assert {k["key_id"] for k in mine} == {keys["alice"]["key_id"], keys["alice2"]["key_id"]}
    # her team key: her keys of its team only
    mine = ok(get(client, "/spend/keys", as_["alice"]))
    assert [k["key_id"] for k in mine] == [keys["alice"]["key_id"]]
    assert_error(get(client, "/spend/keys", as_["service"]), 403)


def test_spend_users(client: Any, world: dict[str, Any]) -> None:
    as_ = world["as"]
    listed = ok(get(client, "/spend/users"))
    assert [(u["user_id"], u["spend"]) for u in listed[:2]] == [("bob", usd(2_000_000_007)),
                                                              ("alice", 1.333333334)]
    assert "password" not in str(listed)
    assert [u["user_id"] for u in ok(get(client, "/spend/users", user_id="alice"))] == [
        "alice"]
    dated = ok(get(client, "/spend/users", start_date="2026-11-03", end_date="2026-11-03"))
    assert [(u["user_id"], u["spend"]) for u in dated[:2]] == [("bob", 2.0), ("alice", 0.0)]
    assert [u["user_id"] for u in ok(get(client, "/spend/users", as_["alice2"]))] == ["alice"]
    assert_error(get(client, "/spend/users", as_["alice2"], user_id="bob"), 403)
    # her team key does not report her total, which spans other teams and personal keys
    assert_error(get(client, "/spend/users", as_["alice"]), 403)
    assert_error(get(client, "/spend/users", as_["service"]), 403)


def test_spend_teams(client: Any, world: dict[str, Any]) -> None:
    as_ = world["as"]
    listed = ok(get(client, "/spend/teams"))
    assert [(t["team_id"], t["spend"]) for t in listed] == [("t1", 1.333333334),
                                                           ("t2", usd(5))]
    dated = ok(get(client, "/spend/teams", start_date="2026-11-03"))
    assert [(t["team_id"], t["spend"]) for t in dated] == [("t2", usd(5)), ("t1", 0.0)]
    assert [t["team_id"] for t in ok(get(client, "/spend/teams", as_["alice"]))] == ["t1"]
    assert ok(get(client, "/spend/teams", as_["bob"])) == []
    assert_error(get(client, "/spend/teams", as_["bob"], team_id="t1"), 403)
    assert_error(get(client, "/spend/teams", as_["service"]), 403)


# -- /global/spend --------------------------------------------------------------------------------


def test_global_spend(client: Any, world: dict[str, Any]) -> None:
    as_ = world["as"]
    total = 1_000_000_001 + 333_333_333 + 7 + 2_000_000_000 + 5
    assert ok(get(client, "/global/spend")) == {"spend": usd(total), "max_budget": None,
                                                 "budget_spend": None, "budget_reset_at": None}
    assert ok(get(client, "/global/spend", start_date="2026-11-02",
                  end_date="2026-11-02"))["spend"] == usd(7)
    assert ok(get(client, "/global/spend", as_["vera"]))["spend"] == usd(total)
    assert ok(get(client, "/global/spend", as_["alice"]))["spend"] == 1.333333334
    assert ok(get(client, "/global/spend", as_["bob"],
                  start_date="2026-11-03"))["spend"] == 2.0
    assert ok(get(client, "/global/spend", as_["carol"]))["spend"] == 0.0


# -- bad input ------------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize("path,query,param", [
    ("/spend/logs", {"start_date": "2026-13-01"}, "start_date"),
    ("/spend/logs", {"start_date": "2026-02-30"}, "start_date"),
    ("/spend/logs", {"end_date": "yesterday"}, "end_date"),
    ("/spend/logs", {"end_date": "2026-11-01T25:00:00"}, "end_date"),
    ("/spend/logs", {"start_date": "0001-01-01"}, "start_date"),
    ("/spend/logs", {"start_date": "20261101"}, "start_date"),
    ("/spend/logs", {"start_date": "2026-11-02", "end_date": "2026-11-01"}, "end_date"),
    ("/spend/logs", {"start_date": "2026-11-02T10:00:00",
                     "end_date": "2026-11-02T09:59:59"}, "end_date"),
    ("/spend/logs", {"page": "0"}, "page"),
    ("/spend/logs", {"page_size": "5000"}, "page_size"),
    ("/spend/logs", {"page_size": "ten"}, "page_size"),
    ("/spend/logs", {"summarize": "maybe"}, "summarize"),
    ("/spend/logs", {"user": "alice"}, "user"),
    ("/spend/logs", {"request_id": "x" * 65}, "request_id"),
    ("/spend/keys", {"limit": "0"}, "limit"),
    ("/spend/keys", {"start_date": "soon"}, "start_date"),
    ("/spend/users", {"end_date": "2026-11-01T"}, "end_date"),
    ("/spend/teams", {"team": "t1"}, "team"),
    ("/global/spend", {"start_date": "x"}, "start_date"),
    ("/global/spend", {"limit": "3"}, "limit"),
])
def test_bad_parameters_are_400(client: Any, path: str, query: dict[str, str],
                                param: str) -> None:
    error = assert_error(get(client, path, **query), 400)
    assert error["param"] == param, error


@SQLITE_ONLY
def test_repeated_parameter_is_400(client: Any) -> None:
    assert_error(client.get("/spend/logs?user_id=a&user_id=b", headers=ADMIN), 400)


# -- end to end: the spend guard writes, the reports read -----------------------------------------


def test_requests_with_an_end_user_are_reported(app_factory: Any, db_url: str) -> None:
    app = app_factory(db_url=db_url, config={"LLMAUTH_SPEND_FLUSH_INTERVAL": 3600})

    @app.post("/v1/responses")
    def reported() -> Any:
        app.llmauth.record_usage(100, 50)  # type: ignore[attr-defined]
        return {"output": "done"}

    client = app.test_client()
    ok(client.post("/customer/new", json={"user_id": "c9"}, headers=ADMIN))
    key = new_key(client)
    for user in ("c9", "c9", "other", None):
        body = {"model": "gpt-4o", **({"user": user} if user else {})}
        assert client.post("/v1/responses", json=body,
                           headers=bearer(key["key"])).status_code == 200
    assert flush(app) == 4
    rows = ok(client.get("/spend/logs", query_string={"end_user_id": "c9"}, headers=ADMIN))
    assert len(rows) == 2 and {r["end_user"] for r in rows} == {"c9"}
    assert {r["api_key"] for r in rows} == {key["key_id"]}
    assert all(r["prompt_tokens"] == 100 and r["completion_tokens"] == 50 for r in rows)
    customer = ok(client.get("/customer/info", query_string={"end_user_id": "c9"},
                             headers=ADMIN))
    assert customer["spend"] == sum(r["spend"] for r in rows)
    every = ok(client.get("/spend/logs", headers=ADMIN))
    total = ok(client.get("/global/spend", headers=ADMIN))["spend"]
    with app.extensions["llmauth"].store.use():
        units = sum(r.spend for r in SpendLog.select())
    assert total == usd(units) and len(every) == 4


def test_own_rows_of_each_kind_of_caller() -> None:
    from flask_llmauth.errors import Forbidden
    from flask_llmauth.principal import Principal, Role
    from flask_llmauth.reports import SpendReports

    def sql(principal: Principal) -> str:
        return str(SpendLog.select().where(SpendReports.own_rows(principal)).sql())

    assert "user_id" in sql(Principal(method="jwt", role=Role.INTERNAL_USER, user_id="u",
                                      team_id="t"))
    assert "key_id" in sql(Principal(method="custom", role=Role.INTERNAL_USER, key_id="k"))
    assert "team_id" in sql(Principal(method="jwt", role=Role.TEAM, team_id="t"))
    with pytest.raises(Forbidden):
        SpendReports.own_rows(Principal(method="custom", role=Role.INTERNAL_USER))


def test_global_spend_reports_the_global_budget(app_factory: Any) -> None:
    from flask_llmauth.config import Settings

    if "max_budget" not in {f.name for f in Settings.table()}:
        pytest.skip("no global budget setting (the budgets are not installed)")
    app = app_factory(config={"LLMAUTH_MAX_BUDGET": 12.5})
    body = ok(app.test_client().get("/global/spend", headers=ADMIN))
    assert body == {"spend": 0.0, "max_budget": 12.5, "budget_spend": 0.0,
                    "budget_reset_at": None}


def test_global_spend_shows_what_the_global_budget_counts_in_its_window(
        app_factory: Any, db_url: str) -> None:
    """``spend`` is the spend log's (all time, master key included); ``budget_spend`` is
    what the global budget holds against ``max_budget`` in its current window: spend
    before the budget was set and the master key's are not in it. Admins only."""
    from tests.test_budgets import budget_gateway, chat

    build = budget_gateway(app_factory, db_url)
    before = build()
    client = before.test_client()
    key = new_key(client, user_id="gia")
    assert chat(client, key["key"], completion=5).status_code == 200  # 5,000 units, no budget
    before.extensions["llmauth"].close()

    app = build(LLMAUTH_MAX_BUDGET=1.0, LLMAUTH_BUDGET_DURATION="1h")
    client = app.test_client()
    assert chat(client, key["key"], completion=3).status_code == 200  # 3,000 units
    assert chat(client, MASTER_KEY, completion=7).status_code == 200  # 7,000: exempt
    app.extensions["llmauth"].budgets.leases.sweep(final=True)
    body = ok(get(client, "/global/spend"))
    assert body["spend"] == usd(15_000) and body["max_budget"] == 1.0
    assert body["budget_spend"] == usd(3_000)
    reset_at = datetime.fromisoformat(body["budget_reset_at"]).replace(tzinfo=None)
    assert timedelta(minutes=59) < reset_at - utcnow() <= timedelta(hours=1)
    mine = ok(get(client, "/global/spend", bearer(key["key"])))
    assert mine == {"spend": usd(8_000), "max_budget": 1.0, "budget_spend": None,
                    "budget_reset_at": None}
    with app.extensions["llmauth"].store.use():  # the window ends: the next request resets it
        BudgetCounter.update(budget_reset_at=datetime(2000, 1, 1)).execute()
    body = ok(get(client, "/global/spend"))
    assert (body["budget_spend"], body["budget_reset_at"]) == (0.0, None)


def _twelve_teams_users_and_keys(client: Any) -> None:
    for i in range(12):
        ok(client.post("/team/new", json={"team_id": f"rank-t{i}"}, headers=ADMIN))
        new_key(client, user_id=f"rank-u{i}")


@pytest.mark.parametrize("path, model, id_field", [("/spend/keys", Key, "key_id"),
                                                   ("/spend/users", User, "user_id"),
                                                   ("/spend/teams", Team, "team_id")])
def test_undated_rankings_are_highest_spend_first_then_oldest_with_any_limit(
        app: Any, client: Any, path: str, model: Any, id_field: str) -> None:
    """Without a date the database ranks and limits the rows: the same order as ranking
    every row (highest spend first, ties oldest first), for every limit."""
    import random

    rng = random.Random(5)
    _twelve_teams_users_and_keys(client)
    with app.extensions["llmauth"].store.use():
        rows = list(model.select().order_by(model.id))
        for row in rows:
            row.spend = rng.choice([0, 5, 5, 7, 10**12])
            row.save()
    expected = [getattr(row, id_field) for row in sorted(rows, key=lambda r: -r.spend)]
    assert len(set(row.spend for row in rows)) > 2 and len(rows) >= 12
    listed = ok(get(client, path))
    assert [item[id_field] for item in listed] == expected
    for limit in (1, 2, 5, len(rows), len(rows) + 3):
        assert [item[id_field] for item in ok(get(client, path, limit=limit))] == (
            expected[:limit])


@pytest.mark.parametrize("path, model, id_field", [("/spend/keys", Key, "key_id"),
                                                   ("/spend/users", User, "user_id"),
                                                   ("/spend/teams", Team, "team_id")])
def test_dated_rankings_with_a_limit_are_the_full_ranking_cut(
        app: Any, client: Any, path: str, model: Any, id_field: str) -> None:
    """With dates and a limit, only the rows that spent in the range and as many others as
    the limit needs are read: the answer is the full ranking (no limit) cut to the limit."""
    import random

    rng = random.Random(9)
    _twelve_teams_users_and_keys(client)
    with app.extensions["llmauth"].store.use():
        rows = list(model.select().order_by(model.id))
        for n, row in enumerate(rng.sample(rows, 7)):
            units = rng.choice([0, 3, 3, 9])
            at = datetime(2026, 11, 2, 12)
            SpendLog.create(request_id=f"rank-{n}", created_at=at, started_at=at, model="m",
                            route="/v1/chat/completions", auth_method="virtual_key",
                            prompt_tokens=1, completion_tokens=1, spend=units,
                            estimated=False, status="success",
                            **{id_field: getattr(row, id_field)})
    dates = {"start_date": "2026-11-01", "end_date": "2026-11-03"}
    full = [(item[id_field], item["spend"]) for item in ok(get(client, path, **dates))]
    assert len(full) == len(rows) and full[0][1] > 0 and full[-1][1] == 0
    for limit in (1, 2, 3, 5, 8, len(rows), len(rows) + 2):
        cut = [(item[id_field], item["spend"])
               for item in ok(get(client, path, limit=limit, **dates))]
        assert cut == full[:limit], limit


# -- pages ----------------------------------------------------------------------------------------


def _spend_row(request_id: str, at: datetime, units: int, **owner: Any) -> None:
    SpendLog.create(request_id=request_id, created_at=at, started_at=at, model="m",
                    route="/v1/chat/completions", auth_method="virtual_key", prompt_tokens=1,
                    completion_tokens=1, spend=units, estimated=False, status="success",
                    **owner)


def _all_pages(client: Any, path: str, headers: dict[str, str] = ADMIN,
               **query: Any) -> list[list[dict[str, Any]]]:
    """Every page, following the Link header's rel="next" from the first."""
    from urllib.parse import urlsplit

    pages = []
    response = get(client, path, headers, **query)
    while True:
        pages.append(ok(response))
        link = response.headers.get("Link")
        if link is None:
            return pages
        target, rel = link.split("; ")
        assert rel == 'rel="next"' and target[0] == "<" and target[-1] == ">"
        url = urlsplit(target[1:-1])
        assert url.path == path
        response = client.get(f"{url.path}?{url.query}", headers=headers)
        assert len(pages) < 1000


@pytest.mark.parametrize("dated, chunk", [(False, 500), (True, 500), (True, 3)])
@pytest.mark.parametrize("path, model, id_field, column", [
    ("/spend/keys", Key, "key_id", "key_id"), ("/spend/users", User, "user_id", "user_id"),
    ("/spend/teams", Team, "team_id", "team_id")])
def test_rankings_page_through_the_whole_ranking(
        app: Any, client: Any, monkeypatch: pytest.MonkeyPatch, path: str, model: Any,
        id_field: str, column: str, dated: bool, chunk: int) -> None:
    """page and limit walk the ranking (highest spend first, ties oldest first) with no row
    missing or repeated, whatever the page size; Link names the next page while there is
    one. Dated: spend in the range only (rows outside it and an entity that no longer
    exists are left out); with chunk=3 the many-spenders path runs."""
    import random

    from flask_llmauth import reports

    monkeypatch.setattr(reports, "_CHUNK", chunk)
    rng = random.Random(11)
    _twelve_teams_users_and_keys(client)
    inside, outside = datetime(2026, 11, 2, 12), datetime(2026, 12, 5)
    with app.extensions["llmauth"].store.use():
        rows = list(model.select().order_by(model.id))
        for row in rows:
            row.spend = rng.choice([0, 5, 5, 7, 10**12])
            row.save()
        ranged: dict[str, int] = {}
        for n, row in enumerate(rng.sample(rows, 9)):
            units = rng.choice([0, 3, 3, 3, 9])
            ident = getattr(row, id_field)
            _spend_row(f"in-{n}", inside, units, **{column: ident})
            _spend_row(f"out-{n}", outside, 10**6, **{column: ident})
            ranged[ident] = ranged.get(ident, 0) + units
        _spend_row("gone", inside, 10**9, **{column: "no-such-entity"})
    if dated:
        query = {"start_date": "2026-11-01", "end_date": "2026-11-30"}
        expected = [(getattr(r, id_field), usd(ranged.get(getattr(r, id_field), 0)))
                    for r in sorted(rows, key=lambda r: -ranged.get(getattr(r, id_field), 0))]
        assert len({units for units in ranged.values()}) >= 2
    else:
        query = {}
        expected = [(getattr(r, id_field), usd(r.spend))
                    for r in sorted(rows, key=lambda r: -r.spend)]
    assert len(rows) >= 12
    for limit in (1, 2, 3, 5, len(rows) - 1, len(rows), len(rows) + 2):
        pages = _all_pages(client, path, limit=limit, **query)
        assert all(len(page) == limit for page in pages[:-1]), limit
        assert 1 <= len(pages[-1]) <= limit
        walked = [(item[id_field], item["spend"]) for page in pages for item in page]
        assert walked == expected, limit
        beyond = get(client, path, limit=limit, page=len(pages) + 1, **query)
        assert ok(beyond) == [] and "Link" not in beyond.headers


def test_a_non_admins_dated_keys_page_through_its_own_keys_only(
        app: Any, client: Any) -> None:
    ok(client.post("/user/new", headers=ADMIN, json={"user_id": "pat",
                                                     "auto_create_key": False}))
    mine = [new_key(client, user_id="pat") for _ in range(7)]
    others = [new_key(client) for _ in range(3)]
    at = datetime(2026, 11, 2)
    with app.extensions["llmauth"].store.use():
        for n, key in enumerate(mine[2:5] + others):
            _spend_row(f"pat-{n}", at, 10 + n, key_id=key["key_id"])
    query = {"start_date": "2026-11-01", "end_date": "2026-11-03", "limit": 2}
    pages = _all_pages(client, "/spend/keys", bearer(mine[0]["key"]), **query)
    walked = [item["key_id"] for page in pages for item in page]
    assert walked == [mine[4]["key_id"], mine[3]["key_id"], mine[2]["key_id"],
                      mine[0]["key_id"], mine[1]["key_id"], mine[5]["key_id"],
                      mine[6]["key_id"]]


def test_rankings_without_a_limit_answer_100_rows_and_a_link(app: Any, client: Any) -> None:
    """Without limit every row of the caller was read and answered (1,000,000 keys: all of
    them); now a page of 100, and limit is at most 1000."""
    import uuid

    with app.extensions["llmauth"].store.use():
        Key.insert_many([{"key_id": str(uuid.uuid4()), "digest": f"{n:064x}",
                          "key_name": f"sk-...{n:04d}"} for n in range(105)]).execute()
    for query in ({}, {"start_date": "2026-11-01"}):
        first = get(client, "/spend/keys", **query)
        assert len(ok(first)) == 100
        assert first.headers["Link"].endswith('page=2>; rel="next"')
        second = get(client, "/spend/keys", page=2, **query)
        assert len(ok(second)) == 5 and "Link" not in second.headers
        listed = [item["key_id"] for item in ok(first) + ok(second)]
        assert len(set(listed)) == 105
    assert len(ok(get(client, "/spend/keys", limit=1000))) == 105
    for path in ("/spend/keys", "/spend/users", "/spend/teams"):
        assert assert_error(get(client, path, limit=1001), 400)["param"] == "limit"
        assert assert_error(get(client, path, page=0), 400)["param"] == "page"


def test_the_daily_summary_pages_by_days(app: Any, client: Any) -> None:
    """With both dates the summary covered the whole range at once (every row of the
    caller in it): now page_size days with spend per page (default 100), oldest first."""
    key = new_key(client)
    with app.extensions["llmauth"].store.use():
        for n, when in enumerate(["2026-01-01 08:00", "2026-01-01 13:00", "2026-01-02 00:00",
                                  "2026-01-05 23:59", "2026-04-10 12:00", "2026-04-11 00:00"]):
            _spend_row(f"day-{n}", datetime.fromisoformat(when), 10**9 * (n + 1),
                       key_id=key["key_id"])
    wide = {"start_date": "2000-01-01", "end_date": "2999-12-31"}
    whole = get(client, "/spend/logs", **wide)
    assert [(day["startTime"], day["spend"]) for day in ok(whole)] == [
        ("2026-01-01", 3.0), ("2026-01-02", 3.0), ("2026-01-05", 4.0), ("2026-04-10", 5.0),
        ("2026-04-11", 6.0)]
    assert "Link" not in whole.headers
    pages = _all_pages(client, "/spend/logs", page_size=2, **wide)
    assert [[day["startTime"] for day in page] for page in pages] == [
        ["2026-01-01", "2026-01-02"], ["2026-01-05", "2026-04-10"], ["2026-04-11"]]
    assert [day for page in pages for day in page] == ok(whole)
    beyond = get(client, "/spend/logs", page=4, page_size=2, **wide)
    assert ok(beyond) == [] and "Link" not in beyond.headers
    # An instant start: rows before it are left out of its day.
    noon = get(client, "/spend/logs", page_size=1, start_date="2026-01-01T12:00:00",
               end_date="2026-01-02T00:00:00")
    assert [(day["startTime"], day["spend"]) for day in ok(noon)] == [("2026-01-01", 2.0)]
    assert noon.headers["Link"].endswith('page=2>; rel="next"')
    last = get(client, "/spend/logs", page=2, page_size=1, start_date="2026-01-01T12:00:00",
               end_date="2026-01-02T00:00:00")
    assert [day["startTime"] for day in ok(last)] == ["2026-01-02"] and "Link" not in last.headers
    # The last days a date may name, and far past any page: never a 500.
    end_of_time = {"start_date": "9999-01-01", "end_date": "9999-12-29"}
    assert ok(get(client, "/spend/logs", page_size=1000, **end_of_time)) == []
    assert ok(get(client, "/spend/logs", page=1_000_000, page_size=1000, **wide)) == []
