"""The guard lifecycle: admit before the view, settle exactly once when the response ends."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest
from flask import Response, jsonify, stream_with_context

from flask_llmauth import Usage, record_usage
from flask_llmauth.errors import TooManyRequests
from flask_llmauth.guards import Admission
from flask_llmauth.usage import MEDIA_TOKENS, StreamUsage, estimate_prompt_tokens, usage_from_body
from tests.helpers import ADMIN, assert_error, bearer, new_key


class RecordingGuard:
    """Records what the lifecycle does to it; refuses when told to."""

    def __init__(self, name: str, refuse: bool = False) -> None:
        self.name = name
        self.refuse = refuse
        self.admitted: list[Admission] = []
        self.settled: list[tuple[Usage | None, bool]] = []

    def wants(self, principal: Any, route: Any, unsafe: bool) -> bool:
        return route.is_llm

    def admit(self, admission: Admission) -> None:
        if self.refuse:
            raise TooManyRequests("refused by test guard")
        self.admitted.append(admission)

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None:
        self.settled.append((usage, failed))

    def headers(self, admission: Admission) -> Mapping[str, str]:
        return {f"x-test-{self.name}": "1"}


OPENAI_BODY = {"model": "gpt-4o", "choices": [],
               "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
ANTHROPIC_BODY = {"model": "claude", "content": [],
                  "usage": {"input_tokens": 5, "output_tokens": 3,
                            "cache_read_input_tokens": 2}}


@pytest.fixture
def guarded(app_factory: Any) -> Any:
    app = app_factory(routes=False)
    guard = RecordingGuard("a")
    app.extensions["llmauth"].guards.add(guard)

    @app.post("/v1/completions")
    def completions() -> Any:
        return jsonify(OPENAI_BODY)

    @app.post("/v1/messages")
    def messages() -> Any:
        return jsonify(ANTHROPIC_BODY)

    @app.post("/v1/embeddings")
    def embeddings() -> Any:
        record_usage(40, 0, model="emb")
        return jsonify({"data": []})

    @app.post("/v1/chat/completions")
    def chat() -> Any:
        def events() -> Any:
            yield 'data: {"choices":[{"delta":{"content":"hello there"}}]}\n\n'
            yield 'data: {"choices":[{"delta":{"content":" world"}}]}\n\n'
            yield ('data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4,'
                   '"total_tokens":13}}\n\n')
            yield "data: [DONE]\n\n"

        return Response(stream_with_context(events()), mimetype="text/event-stream")

    @app.post("/v1/responses")
    def raises() -> Any:
        raise RuntimeError("view failed")

    @app.post("/v1/moderations")
    def bad_request() -> Any:
        return jsonify(error="nope"), 400

    @app.get("/v1/models")
    def models() -> Any:
        return jsonify(data=[])

    return app, guard


def test_plain_json_usage_settles_once_openai_and_anthropic(guarded: Any) -> None:
    app, guard = guarded
    client = app.test_client()
    response = client.post("/v1/completions", json={"model": "gpt-4o"}, headers=ADMIN)
    assert response.headers["x-test-a"] == "1"
    response = client.post("/v1/messages", json={"model": "claude"}, headers=ADMIN)
    assert guard.settled == [(Usage(11, 7, "gpt-4o"), False), (Usage(7, 3, "claude"), False)]
    assert len(guard.admitted) == 2 and guard.admitted[0].model == "gpt-4o"


def test_record_usage_overrides_the_response(guarded: Any) -> None:
    app, guard = guarded
    app.test_client().post("/v1/embeddings", json={"model": "emb", "input": "x"}, headers=ADMIN)
    assert guard.settled == [(Usage(40, 0, "emb"), False)]


def test_stream_settles_at_end_with_reported_usage(guarded: Any) -> None:
    app, guard = guarded
    response = app.test_client().post("/v1/chat/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN)
    assert guard.settled == []  # nothing read yet: nothing settled
    assert b"[DONE]" in response.get_data()
    response.close()
    assert guard.settled == [(Usage(9, 4, "gpt-4o"), False)]


def test_stream_closed_early_settles_with_an_estimate(guarded: Any) -> None:
    app, guard = guarded
    messages = [{"role": "user", "content": "x" * 400}]
    response = app.test_client().post("/v1/chat/completions",
                                      json={"model": "gpt-4o", "messages": messages},
                                      headers=ADMIN, buffered=False)
    first = next(iter(response.response))
    assert b"hello" in first
    response.close()  # the client went away after the first event
    assert len(guard.settled) == 1
    usage, failed = guard.settled[0]
    assert failed is False and usage is not None and usage.estimated
    assert usage.completion_tokens == 3  # "hello there" = 11 chars
    assert usage.prompt_tokens == estimate_prompt_tokens({"messages": messages})


def test_view_exception_and_error_status_settle_as_failed(guarded: Any) -> None:
    app, guard = guarded
    client = app.test_client()
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert client.post("/v1/responses", json={"model": "m"}, headers=ADMIN).status_code == 500
    assert client.post("/v1/moderations", json={"model": "m"}, headers=ADMIN).status_code == 400
    assert guard.settled == [(None, True), (None, True)]


def test_a_response_class_computing_its_status_is_asked_for_it(guarded: Any) -> None:
    """Flask's own ``Response`` is read from its stored status; a subclass's ``status_code``
    is asked (it may compute the status): what it answers decides a failed settlement."""
    app, guard = guarded

    class Computed(Response):
        @property  # type: ignore[override]
        def status_code(self) -> int:
            return 503

        @status_code.setter
        def status_code(self, code: int) -> None:
            Response.status_code.fset(self, code)  # type: ignore[attr-defined]

    app.response_class = Computed
    response = app.test_client().post("/v1/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN)
    assert response.status_code == 503
    assert guard.settled == [(None, True)]


def test_refusal_by_a_later_guard_releases_earlier_guards(guarded: Any) -> None:
    app, first = guarded
    app.extensions["llmauth"].guards.add(RecordingGuard("b", refuse=True))
    response = app.test_client().post("/v1/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN)
    assert_error(response, 429)
    assert len(first.admitted) == 1 and first.settled == [(None, True)]


@pytest.mark.parametrize("refused", [False, True])
def test_a_guard_that_admits_nothing_is_not_called_yet_settles(guarded: Any,
                                                               refused: bool) -> None:
    """``admits = False``: the guard's ``admit`` is skipped; it is settled like any other,
    also (as failed) when a later guard refuses the request."""
    app, first = guarded
    idle = RecordingGuard("idle")
    idle.admits = False  # type: ignore[attr-defined]
    guards = app.extensions["llmauth"].guards
    guards.add(idle)
    if refused:
        guards.add(RecordingGuard("refusing", refuse=True))
    response = app.test_client().post("/v1/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN)
    assert idle.admitted == [] and len(first.admitted) == 1
    if refused:
        assert_error(response, 429)
        assert idle.settled == first.settled == [(None, True)]
    else:
        assert response.status_code == 200
        assert idle.settled == first.settled == [(Usage(11, 7, "gpt-4o"), False)]


class SettledByOthers(RecordingGuard):
    """A guard whose settlement has nothing to do after the view (``settles``), which puts
    its headers in ``admission.header_pairs`` instead of answering ``headers``."""

    adds_headers = False

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.asked: list[tuple[str, ...]] = []

    def settles(self, principal: Any, route: Any, unsafe: bool, wanted: Any) -> bool:
        self.asked.append(tuple(guard.name for guard in wanted))
        return False

    def admit(self, admission: Admission) -> None:
        super().admit(admission)
        from flask_llmauth.guards import HeaderPairs

        class Pairs(HeaderPairs):
            names = frozenset({"x-pairs"})

        admission.header_pairs = Pairs([("x-pairs", self.name)])

    def headers(self, admission: Admission) -> Mapping[str, str]:
        raise AssertionError("not asked: adds_headers is False")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/v1/responses",
                                  "/v1/moderations"])
def test_a_guard_that_settles_nothing_after_the_view_is_not_settled(guarded: Any,
                                                                    path: str) -> None:
    """``settles`` false (asked once per principal, with the guards wanted): the guard is
    not settled after a response, a stream, a failed view or an error status; the others
    are, exactly once; the pairs its ``admit`` put in ``header_pairs`` are on the response."""
    app, first = guarded
    app.config["PROPAGATE_EXCEPTIONS"] = False
    quiet = SettledByOthers("quiet")
    app.extensions["llmauth"].guards.add(quiet)
    client = app.test_client()
    for _ in range(2):
        response = client.post(path, json={"model": "gpt-4o"}, headers=ADMIN)
        response.get_data()
        response.close()
        assert response.headers.get("x-pairs") == "quiet"
    assert len(quiet.admitted) == 2 and quiet.settled == []
    assert len(first.settled) == 2
    assert quiet.asked == [("spend", "a", "quiet")]  # once per principal and route


@pytest.mark.parametrize("present", [[], [("X-Pairs", "old"), ("x-pairs", "older")],
                                     [("X-Other", "1"), ("x-PAIRS", "old")]])
def test_header_pairs_of_an_admission_replace_the_responses_own(guarded: Any,
                                                                present: list[Any]) -> None:
    """The pairs an admission carries are set as ``response.headers[name] = value`` would
    set them: the response's own headers of those names (any case) give way to one value."""
    app, _ = guarded
    app.extensions["llmauth"].guards.add(SettledByOthers("quiet"))

    @app.post("/v1/images/generations")
    def own_headers() -> Any:
        return Response("{}", headers=list(present), mimetype="application/json")

    response = app.test_client().post("/v1/images/generations", json={"model": "m"},
                                      headers=ADMIN)
    assert response.status_code == 200
    assert response.headers.getlist("x-pairs") == ["quiet"]
    assert response.headers.get("X-Other") == ("1" if ("X-Other", "1") in present else None)


