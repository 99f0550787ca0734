"""A team's member defaults (``team_member_budget``, ``team_member_budget_duration``,
``team_member_rpm_limit``, ``team_member_tpm_limit``) bind every member without a value of
its own as they are now — also members added before ``/team/update`` changed them — and a
member following the default window is reset on time (lazily and by ``reset-budgets``),
never at once. On SQLite and Postgres."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.durations import utcnow
from flask_llmauth.store.tables import TeamMembership
from tests.helpers import ADMIN, assert_error, new_key
from tests.test_budgets import (
    api,
    budget_gateway,
    chat,
    give_back,
    row,
    usd,
)

DAY = timedelta(days=1)


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def member(app: Flask, team_id: str, user_id: str) -> Any:
    """The membership row, once this process's leases are given back."""
    return row(app, TeamMembership, team_id=team_id, user_id=user_id)


def set_member(app: Flask, team_id: str, user_id: str, **values: Any) -> None:
    """Change a membership row behind the API's back (time passing, a row an older version
    wrote), then drop the cached principals of the team as a change through the API does."""
    give_back(app)
    state = app.extensions["llmauth"]
    with state.store.use():
        assert TeamMembership.update(**values).where(
            (TeamMembership.team_id == team_id) & (TeamMembership.user_id == user_id)
        ).execute() == 1
    state.invalidate(f"team:{team_id}")


