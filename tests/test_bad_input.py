"""Bad input to the management API: every endpoint answers a clear JSON error with the right
status (400/401/403/404), never a 500, never a digest or table name."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from flask import Flask

from flask_llmauth.api import API_ROUTES, BLUEPRINT_NAME
from tests.helpers import (
    ADMIN,
    assert_error,
    bearer,
    keys_seen_later,
    new_key,
    random_key,
    record_secret,
)

DIGEST = re.compile(r"\b[0-9a-f]{64}\b")
UNKNOWN_ID = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def app(app_factory: Any) -> Flask:
    return app_factory()


@pytest.fixture
def client(app: Flask) -> Any:
    return app.test_client()


def endpoints(app: Flask) -> list[tuple[str, str]]:
    """(method, path) of every management endpoint, with ``{key}`` filled in."""
    out = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.startswith(BLUEPRINT_NAME + "."):
            path = rule.rule.replace("<key>", UNKNOWN_ID)
            for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
                out.append((method, path))
    assert len(out) == len(API_ROUTES)
    return out


def clean(response: Any, status: int) -> dict[str, Any]:
    error = assert_error(response, status)
    text = response.get_data(as_text=True)
    assert "llmauth_" not in text and "Traceback" not in text and not DIGEST.search(text)
    return error


def test_every_post_endpoint_refuses_malformed_bodies(app: Flask, client: Any) -> None:
    json_headers = {**ADMIN, "Content-Type": "application/json"}
    for method, path in endpoints(app):
        if method != "POST":
            continue
        for data, headers, message in (
            ("{not json", json_headers, "Invalid JSON in request body."),
            ("[1, 2]", json_headers, "Request body must be a JSON object."),
            ('"text"', json_headers, "Request body must be a JSON object."),
            ("[" * 50_000, json_headers, "Invalid JSON in request body."),
            ('{"a": 1}', {**ADMIN, "Content-Type": "text/plain"},
             "Content-Type must be application/json."),
            ("a=1", {**ADMIN, "Content-Type": "application/x-www-form-urlencoded"},
             "Content-Type must be application/json."),
        ):
            error = clean(client.post(path, data=data, headers=headers), 400)
            assert error["message"] == message, (path, data[:20], error)
        error = clean(client.post(path, json={"no_such_field": 1}, headers=ADMIN), 400)
        assert error["param"] == "no_such_field" and "Unknown field" in error["message"]


def test_every_get_endpoint_refuses_unknown_and_repeated_query_parameters(
        app: Flask, client: Any) -> None:
    for method, path in endpoints(app):
        if method != "GET":
            continue
        error = clean(client.get(f"{path}?no_such_param=1", headers=ADMIN), 400)
        assert error["param"] == "no_such_param", (path, error)
        error = clean(client.get(f"{path}?user_id=a&user_id=b", headers=ADMIN), 400)
        assert "more than once" in error["message"], (path, error)


def test_every_endpoint_needs_a_credential(app_factory: Any) -> None:
    # two failed authentications per endpoint: more than the per-IP limit allows
    app = app_factory(config={"LLMAUTH_AUTH_FAILURE_LIMIT": ""})
    client = app.test_client()
    bodies = set()
    for method, path in endpoints(app):
        response = client.open(path, method=method, json={})
        error = clean(response, 401)
        assert error["message"] == "Authentication Error, No api key passed in."
        response = client.open(path, method=method, json={}, headers=bearer(random_key()))
        clean(response, 401)
        bodies.add(response.get_data())
    assert len(bodies) == 1


@pytest.mark.parametrize("method,path,body", [
    ("GET", f"/key/info?key={UNKNOWN_ID}", None),
    ("POST", "/key/update", {"key": UNKNOWN_ID, "models": []}),
    ("POST", "/key/delete", {"keys": [UNKNOWN_ID]}),
    ("POST", "/key/delete", {"key_aliases": ["no-such-alias"]}),
    ("POST", "/key/block", {"key": UNKNOWN_ID}),
    ("POST", "/key/unblock", {"key": UNKNOWN_ID}),
    ("POST", "/key/regenerate", {"key": UNKNOWN_ID}),
    ("POST", f"/key/{UNKNOWN_ID}/regenerate", {}),
    ("GET", "/key/info?key=sk-not-a-key-that-exists-0123456789", None),
    ("GET", "/user/info?user_id=nobody", None),
    ("POST", "/user/update", {"user_id": "nobody", "max_budget": 1}),
    ("POST", "/user/delete", {"user_ids": ["nobody"]}),
    ("GET", "/team/info?team_id=nope", None),
    ("POST", "/team/update", {"team_id": "nope", "max_budget": 1}),
    ("POST", "/team/delete", {"team_ids": ["nope"]}),
    ("POST", "/team/block", {"team_id": "nope"}),
    ("POST", "/team/unblock", {"team_id": "nope"}),
    ("POST", "/team/member_add", {"team_id": "nope", "member": {"user_id": "u"}}),
    ("POST", "/team/member_delete", {"team_id": "nope", "user_id": "u"}),
    ("POST", "/team/member_update", {"team_id": "nope", "user_id": "u", "role": "admin"}),
])
def test_unknown_objects_are_404(client: Any, method: str, path: str, body: Any) -> None:
    response = client.open(path, method=method, json=body, headers=ADMIN)
    error = clean(response, 404)
    assert error["type"] == "not_found_error"


@pytest.mark.parametrize("path,body,param", [
    ("/user/new", {"user_id": "x", "user_role": "superuser"}, "user_role"),
    ("/user/new", {"user_id": "x", "user_role": "team"}, "user_role"),
    ("/user/new", {"user_id": "x", "user_role": "customer"}, "user_role"),
    ("/user/new", {"user_id": "x", "user_role": None}, "user_role"),
    ("/team/new", {"team_id": "t", "members_with_roles": [{"user_id": "u", "role": "owner"}]},
     "members_with_roles"),
])
def test_unknown_roles_are_400(client: Any, path: str, body: Any, param: str) -> None:
    error = clean(client.post(path, json=body, headers=ADMIN), 400)
    assert error["param"] == param


WRONG = [
    ("max_budget", -1, "must not be negative"),
    ("max_budget", "ten", "must be a number"),
    ("max_budget", True, "must be a number"),
    ("soft_budget", -0.01, "must not be negative"),
    ("tpm_limit", -1, "must be between 1 and"),
    ("tpm_limit", 1.5, "must be an integer"),
    ("rpm_limit", "fast", "must be an integer"),
    ("models", "gpt-4o", "must be a list of strings"),
    ("models", [1, 2], "must be a string"),
    ("metadata", "x", "must be an object"),
    ("metadata", {"x": float("inf")}, "must be JSON-serialisable"),
    ("budget_duration", "30x", "invalid duration"),
    ("budget_duration", "0d", "greater than zero"),
    ("budget_duration", "-1d", "invalid duration"),
    ("budget_duration", 30, "must be a duration string"),
    ("budget_duration", "99999999d", "duration is too long"),
    ("budget_duration", "9" * 5000 + "d", "duration is too long"),
]


@pytest.mark.parametrize("path,extra", [("/key/generate", {}), ("/user/new", {"user_id": "w"}),
                                        ("/team/new", {"team_id": "w"})])
@pytest.mark.parametrize("field,value,message", WRONG, ids=[f"{f}={v!r}" for f, v, _ in WRONG])
def test_wrong_types_negative_budgets_and_bogus_durations(
        client: Any, path: str, extra: dict[str, Any], field: str, value: Any,
        message: str) -> None:
    response = client.post(path, json={**extra, field: value}, headers=ADMIN)
    error = clean(response, 400)
    assert error["param"] == field and message in error["message"], error
    # Nothing was created.
    listed = client.get("/key/list", headers=ADMIN).get_json()
    assert listed["total_count"] == 0


@pytest.mark.parametrize("duration", ["soon", "30x", "0s", "1.5d", "1d2h", "", " ", "P30D"])
def test_bogus_key_durations(client: Any, duration: str) -> None:
    error = clean(client.post("/key/generate", json={"duration": duration}, headers=ADMIN), 400)
    assert error["param"] == "duration"


def test_another_users_key_is_403_and_unchanged(client: Any) -> None:
    for user in ("alice", "bob"):
        assert client.post("/user/new", json={"user_id": user, "auto_create_key": False},
                           headers=ADMIN).status_code == 200
    alice = new_key(client, user_id="alice")["key"]
    bob = new_key(client, user_id="bob")
    as_alice = bearer(alice)
    for method, path, body in (
        ("GET", f"/key/info?key={bob['key_id']}", None),
        ("POST", "/key/update", {"key": bob["key_id"], "models": ["gpt-4o"]}),
        ("POST", "/key/delete", {"keys": [bob["key_id"]]}),
        ("POST", "/key/regenerate", {"key": bob["key_id"]}),
        ("POST", f"/key/{bob['key_id']}/regenerate", {}),
        ("POST", "/key/block", {"key": bob["key_id"]}),
        ("GET", "/key/list?user_id=bob", None),
    ):
        response = client.open(path, method=method, json=body, headers=as_alice)
        error = clean(response, 403)
        assert bob["key"] not in response.get_data(as_text=True), error
    info = client.get(f"/key/info?key={bob['key_id']}", headers=ADMIN).get_json()["info"]
    assert info["models"] == [] and info["rotation_count"] == 0 and not info["blocked"]
    assert client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                       headers=bearer(bob["key"])).status_code == 200


def test_one_401_body_for_unknown_revoked_expired_rotated_and_orphaned_keys(
        client: Any, app: Any, monkeypatch: Any) -> None:
    assert client.post("/user/new", json={"user_id": "carol", "auto_create_key": False},
                       headers=ADMIN).status_code == 200
    revoked, expired, rotated, orphaned = (new_key(client) for _ in range(4))
    orphaned = new_key(client, user_id="carol")
    expired = new_key(client, duration="1s")
    client.post("/key/delete", json={"keys": [revoked["key_id"]]}, headers=ADMIN)
    new = client.post("/key/regenerate", json={"key": rotated["key_id"]}, headers=ADMIN)
    record_secret(new.get_json()["key"])
    client.post("/user/delete", json={"user_ids": ["carol"]}, headers=ADMIN)
    keys_seen_later(app, monkeypatch, 1.1)  # the 1 s key has expired
    bodies = set()
    for key in (random_key(), revoked["key"], expired["key"], rotated["key"], orphaned["key"],
                "not-even-a-key-0123456789abcdef"):
        response = client.post("/v1/chat/completions", json={"model": "gpt-4o"},
                               headers=bearer(key))
        clean(response, 401)
        bodies.add(response.get_data())
    assert len(bodies) == 1


#: Fields whose value is never empty in storage: ``null`` is a 400 naming the field (it used
#: to reach the database's NOT NULL constraint: a 500).
NOT_NULL = {
    "/key/generate": ("models", "aliases", "allowed_routes", "model_rpm_limit", "model_tpm_limit",
                      "model_max_budget", "spend", "blocked"),
    "/key/update": ("models", "aliases", "allowed_routes", "model_rpm_limit", "model_tpm_limit",
                    "model_max_budget", "spend", "blocked"),
    "/key/regenerate": ("models", "aliases", "allowed_routes", "model_rpm_limit",
                        "model_tpm_limit", "model_max_budget", "spend", "blocked"),
    "/user/new": ("models", "model_max_budget"),
    "/user/update": ("models", "model_max_budget", "spend", "blocked"),
    "/team/new": ("models", "model_aliases", "model_rpm_limit", "model_tpm_limit", "blocked"),
    "/team/update": ("models", "model_aliases", "model_rpm_limit", "model_tpm_limit", "blocked"),
    "/team/member_update": ("role", "allowed_models"),
}


def _null_cases() -> list[tuple[str, str]]:
    return [(path, field) for path, fields in NOT_NULL.items() for field in fields]


@pytest.mark.parametrize("path,field", _null_cases(), ids=[f"{p}:{f}" for p, f in _null_cases()])
def test_null_for_a_field_that_is_never_empty_is_a_400_and_changes_nothing(
        client: Any, path: str, field: str) -> None:
    assert client.post("/user/new", json={"user_id": "nina", "models": ["gpt-4o"],
                                          "auto_create_key": False},
                       headers=ADMIN).status_code == 200
    assert client.post("/team/new", json={"team_id": "nulls", "models": ["gpt-4o"],
                                          "members_with_roles": [{"user_id": "nina"}]},
                       headers=ADMIN).status_code == 200
    key = new_key(client, models=["gpt-4o"], metadata={"a": 1})
    base = {"/key/update": {"key": key["key_id"]}, "/key/regenerate": {"key": key["key_id"]},
            "/user/new": {"user_id": "otto"}, "/user/update": {"user_id": "nina"},
            "/team/new": {"team_id": "other"}, "/team/update": {"team_id": "nulls"},
            "/team/member_update": {"team_id": "nulls", "user_id": "nina"}}.get(path, {})
    before = [client.get(url, headers=ADMIN).get_json() for url in (
        f"/key/info?key={key['key_id']}", "/user/info?user_id=nina", "/team/info?team_id=nulls",
        "/key/list?size=100", "/user/list", "/team/list")]
    error = clean(client.post(path, json={**base, field: None}, headers=ADMIN), 400)
    assert error["param"] == field and error["message"] == f"Field '{field}' must not be null."
    after = [client.get(url, headers=ADMIN).get_json() for url in (
        f"/key/info?key={key['key_id']}", "/user/info?user_id=nina", "/team/info?team_id=nulls",
        "/key/list?size=100", "/user/list", "/team/list")]
    assert after == before


@pytest.mark.parametrize("path,body,info", [
    ("/key/update", {}, "/key/info?key={key_id}"),
    ("/user/update", {"user_id": "mia"}, "/user/info?user_id=mia"),
    ("/team/update", {"team_id": "meta"}, "/team/info?team_id=meta"),
])
def test_null_metadata_clears_it(client: Any, path: str, body: dict[str, Any],
                                 info: str) -> None:
    """As on ``/customer/update``: ``"metadata": null`` is the empty object."""
    assert client.post("/user/new", json={"user_id": "mia", "metadata": {"a": 1},
                                          "auto_create_key": False},
                       headers=ADMIN).status_code == 200
    assert client.post("/team/new", json={"team_id": "meta", "metadata": {"a": 1}},
                       headers=ADMIN).status_code == 200
    key = new_key(client, metadata={"a": 1})
    body = {**body, "key": key["key_id"]} if path.startswith("/key") else body
    response = client.post(path, json={**body, "metadata": None}, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    shown = client.get(info.format(key_id=key["key_id"]), headers=ADMIN).get_json()
    shown = shown.get("info") or shown.get("team_info") or shown.get("user_info") or shown
    assert shown["metadata"] == {}, shown
    for create, extra in (("/key/generate", {}), ("/user/new", {"user_id": "neo"}),
                          ("/team/new", {"team_id": "new"})):
        response = client.post(create, json={**extra, "metadata": None}, headers=ADMIN)
        assert response.status_code == 200, response.get_json()
        if create == "/key/generate":
            record_secret(response.get_json()["key"])
        assert response.get_json()["metadata"] == {}


@pytest.mark.parametrize("path", ["/key/list", "/user/list", "/customer/list"])
def test_a_page_whose_offset_no_database_integer_holds_is_a_400(app_factory: Any, db_url: str,
                                                                path: str) -> None:
    """``page`` times the page size is the query's OFFSET: ``page=2**62`` used to overflow
    SQLite's and Postgres' 64-bit integer (a 500). Pages stop at 2**31 - 1; the last one is
    an empty page like any page past the end."""
    client = app_factory(db_url=db_url).test_client()
    error = clean(client.get(f"{path}?page={2**62}", headers=ADMIN), 400)
    assert error["param"] == "page"
    response = client.get(f"{path}?page={2**31 - 1}", headers=ADMIN)
    assert response.status_code == 200, response.get_json()


@pytest.mark.parametrize("path,body", [
    ("/key/generate", {}), ("/user/new", {"user_id": "wide"}), ("/team/new", {"team_id": "wide"}),
    ("/customer/new", {"user_id": "wide"}), ("/key/update", {"key": "{key_id}"}),
    ("/user/update", {"user_id": "narrow"}), ("/team/update", {"team_id": "narrow"}),
    ("/customer/update", {"user_id": "narrow"}),
])
def test_max_parallel_requests_beyond_its_32_bit_column_is_a_400(
        app_factory: Any, db_url: str, path: str, body: dict[str, Any]) -> None:
    """Postgres keeps ``max_parallel_requests`` in a 32-bit column: 2**31 used to be a 500
    there (and stored on SQLite). The bound is the column's."""
    client = app_factory(db_url=db_url).test_client()
    for create, fields in (("/user/new", {"user_id": "narrow", "auto_create_key": False}),
                           ("/team/new", {"team_id": "narrow"}),
                           ("/customer/new", {"user_id": "narrow"})):
        assert client.post(create, json=fields, headers=ADMIN).status_code == 200
    key = new_key(client)
    body = {k: v.format(key_id=key["key_id"]) for k, v in body.items()}
    error = clean(client.post(path, json={**body, "max_parallel_requests": 2**31},
                              headers=ADMIN), 400)
    assert error["param"] == "max_parallel_requests"
    response = client.post(path, json={**body, "max_parallel_requests": 2**31 - 1},
                           headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    if path in ("/key/generate", "/user/new"):
        record_secret(response.get_json()["key"])


@pytest.mark.parametrize("path", ["/customer/block", "/customer/unblock", "/customer/delete"])
def test_an_end_user_id_longer_than_its_column_is_a_400(app_factory: Any, db_url: str,
                                                       path: str) -> None:
    """End-user ids are at most 255 characters (as on ``/customer/new``): blocking a
    longer one used to insert it, a 500 on Postgres (``varchar(255)``)."""
    client = app_factory(db_url=db_url).test_client()
    error = clean(client.post(path, json={"user_ids": ["x" * 256]}, headers=ADMIN), 400)
    assert error["param"] == "user_ids"
    assert client.get("/customer/list", headers=ADMIN).get_json() == []


@pytest.mark.parametrize("path", ["/key/{key}/regenerate", "/key/{key}/reset_spend"])
@pytest.mark.parametrize("key", ["%00", "a%00b", "%01x", "x" * 257])
def test_a_key_in_the_path_is_checked_like_one_in_the_body(app_factory: Any, db_url: str,
                                                           path: str, key: str) -> None:
    """The path's key is held to the body's rule (printable, at most 256 characters): a NUL
    used to reach Postgres, which refuses it in text (a 500)."""
    client = app_factory(db_url=db_url).test_client()
    body = {"reset_to": 0} if path.endswith("reset_spend") else {}
    error = clean(client.post(path.format(key=key), json=body, headers=ADMIN), 400)
    assert error["param"] == "key"


@pytest.mark.parametrize("path,field,value", [
    ("/key/generate", "model_rpm_limit", {"\ud800": 5}),
    ("/key/generate", "model_tpm_limit", {"m\x00x": 5}),
    ("/key/generate", "model_max_budget", {"\udfff": {"budget_limit": 1}}),
    ("/key/generate", "model_max_budget", {"x" * 513: {"budget_limit": 1}}),
    ("/key/generate", "aliases", {"fast": "gpt\ud800"}),
    ("/key/generate", "aliases", {"": "gpt-4o"}),
    ("/team/new", "model_aliases", {"a\nb": "gpt-4o"}),
    ("/team/new", "model_rpm_limit", {"\ud83d": 1}),
])
def test_a_model_name_a_map_is_keyed_by_is_printable_text(client: Any, path: str, field: str,
                                                          value: dict[str, Any]) -> None:
    """Model names in maps follow the rule of ``models`` (printable, 1 to 512 characters):
    a request naming a model a limit was keyed by with a lone surrogate used to fail in the
    rate limiter or the budget counters (a 403 ``policy_error`` and an ERROR line)."""
    body = json.dumps({"team_id": "maps", field: value} if path == "/team/new"
                      else {field: value})  # escapes the surrogates: valid JSON text
    response = client.post(path, data=body, content_type="application/json", headers=ADMIN)
    error = clean(response, 400)
    assert error["param"] == field and "model names" in error["message"], error
