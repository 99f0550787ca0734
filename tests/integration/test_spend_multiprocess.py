"""The spend ledger across processes, against the real Postgres: the example gateway under
gunicorn (2 workers x 8 threads) answers thousands of concurrent requests of known cost, and
the spend log and the key, user, team, membership and customer rows add up to the exact sum, each
request counted once — including what the workers flush as they shut down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

from example_app import fake_model
from flask_llmauth import LLMAuth
from flask_llmauth.store.tables import Customer, Key, SpendLog, Team, TeamMembership, User
from tests.helpers import ADMIN, MASTER_KEY, bearer, new_key
from tests.integration.gateway import Gateway, gunicorn

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

WORKERS, THREADS = 2, 8
#: Integer prices in money units per token: 1,000 per prompt token, 3,000 per completion.
PRICES = {"gpt-4o": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000003"}}
IN, OUT = 1000, 3000
REQUESTS = 2000
FINAL = 200  # sent right before shutdown: written by the exit flush


@pytest.fixture
def admin(postgres_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An in-process app on the same database (creates the rows; migrates first)."""
    app = Flask("spend_admin", instance_path=str(tmp_path / "admin"))
    app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY, LLMAUTH_DATABASE_URL=postgres_url,
                      LLMAUTH_SPEND_ENABLED=False)
    LLMAuth(app)
    yield app
    app.extensions["llmauth"].close()


def body_for(i: int) -> dict[str, Any]:
    """Request ``i``: prompt and completion sizes vary, a tenth of them stream."""
    body: dict[str, Any] = {"model": "gpt-4o", "max_tokens": 1 + i % 37,
                            "messages": [{"role": "user", "content": "w" * (i % 101)}]}
    if i % 10 == 0:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def cost_of(body: dict[str, Any]) -> int:
    usage = fake_model.chat_completion(body)["usage"]
    return usage["prompt_tokens"] * IN + usage["completion_tokens"] * OUT


def send_all(url: str, jobs: list[tuple[str, dict[str, Any]]]) -> list[int]:
    """Send every job from 32 client threads, each request on a new connection (so both
    workers take a share: a kept-alive connection stays with the worker that accepted it)."""

    def send(job: tuple[str, dict[str, Any]]) -> int:
        key, body = job
        response = requests.post(url + "/v1/chat/completions", json=body, timeout=60,
                                 headers={**bearer(key), "Connection": "close"})
        if body.get("stream"):
            assert b"[DONE]" in response.content
        else:
            usage = response.json()["usage"]
            assert usage == fake_model.chat_completion(body)["usage"]
        return response.status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(send, jobs))


def totals(app: Flask) -> dict[str, Any]:
    with app.extensions["llmauth"].store.use() as db:
        count, distinct, spend = db.execute_sql(
            f'SELECT count(*), count(DISTINCT request_id), coalesce(sum(spend), 0) '  # noqa: S608
            f'FROM "{SpendLog._meta.table_name}"').fetchone()
        return {"rows": count, "ids": distinct, "log": int(spend),
                "keys": {k.key_id: k.spend for k in Key.select()},
                "users": {u.user_id: u.spend for u in User.select()},
                "teams": {t.team_id: t.spend for t in Team.select()},
                "members": {(m.team_id, m.user_id): m.spend for m in TeamMembership.select()},
                "customers": {c.user_id: c.spend for c in Customer.select()}}


def test_concurrent_requests_of_known_cost_sum_exactly(admin: Flask, postgres_url: str,
                                                       tmp_path: Path) -> None:
    client = admin.test_client()
    assert client.post("/team/new", json={"team_id": "t-spend"}, headers=ADMIN).status_code == 200
    for user in ("u-a", "u-b"):
        client.post("/user/new", json={"user_id": user, "auto_create_key": False}, headers=ADMIN)
    client.post("/team/member_add", headers=ADMIN,
                json={"team_id": "t-spend", "member": {"user_id": "u-a", "role": "user"}})
    # team + user / user only / team only
    keys = [new_key(client, team_id="t-spend", user_id="u-a"), new_key(client, user_id="u-b"),
            new_key(client, team_id="t-spend")]
    assert client.post("/customer/new", json={"user_id": "c-spend"},
                       headers=ADMIN).status_code == 200
    jobs = [(keys[i % 3]["key"], body_for(i)) for i in range(REQUESTS + FINAL)]
    for i, (_, body) in enumerate(jobs):
        if i % 3 == 2:  # the team-only key's requests are on behalf of an end user
            body["user"] = "c-spend"
    expected = [0, 0, 0]
    for i, (_, body) in enumerate(jobs):
        expected[i % 3] += cost_of(body)
    assert len(set(cost_of(b) for _, b in jobs)) > 100  # costs really vary

    def serve(flush_interval: str, name: str) -> Gateway:
        return gunicorn(tmp_path / name, {
            "LLMAUTH_MASTER_KEY": MASTER_KEY, "LLMAUTH_DATABASE_URL": postgres_url,
            "LLMAUTH_MODEL_PRICES": json.dumps(PRICES), "LLMAUTH_RATELIMIT_ENABLED": "false",
            "LLMAUTH_SPEND_FLUSH_INTERVAL": flush_interval, "LLMAUTH_CACHE_SYNC_INTERVAL": "0.5",
        }, workers=WORKERS, threads=THREADS, name=name)

    with serve("0.25", "running") as gateway:
        gateway.start()
        started = time.monotonic()
        statuses = send_all(gateway.base_url, jobs[:REQUESTS])
        elapsed = time.monotonic() - started
        assert statuses == [200] * REQUESTS
        served = {pid for pid, _, _ in gateway.access_lines()}
        assert len(served) == WORKERS, "both workers served requests"
        # The background flushes write everything within about an interval.
        deadline = time.monotonic() + 20
        while totals(admin)["rows"] < REQUESTS and time.monotonic() < deadline:
            time.sleep(0.1)
        running = totals(admin)
        assert running["rows"] == running["ids"] == REQUESTS
        assert running["log"] == sum(cost_of(b) for _, b in jobs[:REQUESTS])
    # A gateway whose background flush would come in an hour: only the exit flush (on a
    # graceful stop, SIGTERM) can write the last requests.
    with serve("3600", "stopping") as gateway:
        gateway.start()
        assert send_all(gateway.base_url, jobs[REQUESTS:]) == [200] * FINAL
        assert totals(admin)["rows"] == REQUESTS
    assert gateway.process is None
    done = totals(admin)
    print(f"{REQUESTS} requests in {elapsed:.1f} s; {done['rows']} spend rows")
    assert done["rows"] == done["ids"] == REQUESTS + FINAL  # each request id once
    assert done["log"] == sum(expected)
    a, b, c = (k["key_id"] for k in keys)
    assert done["keys"] == {a: expected[0], b: expected[1], c: expected[2]}
    assert done["users"] == {"u-a": expected[0], "u-b": expected[1]}
    assert done["teams"] == {"t-spend": expected[0] + expected[2]}
    assert done["members"] == {("t-spend", "u-a"): expected[0]}
    assert done["customers"] == {"c-spend": expected[2]}
