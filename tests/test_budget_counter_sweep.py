"""The counter sweep: ``flask llmauth reset-budgets`` and the reset scheduler delete the
``llmauth_budget_counter`` rows that hold nothing (no spend in their window, nothing
reserved, not touched for ``LLMAUTH_BUDGET_RESERVATION_TTL``), so the distinct end-user ids a
key holder names do not grow the table without bound — without giving anyone a fresh
budget, on SQLite and Postgres."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.durations import utcnow
from flask_llmauth.store.tables import BudgetCounter, BudgetReservation, SpendLog
from tests.helpers import assert_error, new_key
from tests.test_budgets import api, budget_gateway, chat, flush, give_back, usd

#: The default end-user budget of these tests: one request of 10 completion tokens
#: (10,000 units) fits, a second one's worst case (~10,001) does not.
BUDGET = usd(15_000)


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def counters(app: Flask, scope: str = "end_user") -> dict[str, BudgetCounter]:
    with app.extensions["llmauth"].store.use():
        return {c.entity_id: c for c in BudgetCounter.select().where(BudgetCounter.scope == scope)}


def age(app: Flask, *, hours: float = 2, **where: Any) -> None:
    """Make counter rows look untouched for ``hours`` (all rows, or those ``where``
    names), as if no request had used them since."""
    with app.extensions["llmauth"].store.use():
        query = BudgetCounter.update(touched_at=utcnow() - timedelta(hours=hours))
        for name, value in where.items():
            query = query.where(getattr(BudgetCounter, name) == value)
        query.execute()


def reset_budgets(app: Flask) -> str:
    result = app.test_cli_runner().invoke(args=["llmauth", "reset-budgets"])
    assert result.exit_code == 0, result.output
    return str(result.output)


def deleted(output: str) -> int:
    return int(output.rsplit("deleted ", 1)[1].split()[0])


def test_idle_end_user_rows_are_swept_and_their_budgets_still_hold(make: Any) -> None:
    app = make(LLMAUTH_MAX_END_USER_BUDGET=BUDGET, LLMAUTH_END_USER_BUDGET_DURATION="7d")
    client = app.test_client()
    key = new_key(client)
    for i in range(50):  # requests that cost nothing
        assert chat(client, key["key"], user=f"end-{i}", completion=0).status_code == 200
    give_back(app)
    rows = counters(app)
    assert len(rows) == 50
    assert all((c.spend, c.reserved) == (0, 0) for c in rows.values())
    # touched by a request within LLMAUTH_BUDGET_RESERVATION_TTL: kept
    assert deleted(reset_budgets(app)) == 0
    assert len(counters(app)) == 50
    age(app)
    output = reset_budgets(app)
    assert output.strip() == ("reset 0 budget window(s); released 0 expired reservation(s); "
                              "deleted 49 idle budget counter(s)")
    # the newest row stays (SQLite would give its id to the next row created)
    newest = max(rows.values(), key=lambda c: c.id)
    assert list(counters(app)) == [newest.entity_id]
    # the end users' budgets hold as before: one request fits, the next is refused
    for user in ("end-0", "end-17"):
        assert chat(client, key["key"], user=user, completion=10).status_code == 200
        error = assert_error(chat(client, key["key"], user=user), 429, "budget_exceeded")
        assert f"End User={user}" in error["message"]
    give_back(app)
    assert counters(app)["end-0"].spend == 10_000


def test_per_model_key_budget_rows_are_swept_too(make: Any) -> None:
    """A key's per-model budgets are bounded by the key's own ``model_max_budget`` (the key
    holder cannot name new ones), but a deleted key's rows would stay: idle ones go too."""
    app = make()
    client = app.test_client()
    limits = {"budget-model": {"budget_limit": usd(15_000), "time_period": "1d"}}
    first, second = (new_key(client, model_max_budget=limits) for _ in range(2))
    for key in (first, second):
        assert chat(client, key["key"], completion=0).status_code == 200
    give_back(app)
    age(app)
    assert deleted(reset_budgets(app)) == 1
    assert list(counters(app, "key_model")) == [second["key_id"]]
    assert chat(client, first["key"], completion=10).status_code == 200
    error = assert_error(chat(client, first["key"]), 429, "budget_exceeded")
    assert "Key model=" in error["message"]


