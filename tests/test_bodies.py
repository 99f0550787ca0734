"""The request-body readers the policy and the guards share."""

from __future__ import annotations

from flask import Flask

from flask_llmauth.bodies import INVALID, JSONBody, known_body


def test_a_known_body_answers_what_a_json_body_of_it_answers() -> None:
    app = Flask(__name__)
    body = {"model": "gpt-4o", "user": "alice"}
    with app.test_request_context(json=body) as ctx:
        lazy = JSONBody(ctx.request)
        known = known_body(lazy.parsed())
        assert known() == lazy() == body
        assert known() is known() is lazy.value  # the same object, every call
        assert JSONBody(ctx.request, body, read=True)() is body


def test_a_json_body_answers_none_for_an_invalid_body() -> None:
    app = Flask(__name__)
    with app.test_request_context(data=b"{not json", content_type="application/json") as ctx:
        lazy = JSONBody(ctx.request)
        assert lazy.parsed() is INVALID and lazy() is None
