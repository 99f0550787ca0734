"""Customers (end users): the ``/customer/*`` API (shapes, admin-only rights, audit, bad
input) and the customers guard (who the end user is, blocked → 403, limits of the end user,
cache invalidation across processes, cost for requests that name no end user)."""

from __future__ import annotations

from typing import Any

import pytest
from flask import jsonify

from flask_llmauth.customers import end_user_budget, end_user_field_of_body, end_user_from_body
from flask_llmauth.errors import BadRequest
from flask_llmauth.guards import current_admission
from flask_llmauth.principal import Principal, Role
from flask_llmauth.store.tables import AuditLog, CacheEvent, Customer
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key, role_keys

CHAT = "/v1/chat/completions"
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def post(client: Any, path: str, body: Any, headers: dict[str, str] = ADMIN) -> Any:
    return client.post(path, json=body, headers=headers)


def ok(response: Any) -> Any:
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def chat(client: Any, key: str, headers: dict[str, str] | None = None, **body: Any) -> Any:
    return client.post(CHAT, json={"model": "gpt-4o", **body},
                       headers={**bearer(key), **(headers or {})})


# -- the API ---------------------------------------------------------------------------------------


def test_customer_lifecycle_shapes_and_audit(app: Any, client: Any) -> None:
    created = ok(post(client, "/customer/new", {
        "user_id": "acme-42", "alias": "Acme", "max_budget": 12.5, "budget_duration": "30d",
        "rpm_limit": 10, "tpm_limit": 1000, "max_parallel_requests": 2,
        "allowed_model_region": "eu", "default_model": "gpt-4o", "metadata": {"plan": "pro"}}))
    assert created["user_id"] == "acme-42" and created["alias"] == "Acme"
    assert created["blocked"] is False and created["spend"] == 0.0
    assert created["max_budget"] == 12.5 and created["budget_reset_at"] is not None
    assert created["litellm_budget_table"]["max_budget"] == 12.5
    assert created["litellm_budget_table"]["rpm_limit"] == 10
    assert created["allowed_model_region"] == "eu" and created["metadata"] == {"plan": "pro"}
    assert created["budget_id"] is None

    duplicate = post(client, "/customer/new", {"user_id": "acme-42"})
    assert "already exists" in assert_error(duplicate, 400)["message"]

    info = ok(client.get("/customer/info", query_string={"end_user_id": "acme-42"},
                         headers=ADMIN))
    assert info == created

    updated = ok(post(client, "/customer/update", {"user_id": "acme-42", "max_budget": 0.1,
                                                   "alias": None}))
    assert updated["max_budget"] == 0.1 and updated["alias"] is None
    assert updated["rpm_limit"] == 10  # untouched fields stay

    ok(post(client, "/end_user/new", {"user_id": "plain"}))
    listed = ok(client.get("/customer/list", headers=ADMIN))
    assert [c["user_id"] for c in listed] == ["acme-42", "plain"]
    assert listed[1]["litellm_budget_table"] is None
    page = ok(client.get("/customer/list", query_string={"page": 2, "page_size": 1},
                         headers=ADMIN))
    assert [c["user_id"] for c in page["customers"]] == ["plain"] and page["total"] == 2

    deleted = ok(post(client, "/customer/delete", {"user_ids": ["acme-42", "plain"]}))
    assert deleted["deleted_customers"] == 2
    assert_error(client.get("/customer/info", query_string={"end_user_id": "acme-42"},
                            headers=ADMIN), 404)
    with app.extensions["llmauth"].store.use():
        assert Customer.select().count() == 0
        actions = [(a.action, a.object_id) for a in AuditLog.select()
                   .where(AuditLog.object_type == "customer").order_by(AuditLog.id)]
    assert actions == [("created", "acme-42"), ("updated", "acme-42"), ("created", "plain"),
                       ("deleted", "acme-42"), ("deleted", "plain")]


def test_delete_is_all_or_nothing(app: Any, client: Any) -> None:
    ok(post(client, "/customer/new", {"user_id": "a"}))
    error = assert_error(post(client, "/customer/delete", {"user_ids": ["a", "ghost"]}), 404)
    assert "ghost" in error["message"]
    with app.extensions["llmauth"].store.use():
        assert Customer.select().count() == 1