def test_a_guard_that_settles_nothing_after_the_view_is_settled_when_refused(
        guarded: Any) -> None:
    """A later guard's refusal settles every guard admitted before it (as failed), whatever
    ``settles`` answers: what it reserved is released."""
    app, first = guarded
    quiet = SettledByOthers("quiet")
    guards = app.extensions["llmauth"].guards
    guards.add(quiet)
    guards.add(RecordingGuard("refusing", refuse=True))
    response = app.test_client().post("/v1/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN)
    assert_error(response, 429)
    assert "x-pairs" not in response.headers
    assert quiet.settled == first.settled == [(None, True)]


def test_a_guard_that_settles_nothing_after_the_view_is_settled_for_an_end_user(
        guarded: Any) -> None:
    """``settles`` answers for requests naming no end user (an end user may bring limits or
    budgets of its own): a request naming one settles every guard."""
    app, first = guarded
    quiet = SettledByOthers("quiet")
    app.extensions["llmauth"].guards.add(quiet)
    client = app.test_client()
    assert client.post("/v1/completions", json={"model": "gpt-4o", "user": "cust-1"},
                       headers=ADMIN).status_code == 200
    assert quiet.settled == first.settled == [(Usage(11, 7, "gpt-4o"), False)]


def test_guards_only_see_requests_they_want(guarded: Any) -> None:
    app, guard = guarded
    client = app.test_client()
    key = new_key(client)["key"]
    assert client.get("/key/info", headers=bearer(key)).status_code == 200
    assert guard.admitted == [] and guard.settled == []
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert [a.route.route for a in guard.admitted] == ["/v1/models"]
    assert guard.settled == [(None, False)]


@pytest.mark.parametrize("body,expected", [
    (OPENAI_BODY, Usage(11, 7, "gpt-4o")),
    ({"usage": {"prompt_tokens": 4, "total_tokens": 10}}, Usage(4, 6, None)),
    ({"model": "r", "usage": {"input_tokens": 3, "output_tokens": 2}}, Usage(3, 2, "r")),
    ({"usage": {"prompt_tokens": -5, "completion_tokens": True}}, Usage(0, 0, None)),
    ({"usage": "lots"}, None),
    ([], None),
    ({"model": 7, "usage": {"prompt_tokens": 2.5, "completion_tokens": "3"}}, Usage(0, 0, None)),
    ({"usage": {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 3}}, Usage(4, 0)),
    ({"usage": {"input_tokens": 3, "cache_read_input_tokens": 5, "output_tokens": False}},
     Usage(8, 0)),
])
def test_usage_from_body(body: Any, expected: Usage | None) -> None:
    assert usage_from_body(body) == expected


class _IntCount(int):
    pass


class _Name(str):
    pass


def test_usage_from_body_reads_any_mapping_int_and_str_subclass() -> None:
    """The fast paths for plain dicts, ints and strs answer what the general ones do."""
    from types import MappingProxyType

    body = MappingProxyType({"model": _Name("m2"), "usage": MappingProxyType(
        {"prompt_tokens": _IntCount(5), "total_tokens": _IntCount(9)})})
    usage = usage_from_body(body, "m1")
    assert usage == Usage(5, 4, "m2") and type(usage) is Usage
    assert (usage.total_tokens, usage.estimated) == (9, False)
    with pytest.raises(AttributeError):
        usage.prompt_tokens = 1  # type: ignore[misc]


def test_stream_that_raises_settles_once_as_failed_with_what_it_streamed(
        guarded: Any) -> None:
    app, guard = guarded
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.post("/chat/completions")
    def breaks_off() -> Any:
        def events() -> Any:
            yield 'data: {"choices":[{"delta":{"content":"hello there"}}]}\n\n'
            raise RuntimeError("upstream went away")

        return Response(events(), mimetype="text/event-stream")

    response = app.test_client().post("/chat/completions", json={"model": "gpt-4o"},
                                      headers=ADMIN, buffered=False)
    chunks = iter(response.response)
    next(chunks)
    with pytest.raises(RuntimeError):
        next(chunks)
    response.close()
    assert len(guard.settled) == 1
    usage, failed = guard.settled[0]
    assert failed is True
    assert usage is not None and usage.estimated and usage.completion_tokens == 3


def test_anthropic_stream_usage_across_events_and_split_chunks() -> None:
    events = [
        ("message_start", {"type": "message_start", "message": {
            "model": "claude", "usage": {"input_tokens": 25, "output_tokens": 1}}}),
        ("content_block_delta", {"type": "content_block_delta",
                                 "delta": {"type": "text_delta", "text": "hi"}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 15}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    raw = "".join(f"event: {n}\ndata: {json.dumps(d)}\n\n" for n, d in events).encode()
    stream = StreamUsage(None, prompt_estimate=99)
    for i in range(0, len(raw), 7):  # arbitrary chunk boundaries
        stream.feed(raw[i:i + 7])
    assert stream.result() == Usage(25, 15, "claude")


def test_stream_without_events_is_estimated_from_the_request() -> None:
    stream = StreamUsage("m", prompt_estimate=12)
    stream.feed(b"not an event stream at all")
    assert stream.result() == Usage(12, 0, "m", estimated=True)


def test_record_usage_validates_its_arguments() -> None:
    with pytest.raises(ValueError):
        record_usage(-1)
    with pytest.raises(ValueError):
        record_usage(1, True)


@pytest.mark.parametrize("checked", [False, True], ids=["mapping", "header_pairs"])
@pytest.mark.parametrize("present", [
    [("X-RateLimit-Limit-Requests", "old"), ("retry-after", "9"), ("Retry-After", "8")],
    [("Content-Type", "application/json"), ("X-Other", "1")],
    [],
], ids=["some_present", "none_present", "no_headers"])
def test_guard_headers_are_set_as_item_assignment_would_set_them(
        checked: bool, present: list[tuple[str, str]]) -> None:
    """Headers a guard adds replace any the response has (case-insensitively, one value
    left) and are added when new: the same result as ``response.headers[name] = value``,
    whether the guard gives a mapping or checked ``HeaderPairs`` (appended at once when
    the response has none of their names)."""
    from flask import Response

    from flask_llmauth.guards import HeaderPairs, _set_headers

    added = {"x-ratelimit-limit-requests": "10", "Retry-After": "3",
             "x-ratelimit-remaining-requests": "9", "X-New": "a"}
    class Pairs(HeaderPairs):
        names = frozenset(name.lower() for name in added)

    given: Any = Pairs(added.items()) if checked else added

    def response() -> Response:
        return Response("x", headers=list(present))

    expected = response()
    for name, value in added.items():
        expected.headers[name] = value
    actual = response()
    _set_headers(actual, given)
    assert list(actual.headers.items()) == list(expected.headers.items())
    assert actual.headers.getlist("Retry-After") == ["3"]
    assert actual.headers.get("x-new") == "a"


def _reference_usage_from_json(data: bytes, model: str | None) -> Usage | None:
    """What the guards did before ``usage_from_json``: ``json.loads`` then the body."""
    if b'"usage"' not in data:
        return None
    try:
        return usage_from_body(json.loads(data), model)
    except ValueError:
        return None


def _usage_samples() -> list[bytes]:
    import random

    rng = random.Random(11)
    usage_blocks = [{"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
                    {"input_tokens": 4, "output_tokens": 2, "cache_read_input_tokens": 1},
                    {"prompt_tokens": 5, "total_tokens": 8}, "none", None, [1]]
    bodies: list[Any] = []
    for _ in range(300):
        body: dict[str, Any] = {"object": "chat.completion", "choices": [
            {"message": {"content": rng.choice(["hi", '"usage": {"x": 1}', "é\u2028\U0001f600"]),
                         "usage": {"prompt_tokens": 999}}}]}
        if rng.random() < 0.8:
            body["usage"] = rng.choice(usage_blocks)
        if rng.random() < 0.5:
            body["model"] = rng.choice(["gpt-4o", 7, "m\u00e9"])
        bodies.append(body)
    samples = []
    for body in bodies:
        text = json.dumps(body, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 2]), sort_keys=rng.random() < 0.5)
        text = rng.choice(["", " ", "\n\t"]) + text + rng.choice(["", "\n", " \r\n", " x", "{}"])
        encoding = rng.choice(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32"])
        samples.append(text.encode(encoding))
    samples += [b'{"usage": {"prompt_tokens": 1}', b'{"usage"', b'{"usage": 1}} ', b"[]",
                b'["usage"]', b'{"usage": {"prompt_tokens": 2}}\x00', b'{\x00"usage"',
                b'{"usage": {"prompt_tokens": 3}, "usage": {"prompt_tokens": 4}}',
                b'{"usage": {"prompt_tokens": 5}}\xff', b'{"a": "\xff", "usage": {}}',
                b'{"usage": {"prompt_tokens": 6}, "model": "\\ud800"}', b"", b"{",
                b'{"usage": {"prompt_tokens": NaN, "completion_tokens": 1e400}}']
    return samples


def test_usage_from_json_answers_what_json_loads_and_usage_from_body_answer() -> None:
    from flask_llmauth.usage import usage_from_json

    samples = _usage_samples()
    found = 0
    for data in samples:
        expected = _reference_usage_from_json(data, "asked")
        assert usage_from_json(data, "asked") == expected, data
        found += expected is not None
    assert 30 < found < len(samples) - 30  # both outcomes are exercised


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 64},
    {"model": "m", "prompt": "x" * 401, "max_completion_tokens": 7},
    {"model": "m", "input": ["a", "b"]},
    None,
    [1, 2],
])
def test_admission_sizes_are_the_body_estimates_computed_once(body: Any) -> None:
    """``Admission.sizes`` is what the usage helpers answer for the body, and is not
    recomputed when the body changes afterwards (every guard sees the same figures)."""
    from flask_llmauth.usage import requested_max_tokens

    admission = Admission(None, None, "m", body)  # type: ignore[arg-type]
    expected = (estimate_prompt_tokens(body), requested_max_tokens(body) or 0)
    assert admission.sizes(MEDIA_TOKENS) == expected
    if isinstance(body, dict):
        body["messages"] = [{"role": "user", "content": "y" * 4000}]
        body["max_tokens"] = 9999
        assert admission.sizes(MEDIA_TOKENS) == expected


