"""The key lifecycle over a real socket, on SQLite and (when configured) Postgres, and
revocation across gunicorn workers: each worker caches keys in-process and learns of other
workers' changes from the invalidation log it polls every LLMAUTH_CACHE_SYNC_INTERVAL."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.helpers import record_secret
from tests.integration.conftest import Admin, check_no_leaks
from tests.integration.gateway import Gateway, gunicorn

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]
#: Much longer than any test: a worker can only drop a cached key through invalidation.
LONG_CACHE_TTL = "600"
SYNC_INTERVAL = 1.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Server settings selecting the database: the instance folder's SQLite, or a fresh
    Postgres database."""
    if request.param == "sqlite":
        return {}
    return {"LLMAUTH_DATABASE_URL": request.getfixturevalue("postgres_url")}


def _start(tmp_path: Path, database_env: dict[str, str], workers: int,
           ) -> Iterator[tuple[Gateway, Admin]]:
    master_key = record_secret("sk-" + secrets.token_urlsafe(32))
    server = gunicorn(tmp_path / "gw", {
        **database_env, "LLMAUTH_MASTER_KEY": master_key, "LLMAUTH_CACHE_TTL": LONG_CACHE_TTL,
        "LLMAUTH_CACHE_SYNC_INTERVAL": str(SYNC_INTERVAL),
        # probe_every_worker may send dozens of revoked-key requests before both workers
        # answer; the per-IP failed-authentication limit (tested on its own in
        # test_ratelimits_multiprocess) would turn the later ones into 429s.
        "LLMAUTH_AUTH_FAILURE_LIMIT": "",
    }, workers=workers)
    with server.start():
        yield server, Admin(server, master_key)
    check_no_leaks(server)


@pytest.fixture
def single(tmp_path: Path, database_env: dict[str, str]) -> Iterator[tuple[Gateway, Admin]]:
    """One worker: every request sees the process that made the last change."""
    yield from _start(tmp_path, database_env, workers=1)


@pytest.fixture
def pair_of_workers(tmp_path: Path,
                    database_env: dict[str, str]) -> Iterator[tuple[Gateway, Admin]]:
    yield from _start(tmp_path, database_env, workers=2)


def _chat(gateway: Gateway, key: str, model: str = "gpt-4o") -> requests.Response:
    """On a connection the server closes (see ``Admin``)."""
    return requests.post(gateway.base_url + "/v1/chat/completions",
                         json={"model": model, "messages": MESSAGES},
                         headers={"Authorization": f"Bearer {key}", "Connection": "close"},
                         timeout=10)


def _whoami(gateway: Gateway, key: str) -> dict[str, Any]:
    response = requests.get(gateway.base_url + "/v1/whoami", timeout=10,
                            headers={"Authorization": f"Bearer {key}", "Connection": "close"})
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_key_lifecycle_over_the_socket(single: tuple[Gateway, Admin],
                                       sdk_clients: ExitStack) -> None:
    gateway, admin = single
    created = admin.new_key(models=["gpt-4o"], key_alias="lifecycle", user_id="alice",
                            metadata={"team": "search"}, duration="1h")
    key, key_id = created["key"], created["key_id"]
    client = sdk_clients.enter_context(
        openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0))
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
    assert _whoami(gateway, key)["key_id"] == key_id

    info = admin.get("/key/info", key=key_id)
    assert info.status_code == 200
    assert info.json()["info"]["key_alias"] == "lifecycle"
    assert key not in info.text
    listed = admin.get("/key/list", user_id="alice").json()
    assert listed["keys"] == [key_id] and listed["total_count"] == 1

    # update: the model list changes on the next request
    assert admin.post("/key/update", {"key": key_id, "models": ["gpt-4o-mini"]}).status_code == 200
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices

    # block / unblock
    assert admin.post("/key/block", {"key": key_id}).status_code == 200
    with pytest.raises(openai.AuthenticationError) as blocked:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "blocked" in blocked.value.body["message"]
    assert admin.post("/key/unblock", {"key": key_id}).status_code == 200
    assert _chat(gateway, key, "gpt-4o-mini").status_code == 200

    # rotation with a grace period: same key_id, both secrets work until it ends
    rotated = admin.post(f"/key/{key_id}/regenerate", {"grace_period": "2s"})
    assert rotated.status_code == 200, rotated.text
    new_key = record_secret(rotated.json()["key"])
    assert rotated.json()["key_id"] == key_id and new_key != key
    assert _whoami(gateway, key)["key_id"] == _whoami(gateway, new_key)["key_id"] == key_id
    time.sleep(2.2)
    assert _chat(gateway, key, "gpt-4o-mini").status_code == 401
    assert _chat(gateway, new_key, "gpt-4o-mini").status_code == 200

    # delete: refused at once, gone from the list, identical 401 body to an unknown key
    deleted = admin.post("/key/delete", {"keys": [key_id]})
    assert deleted.status_code == 200 and deleted.json() == {"deleted_keys": [key_id]}
    refused = _chat(gateway, new_key, "gpt-4o-mini")
    unknown = _chat(gateway, record_secret("sk-" + secrets.token_urlsafe(32)), "gpt-4o-mini")
    assert refused.status_code == unknown.status_code == 401
    assert refused.content == unknown.content
    assert admin.get("/key/list", user_id="alice").json()["keys"] == []
    assert admin.get("/key/info", key=key_id).status_code == 404


def test_revocation_reaches_every_worker(pair_of_workers: tuple[Gateway, Admin]) -> None:
    gateway, admin = pair_of_workers
    deleted = admin.new_key(models=["gpt-4o"])
    blocked = admin.new_key(models=["gpt-4o"])
    untouched = admin.new_key(models=["gpt-4o"])
    body = {"model": "gpt-4o", "messages": MESSAGES}

    def every_worker(key: str) -> dict[int, list[int]]:
        return gateway.probe_every_worker("POST", "/v1/chat/completions", json=body,
                                          headers={"Authorization": f"Bearer {key}"})

    # warm: each key is now cached by both workers (the cache TTL is 10 minutes)
    for key in (deleted["key"], blocked["key"], untouched["key"]):
        warmed = every_worker(key)
        assert all(s == 200 for statuses in warmed.values() for s in statuses), warmed

    assert admin.post("/key/delete", {"keys": [deleted["key_id"]]}).status_code == 200
    assert admin.post("/key/block", {"key": blocked["key_id"]}).status_code == 200
    time.sleep(2 * SYNC_INTERVAL)  # two polls of the invalidation log

    for key in (deleted["key"], blocked["key"]):
        after = every_worker(key)
        assert all(s == 401 for statuses in after.values() for s in statuses), after
    still = every_worker(untouched["key"])
    assert all(s == 200 for statuses in still.values() for s in statuses), still