def test_block_creates_missing_rows_and_unblock_needs_them(client: Any) -> None:
    ok(post(client, "/customer/new", {"user_id": "known", "max_budget": 3}))
    blocked = ok(post(client, "/customer/block", {"user_ids": ["known", "unseen"]}))
    assert [(c["user_id"], c["blocked"]) for c in blocked["blocked_users"]] == [
        ("known", True), ("unseen", True)]
    assert blocked["blocked_users"][0]["max_budget"] == 3.0  # the rest of the row is kept
    assert_error(post(client, "/customer/unblock", {"user_ids": ["never"]}), 404)
    unblocked = ok(post(client, "/customer/unblock", {"user_ids": ["unseen"]}))
    assert unblocked["unblocked_users"][0]["blocked"] is False


@SQLITE_ONLY
def test_only_admins_manage_customers_and_viewers_read(app: Any, client: Any) -> None:
    ok(post(client, "/customer/new", {"user_id": "c1"}))
    keys = role_keys(client, app)
    writes = [("/customer/new", {"user_id": "c2"}), ("/end_user/new", {"user_id": "c2"}),
              ("/customer/update", {"user_id": "c1", "max_budget": 100}),
              ("/customer/delete", {"user_ids": ["c1"]}),
              ("/customer/block", {"user_ids": ["c1"]}),
              ("/customer/unblock", {"user_ids": ["c1"]})]
    for role, key in keys.items():
        if role == "proxy_admin":
            continue
        for path, body in writes:
            assert_error(post(client, path, body, bearer(key)), 403)
        for path, query in (("/customer/info", {"end_user_id": "c1"}), ("/customer/list", {})):
            response = client.get(path, query_string=query, headers=bearer(key))
            if role == "proxy_admin_viewer":
                assert response.status_code == 200, response.get_json()
            else:
                assert_error(response, 403)
    with app.extensions["llmauth"].store.use():
        row = Customer.get(Customer.user_id == "c1")
        assert (row.max_budget, row.blocked) == (None, False)
        assert Customer.select().count() == 1
    # a proxy_admin user key may manage them
    assert ok(post(client, "/customer/update", {"user_id": "c1", "alias": "x"},
                   bearer(keys["proxy_admin"])))["alias"] == "x"


@SQLITE_ONLY
@pytest.mark.parametrize("path,body,param", [
    ("/customer/new", {}, "user_id"),
    ("/customer/new", {"user_id": ""}, "user_id"),
    ("/customer/new", {"user_id": "x" * 256}, "user_id"),
    ("/customer/new", {"user_id": 7}, "user_id"),
    ("/customer/new", {"user_id": "a", "max_budget": -1}, "max_budget"),
    ("/customer/new", {"user_id": "a", "max_budget": "lots"}, "max_budget"),
    ("/customer/new", {"user_id": "a", "budget_duration": "forever"}, "budget_duration"),
    ("/customer/new", {"user_id": "a", "allowed_model_region": "mars"}, "allowed_model_region"),
    ("/customer/new", {"user_id": "a", "rpm_limit": -5}, "rpm_limit"),
    ("/customer/new", {"user_id": "a", "budget_id": "free_tier"}, "budget_id"),
    ("/customer/new", {"user_id": "a", "object_permission": {}}, "object_permission"),
    ("/customer/new", {"user_id": "a", "blocked": None}, "blocked"),
    ("/customer/new", {"user_id": "a", "metadata": [1]}, "metadata"),
    ("/customer/update", {"max_budget": 1}, "user_id"),
    ("/customer/delete", {"user_ids": []}, "user_ids"),
    ("/customer/delete", {"user_ids": "a"}, "user_ids"),
    ("/customer/block", {}, "user_ids"),
    ("/customer/unblock", {"user_ids": [3]}, "user_ids"),
])
def test_bad_input_is_a_400_naming_the_field(app: Any, client: Any, path: str, body: Any,
                                             param: str) -> None:
    error = assert_error(post(client, path, body), 400)
    assert error["param"] == param, error
    with app.extensions["llmauth"].store.use():
        assert Customer.select().count() == 0


@SQLITE_ONLY
def test_bad_queries_and_bodies(client: Any) -> None:
    assert_error(client.get("/customer/info", headers=ADMIN), 400)
    assert_error(client.get("/customer/info", query_string={"end_user_id": "ghost"},
                            headers=ADMIN), 404)
    assert_error(client.get("/customer/list", query_string={"page": "0"}, headers=ADMIN), 400)
    assert_error(client.get("/customer/list", query_string={"page_size": "x"},
                            headers=ADMIN), 400)
    assert_error(client.post("/customer/new", data="[1]", headers=ADMIN,
                             content_type="application/json"), 400)
    assert_error(client.post("/customer/new", data="{", headers=ADMIN,
                             content_type="application/json"), 400)
    assert_error(post(client, "/customer/update", {"user_id": "ghost", "alias": "x"}), 404)