def test_a_deleted_keys_per_model_rows_go_whatever_they_spent(make: Any) -> None:
    """A per-model row with spend in its window is the budget's memory while the key lives;
    once the key is deleted nothing can spend on it again, so the idle row goes too (it
    stayed forever before). A live key's row with spend stays, as does a deleted key's row
    still touched within the TTL."""
    app = make()
    client = app.test_client()
    limits = {"budget-model": {"budget_limit": usd(15_000), "time_period": "30d"}}
    gone, live, recent, newest = (new_key(client, model_max_budget=limits) for _ in range(4))
    for key in (gone, live, recent):
        assert chat(client, key["key"], completion=10).status_code == 200
    assert chat(client, newest["key"], completion=0).status_code == 200
    give_back(app)
    rows = counters(app, "key_model")
    assert {k: rows[k].spend for k in rows} == {
        gone["key_id"]: 10_000, live["key_id"]: 10_000, recent["key_id"]: 10_000,
        newest["key_id"]: 0}
    api(client, "/key/delete", keys=[gone["key_id"], recent["key_id"]])
    age(app, entity_id=gone["key_id"])
    age(app, entity_id=live["key_id"])
    assert deleted(reset_budgets(app)) == 1
    assert sorted(counters(app, "key_model")) == sorted(
        [live["key_id"], recent["key_id"], newest["key_id"]])
    # the live key's window still refuses: its spend was kept
    error = assert_error(chat(client, live["key"]), 429, "budget_exceeded")
    assert "Key model=" in error["message"]
    # the recently touched row goes once it is idle too
    age(app, entity_id=recent["key_id"])
    assert deleted(reset_budgets(app)) == 1
    assert sorted(counters(app, "key_model")) == sorted([live["key_id"], newest["key_id"]])


def test_a_deleted_keys_row_a_lease_still_holds_is_kept(make: Any) -> None:
    """A process may still hold a lease on a deleted key's row (its cache drops the key
    within a second, its lease later): ``reserved`` keeps the row until it is given back."""
    app = make()
    client = app.test_client()
    limits = {"budget-model": {"budget_limit": usd(15_000), "time_period": "30d"}}
    key, newest = (new_key(client, model_max_budget=limits) for _ in range(2))
    assert chat(client, key["key"], completion=10).status_code == 200
    assert chat(client, newest["key"], completion=0).status_code == 200
    flush(app)  # the spend is written; the lease is not given back
    api(client, "/key/delete", keys=[key["key_id"]])
    age(app)
    assert counters(app, "key_model")[key["key_id"]].reserved > 0
    assert deleted(reset_budgets(app)) == 0
    give_back(app)
    age(app)
    assert deleted(reset_budgets(app)) == 1
    assert list(counters(app, "key_model")) == [newest["key_id"]]


def test_the_reset_scheduler_sweeps_too(make: Any) -> None:
    app = make(LLMAUTH_MAX_END_USER_BUDGET=BUDGET, LLMAUTH_BUDGET_RESET_INTERVAL=3600)
    client = app.test_client()
    key = new_key(client)
    for i in range(5):
        assert chat(client, key["key"], user=f"end-{i}", completion=0).status_code == 200
    give_back(app)
    age(app)
    state = app.extensions["llmauth"]
    [task] = [t for t in state.background._tasks if t.name == "budget-reset"]
    task.run()
    assert list(counters(app)) == ["end-4"]


