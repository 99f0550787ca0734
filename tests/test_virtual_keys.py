"""Virtual keys: generation, authentication, rotation with grace, revocation, expiry.

Runs on SQLite and (when LLMAUTH_TEST_POSTGRES_URL is set) on Postgres.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from flask_llmauth.store.tables import DeletedKey, Key
from tests.helpers import ADMIN, assert_error, bearer, keys_seen_later, new_key, random_key

CHAT = "/v1/chat/completions"


def chat(client: Any, key: str, model: str = "gpt-4o") -> Any:
    return client.post(CHAT, json={"model": model, "messages": []}, headers=bearer(key))


def test_generated_key_format_and_single_disclosure(client: Any, app: Any) -> None:
    body = new_key(client, key_alias="svc", models=["gpt-4o"])
    raw = body["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{43}", raw)
    assert body["key_name"] == f"sk-...{raw[-4:]}"
    assert body["token"] == body["key_id"]
    info = client.get(f"/key/info?key={body['key_id']}", headers=ADMIN).get_json()
    assert raw not in str(info)
    with app.extensions["llmauth"].store.use():
        row = Key.get(Key.key_id == body["key_id"])
        assert raw not in str(row.__data__)
        assert len(row.digest) == 64 and row.digest != raw


def test_key_authenticates_and_identifies(client: Any) -> None:
    body = new_key(client, user_id="alice")
    response = chat(client, body["key"])
    assert response.status_code == 200
    principal = response.get_json()["principal"]
    assert principal == {"method": "virtual_key", "role": "internal_user", "user_id": "alice",
                         "team_id": None, "key_id": body["key_id"], "key_name": body["key_name"]}


def test_unknown_revoked_and_expired_keys_get_identical_401_bodies(
        client: Any, app: Any, monkeypatch: Any) -> None:
    revoked = new_key(client)
    assert client.post("/key/delete", json={"keys": [revoked["key_id"]]},
                       headers=ADMIN).status_code == 200
    expired = new_key(client, duration="1s")
    keys_seen_later(app, monkeypatch, 1.1)
    bodies = []
    for key in (random_key(), revoked["key"], expired["key"]):
        response = chat(client, key)
        assert_error(response, 401, "auth_error")
        bodies.append(response.get_data())
    assert bodies[0] == bodies[1] == bodies[2]


def test_rotation_with_grace_period_keeps_key_id(client: Any, app: Any,
                                                 monkeypatch: Any) -> None:
    old = new_key(client, user_id="alice")
    assert chat(client, old["key"]).status_code == 200
    response = client.post(f"/key/{old['key_id']}/regenerate", json={"grace_period": "2s"},
                           headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    new = response.get_json()
    assert new["key_id"] == old["key_id"] and new["key"] != old["key"]
    assert new["rotation_count"] == 1
    for key in (old["key"], new["key"]):
        response = chat(client, key)
        assert response.status_code == 200
        assert response.get_json()["principal"]["key_id"] == old["key_id"]
    keys_seen_later(app, monkeypatch, 2.1)
    assert_error(chat(client, old["key"]), 401)
    assert chat(client, new["key"]).status_code == 200


def test_rotation_without_grace_revokes_old_secret_at_once(client: Any) -> None:
    old = new_key(client)
    assert chat(client, old["key"]).status_code == 200  # now cached
    response = client.post("/key/regenerate", json={"key": old["key"]}, headers=ADMIN)
    assert response.status_code == 200
    assert_error(chat(client, old["key"]), 401)
    assert chat(client, response.get_json()["key"]).status_code == 200


def test_block_unblock_and_delete_take_effect_on_next_request(client: Any, app: Any) -> None:
    body = new_key(client)
    assert chat(client, body["key"]).status_code == 200
    assert client.post("/key/block", json={"key": body["key_id"]}, headers=ADMIN).status_code == 200
    error = assert_error(chat(client, body["key"]), 401)
    assert "blocked" in error["message"]
    assert client.post("/key/unblock", json={"key": body["key_id"]},
                       headers=ADMIN).status_code == 200
    assert chat(client, body["key"]).status_code == 200
    response = client.post("/key/delete", json={"keys": [body["key"]]}, headers=ADMIN)
    assert response.get_json() == {"deleted_keys": [body["key_id"]]}
    assert_error(chat(client, body["key"]), 401)
    with app.extensions["llmauth"].store.use():
        assert DeletedKey.get(DeletedKey.key_id == body["key_id"]).key_name == body["key_name"]
        assert not Key.select().where(Key.key_id == body["key_id"]).exists()


def test_update_takes_effect_on_next_request(client: Any) -> None:
    body = new_key(client, models=["gpt-4o"])
    assert chat(client, body["key"], "gpt-4o-mini").status_code == 403
    response = client.post("/key/update", json={"key": body["key_id"], "models": ["gpt-4o-mini"]},
                           headers=ADMIN)
    assert response.status_code == 200 and response.get_json()["models"] == ["gpt-4o-mini"]
    assert chat(client, body["key"], "gpt-4o-mini").status_code == 200
    assert chat(client, body["key"], "gpt-4o").status_code == 403


def test_expiry_set_by_update_applies_to_cached_key(client: Any, app: Any,
                                                    monkeypatch: Any) -> None:
    body = new_key(client)
    assert chat(client, body["key"]).status_code == 200
    client.post("/key/update", json={"key": body["key_id"], "duration": "1s"}, headers=ADMIN)
    assert chat(client, body["key"]).status_code == 200
    keys_seen_later(app, monkeypatch, 1.1)
    assert_error(chat(client, body["key"]), 401)
    client.post("/key/update", json={"key": body["key_id"], "duration": None}, headers=ADMIN)
    assert chat(client, body["key"]).status_code == 200


def test_last_used_is_batched_not_written_per_request(client: Any, app: Any) -> None:
    state = app.extensions["llmauth"]
    body = new_key(client)
    assert chat(client, body["key"]).status_code == 200
    with state.store.use():
        assert Key.get(Key.key_id == body["key_id"]).last_used_at is None
    assert state.last_used.flush(state) == 1
    with state.store.use():
        first = Key.get(Key.key_id == body["key_id"]).last_used_at
    assert first is not None and state.last_used.pending == {}
    assert state.last_used.flush(state) == 0  # nothing used since
    # the request path records into the recorder's own dict, which a flush empties in place
    time.sleep(0.01)
    assert chat(client, body["key"]).status_code == 200
    assert list(state.last_used.pending) == [body["key_id"]]
    assert state.last_used.flush(state) == 1
    with state.store.use():
        assert Key.get(Key.key_id == body["key_id"]).last_used_at > first


def test_cached_key_costs_no_database_round_trip(client: Any, app: Any, monkeypatch: Any) -> None:
    body = new_key(client)
    assert chat(client, body["key"]).status_code == 200
    state = app.extensions["llmauth"]
    calls: list[str] = []
    original = state.store.db.execute_sql
    monkeypatch.setattr(state.store.db, "execute_sql",
                        lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    for _ in range(5):
        assert chat(client, body["key"]).status_code == 200
    assert calls == []


@pytest.mark.parametrize("field,value", [
    ("duration", "soon"), ("max_budget", -1), ("models", "gpt-4o"), ("tpm_limit", "many"),
    ("key_type", "superuser"), ("allowed_ips", ["not-an-ip"]), ("unknown_field", 1),
    ("budget_duration", "0d"), ("metadata", []), ("blocked", "yes"),
])
def test_generate_rejects_bad_fields_with_400(client: Any, field: str, value: Any) -> None:
    error = assert_error(client.post("/key/generate", json={field: value}, headers=ADMIN), 400)
    assert error["param"] == field


def test_list_paginates_filters_and_sorts(client: Any) -> None:
    for i in range(5):
        new_key(client, user_id="u1" if i < 3 else "u2", key_alias=f"k{i}")
    page = client.get("/key/list?size=2&page=2&user_id=u1&sort_by=key_alias&sort_order=asc",
                      headers=ADMIN).get_json()
    assert page["total_count"] == 3 and page["total_pages"] == 2 and page["current_page"] == 2
    full = client.get("/key/list?user_id=u1&return_full_object=true&sort_by=key_alias"
                      "&sort_order=asc", headers=ADMIN).get_json()
    assert [k["key_alias"] for k in full["keys"]] == ["k0", "k1", "k2"]
    assert_error(client.get("/key/list?size=1000", headers=ADMIN), 400)
    assert_error(client.get("/key/list?sort_by=digest", headers=ADMIN), 400)


def test_v2_key_info_answers_several_keys_each_as_key_info_does(client: Any) -> None:
    """LiteLLM's ``POST /v2/key/info {"keys": [...]}``: ``{"key": [...], "info": [...]}``,
    each key (raw or key_id) held to the rules of ``/key/info``."""
    first, second = new_key(client, key_alias="one"), new_key(client, key_alias="two")
    response = client.post("/v2/key/info", json={"keys": [first["key"], second["key_id"]]},
                           headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["key"] == [first["key_id"], second["key_id"]]
    assert [info["key_alias"] for info in body["info"]] == ["one", "two"]
    single = client.get("/key/info", query_string={"key": second["key_id"]},
                        headers=ADMIN).get_json()["info"]
    assert body["info"][1] == single
    assert first["key"] not in response.get_data(as_text=True)
    # a non-admin reads its own keys only
    own = client.post("/v2/key/info", json={"keys": [first["key_id"]]},
                      headers=bearer(first["key"]))
    assert own.status_code == 200
    assert_error(client.post("/v2/key/info", json={"keys": [first["key_id"], second["key_id"]]},
                             headers=bearer(first["key"])), 403)
    assert_error(client.post("/v2/key/info", json={"keys": ["no-such-key"]}, headers=ADMIN), 404)
    for bad in ({}, {"keys": []}, {"keys": "x"}, {"keys": [1]}, {"keys": ["a"], "x": 1}):
        assert_error(client.post("/v2/key/info", json=bad, headers=ADMIN), 400)
