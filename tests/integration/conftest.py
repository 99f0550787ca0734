"""Fixtures for tests against the example gateway served on a real socket.

``gateway`` is one gunicorn server (2 gthread workers, SQLite in its own instance folder)
shared by a test module; it starts without a configured master key, so its first start
generates one. When a server stops, its database and everything it printed are searched
for the secrets the tests registered.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import dump_database, find_leaks
from tests.helpers import record_secret
from tests.integration.gateway import Gateway, generated_master_key, gunicorn

pytestmark = pytest.mark.integration


class Admin:
    """The management API of one gateway, called with its master key over HTTP. Each call
    asks the server to close its connection (``Connection: close``): a response a test still
    holds would otherwise keep an idle keep-alive connection open, and a server's graceful
    stop waits for it (gunicorn's 2 s keep-alive)."""

    def __init__(self, gateway: Gateway, master_key: str) -> None:
        self.gateway = gateway
        self.master_key = record_secret(master_key)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.master_key}"}

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return requests.post(self.gateway.base_url + path, json=body, timeout=10,
                             headers={**self.headers, "Connection": "close"})

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.gateway.base_url + path, params=params, timeout=10,
                            headers={**self.headers, "Connection": "close"})

    def new_key(self, **fields: Any) -> dict[str, Any]:
        response = self.post("/key/generate", fields)
        assert response.status_code == 200, response.text
        body = response.json()
        record_secret(body["key"])
        return body


def check_no_leaks(gateway: Gateway, *, printed_master_key: str | None = None) -> None:
    """No registered secret in the server's output (except the one announcement of a
    generated master key) or in its SQLite database."""
    output = gateway.output()
    if printed_master_key is not None:
        assert output.count(printed_master_key) == 1
        output = output.replace(printed_master_key, "")
    assert find_leaks(output) == [], "raw secret in the gateway's output"
    database = gateway.instance_path / "llmauth.db"
    if database.exists():
        assert find_leaks(dump_database(f"sqlite:///{database}")) == []


@pytest.fixture(scope="module")
def gateway_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(f"gateway-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def gateway(gateway_dir: Path) -> Iterator[Gateway]:
    """gunicorn, 2 workers × 4 threads, first start (no master key configured)."""
    server = gunicorn(gateway_dir, {"LLMAUTH_CACHE_SYNC_INTERVAL": "1"})
    with server.start():
        yield server
    check_no_leaks(server, printed_master_key=generated_master_key(server.output()))


@pytest.fixture(scope="module")
def admin(gateway: Gateway) -> Admin:
    return Admin(gateway, generated_master_key(gateway.output()))


@pytest.fixture
def make_app(app_factory: Any, idp: Any) -> Any:
    """``make_app(provider=None, config=None, **jwt_settings)``: an app with JWT auth on
    against the test IdP (``provider``, default the shared one) and an echo route
    (tests/integration/test_jwt.py's ``jwt_config`` and ``add_echo``)."""
    from tests.integration.test_jwt import add_echo, jwt_config

    def make(provider: Any = None, config: dict[str, Any] | None = None,
             **extra: Any) -> Any:
        cfg = jwt_config(provider or idp, **extra)
        cfg.update(config or {})
        app = app_factory(cfg)
        add_echo(app)
        return app
    return make
