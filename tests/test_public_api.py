"""The public Python API as a typed host app sees it."""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from typing import Any

import pytest
from flask import Blueprint, Flask, Response

from flask_llmauth import (
    ConfigurationError,
    LLMAuth,
    current_admission,
    current_principal,
    get_principal,
    guards,
    record_usage,
    require_scope,
)
from tests.conftest import migrated_sqlite_url
from tests.helpers import ADMIN, MASTER_KEY


@pytest.mark.parametrize("scopes", [(), ("",), (["a", "b"],)])
def test_require_scope_refuses_a_check_that_checks_nothing(scopes: tuple[Any, ...]) -> None:
    """``@require_scope()`` (or a list passed as one scope) would let every caller through
    or none; like ``@require_role()`` it fails where it is written."""
    with pytest.raises(ValueError, match="at least one scope|not a list"):
        require_scope(*scopes)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="typing.get_overloads is 3.11+")
def test_exempt_returns_what_it_was_given_to_a_type_checker() -> None:
    """``@app.get(...)`` over ``@llmauth.exempt`` type-checks: a view comes back as the same
    callable and a blueprint as the same blueprint (one ``F | Blueprint`` return type was
    refused by mypy as a route's view)."""
    shapes = []
    for overload in typing.get_overloads(LLMAuth.exempt):
        hints = typing.get_type_hints(overload)
        assert hints["view"] is hints["return"]
        shapes.append(hints["return"].__bound__)
    assert sorted(map(repr, shapes)) == sorted(map(repr, [Blueprint, Callable[..., Any]]))


def test_outside_an_app_context_there_is_no_principal_and_nothing_to_record() -> None:
    """What the docstrings say: ``None``/falsy and a no-op outside a request — also in a
    thread of the host's own with no app context (Flask's ``RuntimeError`` before)."""
    assert get_principal() is None
    assert not current_principal
    assert current_admission() is None
    with pytest.raises(ValueError):
        record_usage(-1)


def test_on_a_public_route_current_principal_stands_for_none(app_factory: Any) -> None:
    """docs/extension.md: falsy, and its attributes are ``None``'s (an AttributeError), so
    shared code tests it first or uses ``get_principal()``."""
    app = app_factory()

    @app.get("/open")
    @app.llmauth.exempt
    def open_view() -> Any:
        with pytest.raises(AttributeError):
            current_principal.user_id  # noqa: B018
        user = current_principal.user_id if current_principal else "anonymous"
        return {"user": user, "principal": get_principal()}

    response = app.test_client().get("/open", headers=ADMIN)
    assert response.get_json() == {"user": "anonymous", "principal": None}


def test_record_usage_in_a_stream_without_its_context_is_not_lost_silently(
        app_factory: Any, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A generator streamed without ``stream_with_context`` runs outside the app context:
    ``record_usage`` there cannot reach the request; it does not break the stream and says
    so in the log (once)."""
    monkeypatch.setattr(guards, "_warned_no_context", [])
    app = app_factory()

    @app.post("/v1/completions")
    def completions() -> Any:
        def events() -> Any:
            yield 'data: {"choices": [{"text": "hi"}]}\n\n'
            record_usage(100, 50, model="gpt-4o")
            yield "data: [DONE]\n\n"
        return Response(events(), mimetype="text/event-stream")

    client = app.test_client()
    for _ in range(2):
        response = client.post("/v1/completions", json={"model": "gpt-4o", "prompt": "x"},
                               headers=ADMIN)
        assert response.get_data(as_text=True).endswith("data: [DONE]\n\n")
    assert caplog.text.count("record_usage() called outside an app context") == 1


def test_a_second_init_app_on_one_app_fails_clearly(tmp_path: Any) -> None:
    """``LLMAuth(app)`` and then ``init_app(app)`` again (or two extensions): a message
    saying so, before a second database pool and hook are set up (Flask's "blueprint name
    already registered" error before, or with the API off a second hook run per request)."""
    for api_enabled in (True, False):
        app = Flask("twice", instance_path=str(tmp_path / "instance"))
        app.config.update(LLMAUTH_MASTER_KEY=MASTER_KEY, LLMAUTH_API_ENABLED=api_enabled,
                          LLMAUTH_DATABASE_URL=migrated_sqlite_url(tmp_path))
        llmauth = LLMAuth(app)
        hooks = list(app.before_request_funcs[None])
        for again in (llmauth, LLMAuth()):
            with pytest.raises(ConfigurationError, match="already initialised on app 'twice'"):
                again.init_app(app)
        assert app.before_request_funcs[None] == hooks
        app.extensions["llmauth"].close()
