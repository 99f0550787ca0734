"""The budget guard's in-memory admission: the worst case it admits, its per-principal plans,
what a finished request leaves in a lease, and a forked child's leases — on SQLite and
Postgres."""

from __future__ import annotations

import threading
import time
import types
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.prices import cost_units, worst_case_units
from flask_llmauth.signals import budget_exceeded, soft_budget_crossed
from flask_llmauth.store.tables import BudgetCounter, Key, Team
from flask_llmauth.usage import Usage
from tests.helpers import assert_error, new_key
from tests.test_budgets import (
    PRICES,
    api,
    budget_gateway,
    chat,
    give_back,
    reserved_now,
    row,
    usd,
)

#: Prices that are not whole money units (1e-9 USD) per token: the worst case rounds up.
ODD_PRICES = {
    "odd-model": {"input_cost_per_token": "0.0000000015", "output_cost_per_token": "0.0000013337"},
    "tiny-model": {"input_cost_per_token": "0.0000000000001",
                   "output_cost_per_token": "0.000000000000003"},
}


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url, {**PRICES, **ODD_PRICES})


def leases_of(app: Flask) -> Any:
    return app.extensions["llmauth"].budgets.leases


@pytest.mark.parametrize("model", ["budget-model", "odd-model", "tiny-model", "unpriced"])
@pytest.mark.parametrize("body", [
    {"max_tokens": 7},
    {"max_completion_tokens": 333, "messages": [{"role": "user", "content": "x" * 101}]},
    {"messages": [{"role": "user", "content": "hello"}, {"role": "user", "content": "y"}],
     "system": "s" * 13},  # no max_tokens: the default
])
def test_the_admitted_worst_case_is_worst_case_units(make: Any, model: str,
                                                     body: dict[str, Any]) -> None:
    """Without leases a request in flight reserves exactly its worst case: whole-unit prices
    (computed without rounding) and others (rounded up) alike."""
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=0)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**12))
    settings = app.extensions["llmauth"].settings
    expected = worst_case_units(model, {"model": model, "stream": True, **body}, settings)
    if model in ("odd-model", "tiny-model"):
        assert expected > 0
    held = chat(client, key["key"], model=model, stream=True, **body)
    assert held.status_code == 200
    assert reserved_now(app, key["key_id"]) == expected
    held.close()


