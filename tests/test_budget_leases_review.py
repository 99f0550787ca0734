"""Budget leases under failure and lifecycle events: a database error while a lease checks
which spend is written, an entity deleted and created again, a reservation row released by
the expiry sweep while its owner changes it — on SQLite and Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import peewee
import pytest
from flask import Flask

from flask_llmauth.budgets import _RETRIES
from flask_llmauth.durations import utcnow
from flask_llmauth.errors import ServiceUnavailable
from flask_llmauth.store.tables import BudgetReservation, Key, TeamMembership
from tests.test_budgets import (
    api,
    budget_gateway,
    chat,
    flush,
    row,
    row_without_give_back,
    usd,
    worst,
)


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def leases_of(app: Flask) -> Any:
    return app.extensions["llmauth"].budgets.leases


@contextmanager
def database_down_once(app: Flask) -> Iterator[list[int]]:
    """The store's next ``use()`` block fails as if the connection dropped; later ones work."""
    store = app.extensions["llmauth"].store
    real = store.use
    calls: list[int] = []

    @contextmanager
    def use() -> Iterator[Any]:
        if calls:
            with real() as db:
                yield db
            return
        calls.append(1)
        with real():
            raise peewee.OperationalError("server closed the connection unexpectedly")
        yield  # pragma: no cover

    store.use = use
    try:
        yield calls
    finally:
        del store.use


