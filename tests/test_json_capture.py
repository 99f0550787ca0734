"""A guarded request's usage read from the object Flask's JSON provider wrote, never from a
body that is not that object's text (guards.capture_json_responses)."""

from __future__ import annotations

import decimal
import json
import random
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, after_this_request, g, jsonify
from flask.json.provider import DefaultJSONProvider

from flask_llmauth import LLMAuth, Usage
from flask_llmauth import guards as guards_module
from flask_llmauth.usage import UNDECIDED, usage_from_json, usage_from_object
from tests.conftest import migrated_sqlite_url
from tests.helpers import ADMIN, MASTER_KEY
from tests.test_guards import RecordingGuard

ANSWER = {"model": "gpt-4o-mini", "choices": [],
          "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
OTHER = {"model": "other-model", "choices": [],
         "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}}
READ_ANSWER = Usage(11, 7, "gpt-4o-mini")
READ_OTHER = Usage(100, 50, "other-model")


class _Parses:
    """Counts the body parses ``Guards.finish`` makes."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, data: bytes, model: str | None = None) -> Usage | None:
        self.count += 1
        return usage_from_json(data, model)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> _Parses:
    counter = _Parses()
    monkeypatch.setattr(guards_module, "usage_from_json", counter)
    return counter


@pytest.fixture
def make_app(tmp_path: Any) -> Iterator[Any]:
    """``make_app(before=None, provider=None, response_class=None)`` → (app, guard): an app
    whose ``before`` hook runs before the extension's (its ``after_this_request``
    functions run before the guards' finish), with ``/v1/completions`` to define."""
    states = []

    def make(before: Any = None, provider: Any = None, response_class: Any = None) -> Any:
        app = Flask(f"capture_{len(states)}", instance_path=str(tmp_path / "instance"))
        app.config.update({"TESTING": True, "LLMAUTH_MASTER_KEY": MASTER_KEY,
                           "LLMAUTH_DATABASE_URL": migrated_sqlite_url(tmp_path)})
        if provider is not None:
            app.json_provider_class = provider
            app.json = provider(app)
        if response_class is not None:
            app.response_class = response_class
        if before is not None:
            app.before_request(before)
        LLMAuth(app)
        guard = RecordingGuard("a")
        app.extensions["llmauth"].guards.add(guard)
        states.append(app.extensions["llmauth"])
        return app, guard

    yield make
    for state in states:
        state.close()


def _post(app: Flask, path: str = "/v1/completions") -> Any:
    response = app.test_client().post(path, json={"model": "gpt-4o"}, headers=ADMIN)
    assert response.status_code == 200, response.get_data()
    return response


@pytest.mark.parametrize("answer, expected", [
    (lambda: ANSWER, READ_ANSWER),
    (lambda: jsonify(ANSWER), READ_ANSWER),
    (lambda: (ANSWER, 200, {"x-extra": "1"}), READ_ANSWER),
    (lambda: {"model": "claude", "content": [], "usage": {
        "input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 2}},
     Usage(7, 3, "claude")),
    (lambda: {"usage": {"prompt_tokens": 4, "total_tokens": 9}}, Usage(4, 5, "gpt-4o")),
    (lambda: {"data": [], "object": "list"}, None),
    (lambda: {"data": [], "usage": None}, None),
    (lambda: [ANSWER], None),
])
def test_a_written_object_is_read_without_parsing_the_body(
        make_app: Any, parses: _Parses, answer: Any, expected: Usage | None) -> None:
    app, guard = make_app()
    app.post("/v1/completions")(answer)
    body = _post(app).get_data()
    assert guard.settled == [(expected, False)]
    assert usage_from_json(body, "gpt-4o") == expected  # what the body says
    assert parses.count == 0


def test_the_object_is_read_when_written_not_when_the_request_ends(
        make_app: Any, parses: _Parses) -> None:
    """A hook that changes the view's object after it was written leaves the body, and so
    the usage, as written."""
    def before() -> None:
        def change(response: Response) -> Response:
            g.answer["usage"]["completion_tokens"] = 999
            g.answer["model"] = "changed"
            return response

        after_this_request(change)

    app, guard = make_app(before)

    @app.post("/v1/completions")
    def view() -> Any:
        g.answer = json.loads(json.dumps(ANSWER))
        return g.answer

    _post(app)
    assert guard.settled == [(READ_ANSWER, False)] and parses.count == 0


@pytest.mark.parametrize("change, expected", [
    (lambda r: r.set_data(json.dumps(OTHER)), READ_OTHER),  # the body replaced (a new list)
    (lambda r: r.response.__setitem__(0, json.dumps(OTHER).encode()), READ_OTHER),  # its item
    (lambda r: r.response.append(b'{"usage": {}}'), None),  # more text after it: not JSON
])
def test_a_body_changed_before_the_guards_finish_is_parsed(
        make_app: Any, parses: _Parses, change: Any, expected: Usage | None) -> None:
    """An ``after_this_request`` function registered before the extension's hook runs
    before the guards' finish: what it writes is what is charged."""
    def before() -> None:
        def rewrite(response: Response) -> Response:
            change(response)
            return response

        after_this_request(rewrite)

    app, guard = make_app(before)
    app.post("/v1/completions")(lambda: ANSWER)
    body = _post(app).get_data()
    assert guard.settled == [(expected, False)] and parses.count == 1
    assert usage_from_json(body) == expected


def test_another_response_with_the_same_text_is_parsed(make_app: Any, parses: _Parses) -> None:
    """A hook that answers another response object (the same text, a new list) is parsed."""
    def before() -> None:
        after_this_request(lambda r: Response(r.get_data(), mimetype="application/json"))

    app, guard = make_app(before)
    app.post("/v1/completions")(lambda: ANSWER)
    _post(app)
    assert guard.settled == [(READ_ANSWER, False)] and parses.count == 1


def test_a_response_the_view_changed_or_did_not_return_is_parsed(
        make_app: Any, parses: _Parses) -> None:
    app, guard = make_app()

    @app.post("/v1/completions")
    def changed() -> Any:
        response = jsonify(ANSWER)
        response.set_data(json.dumps(OTHER))
        return response

    @app.post("/v1/chat/completions")
    def decoy() -> Any:
        jsonify(ANSWER)  # written, not returned
        return Response(json.dumps(OTHER), mimetype="application/json")

    @app.post("/v1/embeddings")
    def two() -> Any:
        answer = jsonify(OTHER)
        jsonify(ANSWER)  # written last, not returned
        return answer

    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        _post(app, path)
    assert guard.settled == [(READ_OTHER, False)] * 3 and parses.count == 3


def test_a_written_object_made_into_a_stream_is_read_as_a_stream(make_app: Any) -> None:
    app, guard = make_app()

    @app.post("/v1/completions")
    def view() -> Any:
        response = jsonify(ANSWER)
        response.response = iter([b"data: " + json.dumps(OTHER).encode() + b"\n\n"])
        response.mimetype = "text/event-stream"
        return response

    response = _post(app)
    response.get_data()
    response.close()
    assert guard.settled == [(READ_OTHER, False)]


def test_a_written_object_sent_as_another_media_type_has_no_usage(make_app: Any) -> None:
    def before() -> None:
        def retype(response: Response) -> Response:
            response.mimetype = "text/plain"
            return response

        after_this_request(retype)

    app, guard = make_app(before)
    app.post("/v1/completions")(lambda: ANSWER)
    _post(app)
    assert guard.settled == [(None, False)]


class _Enveloping(DefaultJSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return super().dumps({"data": obj}, **kwargs)


class _EnvelopingResponse(Response):
    def __init__(self, response: Any = None, *args: Any, **kwargs: Any) -> None:
        if isinstance(response, str):
            response = json.dumps({"data": json.loads(response)})
        super().__init__(response, *args, **kwargs)


def _dumps_enveloped(obj: Any, **kwargs: Any) -> str:
    return json.dumps({"data": obj}, **kwargs)


@pytest.mark.parametrize("setup", ["provider", "response_class", "instance dumps",
                                   "class dumps", "instance prepare"])
def test_a_provider_or_response_that_writes_another_text_is_parsed(
        make_app: Any, parses: _Parses, monkeypatch: pytest.MonkeyPatch, setup: str) -> None:
    """The body is not the object's text: the body (no top-level usage) is what counts."""
    app, guard = make_app(provider=_Enveloping if setup == "provider" else None,
                          response_class=_EnvelopingResponse if setup == "response_class"
                          else None)
    if setup == "instance dumps":
        app.json.dumps = _dumps_enveloped  # type: ignore[method-assign]
    elif setup == "class dumps":
        original = DefaultJSONProvider.dumps
        monkeypatch.setattr(DefaultJSONProvider, "dumps", lambda self, obj, **kwargs: original(
            self, {"data": obj}, **kwargs))
    elif setup == "instance prepare":
        app.json._prepare_response_obj = (  # type: ignore[method-assign]
            lambda args, kwargs: {"data": args[0]})
    app.post("/v1/completions")(lambda: ANSWER)
    body = _post(app).get_data()
    assert json.loads(body) == {"data": ANSWER}
    assert guard.settled == [(None, False)] and parses.count == 1


def test_values_the_provider_converts_are_read_from_the_body(
        make_app: Any, parses: _Parses) -> None:
    """A ``Decimal`` count is written as a string (Flask's ``default``): no count."""
    app, guard = make_app()
    app.post("/v1/completions")(lambda: {"model": decimal.Decimal("1"), "usage": {
        "prompt_tokens": decimal.Decimal("11"), "completion_tokens": 7}})
    _post(app)
    assert guard.settled == [(Usage(0, 7, "1"), False)] and parses.count == 1


class _Odd(str):
    """A key that names another member than its text: written as ``usage``."""

    def __hash__(self) -> int:
        return 1

    def __eq__(self, other: object) -> bool:
        return False


class _Count(int):
    pass


def _random_object(rng: random.Random) -> Any:
    def value() -> Any:
        return rng.choice([None, 0, 3, -2, 10**20, 2.5, True, "7", _Count(4), [], {},
                           decimal.Decimal("5"), float("nan")])

    if rng.random() < 0.05:
        return [value()]
    usage: dict[Any, Any] = {}
    for name in rng.sample(["prompt_tokens", "completion_tokens", "total_tokens",
                            "input_tokens", "output_tokens", "cache_read_input_tokens",
                            "cache_creation_input_tokens", "details"], rng.randint(0, 4)):
        usage[name] = value() if rng.random() < 0.4 else rng.randint(0, 50)
    obj: dict[Any, Any] = {"choices": [{"text": "usage", "usage": {"prompt_tokens": 1}}]}
    if rng.random() < 0.8:
        obj["usage"] = rng.choice([usage, usage, usage, None, OrderedDict(usage), 5])
    if rng.random() < 0.7:
        obj["model"] = rng.choice(["m", "m\u00e9\ud800", None, 3, decimal.Decimal("2")])
    if rng.random() < 0.1:
        obj[_Odd("usage")] = {"prompt_tokens": 99}
    if rng.random() < 0.1:
        obj[rng.choice([7, None, _Odd("model")])] = "x"
    if rng.random() < 0.1:
        obj["pad"] = "x" * 1200  # the tail read
    return obj


def test_usage_from_object_answers_what_the_written_text_answers() -> None:
    rng = random.Random(11)
    provider = DefaultJSONProvider(Flask("x"))
    decided = 0
    for _ in range(3000):
        obj = _random_object(rng)
        read = usage_from_object(obj, "asked")
        if read is UNDECIDED:
            continue
        decided += 1
        for options in ({}, {"sort_keys": False}, {"indent": 2}, {"ensure_ascii": False}):
            try:
                text = provider.dumps(obj, **{"sort_keys": False, **options}
                                      if any(type(k) is not str for k in obj)
                                      else options)
            except (TypeError, UnicodeEncodeError):
                continue
            data = text.encode("utf-8", "surrogatepass") + b"\n"
            assert read == usage_from_json(data, "asked"), (obj, options)
    assert decided > 1000


@pytest.mark.parametrize("obj", [
    OrderedDict(ANSWER), {**ANSWER, _Odd("usage"): {}}, {1: 2, "usage": {}},
    {"usage": OrderedDict()}, {"usage": {"prompt_tokens": True}}, {"usage": {_Odd("x"): 1}},
    {"usage": {}, "model": _Odd("m")}, {"usage": {"prompt_tokens": 2.0}}, "text",
])
def test_usage_from_object_leaves_what_it_cannot_tell_to_the_text(obj: Any) -> None:
    assert usage_from_object(obj) is UNDECIDED


def test_the_provider_still_answers_outside_a_request(make_app: Any) -> None:
    """``app.json.response`` called outside any context, or in an app context without a
    guarded request, answers as Flask's does (and the latter takes the watch away)."""
    app, guard = make_app()
    assert "response" not in vars(app.json)  # no admission yet: not watched
    app.extensions["llmauth"].guards.arm_json_watch()
    assert "response" in vars(app.json)  # watched
    outside = app.json.response(ANSWER)
    assert json.loads(outside.get_data()) == ANSWER
    assert "response" in vars(app.json)
    with app.app_context():
        assert json.loads(app.json.response(ANSWER).get_data()) == ANSWER
        assert "response" not in vars(app.json)
        assert json.loads(jsonify(ANSWER).get_data()) == ANSWER
    assert guard.settled == []


def test_the_watch_is_in_place_from_an_admission_to_a_response_without_one(
        make_app: Any, parses: _Parses) -> None:
    """Requests without guards write their JSON unwatched; a guarded request puts the
    watch back in place and its usage is still read from the object."""
    app, guard = make_app()
    app.post("/v1/completions")(lambda: ANSWER)
    client = app.test_client()
    assert client.get("/key/list", headers=ADMIN).status_code == 200  # no admission
    assert "response" not in vars(app.json)
    for _ in range(2):
        _post(app)
        assert "response" in vars(app.json)
        assert client.get("/key/list", headers=ADMIN).status_code == 200
        assert "response" not in vars(app.json)
    assert guard.settled == [(READ_ANSWER, False)] * 2
    assert parses.count == 0


def test_a_provider_with_its_own_response_is_not_watched(tmp_path: Any,
                                                         parses: _Parses) -> None:
    """A host that set ``response`` on its provider instance keeps it: nothing replaces
    it, and the usage is read from the body."""
    app = Flask("own_response", instance_path=str(tmp_path / "instance"))
    app.config.update({"TESTING": True, "LLMAUTH_MASTER_KEY": MASTER_KEY,
                       "LLMAUTH_DATABASE_URL": migrated_sqlite_url(tmp_path)})
    calls = []
    original = app.json.response

    def own(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    app.json.response = own  # type: ignore[method-assign]
    LLMAuth(app)
    state = app.extensions["llmauth"]
    try:
        guard = RecordingGuard("a")
        state.guards.add(guard)
        assert state.guards.arm_json_watch is None
        app.post("/v1/completions")(lambda: ANSWER)
        _post(app)
        assert app.json.response is own and len(calls) == 1
        assert guard.settled == [(READ_ANSWER, False)]
        assert parses.count == 1
    finally:
        state.close()


@pytest.mark.parametrize("args, kwargs, expected", [
    ((), {}, None), ((ANSWER,), {}, ANSWER), ((1, 2), {}, [1, 2]),
    ((), {"a": 1}, {"a": 1}), ((ANSWER, 3), {}, [ANSWER, 3]),
])
def test_the_watched_provider_answers_any_arguments_as_flask_does(
        make_app: Any, args: Any, kwargs: Any, expected: Any) -> None:
    app, _ = make_app()
    with app.test_request_context("/"):
        assert json.loads(app.json.response(*args, **kwargs).get_data()) == expected
        assert json.loads(jsonify(*args, **kwargs).get_data()) == expected