def test_a_principal_switching_models_meets_each_model_budget(make: Any) -> None:
    """A principal's plan is per model: requests alternating between a model with a used-up
    per-model budget and one without are refused and admitted in turn."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9),
                  model_max_budget={"budget-model": {"budget_limit": usd(10_000)}})
    assert chat(client, key["key"], completion=10).status_code == 200  # 10,000: used up
    for _ in range(3):
        assert_error(chat(client, key["key"], completion=1), 429, "budget_exceeded")
        assert chat(client, key["key"], model="odd-model", completion=1).status_code == 200
    counter = row(app, BudgetCounter, scope="key_model")
    assert (counter.spend, counter.reserved) == (10_000, 0)
    k = row(app, Key, key_id=key["key_id"])
    odd = cost_units("odd-model", Usage(0, 1), app.extensions["llmauth"].settings)
    assert odd == 1334  # 1333.7 units, rounded up
    assert (k.spend, k.reserved) == (10_000 + 3 * odd, 0)


def _shifted(seconds: float) -> Any:
    """The ``time`` module as the leases see it ``seconds`` later."""
    return types.SimpleNamespace(monotonic=lambda: time.monotonic() + seconds,
                                 time=lambda: time.time() + seconds, sleep=time.sleep)


def test_a_finished_request_whose_spend_is_never_written_leaves_the_lease_after_the_ttl(
        make: Any, monkeypatch: Any) -> None:
    """The spend ledger dropped its event (queue full): the request's worst case stays in
    the lease until the reservation TTL has passed since it finished; a request still in
    flight (a stream) stays in it whatever its age."""
    from flask_llmauth import budget_leases, budgets, spend

    def later(seconds: float) -> None:  # the guards' and the leases' clocks (the spend
        monkeypatch.setattr(budget_leases, "time", _shifted(seconds))  # guard marks a
        monkeypatch.setattr(budgets, "time", _shifted(seconds))  # ticket finished)
        monkeypatch.setattr(spend, "time", _shifted(seconds))

    app = make(LLMAUTH_BUDGET_RESERVATION_TTL=60)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    app.extensions["llmauth"].spend_ledger.queue_limit = 0  # every event is dropped
    stream = chat(client, key["key"], stream=True, completion=1)  # in flight
    assert chat(client, key["key"], completion=2).status_code == 200  # finished, not written
    leases = leases_of(app)
    (lease,) = leases._leases.values()
    w = lease.unit
    assert (lease.in_use, len(lease.in_flight)) == (2 * w, 2)
    leases.sweep()
    assert (lease.in_use, len(lease.in_flight)) == (2 * w, 2)
    later(59)
    leases.sweep()
    assert (lease.in_use, len(lease.in_flight)) == (2 * w, 2)  # not yet
    later(61)
    leases.sweep()
    assert (lease.in_use, len(lease.in_flight)) == (w, 1)  # only the stream is left
    (ticket,) = lease.in_flight.values()
    assert ticket.finished is None
    assert reserved_now(app, key["key_id"]) >= w
    stream.close()  # ends now: dropped as well, so it leaves the lease a TTL from now
    leases.sweep()
    # (the lease, idle, gave its unused part back: out of room, it holds the stream's cost,
    # known now, instead of its worst case: Ticket.costs)
    assert len(lease.in_flight) == 1 and lease.in_use == ticket.need < w
    assert reserved_now(app, key["key_id"]) >= ticket.need > 0
    later(122)
    leases.sweep(final=True)
    assert (lease.in_use, lease.in_flight, lease.held) == (0, {}, 0)
    monkeypatch.undo()
    assert reserved_now(app, key["key_id"]) == 0


def test_written_spend_leaves_the_lease_at_the_next_sweep(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    for completion in (1, 2, 3):
        assert chat(client, key["key"], completion=completion).status_code == 200  # flushed
    (lease,) = leases_of(app)._leases.values()
    assert len(lease.in_flight) == 3 and lease.in_use == 3 * lease.unit
    leases_of(app).sweep()
    assert (lease.in_use, lease.in_flight, lease.done_sum) == (0, {}, 0)
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (6000, 0)


def test_a_forked_child_never_takes_the_lock_of_a_lease_it_inherited(make: Any) -> None:
    """A lease's lock may be held by another thread of the parent when it forks: the child
    (``_reseed`` runs after the fork) takes a lease of its own, without that lock."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**9))
    assert chat(client, key["key"], completion=1).status_code == 200
    leases = leases_of(app)
    (inherited,) = leases._leases.values()
    assert inherited.lock.acquire(timeout=5)  # held by a thread that is not in the child
    try:
        leases._reseed()
        statuses: list[int] = []
        worker = threading.Thread(
            target=lambda: statuses.append(chat(client, key["key"], completion=2).status_code))
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive() and statuses == [200]
    finally:
        inherited.lock.release()
    (own,) = leases._leases.values()
    assert own is not inherited and inherited.dead and not own.dead
    assert own.lease_id != inherited.lease_id
    give_back(app)
    k = row(app, Key, key_id=key["key_id"])
    assert k.spend == 3000


# -- soft budgets seen by a lease transaction that does not admit --------------------------------


