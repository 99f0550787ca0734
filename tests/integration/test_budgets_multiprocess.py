# ruff: noqa: F811 - pytest fixtures imported from the rate-limit module are parameters here
"""Budgets across processes: the example gateway under gunicorn (2 workers x 8 threads) on
the real Postgres and on SQLite. A burst whose reservations exceed the budget admits spend
within it — near the limit (per-request reservations) and far from it (budget leases) — the
spend equals the sum of the admitted requests' costs, nothing stays reserved once the
workers are idle; the openai SDK sees an exhausted budget as ``RateLimitError``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

import openai
import pytest
import requests

from flask_llmauth.money import to_units
from flask_llmauth.store.tables import BudgetReservation, Key, Team
from tests.conftest import POSTGRES_URL, fresh_postgres_database
from tests.helpers import MASTER_KEY, bearer, new_key
from tests.integration.test_ratelimits_multiprocess import (  # noqa: F401 - fixtures
    WORKERS,
    Gateway,
    admin,
)

pytestmark = [pytest.mark.integration]

#: Prompt tokens are free here, so a request's real cost (completion tokens, at most its
#: max_tokens) never passes its reservation: the test checks the reservations, not the
#: prompt estimate.
OUTPUT_PRICE = Decimal("0.00001")  # USD per completion token
PRICES = {"gpt-4o": {"input_cost_per_token": "0", "output_cost_per_token": str(OUTPUT_PRICE)}}
MAX_TOKENS = 20
CHAT = {"model": "gpt-4o", "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[str]:
    """The module runs on SQLite, then on a fresh Postgres database (when configured;
    dumped for leaks, then dropped)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db')}/gateway.db"
        return
    if not POSTGRES_URL:
        pytest.skip("LLMAUTH_TEST_POSTGRES_URL is not set (.ci/run sets it)")
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def start(database: str, admin: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def make(**env: Any) -> Gateway:
        values = {"LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": database,
                  "LLMAUTH_RATELIMIT_ENABLED": "false", "LLMAUTH_CACHE_SYNC_INTERVAL": "0.2",
                  "LLMAUTH_MODEL_PRICES": json.dumps(PRICES)}
        values.update({k: str(v) for k, v in env.items()})
        gw = Gateway(tmp_path_factory.mktemp("gateway"), values)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


def cost(response: requests.Response) -> int:
    return to_units(response.json()["usage"]["completion_tokens"] * OUTPUT_PRICE)


def burst(url: str, key: str, n: int) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def send(i: int) -> None:
        barrier.wait()
        try:
            results[i] = requests.post(url + "/v1/chat/completions", json=CHAT,
                                       headers=bearer(key), timeout=30)
        except requests.RequestException as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def settled(app: Any, key_id: str, timeout: float = 20.0) -> Any:
    """The key row once nothing is reserved or waiting to be written any more."""
    deadline = time.time() + timeout
    while True:
        with app.extensions["llmauth"].store.use():
            row = Key.get(Key.key_id == key_id)
            pending = BudgetReservation.select().count()
        if (row.reserved == 0 and pending == 0) or time.time() > deadline:
            return row
        time.sleep(0.1)


@pytest.mark.parametrize(("worst_cases", "burst_size", "lease_env"), [
    # ten worst cases: near the limit, a lease holds exactly its requests' reservations.
    # No spend is written while the burst arrives: a written cost counts twice (spend and
    # lease) until the next lease pass, so on a slow machine a burst spread over a flush
    # admitted fewer than the ten that fit (still within the budget)
    (10, 60, {"LLMAUTH_SPEND_FLUSH_INTERVAL": 5}),
    # two hundred: the workers lease chunks (up to 20 worst cases, half the room left)
    (200, 300, {"LLMAUTH_BUDGET_LEASE_REQUESTS": 20, "LLMAUTH_BUDGET_LEASE_FRACTION": 0.5}),
], ids=["near-the-limit", "leases"])
def test_burst_over_the_budget_admits_spend_within_it(
        start: Callable[..., Gateway], admin: Any, worst_cases: int, burst_size: int,
        lease_env: dict[str, Any]) -> None:
    gw = start(**lease_env)
    app = admin.application
    team_id = f"mp-team-{worst_cases}"
    admin.post("/team/new", json={"team_id": team_id, "max_budget": 1.0},
               headers={"Authorization": f"Bearer {MASTER_KEY}"})
    worst = to_units(MAX_TOKENS * OUTPUT_PRICE)
    budget = worst_cases * worst  # the burst's reservations are six times or more the budget
    body = new_key(admin, max_budget=float(Decimal(budget) / 10**9), team_id=team_id)
    key, key_id = body["key"], body["key_id"]
    admitted_cost = 0
    responses = burst(gw.url, key, burst_size)
    statuses = [getattr(r, "status_code", -1) for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 200:
            admitted_cost += cost(r)
        else:
            assert r.json()["error"]["type"] == "budget_exceeded"
    assert admitted_cost <= budget
    if worst_cases == 10:
        assert statuses.count(200) >= 10  # exact: every reservation that fits is admitted
    assert statuses.count(429) > 0
    # then one at a time until the budget refuses for good (a refusal while finished
    # requests' worst cases or another worker's unused lease hold the rest says "in flight")
    deadline = time.time() + 90
    while True:
        assert time.time() < deadline, "the budget never refused"
        r = requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers={
            **bearer(key), "Connection": "close"}, timeout=10)
        if r.status_code == 200:
            admitted_cost += cost(r)
            continue
        assert r.status_code == 429
        if "in flight" not in r.json()["error"]["message"]:
            break
        time.sleep(0.2)
    row = settled(app, key_id)
    assert row.reserved == 0
    assert row.spend == admitted_cost  # exactly the sum of the admitted requests' costs
    assert admitted_cost <= budget
    assert admitted_cost + worst > budget  # and it was used up, not refused early
    with app.extensions["llmauth"].store.use():
        team = Team.get(Team.team_id == team_id)
    assert (team.spend, team.reserved) == (admitted_cost, 0)
    assert len(gw.served_by()) == WORKERS


def test_openai_sdk_sees_an_exhausted_budget_as_rate_limit_error(
        start: Callable[..., Gateway], admin: Any, sdk_clients: ExitStack) -> None:
    gw = start()
    worst = to_units(MAX_TOKENS * OUTPUT_PRICE)
    body = new_key(admin, max_budget=float(Decimal(worst) / 10**9))
    client = sdk_clients.enter_context(openai.OpenAI(
        base_url=gw.url + "/v1", api_key=body["key"], max_retries=2, timeout=10))
    first = client.chat.completions.create(**CHAT)
    assert first.usage is not None and first.usage.completion_tokens > 0
    settled(admin.application, body["key_id"])  # its real spend replaced its reservation
    before = sum(gw.served_by().values())
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**CHAT)
    error = caught.value
    assert error.status_code == 429
    assert error.body["type"] == "budget_exceeded"  # type: ignore[index]
    assert "Budget" in error.message and "Max budget: 0.0002" in error.message
    assert body["key"] not in error.message
    # the budget never resets: the SDK is told not to retry. The refusal's access-log line
    # may be written just after the SDK had the answer: wait for it, then for any retry's
    deadline = time.time() + 10
    while sum(gw.served_by().values()) == before and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert sum(gw.served_by().values()) == before + 1