def test_a_database_error_while_checking_written_spend_does_not_hold_the_lease(
        make: Any) -> None:
    """The requests whose spend the ledger wrote are looked up in the spend log; when that
    lookup fails, they must be looked up again later, not left in the lease until the
    reservation TTL (1 h): their spend is in the budget row, so meanwhile they would count
    twice and refuse requests the budget has room for."""
    app = make()
    client = app.test_client()
    key = new_key_with_budget(client, usd(10**9))
    assert chat(client, key["key"], completion=4).status_code == 200  # spend written (flush)
    leases = leases_of(app)
    lease = next(iter(leases._leases.values()))
    assert lease.written  # the ledger told the lease which requests it wrote
    with database_down_once(app) as calls, pytest.raises(ServiceUnavailable):
        leases.sweep()  # the background pass during the outage
    assert calls == [1]
    leases.sweep(final=True)  # the database is back
    assert (lease.in_use, lease.in_flight, lease.done_sum) == (0, {}, 0)
    k = row_without_give_back(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (4000, 0)


def new_key_with_budget(client: Any, budget: float, **fields: Any) -> dict[str, Any]:
    from tests.helpers import new_key

    return new_key(client, max_budget=budget, **fields)


def test_a_member_deleted_and_added_again_starts_with_no_lease_of_the_old_row(
        make: Any, db_url: str) -> None:
    """A process's lease of a budget row must not carry over to another row that gets the
    same id. SQLite gives a new row the highest id + 1, so a team member removed and added
    again (the newest membership) gets the id of the old row back; a lease of the old row
    would then admit, in memory and in its next lease transaction, against room it never
    reserved on the new row. Leases are keyed by the row's incarnation (``created_at``)."""
    one = make(LLMAUTH_BUDGET_LEASE_FRACTION=0.5)
    two = make(LLMAUTH_BUDGET_LEASE_FRACTION=0.5)
    c1, c2 = one.test_client(), two.test_client()
    w = worst(one, completion=10)
    budget = usd(20 * w)
    api(c1, "/team/new", team_id="t-reuse")
    api(c1, "/team/member_add", team_id="t-reuse", member=[{"user_id": "ann"}],
        max_budget_in_team=budget)
    key = new_key_with_budget(c1, None, user_id="ann", team_id="t-reuse")
    assert chat(c1, key["key"], completion=10).status_code == 200
    old = row_without_give_back(one, TeamMembership, team_id="t-reuse", user_id="ann")
    assert old.reserved > 2 * w  # process one leased a chunk beyond its request
    api(c1, "/team/member_delete", team_id="t-reuse", user_id="ann")
    api(c1, "/team/member_add", team_id="t-reuse", member=[{"user_id": "ann"}],
        max_budget_in_team=budget)
    # removing ann revoked her key of the team: a new one for the new membership
    key = new_key_with_budget(c1, None, user_id="ann", team_id="t-reuse")
    new = row_without_give_back(one, TeamMembership, team_id="t-reuse", user_id="ann")
    assert (new.spend, new.reserved) == (0, 0)  # a fresh budget row
    if db_url.startswith("sqlite"):
        assert new.id == old.id  # the case at hand: the old row's id again
    admitted = 0
    for client in (c2, c1, c2, c1):  # both processes spend until they are refused
        while chat(client, key["key"], completion=10).status_code == 200:
            admitted += 1
    flush(one)
    flush(two)
    spent = row(one, TeamMembership, team_id="t-reuse", user_id="ann").spend
    assert admitted > 0 and spent == admitted * 10_000
    assert spent <= 20 * w  # the new row's budget holds


def test_the_lease_of_a_deleted_key_is_dropped_with_its_reservation_row(make: Any) -> None:
    """Sanity: a deleted key's lease is dropped by the sweep, and its reservation row too."""
    app = make()
    client = app.test_client()
    key = new_key_with_budget(client, usd(10**9))
    assert chat(client, key["key"], completion=1).status_code == 200
    api(client, "/key/delete", keys=[key["key_id"]])
    leases = leases_of(app)
    for lease in leases._leases.values():
        lease.last_used -= 10
    leases.sweep()
    assert not leases.has_leases
    with app.extensions["llmauth"].store.use():
        assert BudgetReservation.select().count() == 0


def test_the_expiry_sweep_releases_what_the_reservation_row_holds_when_it_deletes_it(
        make: Any) -> None:
    """The expiry sweep reads the expired reservation rows, then releases them one by one.
    A lease's owner (alive, only late) may refresh and resize its row in between: the sweep
    must then leave the row alone, and never take a stale amount off the budget row (that
    would leave ``reserved`` wrong for good: below what is held, the budget admits more
    than its limit)."""
    app = make(LLMAUTH_BUDGET_RESERVATION_TTL=60)
    client = app.test_client()
    key = new_key_with_budget(client, usd(10**9))
    assert chat(client, key["key"], completion=1).status_code == 200
    stream = chat(client, key["key"], stream=True, completion=1)  # in flight: holds w
    w = worst(app, stream=True, completion=1)
    state = app.extensions["llmauth"]
    ledger, leases = state.budgets.ledger, state.budgets.leases
    flush(app)
    stale = row_without_give_back(app, Key, key_id=key["key_id"]).reserved
    assert stale > w  # the lease holds a chunk beyond the request in flight
    store = state.store
    real_use = store.use
    uses: list[int] = []

    @contextmanager
    def use() -> Iterator[Any]:
        uses.append(1)
        if len(uses) == 2:  # the sweep read the expired rows and goes on to release them
            del store.use
            leases.sweep(final=True)  # the owner gives back all but the stream's w
            assert row_without_give_back(app, Key, key_id=key["key_id"]).reserved == w
        with real_use() as db:
            yield db

    with state.store.use():  # the owner was late: its lease row expired
        BudgetReservation.update(expires_at=utcnow() - timedelta(seconds=1)).execute()
    store.use = use
    released = ledger.sweep()
    assert len(uses) >= 2
    # the row the sweep found expired was refreshed before it was deleted: it is kept
    assert released == 0
    assert row_without_give_back(app, Key, key_id=key["key_id"]).reserved == w
    assert b"[DONE]" in stream.get_data()
    stream.close()
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (2000, 0)


def test_a_crashed_lease_of_a_deleted_row_is_not_released_from_the_row_with_its_id(
        make: Any, db_url: str) -> None:
    """The expiry sweep releases a crashed process's lease row from the budget row it was
    reserved on: not from a row created since with the same id (SQLite), whose ``reserved``
    holds other processes' leases — taken off it, that room would be admitted twice."""
    one = make(LLMAUTH_BUDGET_RESERVATION_TTL=60)
    two = make(LLMAUTH_BUDGET_RESERVATION_TTL=60)
    c1, c2 = one.test_client(), two.test_client()
    w = worst(one, completion=10)
    api(c1, "/team/new", team_id="t-crash")
    api(c1, "/team/member_add", team_id="t-crash", member=[{"user_id": "bob"}],
        max_budget_in_team=usd(1000 * w))
    key = new_key_with_budget(c1, None, user_id="bob", team_id="t-crash")
    assert chat(c1, key["key"], completion=10).status_code == 200
    old = row_without_give_back(one, TeamMembership, team_id="t-crash", user_id="bob")
    assert old.reserved > w
    crashed = row_without_give_back(one, BudgetReservation).request_id
    leases_of(one)._reseed()  # process one is gone: nobody gives its lease back
    api(c1, "/team/member_delete", team_id="t-crash", user_id="bob")
    api(c1, "/team/member_add", team_id="t-crash", member=[{"user_id": "bob"}],
        max_budget_in_team=usd(1000 * w))
    # removing bob revoked his key of the team: a new one for the new membership
    key = new_key_with_budget(c1, None, user_id="bob", team_id="t-crash")
    new = row_without_give_back(one, TeamMembership, team_id="t-crash", user_id="bob")
    if db_url.startswith("sqlite"):
        assert new.id == old.id
    assert chat(c2, key["key"], completion=10).status_code == 200  # process two leases
    held = row_without_give_back(two, TeamMembership, team_id="t-crash", user_id="bob")
    assert held.reserved > w
    state = one.extensions["llmauth"]
    with state.store.use():
        BudgetReservation.update(expires_at=utcnow() - timedelta(seconds=1)).where(
            BudgetReservation.request_id == crashed).execute()
    assert state.budgets.ledger.sweep() == 1
    now = row_without_give_back(two, TeamMembership, team_id="t-crash", user_id="bob")
    assert now.reserved == held.reserved  # process two's lease, untouched
    m = row(two, TeamMembership, team_id="t-crash", user_id="bob")
    assert (m.spend, m.reserved) == (10_000, 0)


def test_a_lease_row_written_before_incarnations_were_recorded_is_released_by_id(
        make: Any) -> None:
    """Lease rows whose parts name no incarnation (``[table, id, amount, counter]``, written
    by an earlier version) are still released from their row by the expiry sweep."""
    app = make(LLMAUTH_BUDGET_RESERVATION_TTL=60)
    client = app.test_client()
    key = new_key_with_budget(client, usd(10**9))
    assert chat(client, key["key"], completion=3).status_code == 200
    held = row_without_give_back(app, Key, key_id=key["key_id"])
    assert held.reserved > 0
    state = app.extensions["llmauth"]
    state.budgets.leases._reseed()  # the process is gone
    with state.store.use():
        BudgetReservation.update(parts=[["llmauth_key", held.id, held.reserved, False]],
                                 expires_at=utcnow() - timedelta(seconds=1)).execute()
    assert state.budgets.ledger.sweep() == 1
    k = row_without_give_back(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (3000, 0)


@pytest.mark.parametrize("failures", [1, 1000])
def test_a_locked_database_in_the_lease_transaction_is_retried_then_fails_closed(
        make: Any, monkeypatch: pytest.MonkeyPatch, failures: int) -> None:
    """A busy/locked database (SQLite's ``database is locked``) fails the lease transaction's
    first statement: the transaction is retried and the request admitted; when it stays
    locked the request is refused with a 503 and nothing is admitted or reserved."""
    app = make()
    client = app.test_client()
    key = new_key_with_budget(client, usd(10**9))
    db = app.extensions["llmauth"].store.db
    real = db.execute_sql
    calls: list[str] = []
    lease_refresh = 'UPDATE "' + BudgetReservation._meta.table_name + '" SET "expires_at"'  # noqa: S608

    def execute_sql(sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql.startswith(lease_refresh):  # the lease transaction's first statement
            calls.append(sql)
            if len(calls) <= failures:
                raise peewee.OperationalError("database is locked")
        return real(sql, *args, **kwargs)

    monkeypatch.setattr(db, "execute_sql", execute_sql)
    response = chat(client, key["key"], completion=4)
    monkeypatch.undo()
    if failures == 1:
        assert response.status_code == 200
        assert len(calls) == 2  # locked once, then the retry
        k = row(app, Key, key_id=key["key_id"])
        assert (k.spend, k.reserved) == (4000, 0)
    else:
        assert response.status_code == 503
        assert response.get_json()["error"]["type"] != "budget_exceeded"
        assert len(calls) == _RETRIES
        k = row(app, Key, key_id=key["key_id"])
        assert (k.spend, k.reserved) == (0, 0)
        lease = next(iter(leases_of(app)._leases.values()), None)
        assert lease is None or (lease.held, lease.in_use, lease.in_flight) == (0, 0, {})
        with app.extensions["llmauth"].store.use():
            assert BudgetReservation.select().count() == 0


def test_a_failed_request_without_usage_gives_its_worst_case_back_at_once(make: Any) -> None:
    """An upstream error with no usage spends nothing: its worst case leaves the lease when
    the response ends, not when the spend ledger writes its zero-cost row."""
    from tests.helpers import bearer
    from tests.test_budgets import CHAT

    app = make(LLMAUTH_SPEND_FLUSH_INTERVAL=3600)
    client = app.test_client()
    need = worst(app)
    key = new_key_with_budget(client, usd(need + 1))["key"]  # room for one worst case

    def post(**body: Any) -> int:  # no flush in between: the ledger holds the events
        return client.post(CHAT, json={"model": "budget-model", "max_tokens": 10, **body},
                           headers=bearer(key)).status_code

    assert post(fail=True) == 502
    assert post(fail=True) == 502  # the first one's worst case is back already
    assert post(completion=1) == 200
    assert post() == 429  # a request that spent keeps its worst case until it is written
