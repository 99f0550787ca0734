"""``@llmauth.error_handler``: the host's callback answers every auth error, and a callback
that returns nothing or crashes never lets a refused request through to the view."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, abort, redirect

from flask_llmauth import LLMAuthError
from tests.helpers import ADMIN, assert_error, bearer, new_key, random_key

CHAT = "/v1/chat/completions"


def refused_requests(app: Flask) -> list[tuple[str, Any]]:
    """One refusal per place an error is answered: the request hook (no key, unknown key,
    a model the key may not call) and a view's decorator (``@require_role``)."""
    client = app.test_client()
    key = new_key(client, models=["gpt-4o"])["key"]
    return [
        ("no key", lambda: client.post(CHAT, json={"model": "gpt-4o"})),
        ("unknown key", lambda: client.post(CHAT, json={"model": "gpt-4o"},
                                            headers=bearer(random_key()))),
        ("model denied", lambda: client.post(CHAT, json={"model": "o3"}, headers=bearer(key))),
        ("role missing", lambda: client.get("/custom/admin", headers=bearer(key))),
    ]


def test_the_callback_answers_every_auth_error(app_factory: Any) -> None:
    app = app_factory()

    @app.llmauth.error_handler
    def answer(error: LLMAuthError) -> Any:
        return {"failed": error.error_type}, error.status, {"X-Acme": "1"}

    for name, call in refused_requests(app):
        response = call()
        assert response.status_code in (401, 403), name
        assert response.headers["X-Acme"] == "1", name
        assert set(response.get_json()) == {"failed"}, name


@pytest.mark.parametrize("failure", ["returns None", "raises"])
def test_a_broken_callback_never_lets_a_refused_request_through(
        app_factory: Any, caplog: Any, failure: str) -> None:
    app = app_factory()
    served: list[str] = []

    @app.before_request
    def count() -> None:  # runs after the extension's hook, so only for admitted requests
        served.append("view")

    @app.llmauth.error_handler
    def broken(error: LLMAuthError) -> Any:
        if failure == "raises":
            raise RuntimeError("the callback's own bug")
        return None

    for name, call in refused_requests(app):
        served.clear()
        response = call()
        assert response.status_code in (401, 403), (name, response.get_data(as_text=True))
        assert_error(response, response.status_code)
        if name != "role missing":  # the decorator refuses inside the view
            assert served == [], name
    assert "the error_handler callback" in caplog.text
    assert "the callback's own bug" not in caplog.text  # its type only, as for hooks


@pytest.mark.parametrize("answer", [
    lambda error: {"failed": error.error_type},  # Flask makes a bare dict a 200
    lambda error: ("plain " + error.message, 200, {"X-Acme": "1"}),
    lambda error: ({"failed": error.error_type}, 204),
])
def test_a_callback_that_answers_with_a_success_status_still_refuses(
        app_factory: Any, caplog: Any, answer: Any) -> None:
    app = app_factory()
    app.llmauth.error_handler(answer)
    for name, call in refused_requests(app):
        response = call()
        assert response.status_code in (401, 403), (name, response.status_code)
        assert response.get_data(as_text=True), name  # the callback's body is kept
    assert "the error_handler callback answered a 401 refusal with 2" in caplog.text


def test_a_callback_may_redirect(app_factory: Any) -> None:
    """A browser app may send refused callers to its login page: a 3xx is left alone."""
    app = app_factory()
    app.llmauth.error_handler(lambda error: redirect("/login"))
    response = app.test_client().post(CHAT, json={"model": "gpt-4o"})
    assert (response.status_code, response.headers["Location"]) == (302, "/login")


def test_a_broken_callback_on_a_deployment_gate_refuses(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_ALLOWED_IPS": ["10.0.0.0/8"]})
    app.llmauth.error_handler(lambda error: None)
    response = app.test_client().get("/public/ping", headers=ADMIN)
    assert_error(response, 403)


def test_a_callback_may_abort_with_the_status(app_factory: Any) -> None:
    app = app_factory()

    @app.llmauth.error_handler
    def plain(error: LLMAuthError) -> Any:
        abort(error.status)

    response = app.test_client().post(CHAT, json={"model": "gpt-4o"})
    assert response.status_code == 401


def test_the_management_apis_http_errors_go_through_the_callback(app_factory: Any) -> None:
    """A body over LLMAUTH_MAX_API_BODY_SIZE is a 413 raised inside the endpoint: answered
    by the host's callback like the API's other errors, not by a fixed envelope."""
    app = app_factory({"LLMAUTH_MAX_API_BODY_SIZE": 1024})

    @app.llmauth.error_handler
    def answer(error: LLMAuthError) -> Any:
        return {"failed": error.status}, error.status

    client = app.test_client()
    response = client.post("/key/generate", json={"metadata": {"x": "a" * 2048}}, headers=ADMIN)
    assert (response.status_code, response.get_json()) == (413, {"failed": 413})
    app.llmauth.error_handler(lambda error: None)  # and a broken one still answers
    assert_error(client.post("/key/generate", json={"metadata": {"x": "a" * 2048}},
                             headers=ADMIN), 413)


@pytest.mark.parametrize("prefix", ["", "/llm-admin"])
def test_a_wrong_method_on_the_management_api_is_a_json_405(app_factory: Any,
                                                             prefix: str) -> None:
    """``GET /key/generate`` is the JSON envelope with ``Allow`` (Flask's HTML page
    before), through the host's callback; the host's own routes keep Flask's 405."""
    app = app_factory({"LLMAUTH_API_PREFIX": prefix} if prefix else {})
    client = app.test_client()
    for method in ("GET", "PUT", "DELETE"):
        response = client.open(f"{prefix}/key/generate", method=method, headers=ADMIN)
        error = assert_error(response, 405)
        assert "not allowed" in error["message"]
        assert "POST" in response.headers["Allow"]
    assert_error(client.post(f"{prefix}/key/info", headers=ADMIN), 405)
    host = client.get(CHAT)  # a host route (POST only): Flask's answer, untouched
    assert host.status_code == 405 and host.mimetype == "text/html"
    assert client.get(f"{prefix}/key/nowhere").status_code == 404

    @app.llmauth.error_handler
    def answer(error: LLMAuthError) -> Any:
        return {"failed": error.status}, error.status, error.headers

    response = client.get(f"{prefix}/key/generate")
    assert response.get_json() == {"failed": 405} and "POST" in response.headers["Allow"]
