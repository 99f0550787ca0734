"""The example gateway's LLM routes: a body with a wrongly typed field is a 400 naming it (the
fake model used to raise on it: a 500), and text with a lone surrogate is answered."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from example_app import create_app
from flask_llmauth.prices import prices_for
from flask_llmauth.spend import flush
from tests.conftest import migrated_sqlite_url
from tests.helpers import ADMIN, MASTER_KEY, assert_error, record_secret

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def gateway(tmp_path: Any) -> Iterator[Flask]:
    app = create_app({"TESTING": True, "LLMAUTH_MASTER_KEY": MASTER_KEY,
                      "LLMAUTH_DATABASE_URL": migrated_sqlite_url(tmp_path)})
    yield app
    app.extensions["llmauth"].close()


BAD = [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": "5"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 1.5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": [1]}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": ["hi"]}, "messages"),
    ("/v1/chat/completions", {"messages": [1.5]}, "messages"),
    ("/v1/chat/completions", {"messages": [None]}, "messages"),
    ("/v1/chat/completions", {"messages": HI, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": HI, "stream": True, "stream_options": "x"},
     "stream_options"),
    ("/chat/completions", {"messages": HI + [7]}, "messages"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": 1.5}, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": {"n": 1}}, "max_tokens"),
    ("/v1/messages", {"messages": HI, "max_tokens": "5"}, "max_tokens"),
    ("/v1/messages", {"messages": [1]}, "messages"),
    ("/v1/messages", {"messages": HI, "stream": 1}, "stream"),
    ("/v1/embeddings", {"input": "x", "max_tokens": -3}, "max_tokens"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}:{json.dumps(b)[:40]}"
                                                      for p, b, _ in BAD])
def test_a_wrongly_typed_field_is_a_400_naming_it(gateway: Flask, path: str,
                                                  body: dict[str, Any], param: str) -> None:
    response = gateway.test_client().post(path, json={"model": "gpt-4o", **body}, headers=ADMIN)
    error = assert_error(response, 400, "invalid_request_error")
    assert error["param"] == param, error


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"content": "a\ud800b"}]}),
    ("/v1/chat/completions", {"model": "gpt-4o\udfff", "messages": HI}),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"content": "\ud800"}],
                              "stream": True}),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "\udc00"}),
    ("/v1/embeddings", {"model": "gpt-4o", "input": ["ok", "\ud83d"]}),
    ("/v1/messages", {"model": "gpt-4o", "messages": [{"content": [{"text": "\ud800"}]}]}),
])
def test_text_with_a_lone_surrogate_is_answered(gateway: Flask, path: str,
                                                body: dict[str, Any]) -> None:
    """JSON may escape half a UTF-16 pair; the fake model used to fail encoding it."""
    response = gateway.test_client().post(path, data=json.dumps(body), headers=ADMIN,
                                          content_type="application/json")
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    assert response.get_data()


def test_readiness_reports_the_database(gateway: Flask, tmp_path: Any) -> None:
    ready = gateway.test_client().get("/health/readiness")  # public: no credential
    assert (ready.status_code, ready.get_json()) == (200, {"status": "healthy",
                                                           "db": "connected"})
    empty = tmp_path / "empty"
    empty.mkdir()
    unmigrated = create_app({"TESTING": True, "LLMAUTH_MASTER_KEY": MASTER_KEY,
                             "LLMAUTH_AUTO_MIGRATE": False,
                             "LLMAUTH_DATABASE_URL": f"sqlite:///{empty}/llmauth.db"})
    try:
        answer = unmigrated.test_client().get("/health/readiness")
        assert (answer.status_code, answer.get_json()) == (
            503, {"status": "unhealthy", "db": "disconnected"})
    finally:
        unmigrated.extensions["llmauth"].close()


def test_a_soft_budget_crossing_is_logged(gateway: Flask, caplog: Any) -> None:
    """The library sends ``soft_budget_crossed`` and logs nothing; the gateway logs it once
    per window, naming the key by its printable name only."""
    client = gateway.test_client()
    created = client.post("/key/generate", json={"soft_budget": 0.0000001}, headers=ADMIN)
    key = created.get_json()
    record_secret(key["key"])
    caplog.set_level(logging.WARNING, logger=gateway.logger.name)
    for _ in range(3):
        response = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HI},
                               headers={"Authorization": f"Bearer {key['key']}"})
        assert response.status_code == 200
        flush(gateway)
    lines = [r.getMessage() for r in caplog.records if "soft budget crossed" in r.getMessage()]
    assert lines == [f"soft budget crossed: key={key['key_name']} spend=0.0001275 "
                     "soft_budget=1e-07"], lines
    assert key["key"] not in caplog.text


def test_every_model_the_gateway_lists_has_a_price(gateway: Flask) -> None:
    """A listed model no price table knows would be free: budgets would never bind it and
    its spend would be 0 (the gateway listed "claude-3-5-sonnet", a name no table has)."""
    listed = gateway.test_client().get("/v1/models", headers=ADMIN).get_json()["data"]
    table = prices_for(gateway.extensions["llmauth"].settings)
    unpriced = [m["id"] for m in listed if table.lookup(m["id"]) is None]
    assert listed and unpriced == []


@pytest.mark.parametrize("master_key", [MASTER_KEY, None])
def test_each_litellm_config_warning_is_logged_once(tmp_path: Any, monkeypatch: Any,
                                                    caplog: Any, master_key: str | None) -> None:
    """The gateway reads its settings to find a master key before ``LLMAuth(app)`` reads them
    again: the warnings about the LiteLLM config (a relaxation not honoured, a misspelt key)
    appeared twice."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text("general_settings:\n  allow_requests_on_db_unavailable: true\n"
                           "  master_kye: x\n")
    monkeypatch.setenv("GATEWAY_INSTANCE_PATH", str(tmp_path / "gateway"))
    caplog.set_level(logging.WARNING, logger="flask_llmauth")
    config = {"TESTING": True, "LLMAUTH_DATABASE_URL": migrated_sqlite_url(tmp_path),
              "LLMAUTH_CONFIG_FILE": str(config_file)}
    if master_key is not None:
        config["LLMAUTH_MASTER_KEY"] = master_key
    app = create_app(config)
    try:
        messages = [r.getMessage() for r in caplog.records if r.name == "flask_llmauth"]
        relaxation = [m for m in messages if "allow_requests_on_db_unavailable" in m]
        typo = [m for m in messages if "did you mean general_settings.master_key" in m]
        assert (len(relaxation), len(typo)) == (1, 1), messages
    finally:
        app.extensions["llmauth"].close()
