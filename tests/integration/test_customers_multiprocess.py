"""Customers over a real socket: the example gateway under gunicorn with two workers, on
SQLite and (when configured) Postgres. Each worker caches end users' rows; a block made
through one worker reaches the other through the invalidation log; the ``openai`` SDK sees a
blocked end user as ``PermissionDeniedError``; spend is attributed to the end user."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.helpers import record_secret
from tests.integration.conftest import Admin, check_no_leaks
from tests.integration.gateway import Gateway, gunicorn

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]
SYNC_INTERVAL = 1.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_workers(request: pytest.FixtureRequest, tmp_path: Path
                ) -> Iterator[tuple[Gateway, Admin]]:
    database = ({} if request.param == "sqlite"
                else {"LLMAUTH_DATABASE_URL": request.getfixturevalue("postgres_url")})
    master_key = record_secret("sk-" + secrets.token_urlsafe(32))
    server = gunicorn(tmp_path / "gw", {
        **database, "LLMAUTH_MASTER_KEY": master_key, "LLMAUTH_CACHE_TTL": "600",
        "LLMAUTH_CACHE_SYNC_INTERVAL": str(SYNC_INTERVAL),
        "LLMAUTH_SPEND_FLUSH_INTERVAL": "0.2",
    }, workers=2)
    with server.start():
        yield server, Admin(server, master_key)
    check_no_leaks(server)


def test_block_reaches_every_worker_and_the_sdk_sees_403(
        two_workers: tuple[Gateway, Admin], sdk_clients: ExitStack) -> None:
    gateway, admin = two_workers
    key = admin.new_key(models=["gpt-4o"])["key"]
    assert admin.post("/customer/new", {"user_id": "acme"}).status_code == 200

    def every_worker(**extra: Any) -> dict[int, list[int]]:
        return gateway.probe_every_worker(
            "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                     **extra.pop("headers", {})},
            json={"model": "gpt-4o", "messages": MESSAGES, **extra})

    # warm: both workers have the row (not blocked) cached for ten minutes
    warmed = every_worker(user="acme")
    assert all(s == 200 for statuses in warmed.values() for s in statuses), warmed

    assert admin.post("/customer/block", {"user_ids": ["acme"]}).status_code == 200
    time.sleep(2 * SYNC_INTERVAL)  # two polls of the invalidation log
    for extra in ({"user": "acme"}, {"headers": {"x-litellm-customer-id": "acme"}}):
        after = every_worker(**extra)
        assert all(s == 403 for statuses in after.values() for s in statuses), after
    others = every_worker(user="someone-else")
    assert all(s == 200 for statuses in others.values() for s in statuses), others

    client = sdk_clients.enter_context(
        openai.OpenAI(api_key=key, base_url=gateway.base_url + "/v1", max_retries=0))
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, user="acme")
    assert "acme" in refused.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                       extra_headers={"x-litellm-end-user-id": "acme"})

    assert admin.post("/customer/unblock", {"user_ids": ["acme"]}).status_code == 200
    time.sleep(2 * SYNC_INTERVAL)
    again = every_worker(user="acme")
    assert all(s == 200 for statuses in again.values() for s in statuses), again

    # every admitted call above was recorded for its end user (the ledger flushes often)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        logs = admin.get("/spend/logs", end_user_id="acme", page_size=1000).json()
        customer = admin.get("/customer/info", end_user_id="acme").json()
        expected = len(warmed_and(again, warmed))
        if len(logs) == expected and customer["spend"] > 0:
            break
        time.sleep(0.2)
    assert len(logs) == expected and {r["end_user"] for r in logs} == {"acme"}
    assert all(r["spend"] > 0 for r in logs)
    # the row counts only what was spent while it existed: here, all of it
    assert round(customer["spend"], 9) == round(sum(r["spend"] for r in logs), 9)


def warmed_and(*rounds: dict[int, list[int]]) -> list[int]:
    """Every 200 of the given probe rounds."""
    return [s for statuses in rounds for worker in statuses.values() for s in worker
            if s == 200]