@pytest.mark.parametrize("window", ["7d", None])
def test_rows_holding_spend_in_their_window_stay_and_still_refuse(
        make: Any, window: str | None) -> None:
    """Spend in an open window, and the all-time spend of a budget without a window: the row
    is the budget's memory, so it stays however long it is idle."""
    app = make(LLMAUTH_MAX_END_USER_BUDGET=BUDGET, LLMAUTH_END_USER_BUDGET_DURATION=window)
    client = app.test_client()
    key = new_key(client)
    assert chat(client, key["key"], user="spender", completion=10).status_code == 200
    assert chat(client, key["key"], user="idle", completion=0).status_code == 200
    assert chat(client, key["key"], user="newest", completion=0).status_code == 200
    give_back(app)
    age(app, hours=24 * 6)
    assert deleted(reset_budgets(app)) == 1  # "idle"
    rows = counters(app)
    assert sorted(rows) == ["newest", "spender"]
    assert (rows["spender"].spend, rows["spender"].reserved) == (10_000, 0)
    error = assert_error(chat(client, key["key"], user="spender"), 429, "budget_exceeded")
    assert "End User=spender" in error["message"]
    # the swept end user starts from its zero state: its row is created again
    assert chat(client, key["key"], user="idle", completion=10).status_code == 200
    assert_error(chat(client, key["key"], user="idle"), 429, "budget_exceeded")
    give_back(app)
    assert counters(app)["idle"].spend == 10_000


def test_an_ended_window_is_reset_swept_and_starts_afresh(make: Any) -> None:
    app = make(LLMAUTH_MAX_END_USER_BUDGET=BUDGET, LLMAUTH_END_USER_BUDGET_DURATION="7d")
    client = app.test_client()
    key = new_key(client)
    assert chat(client, key["key"], user="end-1", completion=10).status_code == 200
    assert_error(chat(client, key["key"], user="end-1"), 429, "budget_exceeded")
    assert chat(client, key["key"], user="end-2", completion=0).status_code == 200
    give_back(app)
    ended = utcnow() - timedelta(hours=1)
    with app.extensions["llmauth"].store.use():
        BudgetCounter.update(budget_reset_at=ended).where(
            BudgetCounter.entity_id == "end-1").execute()
    age(app, hours=2)
    output = reset_budgets(app)
    assert output.startswith("reset 1 budget window(s);")
    assert deleted(output) == 1
    assert list(counters(app)) == ["end-2"]
    # as the reset says: a fresh budget, a new window from now
    assert chat(client, key["key"], user="end-1", completion=10).status_code == 200
    assert_error(chat(client, key["key"], user="end-1"), 429, "budget_exceeded")
    give_back(app)
    fresh = counters(app)["end-1"]
    assert fresh.spend == 10_000
    assert fresh.budget_reset_at > utcnow() + timedelta(days=6)


def test_rows_a_lease_or_a_request_in_flight_holds_are_kept(make: Any) -> None:
    app = make(LLMAUTH_MAX_END_USER_BUDGET=usd(10**9))
    client = app.test_client()
    key = new_key(client)
    # a lease of this process (given back when idle): reserved on the row
    assert chat(client, key["key"], user="leased", completion=0).status_code == 200
    # a request in flight (its stream is open)
    streaming = chat(client, key["key"], user="streaming", stream=True, completion=3)
    assert chat(client, key["key"], user="newest", completion=0).status_code == 200
    app.extensions["llmauth"].spend_ledger.flush()
    age(app)
    assert deleted(reset_budgets(app)) == 0
    rows = counters(app)
    assert rows["leased"].reserved > 0 and rows["streaming"].reserved > 0
    assert b"[DONE]" in streaming.get_data()
    streaming.close()
    give_back(app)  # the leases are given back: nothing is held any more
    age(app)
    assert deleted(reset_budgets(app)) == 1  # "leased"; "streaming" has spent
    rows = counters(app)
    assert sorted(rows) == ["newest", "streaming"]
    assert (rows["streaming"].spend, rows["streaming"].reserved) == (3000, 0)