_SIZE_BODIES: list[Any] = [
    {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 64},
    {"messages": [{"content": [{"type": "text", "text": "ab"}, "cd"]}, "x", None, {}]},
    {"messages": "not a list", "prompt": ["a", 1, None], "max_tokens": True,
     "max_output_tokens": 5},
    {"messages": [], "input": [{"text": "abc"}, {"text": "de"}], "system": "sys" * 7},
    {"prompt": "p" * 13, "max_completion_tokens": 0, "max_tokens": -3},
    {"max_completion_tokens": 2.5, "max_tokens": "9", "max_output_tokens": 11},
    {"input": [], "system": None, "max_tokens": 10**9},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": "abc"}]},
               {"type": "function_call_output", "output": "out"}], "instructions": "be",
     "max_output_tokens": 9, "max_tokens": 3},
    {"contents": [{"role": "user", "parts": [{"text": "gem"}]}], "max_tokens": 0,
     "max_completion_tokens": 4},
    {"contents": [{"parts": [{"text": "gem"}]}], "generationConfig": {"maxOutputTokens": 7},
     "max_tokens": 3},
    {"generation_config": {"max_output_tokens": True}, "max_tokens": 3},
    {"input": [[1, 2, 3], [4]], "prompt": [0, 0], "system": [True, 1]},
    {"messages": [{"content": [{"type": "tool_result", "content": "res"}]}],
     "max_tokens": 2, "max_output_tokens": -1},
    {}, None, [], "text", 7,
]