@pytest.mark.parametrize("lease_requests", [0, 100])
def test_a_soft_budget_crossing_seen_by_a_refused_request_is_signalled(
        make: Any, lease_requests: int) -> None:
    """The lease transaction that refuses a request marks the row's soft budget crossed (once
    per window, across processes): the signal is sent then, or never in this window."""
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=lease_requests)
    client = app.test_client()
    key = new_key(client, max_budget=usd(30_000), soft_budget=usd(5_000))
    seen: list[dict[str, Any]] = []
    with soft_budget_crossed.connected_to(lambda sender, **data: seen.append(data), app):
        assert chat(client, key["key"], completion=6).status_code == 200  # saw 0
        assert seen == []
        # spend 6,000 >= 5,000; a worst case of 100,000 does not fit 30,000
        assert_error(chat(client, key["key"], max_tokens=100), 429, "budget_exceeded")
        assert [(s["level"], s["spend"]) for s in seen] == [("key", usd(6_000))]
        assert chat(client, key["key"], completion=1).status_code == 200
        assert len(seen) == 1
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved, k.soft_alerted) == (7_000, 0, True)


@pytest.mark.parametrize("lease_requests", [0, 100])
def test_a_soft_budget_crossing_is_signalled_when_a_later_budget_refuses(
        make: Any, lease_requests: int) -> None:
    """The key's lease transaction sees its soft budget crossed and admits; the team's (later
    in lock order) refuses: the key's crossing is marked, so it is signalled now."""
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=lease_requests)
    client = app.test_client()
    api(client, "/team/new", team_id="t-soft", max_budget=usd(30_000))
    key = new_key(client, team_id="t-soft", max_budget=usd(10**6), soft_budget=usd(5_000))
    seen: list[dict[str, Any]] = []
    with soft_budget_crossed.connected_to(lambda sender, **data: seen.append(data), app):
        assert chat(client, key["key"], completion=6).status_code == 200
        assert seen == []
        refused = assert_error(chat(client, key["key"], max_tokens=100), 429,
                               "budget_exceeded")
        assert "Team" in refused["message"]
        assert [(s["level"], s["spend"]) for s in seen] == [("key", usd(6_000))]
        assert chat(client, key["key"], completion=1).status_code == 200
        assert len(seen) == 1
    assert row(app, Key, key_id=key["key_id"]).reserved == 0
    assert row(app, Team, team_id="t-soft").reserved == 0


def test_a_failing_soft_budget_receiver_neither_blocks_nor_keeps_a_reservation(
        make: Any, caplog: Any) -> None:
    """Soft budgets never block: a ``soft_budget_crossed`` receiver that raises is logged,
    the request is answered and settled, and its worst case leaves the lease."""
    app = make(LLMAUTH_BUDGET_LEASE_REQUESTS=0)
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**6), soft_budget=usd(5_000))

    def receiver(sender: Any, **data: Any) -> None:
        raise RuntimeError("receiver failed")

    assert chat(client, key["key"], completion=6).status_code == 200
    with soft_budget_crossed.connected_to(receiver, app):
        assert chat(client, key["key"], completion=1).status_code == 200
    assert "a receiver of the llmauth-soft-budget-crossed signal failed" in caplog.text
    (lease,) = leases_of(app)._leases.values()
    give_back(app)
    assert (lease.in_use, lease.in_flight, lease.held) == (0, {}, 0)
    k = row(app, Key, key_id=key["key_id"])
    assert (k.spend, k.reserved) == (7_000, 0)


def test_a_failing_budget_exceeded_receiver_leaves_the_429(make: Any, caplog: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(30_000))

    def receiver(sender: Any, **data: Any) -> None:
        raise RuntimeError("receiver failed")

    assert chat(client, key["key"], completion=6).status_code == 200
    with budget_exceeded.connected_to(receiver, app):  # a worst case of 100,000 does not fit
        assert_error(chat(client, key["key"], max_tokens=100), 429, "budget_exceeded")
    assert "a receiver of the llmauth-budget-exceeded signal failed" in caplog.text
    assert row(app, Key, key_id=key["key_id"]).reserved == 0