# -- the guard -------------------------------------------------------------------------------------


def test_blocked_end_user_is_refused_by_body_field_and_headers(client: Any) -> None:
    key = new_key(client)["key"]
    ok(post(client, "/customer/block", {"user_ids": ["bad-user"]}))
    for body, headers, param in (
            ({"user": "bad-user"}, {}, "user"),
            ({"metadata": {"user_id": "bad-user"}}, {}, "metadata.user_id"),
            ({"litellm_metadata": {"user": "bad-user"}}, {}, "litellm_metadata.user"),
            ({"safety_identifier": "bad-user"}, {}, "safety_identifier"),
            ({}, {"x-litellm-customer-id": "bad-user"}, "x-litellm-customer-id"),
            ({}, {"X-LiteLLM-End-User-Id": "bad-user"}, "x-litellm-end-user-id"),
            ({"user": "someone-else"}, {"x-litellm-customer-id": "bad-user"},
             "x-litellm-customer-id")):
        error = assert_error(chat(client, key, headers, **body), 403, "permission_error")
        assert "bad-user" in error["message"] and "/customer/unblock" in error["message"]
        assert error["param"] == param, (body, headers, error)
    # others pass; the header wins over the body
    assert chat(client, key, user="good-user").status_code == 200
    assert chat(client, key, {"x-litellm-customer-id": "good-user"},
                user="bad-user").status_code == 200
    assert chat(client, key).status_code == 200  # no end user at all
    # unblocking takes effect at once (the cached row is dropped)
    ok(post(client, "/customer/unblock", {"user_ids": ["bad-user"]}))
    assert chat(client, key, user="bad-user").status_code == 200
    # and blocking again too
    ok(post(client, "/customer/update", {"user_id": "bad-user", "blocked": True}))
    assert_error(chat(client, key, user="bad-user"), 403)


def test_blocked_end_user_in_a_body_sent_without_a_json_content_type(client: Any) -> None:
    """The model check reads the body as JSON whatever its Content-Type (as LiteLLM does),
    so the end user is read from the same parse: a client cannot slip a blocked end user
    past the check by labelling the body text/plain."""
    import json

    key = new_key(client)["key"]
    ok(post(client, "/customer/block", {"user_ids": ["bad-user"]}))
    for content_type in ("text/plain", "application/octet-stream", None):
        headers = {**bearer(key), **({"Content-Type": content_type} if content_type else {})}
        response = client.post(CHAT, data=json.dumps({"model": "gpt-4o", "user": "bad-user"}),
                               headers=headers)
        assert_error(response, 403, "permission_error")
        good = client.post(CHAT, data=json.dumps({"model": "gpt-4o", "user": "good-user"}),
                           headers=headers)
        assert good.status_code == 200, (content_type, good.get_data())


def test_configured_headers_name_the_end_user(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_USER_HEADER_MAPPINGS": [
        {"header_name": "x-openwebui-user-id", "litellm_user_role": "internal_user"},
        {"header_name": "X-OpenWebUI-User-Email", "litellm_user_role": "customer"}],
        "LLMAUTH_USER_HEADER_NAME": "x-legacy-end-user"})
    client = app.test_client()
    key = new_key(client)["key"]
    ok(post(client, "/customer/block", {"user_ids": ["eve@example.com", "legacy"]}))
    error = assert_error(chat(client, key, {"x-openwebui-user-email": "eve@example.com"}), 403)
    assert error["param"] == "x-openwebui-user-email"
    error = assert_error(chat(client, key, {"x-legacy-end-user": "legacy"}), 403)
    assert error["param"] == "x-legacy-end-user"
    # an internal_user mapping never names the end user (nor the caller)
    assert chat(client, key, {"x-openwebui-user-id": "eve@example.com"}).status_code == 200
    # the mapped header comes before the body
    assert_error(chat(client, key, {"x-openwebui-user-email": "eve@example.com"},
                      user="fine"), 403)