def memberships(client: Any, team_id: str) -> dict[str, dict[str, Any]]:
    response = client.get(f"/team/info?team_id={team_id}", headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return {m["user_id"]: m for m in response.get_json()["team_memberships"]}


def close_to(value: datetime, expected: datetime, seconds: float = 5) -> bool:
    return abs((value - expected).total_seconds()) <= seconds


# -- budgets and limits ----------------------------------------------------------------------------


def test_a_member_added_before_a_team_member_budget_change_is_bound_by_the_new_value(
        make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-d", team_member_budget=usd(25_000))
    api(client, "/team/member_add", team_id="t-d", member={"user_id": "bob"})
    bob = new_key(client, user_id="bob", team_id="t-d")["key"]
    assert chat(client, bob, completion=10).status_code == 200  # 10,000 of 25,000
    # the next request's worst case (~10,001) fits 25,000 but not 15,000
    api(client, "/team/update", team_id="t-d", team_member_budget=usd(15_000))
    error = assert_error(chat(client, bob, completion=1), 429, "budget_exceeded")
    assert "Team member=t-d:bob" in error["message"]
    assert "Max budget: 0.000015" in error["message"]
    api(client, "/team/update", team_id="t-d", team_member_budget=usd(50_000))
    assert chat(client, bob, completion=1).status_code == 200
    assert member(app, "t-d", "bob").spend == 11_000
    # the member's own field stays empty: it follows the team's default
    assert member(app, "t-d", "bob").max_budget is None
    assert memberships(client, "t-d")["bob"]["max_budget_in_team"] is None


def test_an_explicit_max_budget_in_team_is_not_overridden_by_a_team_default_change(
        make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-e", team_member_budget=usd(15_000),
        members_with_roles=[{"user_id": "ann"}])
    api(client, "/team/member_add", team_id="t-e", member={"user_id": "bob"})
    added = api(client, "/team/member_add", team_id="t-e", member={"user_id": "cat"},
                max_budget_in_team=usd(25_000))
    assert added["updated_team_memberships"][0]["max_budget_in_team"] == usd(25_000)
    api(client, "/team/update", team_id="t-e", team_member_budget=usd(5_000))
    cat = new_key(client, user_id="cat", team_id="t-e")["key"]
    assert chat(client, cat, completion=10).status_code == 200
    assert chat(client, cat, completion=10).status_code == 200  # 20,000 of its own 25,000
    assert_error(chat(client, cat, completion=1), 429, "budget_exceeded")
    for name in ("ann", "bob"):  # a worst case of ~10,001 does not fit the new 5,000
        key = new_key(client, user_id=name, team_id="t-e")["key"]
        error = assert_error(chat(client, key, completion=1), 429, "budget_exceeded")
        assert f"Team member=t-e:{name}" in error["message"]
    shown = memberships(client, "t-e")
    assert {name: m["max_budget_in_team"] for name, m in shown.items()} == {
        "ann": None, "bob": None, "cat": usd(25_000)}


def test_a_member_added_before_a_team_member_rpm_change_is_bound_by_the_new_value(
        make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-r", team_member_rpm_limit=5, team_member_tpm_limit=10**6)
    api(client, "/team/member_add", team_id="t-r", member=[{"user_id": "bob"}, {"user_id": "cat"}])
    api(client, "/team/member_update", team_id="t-r", user_id="cat", rpm_limit=4)
    bob = new_key(client, user_id="bob", team_id="t-r")["key"]
    cat = new_key(client, user_id="cat", team_id="t-r")["key"]
    assert chat(client, bob).status_code == 200
    api(client, "/team/update", team_id="t-r", team_member_rpm_limit=2)
    assert chat(client, bob).status_code == 200
    refused = assert_error(chat(client, bob), 429)
    assert refused["message"].startswith(
        "Rate limit exceeded for team_member: t-r:bob. Limit type: requests. Current limit: 2")
    # a member's own limit stays its own
    assert [chat(client, cat).status_code for _ in range(5)] == [200] * 4 + [429]
    shown = memberships(client, "t-r")
    assert (shown["bob"]["rpm_limit"], shown["bob"]["tpm_limit"]) == (None, None)
    assert shown["cat"]["rpm_limit"] == 4
    # and the tpm default binds the members that follow it
    api(client, "/team/update", team_id="t-r", team_member_rpm_limit=100,
        team_member_tpm_limit=5)
    assert chat(client, bob, prompt=100).status_code == 200  # 100 tokens of 5 a minute
    refused = assert_error(chat(client, bob), 429)
    assert refused["message"].startswith("Rate limit exceeded for team_member: t-r:bob. "
                                         "Limit type: tokens. Current limit: 5")


def test_team_info_shows_a_member_that_follows_the_defaults(make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-i", team_member_budget=2.5,
        team_member_budget_duration="7d", team_member_rpm_limit=3, team_member_tpm_limit=30,
        members_with_roles=[{"user_id": "ann", "role": "admin"}])
    api(client, "/user/new", user_id="dan", teams=["t-i"], auto_create_key=False)
    api(client, "/team/member_add", team_id="t-i", member={"user_id": "bob"})
    body = client.get("/team/info?team_id=t-i", headers=ADMIN).get_json()
    info = body["team_info"]
    assert (info["team_member_budget"], info["team_member_budget_duration"],
            info["team_member_rpm_limit"], info["team_member_tpm_limit"]) == (2.5, "7d", 3, 30)
    now = utcnow()
    for m in body["team_memberships"]:
        assert (m["max_budget_in_team"], m["budget_duration"], m["rpm_limit"],
                m["tpm_limit"]) == (None, None, None, None), m
        # the member's own window end, on the team's default window
        reset_at = datetime.fromisoformat(m["budget_reset_at"]).replace(tzinfo=None)
        assert close_to(reset_at, now + timedelta(days=7), 60), m
    # member_update: a value of its own, then null again = the team's default
    own = api(client, "/team/member_update", team_id="t-i", user_id="bob",
              max_budget_in_team=9, budget_duration="1d", rpm_limit=7)
    assert (own["max_budget_in_team"], own["budget_duration"], own["rpm_limit"]) == (9, "1d", 7)
    back = api(client, "/team/member_update", team_id="t-i", user_id="bob",
               max_budget_in_team=None, budget_duration=None, rpm_limit=None)
    assert (back["max_budget_in_team"], back["budget_duration"], back["rpm_limit"]) == (
        None, None, None)
    reset_at = datetime.fromisoformat(back["budget_reset_at"]).replace(tzinfo=None)
    assert close_to(reset_at, utcnow() + timedelta(days=7), 60)


# -- the default window ----------------------------------------------------------------------------


def test_a_member_on_the_team_default_window_is_reset_lazily_on_time_not_at_once(
        make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-w", team_member_budget=usd(15_000))
    api(client, "/team/member_add", team_id="t-w", member={"user_id": "bob"})
    bob = new_key(client, user_id="bob", team_id="t-w")["key"]
    assert chat(client, bob, completion=10).status_code == 200  # 10,000 of 15,000
    # a window now: a new schedule from now, the spend stays (no reset at once)
    api(client, "/team/update", team_id="t-w", team_member_budget_duration="1d")
    m = member(app, "t-w", "bob")
    assert (m.budget_duration, m.spend) == (None, 10_000)
    assert close_to(m.budget_reset_at, utcnow() + DAY)
    response = chat(client, bob, completion=1)
    assert_error(response, 429, "budget_exceeded")
    assert 86_000 <= int(response.headers["Retry-After"]) <= 86_400
    assert member(app, "t-w", "bob").spend == 10_000
    # the window ends (no job runs): the next request resets it, the schedule is kept
    past = utcnow() - timedelta(seconds=5)
    set_member(app, "t-w", "bob", budget_reset_at=past)
    assert chat(client, bob, completion=2).status_code == 200
    m = member(app, "t-w", "bob")
    assert (m.spend, m.reserved) == (2_000, 0)
    assert m.budget_reset_at == past + DAY
    # another default window: a new schedule again
    api(client, "/team/update", team_id="t-w", team_member_budget_duration="7d")
    assert close_to(member(app, "t-w", "bob").budget_reset_at, utcnow() + 7 * DAY)


def test_a_member_row_without_a_window_end_counts_its_windows_from_created_at(
        make: Any) -> None:
    """A row that follows a default window but has no ``budget_reset_at`` (written by an
    older version): neither reset at once nor never — its first window ends one duration
    after its ``created_at``."""
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-c", team_member_budget=usd(15_000),
        team_member_budget_duration="1d")
    api(client, "/team/member_add", team_id="t-c", member={"user_id": "bob"})
    bob = new_key(client, user_id="bob", team_id="t-c")["key"]
    assert chat(client, bob, completion=10).status_code == 200
    created = member(app, "t-c", "bob").created_at
    set_member(app, "t-c", "bob", budget_reset_at=None)
    assert_error(chat(client, bob, completion=1), 429, "budget_exceeded")  # not reset
    m = member(app, "t-c", "bob")
    assert (m.spend, m.budget_reset_at) == (10_000, created + DAY)
    # created two days ago: its windows ended at +1d and +2d, the current one ends at +3d
    created = utcnow() - 2 * DAY - timedelta(hours=1)
    set_member(app, "t-c", "bob", budget_reset_at=None, created_at=created)
    assert chat(client, bob, completion=3).status_code == 200
    m = member(app, "t-c", "bob")
    assert (m.spend, m.budget_reset_at) == (3_000, created + 3 * DAY)


def test_reset_budgets_resets_members_on_the_team_default_window_on_time(make: Any) -> None:
    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-b", team_member_budget=usd(50_000))
    api(client, "/team/member_add", team_id="t-b", member=[{"user_id": "bob"}, {"user_id": "cat"}])
    for name in ("bob", "cat"):
        key = new_key(client, user_id=name, team_id="t-b")["key"]
        assert chat(client, key, completion=10).status_code == 200
    api(client, "/team/update", team_id="t-b", team_member_budget_duration="1d")

    def reset_budgets() -> str:
        give_back(app)
        result = app.test_cli_runner().invoke(args=["llmauth", "reset-budgets"])
        assert result.exit_code == 0, result.output
        return str(result.output)

    # the new window has just begun: nothing to reset
    assert "reset 0 budget window(s)" in reset_budgets()
    assert member(app, "t-b", "bob").spend == 10_000
    # bob's window is over: it is reset, its schedule kept
    past = utcnow() - timedelta(seconds=5)
    set_member(app, "t-b", "bob", budget_reset_at=past)
    assert "reset 1 budget window(s)" in reset_budgets()
    bob, cat = member(app, "t-b", "bob"), member(app, "t-b", "cat")
    assert (bob.spend, bob.budget_reset_at) == (0, past + DAY)
    assert cat.spend == 10_000
    # a row without a window end: not reset at once; its first window ends a day after
    # its created_at, and it is reset then
    set_member(app, "t-b", "cat", budget_reset_at=None)
    assert "reset 0 budget window(s)" in reset_budgets()
    cat = member(app, "t-b", "cat")
    assert (cat.spend, cat.budget_reset_at) == (10_000, cat.created_at + DAY)
    set_member(app, "t-b", "cat", budget_reset_at=None)
    set_member(app, "t-b", "bob", budget_reset_at=utcnow() + 7 * DAY)
    ledger = app.extensions["llmauth"].budgets.ledger
    later = cat.created_at + DAY + timedelta(seconds=1)
    assert ledger.reset_due(later)["llmauth_team_membership"] == 1
    cat = member(app, "t-b", "cat")
    assert (cat.spend, cat.budget_reset_at) == (0, cat.created_at + 2 * DAY)
    # the default window removed: the members that followed it are never reset again
    api(client, "/team/update", team_id="t-b", team_member_budget_duration=None)
    cat_key = new_key(client, user_id="cat", team_id="t-b")["key"]
    assert chat(client, cat_key, completion=4).status_code == 200
    assert member(app, "t-b", "cat").budget_reset_at is None
    assert ledger.reset_due(utcnow() + 30 * DAY)["llmauth_team_membership"] == 0
    assert member(app, "t-b", "cat").spend == 4_000


# -- month default windows keep their day of the month ---------------------------------------------


def assert_lazy_resets(app: Flask, client: Any, monkeypatch: Any, team: str, user: str,
                       key: str, day: int, schedule: Any) -> None:
    """With no job running, the member's first request at each ``now`` of ``schedule``
    resets its spent window (1,000 set before) and starts the next one, ending at
    ``expected`` on its month's ``day`` (clamped)."""
    from flask_llmauth import budget_leases

    for now, expected in schedule:
        set_member(app, team, user, spend=1_000)
        monkeypatch.setattr(budget_leases, "utcnow", lambda now=now: now)
        assert chat(client, key, completion=2).status_code == 200
        m = member(app, team, user)
        assert (m.spend, m.budget_reset_at, m.budget_reset_day) == (2_000, expected, day)
        monkeypatch.undo()


@pytest.mark.parametrize("year", [2026, 2024])  # February: 28 days, then 29 (a leap year)
def test_a_member_added_on_a_31st_to_a_month_default_window_is_reset_on_the_31st_again(
        make: Any, monkeypatch: Any, year: int) -> None:
    """A member added on a 31st to a team whose default window is ``1mo``: its windows end
    on the last day of shorter months and on the 31st again afterwards (Jan 31, Feb 28/29,
    Mar 31, Apr 30, May 31) — by ``reset-budgets`` and by the lazy reset — not on the day a
    short month clamped a reset to, for good."""
    from flask_llmauth import teams

    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-31", team_member_budget=usd(50_000),
        team_member_budget_duration="1mo")
    monkeypatch.setattr(teams, "utcnow", lambda: datetime(year, 1, 31, 10, 30))
    api(client, "/team/member_add", team_id="t-31",
        member=[{"user_id": "bob"}, {"user_id": "cat"}])
    monkeypatch.undo()
    february = datetime(year, 2, 29 if year % 4 == 0 else 28, 10, 30)
    for name in ("bob", "cat"):
        m = member(app, "t-31", name)
        assert (m.budget_duration, m.budget_reset_at, m.budget_reset_day) == (
            None, february, 31)
    # bob: reset by reset-budgets (the CLI's pass), on the 31st again after February
    ledger = app.extensions["llmauth"].budgets.ledger
    for now, expected in ((datetime(year, 3, 1), datetime(year, 3, 31, 10, 30)),
                          (datetime(year, 4, 1), datetime(year, 4, 30, 10, 30)),
                          (datetime(year, 5, 1), datetime(year, 5, 31, 10, 30))):
        set_member(app, "t-31", "bob", spend=1_000)
        assert ledger.reset_due(now)["llmauth_team_membership"] == 2  # bob and cat
        bob = member(app, "t-31", "bob")
        assert (bob.spend, bob.budget_reset_at, bob.budget_reset_day) == (0, expected, 31)
        # cat's own pass below starts from its February window end again
        set_member(app, "t-31", "cat", budget_reset_at=february)
    # cat: reset by its first request after each window's end (no job runs)
    cat = new_key(client, user_id="cat", team_id="t-31")["key"]
    assert_lazy_resets(app, client, monkeypatch, "t-31", "cat", cat, 31, (
        (datetime(year, 3, 1), datetime(year, 3, 31, 10, 30)),
        (datetime(year, 4, 1), datetime(year, 4, 30, 10, 30)),
        (datetime(year, 5, 1), datetime(year, 5, 31, 10, 30))))


def test_a_month_default_window_set_by_team_update_puts_its_followers_on_that_day(
        make: Any, monkeypatch: Any) -> None:
    """``/team/update`` changing ``team_member_budget_duration`` to ``1mo`` on a 30th: the
    members that follow it — added before, on another day and another window — get windows
    ending on the 30th (Feb 28 clamped, then Mar 30), by ``reset-budgets`` and by the lazy
    reset; a member with a window of its own keeps its own schedule."""
    from flask_llmauth import teams

    app = make()
    client = app.test_client()
    api(client, "/team/new", team_id="t-30", team_member_budget=usd(50_000),
        team_member_budget_duration="7d")
    monkeypatch.setattr(teams, "utcnow", lambda: datetime(2026, 1, 5, 8, 0))
    api(client, "/team/member_add", team_id="t-30",
        member=[{"user_id": "bob"}, {"user_id": "cat"}, {"user_id": "dan"}])
    monkeypatch.undo()
    api(client, "/team/member_update", team_id="t-30", user_id="dan", budget_duration="1d")
    dan_before = member(app, "t-30", "dan")
    monkeypatch.setattr(teams, "utcnow", lambda: datetime(2026, 1, 30, 10, 30))
    api(client, "/team/update", team_id="t-30", team_member_budget_duration="1mo")
    monkeypatch.undo()
    for name in ("bob", "cat"):
        m = member(app, "t-30", name)
        assert (m.budget_duration, m.budget_reset_at, m.budget_reset_day) == (
            None, datetime(2026, 2, 28, 10, 30), 30)
    dan = member(app, "t-30", "dan")  # its own window: not the team's default
    assert (dan.budget_duration, dan.budget_reset_at, dan.budget_reset_day) == (
        "1d", dan_before.budget_reset_at, None)
    # bob: reset-budgets
    ledger = app.extensions["llmauth"].budgets.ledger
    for now, expected in ((datetime(2026, 3, 1), datetime(2026, 3, 30, 10, 30)),
                          (datetime(2026, 4, 1), datetime(2026, 4, 30, 10, 30)),
                          (datetime(2026, 5, 1), datetime(2026, 5, 30, 10, 30))):
        set_member(app, "t-30", "bob", spend=1_000)
        assert ledger.reset_due(now)["llmauth_team_membership"] == 2  # bob and cat
        bob = member(app, "t-30", "bob")
        assert (bob.spend, bob.budget_reset_at, bob.budget_reset_day) == (0, expected, 30)
        set_member(app, "t-30", "cat", budget_reset_at=datetime(2026, 2, 28, 10, 30))
    # cat: the lazy reset
    cat = new_key(client, user_id="cat", team_id="t-30")["key"]
    assert_lazy_resets(app, client, monkeypatch, "t-30", "cat", cat, 30, (
        (datetime(2026, 3, 1), datetime(2026, 3, 30, 10, 30)),
        (datetime(2026, 4, 1), datetime(2026, 4, 30, 10, 30))))