@pytest.mark.parametrize("body", _SIZE_BODIES)
def test_body_sizes_agree_with_the_two_estimates(body: Any) -> None:
    """``body_sizes`` (one pass, used per admission) answers exactly what
    ``estimate_prompt_tokens`` and ``requested_max_tokens`` answer, for odd bodies too."""
    from flask_llmauth.usage import body_sizes, requested_max_tokens

    assert body_sizes(body) == (estimate_prompt_tokens(body), requested_max_tokens(body) or 0)


def test_request_ids_are_32_hex_digits_unique_and_new_after_a_fork() -> None:
    """Each admission gets its own id (32 lower-case hex digits: 64 random bits, then a
    counter); a forked child draws new random bits, so it never repeats its parent's ids."""
    import re

    from flask_llmauth.guards import _request_ids

    ids = [Admission(None, None, None, None).request_id  # type: ignore[arg-type]
           for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)
    assert len({rid[:16] for rid in ids}) == 1
    assert int(ids[-1][16:], 16) - int(ids[0][16:], 16) == 999
    admission = Admission(None, None, None, None)  # type: ignore[arg-type]
    assert admission.request_id == admission.request_id  # drawn once
    _request_ids.reseed()  # what runs in a forked child
    after = Admission(None, None, None, None).request_id  # type: ignore[arg-type]
    assert after[:16] != ids[0][:16] and after not in ids