def test_blocked_end_user_is_refused_when_only_the_end_user_could_matter(
        app_factory: Any) -> None:
    """With spend tracking off, nothing guards a master-key request unless it names an
    end user: the hook drops that plan when the request names none (no end-user header,
    no end-user field in a JSON object body). Every way of naming one still reaches the
    guard, an empty header names none, and a configured header counts too."""
    app = app_factory(config={"LLMAUTH_SPEND_ENABLED": False,
                              "LLMAUTH_USER_HEADER_NAME": "x-legacy-end-user"})
    client = app.test_client()
    ok(post(client, "/customer/block", {"user_ids": ["bad-user"]}))
    assert chat(client, MASTER_KEY).status_code == 200
    verdicts = [v for v in app.extensions["llmauth"]._verdicts.values()
                if v.principal.is_master_key and v.info.route == CHAT]
    assert verdicts and all(v.plan is not None and v.only_for_end_user for v in verdicts)
    for body, headers in (
            ({"user": "bad-user"}, {}),
            ({"metadata": {"user_id": "bad-user"}}, {}),
            ({"litellm_metadata": {"user": "bad-user"}}, {}),
            ({"safety_identifier": "bad-user"}, {}),
            ({}, {"x-litellm-customer-id": "bad-user"}),
            ({}, {"X-LiteLLM-End-User-Id": "bad-user"}),
            ({}, {"x-legacy-end-user": "bad-user"}),
            ({"user": "bad-user"}, {"x-litellm-customer-id": ""})):
        assert_error(chat(client, MASTER_KEY, headers, **body), 403, "permission_error")
    for body, headers in (({"user": "good-user"}, {}), ({}, {"x-litellm-customer-id": ""}),
                          ({"messages": [{"role": "user", "content": "bad-user"}]}, {})):
        assert chat(client, MASTER_KEY, headers, **body).status_code == 200, (body, headers)


@SQLITE_ONLY
def test_malformed_end_user_is_a_400(client: Any) -> None:
    key = new_key(client)["key"]
    for body in ({"user": 5}, {"user": ["a"]}, {"user": "x" * 256}, {"user": "a\nb"},
                 {"metadata": {"user_id": {"id": 1}}}):
        error = assert_error(chat(client, key, **body), 400)
        assert error["param"] in ("user", "metadata.user_id")
    assert chat(client, key, user="").status_code == 200  # empty: names no end user


def test_end_user_from_body_order() -> None:
    assert end_user_from_body({"user": "a", "metadata": {"user_id": "b"}}) == "a"
    assert end_user_from_body({"litellm_metadata": {"user": "c"},
                               "metadata": {"user_id": "b"}}) == "c"
    assert end_user_from_body({"metadata": {"user_id": "b"}, "safety_identifier": "d"}) == "b"
    assert end_user_from_body({"safety_identifier": "d"}) == "d"
    assert end_user_field_of_body({"safety_identifier": "d"}) == ("d", "safety_identifier")
    assert end_user_field_of_body({"user": "", "metadata": {"user_id": "b"}}) == (
        "b", "metadata.user_id")
    assert end_user_field_of_body({"safety_identifier": ""}) is None
    assert end_user_from_body({"metadata": "x"}) is None
    assert end_user_from_body(["user"]) is None and end_user_from_body(None) is None
    with pytest.raises(BadRequest):
        end_user_from_body({"user": 1})


@SQLITE_ONLY
def test_principal_end_user_wins_over_the_request(app: Any, client: Any) -> None:
    """An end user asserted by the credential (a JWT claim...) beats headers and body."""
    ok(post(client, "/customer/block", {"user_ids": ["claimed"]}))
    state = app.extensions["llmauth"]
    principal = Principal(method="jwt", role=Role.INTERNAL_USER, user_id="u",
                          end_user_id="claimed")
    with app.test_request_context(CHAT, method="POST", json={"user": "other"},
                                  headers={"x-litellm-customer-id": "other"}):
        with pytest.raises(Exception) as info:
            state.customers.resolve(principal, {"HTTP_X_LITELLM_CUSTOMER_ID": "other"},
                                    lambda: {"user": "other"})
        assert getattr(info.value, "status", None) == 403
        unblocked = Principal(method="jwt", role=Role.INTERNAL_USER, end_user_id="fine")
        assert state.customers.resolve(unblocked, {}, lambda: {"user": "claimed"}) == (
            "fine", None)


def _admission_probe(app: Any) -> None:
    @app.post("/v1/completions")
    def probe() -> Any:
        admission = current_admission()
        if admission is None:
            return jsonify(admission=None)
        customer = admission.customer
        return jsonify(admission=True, end_user_id=admission.end_user_id,
                       customer=None if customer is None else customer.user_id,
                       max_budget=None if customer is None else customer.max_budget)