def test_a_reservation_of_a_crashed_process_keeps_its_row_until_released(make: Any) -> None:
    app = make(LLMAUTH_MAX_END_USER_BUDGET=usd(10**9), LLMAUTH_BUDGET_RESERVATION_TTL=60)
    client = app.test_client()
    key = new_key(client)
    assert chat(client, key["key"], user="crashed", completion=0).status_code == 200
    assert chat(client, key["key"], user="newest", completion=0).status_code == 200
    app.extensions["llmauth"].spend_ledger.flush()
    state = app.extensions["llmauth"]
    held = counters(app)["crashed"].reserved
    assert held > 0
    # the process "crashes": its leases are forgotten, their rows stay until they expire
    state.budgets.leases._reseed()
    age(app)
    assert deleted(reset_budgets(app)) == 0
    assert counters(app)["crashed"].reserved == held
    with state.store.use():
        BudgetReservation.update(expires_at=utcnow() - timedelta(seconds=1)).execute()
    output = reset_budgets(app)
    assert "released 2 expired reservation(s)" in output
    assert deleted(output) == 1
    assert list(counters(app)) == ["newest"]


def test_a_soft_budget_row_a_request_in_flight_reads_is_kept(make: Any) -> None:
    """A budget with a soft budget only reserves nothing: a request in flight holds its
    row's id to add its spend to. The row was touched when the request read it, so the sweep
    leaves it for LLMAUTH_BUDGET_RESERVATION_TTL and the spend is counted."""
    app = make()
    client = app.test_client()
    api(client, "/customer/new", user_id="soft", soft_budget=usd(50_000))
    api(client, "/customer/new", user_id="newest", soft_budget=usd(50_000))
    key = new_key(client)
    streaming = chat(client, key["key"], user="soft", stream=True, completion=3)
    assert chat(client, key["key"], user="newest", completion=0).status_code == 200
    age(app, entity_id="newest")
    assert deleted(reset_budgets(app)) == 0
    assert b"[DONE]" in streaming.get_data()
    streaming.close()
    give_back(app)
    assert counters(app)["soft"].spend == 3000


def test_a_sweep_racing_requests_never_loses_spend(make: Any) -> None:
    """Requests on a few end users (some free, so their rows fall back to nothing held),
    leases given back and rows swept (with no idle time: only what a row holds protects it)
    all at once: every admitted request's spend is in its end user's row, and no end user
    passes its budget."""
    limit = 40_000  # 4 requests of 10 completion tokens (worst case ~10,001: 3 admitted)
    app = make(LLMAUTH_MAX_END_USER_BUDGET=usd(limit), LLMAUTH_BUDGET_LEASE_IDLE=0.05)
    client = app.test_client()
    key = new_key(client)["key"]
    state = app.extensions["llmauth"]
    users = [f"end-{i}" for i in range(24)]
    spent: dict[str, int] = dict.fromkeys(users, 0)
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    swept = [0]

    def requests(seed: int) -> None:
        rng = random.Random(seed)  # noqa: S311
        c = app.test_client()
        try:
            for _ in range(50):
                user = rng.choice(users)
                completion = rng.choice((0, 0, 0, 10))
                status = chat(c, key, user=user, completion=completion).status_code
                assert status in (200, 429), status
                if status == 200:
                    with lock:
                        spent[user] += completion * 1000
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def background() -> None:
        try:
            while not stop.is_set():
                state.spend_ledger.flush()
                state.budgets.leases.sweep(final=True)  # every unused lease given back
                swept[0] += state.budgets.ledger.sweep_counters(idle=0)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    sweeper = threading.Thread(target=background)
    sweeper.start()
    workers = [threading.Thread(target=requests, args=(i,)) for i in range(4)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    during = swept[0]
    stop.set()
    sweeper.join()
    assert not errors, errors
    give_back(app)
    rows = counters(app)
    with state.store.use():
        logged: dict[str, int] = {}
        for entry in SpendLog.select():
            logged[entry.end_user_id] = logged.get(entry.end_user_id, 0) + entry.spend
    for user in users:
        counted = rows[user].spend if user in rows else 0
        assert counted == spent[user] == logged.get(user, 0), (user, counted, spent, logged)
        assert counted <= limit
        assert user in rows or counted == 0
        if user in rows:
            assert rows[user].reserved == 0
    assert sum(spent.values()) > 0
    print("swept during the requests:", during)
    assert during > 0  # rows were deleted (and created again) while requests ran
