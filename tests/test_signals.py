"""Blinker signals fire with the documented keyword data, the app as sender, and no secret."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from flask import Flask

from flask_llmauth import Principal, Role, signals
from flask_llmauth.store.records import KeyRecord
from tests.helpers import (
    ADMIN,
    MASTER_KEY,
    assert_error,
    bearer,
    new_key,
    random_key,
    record_secret,
)

CHAT = "/v1/chat/completions"
NAMES = ("auth_succeeded", "auth_failed", "key_created", "key_rotated", "key_revoked")
#: The keyword data each signal documents (flask_llmauth/signals.py).
DOCUMENTED = {
    "auth_succeeded": {"principal"},
    "auth_failed": {"status", "reason", "route", "ip"},
    "key_created": {"key_id", "key_name", "actor"},
    "key_rotated": {"key_id", "key_name", "actor", "grace_until"},
    "key_revoked": {"key_id", "actor"},
}


@pytest.fixture
def app(app_factory: Any) -> Flask:
    return app_factory()


@pytest.fixture
def received(app: Flask) -> Iterator[dict[str, list[dict[str, Any]]]]:
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in NAMES}
    handlers = []
    for name in NAMES:
        def handler(sender: Any, _name: str = name, **data: Any) -> None:
            assert sender is app
            out[_name].append(data)
        getattr(signals, name).connect(handler, app)
        handlers.append((name, handler))
    yield out
    for name, handler in handlers:
        getattr(signals, name).disconnect(handler, app)


def assert_no_secret(data: Any, *secrets: str) -> None:
    text = repr(data)
    for secret in (MASTER_KEY, *secrets):
        assert secret not in text


def test_documented_keywords_match_the_module() -> None:
    lines = open(signals.__file__).read().splitlines()
    for name, keywords in DOCUMENTED.items():
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{name} ="))
        doc = lines[index - 1]
        assert doc.startswith("#:"), name
        assert {k.strip() for k in doc[2:].split("—")[0].replace("`", "").split(",")
                if k.strip()} == {f"{k}=" for k in keywords}, (name, doc)


def test_auth_succeeded_carries_the_principal(app: Flask, received: Any) -> None:
    client = app.test_client()
    key = new_key(client, user_id="alice")
    assert client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key["key"])).status_code \
        == 200
    assert client.post(CHAT, json={"model": "gpt-4o"}, headers=ADMIN).status_code == 200
    events = received["auth_succeeded"]
    assert all(set(e) == DOCUMENTED["auth_succeeded"] for e in events)
    by_method = {e["principal"].method: e["principal"] for e in events}
    virtual, master = by_method["virtual_key"], by_method["master_key"]
    assert isinstance(virtual, Principal) and virtual.key_id == key["key_id"]
    assert virtual.user_id == "alice" and virtual.key_name == key["key_name"]
    assert master.role is Role.PROXY_ADMIN and master.key_name == "litellm-proxy-master-key"
    assert_no_secret(events, key["key"])


def test_a_principal_repr_names_who_it_is_and_nothing_more() -> None:
    """Receivers of ``auth_succeeded``, ``budget_exceeded``, ``rate_limited`` ... get the
    principal; a log line of it shows who it is, not its records, claims or metadata."""
    key = KeyRecord(id=1, key_id="k-1", key_name="sk-...abcd", metadata={"note": "key-meta"},
                    models=("gpt-4o",))
    principal = Principal(method="virtual_key", role=Role.INTERNAL_USER, user_id="alice",
                          user_email="alice@example.com", team_id="t1", key_id="k-1",
                          key_name="sk-...abcd", key=key, metadata={"note": "key-meta"},
                          claims={"sub": "alice", "at_hash": "claim-value"},
                          limits={"rpm_limit": 5})
    assert repr(principal) == ("Principal(method='virtual_key', role='internal_user', "
                               "user_id='alice', team_id='t1', key_id='k-1', "
                               "key_name='sk-...abcd')")
    assert repr(Principal(method="master_key", role=Role.PROXY_ADMIN)) == \
        "Principal(method='master_key', role='proxy_admin')"


def test_auth_failed_says_why_without_the_credential(app: Flask, received: Any) -> None:
    client = app.test_client()
    limited = new_key(client, models=["gpt-4o"])
    unknown = random_key()
    assert_error(client.post(CHAT, json={}, headers=bearer(unknown)), 401)
    assert_error(client.post(CHAT, json={}), 401)
    assert_error(client.post(CHAT, json={"model": "claude-3-5-sonnet"},
                             headers=bearer(limited["key"])), 403)
    events = received["auth_failed"]
    assert all(set(e) == DOCUMENTED["auth_failed"] for e in events)
    assert [(e["status"], e["reason"], e["route"], e["ip"]) for e in events] == [
        (401, "unknown_key", CHAT, "127.0.0.1"),
        (401, "no_credentials", CHAT, "127.0.0.1"),
        (403, "key_model_access_denied", CHAT, "127.0.0.1"),
    ]
    assert_no_secret(events, unknown, limited["key"])
    # Only the master key's /key/generate call succeeded.
    assert [e["principal"].method for e in received["auth_succeeded"]] == ["master_key"]


def test_key_lifecycle_signals(app: Flask, received: Any) -> None:
    client = app.test_client()
    key = new_key(client, user_id="alice")
    assert received["key_created"] == [
        {"key_id": key["key_id"], "key_name": key["key_name"], "actor": "default_user_id"}]
    response = client.post(f"/key/{key['key_id']}/regenerate", json={"grace_period": "1h"},
                           headers=ADMIN)
    rotated = response.get_json()
    record_secret(rotated["key"])
    [event] = received["key_rotated"]
    assert set(event) == DOCUMENTED["key_rotated"]
    assert (event["key_id"], event["key_name"], event["actor"]) == \
        (key["key_id"], rotated["key_name"], "default_user_id")
    assert isinstance(event["grace_until"], datetime)
    # timezone-aware UTC, the instant the API answers with its +00:00 timestamp
    assert event["grace_until"].tzinfo is timezone.utc
    assert event["grace_until"].isoformat() == rotated["grace_period_ends_at"]
    client.post("/key/regenerate", json={"key": key["key_id"]}, headers=ADMIN)
    assert received["key_rotated"][-1]["grace_until"] is None
    assert client.post("/key/delete", json={"keys": [key["key_id"]]},
                       headers=ADMIN).status_code == 200
    assert received["key_revoked"] == [{"key_id": key["key_id"], "actor": "default_user_id"}]
    assert_no_secret(received, key["key"], rotated["key"])


def test_key_revoked_fires_for_keys_deleted_with_their_user_or_team(app: Flask,
                                                                      received: Any) -> None:
    client = app.test_client()
    assert client.post("/user/new", json={"user_id": "bob", "auto_create_key": False},
                       headers=ADMIN).status_code == 200
    assert client.post("/team/new", json={"team_id": "t1"}, headers=ADMIN).status_code == 200
    of_user = [new_key(client, user_id="bob")["key_id"] for _ in range(2)]
    of_team = new_key(client, team_id="t1")["key_id"]
    assert client.post("/user/delete", json={"user_ids": ["bob"]}, headers=ADMIN) \
        .status_code == 200
    assert client.post("/team/delete", json={"team_ids": ["t1"]}, headers=ADMIN) \
        .status_code == 200
    assert sorted(e["key_id"] for e in received["key_revoked"]) == sorted([*of_user, of_team])


def test_cli_commands_send_the_same_signals(app: Flask, received: Any) -> None:
    runner = app.test_cli_runner()
    created = runner.invoke(args=["llmauth", "create-key"])
    record_secret(created.stdout.strip())
    [event] = received["key_created"]
    assert event["actor"] == "default_user_id"
    rotated = runner.invoke(args=["llmauth", "rotate-key", event["key_id"]])
    record_secret(rotated.stdout.strip())
    assert received["key_rotated"][0]["key_id"] == event["key_id"]
    runner.invoke(args=["llmauth", "revoke-key", event["key_id"]])
    assert received["key_revoked"] == [{"key_id": event["key_id"], "actor": "default_user_id"}]
    assert_no_secret(received, created.stdout.strip(), rotated.stdout.strip())


def test_a_failing_receiver_changes_no_answer(app: Flask, caplog: Any) -> None:
    """Signals notify, they do not decide: a receiver that raises is logged, and the
    request gets the answer it would have got without it (no 500)."""
    client = app.test_client()
    key = new_key(client)

    def receiver(sender: Any, **data: Any) -> None:
        raise RuntimeError("receiver failed")

    with signals.auth_succeeded.connected_to(receiver, app), \
            signals.auth_failed.connected_to(receiver, app):
        ok = client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key["key"]))
        assert ok.status_code == 200, ok.get_json()
        assert_error(client.post(CHAT, json={"model": "gpt-4o"}), 401)
    for name in ("llmauth-auth-succeeded", "llmauth-auth-failed"):
        assert f"a receiver of the {name} signal failed" in caplog.text


def test_a_failing_key_signal_receiver_still_answers_with_the_key(app: Flask,
                                                                  caplog: Any) -> None:
    """A key is written before its signal: a receiver that raises must not turn the answer
    into a 500 that hides the new secret (the key would exist, its secret lost)."""
    client = app.test_client()

    def receiver(sender: Any, **data: Any) -> None:
        raise RuntimeError("receiver failed")

    with signals.key_created.connected_to(receiver, app), \
            signals.key_rotated.connected_to(receiver, app), \
            signals.key_revoked.connected_to(receiver, app):
        key = new_key(client)
        assert client.post(CHAT, json={"model": "gpt-4o"}, headers=bearer(key["key"])
                           ).status_code == 200
        rotated = client.post("/key/regenerate", json={"key": key["key_id"]}, headers=ADMIN)
        assert rotated.status_code == 200 and rotated.get_json()["key"].startswith("sk-")
        record_secret(rotated.get_json()["key"])
        deleted = client.post("/key/delete", json={"keys": [key["key_id"]]}, headers=ADMIN)
        assert deleted.status_code == 200
    for name in ("key-created", "key-rotated", "key-revoked"):
        assert f"a receiver of the llmauth-{name} signal failed" in caplog.text