def test_end_user_limits_reach_the_rate_limit_guard(app_factory: Any, db_url: str) -> None:
    # Spend tracking off: it wants every LLM request, and this test looks for requests
    # no guard wants.
    app = app_factory(db_url=db_url, config={"LLMAUTH_SPEND_ENABLED": False})
    client = app.test_client()
    _admission_probe(app)
    key = new_key(client)["key"]  # a key without limits of its own
    ok(post(client, "/customer/new", {"user_id": "limited", "rpm_limit": 2,
                                      "max_budget": 1.5}))

    def call(user: str | None) -> Any:
        body = {"model": "gpt-4o", **({"user": user} if user else {})}
        return client.post("/v1/completions", json=body, headers=bearer(key))

    # nothing applies: no admission at all (no guard runs for the request)
    assert ok(call(None)) == {"admission": None}
    assert ok(call("row-less")) == {"admission": None}
    # the customer's limit makes the rate-limit guard admit, with the row on the admission
    first = ok(call("limited"))
    assert first == {"admission": True, "end_user_id": "limited", "customer": "limited",
                     "max_budget": 1_500_000_000}
    assert call("limited").status_code == 200
    error = assert_error(call("limited"), 429, "rate_limit_error")
    assert "limited" in error["message"] or error["message"]
    assert call("row-less").status_code == 200  # other end users are not affected
    # the master key is exempt from limits
    response = client.post("/v1/completions", json={"model": "gpt-4o", "user": "limited"},
                           headers=ADMIN)
    assert response.status_code == 200


def test_end_user_is_on_the_admission_when_another_guard_runs(app_factory: Any,
                                                              db_url: str) -> None:
    app = app_factory(db_url=db_url, config={"LLMAUTH_RATELIMIT_GLOBAL_RPM": 1000})
    _admission_probe(app)
    client = app.test_client()
    key = new_key(client)["key"]
    body = {"model": "gpt-4o", "user": "row-less"}
    assert ok(client.post("/v1/completions", json=body, headers=bearer(key))) == {
        "admission": True, "end_user_id": "row-less", "customer": None, "max_budget": None}
    assert ok(client.post("/v1/completions", json={"model": "gpt-4o"},
                          headers=bearer(key)))["end_user_id"] is None


def test_rows_are_cached_and_dropped_in_every_process(app_factory: Any, db_url: str) -> None:
    """Two apps on one database stand for two processes: a change made through one is
    seen by the other after its invalidation-log poll."""
    one = app_factory(db_url=db_url)
    two = app_factory(db_url=db_url)
    c1, c2 = one.test_client(), two.test_client()
    key = new_key(c1)["key"]
    ok(post(c1, "/customer/new", {"user_id": "shared"}))
    assert chat(c2, key, user="shared").status_code == 200  # cached in app two
    guard = two.extensions["llmauth"].customers
    cached = guard.lookup("shared")
    assert guard.lookup("shared") is cached  # a cache hit: the same record object
    ok(post(c1, "/customer/block", {"user_ids": ["shared"]}))
    with one.extensions["llmauth"].store.use():
        assert CacheEvent.select().where(CacheEvent.tag == "customer:shared").exists()
    two.extensions["llmauth"].invalidation_log.poll()
    assert_error(chat(c2, key, user="shared"), 403)
    # absence is cached too, and dropped when the row is created
    assert guard.lookup("later") is None
    ok(post(c1, "/customer/block", {"user_ids": ["later"]}))
    two.extensions["llmauth"].invalidation_log.poll()
    assert guard.lookup("later") is not None and guard.lookup("later").blocked


@SQLITE_ONLY
def test_a_cache_hit_does_not_touch_the_database(app: Any, client: Any) -> None:
    key = new_key(client)["key"]
    ok(post(client, "/customer/new", {"user_id": "warm"}))
    assert chat(client, key, user="warm").status_code == 200
    state = app.extensions["llmauth"]
    queries: list[str] = []
    original = state.store.db.execute_sql

    def counting(sql: str, *args: Any, **kwargs: Any) -> Any:
        queries.append(sql)
        return original(sql, *args, **kwargs)

    state.store.db.execute_sql = counting  # type: ignore[method-assign]
    try:
        assert state.customers.lookup("warm") is not None
        assert chat(client, key, user="warm").status_code == 200
    finally:
        del state.store.db.execute_sql
    assert not any("llmauth_customer" in q for q in queries), queries