@pytest.mark.parametrize(("headers", "expected"), [
    ([("Content-Type", "application/json")], True),
    ([("X-A", "1"), ("content-type", "Application/JSON ; charset=utf-8")], True),
    ([("Content-Type", "application/jsonx")], False),
    ([("Content-Types", "application/json")], False),
    ([("X-Content-Typ", "application/json")], False),
    ([("Content-Type", "")], False),
    ([], False),
])
def test_is_json_reads_the_media_type_only(headers: list[tuple[str, str]],
                                           expected: bool) -> None:
    """Usage is read from a response whose media type is ``application/json`` (any case,
    any parameters), from no other."""
    from flask_llmauth.guards import _is_json

    response = Response(b"{}")
    response.headers.clear()
    for name, value in headers:
        response.headers.add(name, value)
    assert _is_json(response) is expected
    assert _is_json(response) is expected  # answered again from the first header's memo


def test_is_json_answers_from_the_first_header_only_when_it_is_the_content_type() -> None:
    from flask_llmauth.guards import _is_json

    def answer(*headers: tuple[str, str]) -> bool:
        response = Response(b"{}")
        response.headers.clear()
        for name, value in headers:
            response.headers.add(name, value)
        return _is_json(response)

    same = "application/json"
    assert answer(("X-A", same), ("Content-Type", "text/plain")) is False
    assert answer(("X-A", same), ("Content-Type", same)) is True
    assert answer(("X-A", same), ("Content-Type", "text/plain")) is False
    assert answer(("Content-Type", same), ("Content-Type", "text/plain")) is True
    assert answer(("Content-Type", "text/plain"), ("Content-Type", same)) is False
    assert answer(("Content-Type", "text/plain"), ("Content-Type", same)) is False


def test_a_request_body_nested_deeper_than_the_recursion_limit_is_answered(
        guarded: Any) -> None:
    """The size estimates walk a message's content without recursion: nested lists as deep
    as the JSON parser reads are admitted, not refused by a RecursionError."""
    app, guard = guarded
    content: Any = "hi"
    for _ in range(700):
        content = [content]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    response = app.test_client().post("/v1/completions", json=body, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    assert [admission.sizes(MEDIA_TOKENS) for admission in guard.admitted] == [
        (-(-(2 + 12) // 4), 0)]