def test_default_end_user_budget(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_MAX_END_USER_BUDGET": 0.25})
    settings = app.extensions["llmauth"].settings
    assert settings.max_end_user_budget == 250_000_000
    client = app.test_client()
    ok(post(client, "/customer/new", {"user_id": "own", "max_budget": 3}))
    ok(post(client, "/customer/new", {"user_id": "none"}))
    guard = app.extensions["llmauth"].customers
    assert end_user_budget(guard.lookup("own"), settings) == 3_000_000_000
    assert end_user_budget(guard.lookup("none"), settings) == 250_000_000
    assert end_user_budget(None, settings) == 250_000_000
    plain = app_factory().extensions["llmauth"].settings
    assert end_user_budget(None, plain) is None


def test_null_metadata_clears_it(client: Any) -> None:
    ok(post(client, "/customer/new", {"user_id": "m", "metadata": {"a": 1}}))
    assert ok(post(client, "/customer/update", {"user_id": "m", "metadata": None}))[
        "metadata"] == {}


def test_a_concurrent_insert_is_a_409_not_a_500(app: Any) -> None:
    """The existence check and the insert race with another process's insert: the unique
    index decides, and the loser gets a 409 inside a transaction that stays usable."""
    from flask_llmauth.customers import _insert
    from flask_llmauth.durations import utcnow
    from flask_llmauth.errors import Conflict

    state = app.extensions["llmauth"]
    with state.store.use() as db, db.atomic():
        Customer.create(user_id="dup", created_at=utcnow(), updated_at=utcnow())
        with pytest.raises(Conflict) as info:
            _insert(Customer(user_id="dup", created_at=utcnow(), updated_at=utcnow()))
        assert info.value.status == 409
        assert Customer.select().where(Customer.user_id == "dup").count() == 1


def test_enforce_user_param_requires_the_body_user_on_llm_posts(
        app_factory: Any, tmp_path: Any) -> None:
    """LiteLLM's ``general_settings.enforce_user_param``: every POST to an LLM route must
    name its end user in the body's ``user`` field (400 otherwise), master key included;
    other routes and safe methods are unaffected."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text("general_settings:\n  enforce_user_param: true\n")
    app = app_factory(config={"LLMAUTH_CONFIG_FILE": str(config_file)})
    client = app.test_client()
    key = new_key(client)["key"]
    for caller in (key, MASTER_KEY):
        for body in ({}, {"user": ""}, {"metadata": {"tags": ["x"]}}):
            error = assert_error(chat(client, caller, **body), 400, "invalid_request_error")
            assert error["param"] == "user"
            assert "enforce_user_param" in error["message"]
        assert_error(chat(client, caller, user=7), 400)
        assert chat(client, caller, user="end-user-1").status_code == 200
        # the other body fields LiteLLM reads the end user from (the Anthropic SDK's)
        assert chat(client, caller, metadata={"user_id": "end-user-1"}).status_code == 200
    # a JSON body that is not an object names no user either
    response = client.post(CHAT, json=["gpt-4o"], headers=bearer(key))
    assert response.status_code == 400
    # a form body (audio transcriptions and the like) carries it as a form field
    form = client.post(CHAT, data={"model": "gpt-4o", "user": "u1"}, headers=bearer(key))
    assert form.status_code == 200
    assert_error(client.post(CHAT, data={"model": "gpt-4o"}, headers=bearer(key)), 400)
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.get("/key/info", headers=bearer(key)).status_code == 200
    # off by default
    plain = app_factory()
    plain_key = new_key(plain.test_client())["key"]
    assert chat(plain.test_client(), plain_key).status_code == 200


def test_enforce_user_param_leaves_other_methods_of_llm_routes_alone(
        app_factory: Any, tmp_path: Any) -> None:
    """Only a POST must name its end user (LiteLLM's rule): a ``DELETE /v1/files/{id}`` has
    no body to carry ``user``, and refusing it would make such routes unusable."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text("general_settings:\n  enforce_user_param: true\n")
    app = app_factory(config={"LLMAUTH_CONFIG_FILE": str(config_file)})

    @app.route("/v1/files/<file_id>", methods=["DELETE", "POST"])
    def file(file_id: str) -> Any:
        return {"id": file_id, "deleted": True}

    client = app.test_client()
    key = new_key(client)["key"]
    assert client.delete("/v1/files/file-1", headers=bearer(key)).status_code == 200
    refused = client.post("/v1/files/file-1", json={"model": "gpt-4o"}, headers=bearer(key))
    assert assert_error(refused, 400)["param"] == "user"
