"""Reading ``usage`` from the end of a long JSON response (``usage.usage_from_json``)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from flask_llmauth import usage as usage_module
from flask_llmauth.usage import TAIL_READ_MIN_BYTES, Usage, usage_from_json
from tests.test_guards import _reference_usage_from_json
from tests.test_prices import _reference_text

_TRICKY_TEXT = ['"usage": {"prompt_tokens": 77}', 'a\\"usage\\": {', '\\\\', '"model": "evil"',
                "é\u2028\U0001f600", '}], "usage": {"prompt_tokens": 5}}', "plain words " * 9]
_USAGE_BLOCKS: list[Any] = [
    {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12,
     "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"x": [1, 2]}},
    {"input_tokens": 4, "output_tokens": 2, "cache_read_input_tokens": 1},
    {"prompt_tokens": 5, "total_tokens": 8}, {}, "none", None, [1], 7,
]
_MODELS: list[Any] = ["gpt-4o-2024-08-06", "m\u00e9", 'q"uote', "back\\slash", 7, None, ["x"]]


#: What ``usage_from_json`` answers by definition: ``json.loads``, then the body.
_reference = _reference_usage_from_json


def _nested(rng: random.Random, depth: int = 0) -> Any:
    """A value of a completion's choices: objects that may hold their own ``usage`` and
    ``model`` members, arrays, and strings with quotes, escapes and those names."""
    kind = rng.random()
    if depth > 2 or kind < 0.35:
        return rng.choice(_TRICKY_TEXT + [1, 2.5, None, True])
    if kind < 0.55:
        return [_nested(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    value = {rng.choice(["content", "usage", "model", 'a"usage', "role"]): _nested(rng, depth + 1)
             for _ in range(rng.randint(0, 3))}
    return value


def _document(rng: random.Random) -> bytes:
    members: list[tuple[str, Any]] = [("id", "chatcmpl-1"), ("object", "chat.completion"),
                                      ("created", 1700000000)]
    if rng.random() < 0.85:
        members.insert(rng.randint(0, len(members)), ("model", rng.choice(_MODELS)))
    content = "".join(rng.choice(_TRICKY_TEXT) for _ in range(rng.choice([0, 3, 40, 120])))
    members.append(("choices", [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "extra": _nested(rng)}]))
    if rng.random() < 0.9:
        members.append(("usage", rng.choice(_USAGE_BLOCKS)))
    for name, value in (("service_tier", "default"), ("system_fingerprint", "fp_1"),
                        ("model", rng.choice(_MODELS)), ("meta", _nested(rng))):
        if rng.random() < 0.3:
            members.append((name, value))
    if rng.random() < 0.2:
        rng.shuffle(members)
    body = dict(members)  # one member per name, as every JSON text here
    text = json.dumps(body, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]),
                      separators=rng.choice([None, (",", ":")]) if rng.random() < 0.5 else None)
    text += rng.choice(["", "\n", " \r\n", "\t", " x", "{}", "]"])
    return text.encode("utf-8", "surrogatepass")


def _samples() -> list[bytes]:
    rng = random.Random(20261127)
    return [_document(rng) for _ in range(3000)]


def test_the_tail_read_answers_what_json_loads_answers_on_long_and_short_bodies() -> None:
    samples = _samples()
    long_bodies = [data for data in samples if len(data) >= TAIL_READ_MIN_BYTES]
    assert 1000 < len(long_bodies) < len(samples) - 500  # both sides of the threshold
    outcomes = {"usage": 0, "none": 0}
    for data in samples:
        expected = _reference(data, "asked")
        assert usage_from_json(data, "asked") == expected, data
        outcomes["none" if expected is None else "usage"] += 1
    assert min(outcomes.values()) > 300


def _realistic(rng: random.Random) -> bytes:
    """An OpenAI chat completion or an Anthropic message as providers send them."""
    content = "".join(rng.choice(['He said "hi".\n', "café ", "x = {'a': [1]}\t", "word "])
                      for _ in range(rng.randint(100, 600)))
    if rng.random() < 0.5:
        body: dict[str, Any] = {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": rng.choice(["gpt-4o-2024-08-06", "gpt-4o-mini"]),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": rng.choice(_USAGE_BLOCKS[:2])}
        if rng.random() < 0.7:
            body.update(service_tier="default", system_fingerprint="fp_1")
    else:
        body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
                "content": [{"type": "text", "text": content}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": _USAGE_BLOCKS[2]}
    return json.dumps(body, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]),
                      separators=(",", ":") if rng.random() < 0.5 else None,
                      sort_keys=rng.random() < 0.5).encode()  # sorted: as Flask's jsonify


def test_the_tail_read_decides_every_realistic_long_body_itself() -> None:
    """The tail read is no stub that always falls back to the full parse: it answers every
    provider-shaped long body itself, with ``json.loads``'s answer."""
    rng = random.Random(7)
    for _ in range(400):
        data = _realistic(rng)
        assert len(data) >= TAIL_READ_MIN_BYTES
        answer = usage_module._usage_from_tail(data, data.rfind(b'"usage"'), "asked")
        assert answer is not usage_module.UNDECIDED, data
        assert answer == _reference(data, "asked") is not None


def _openai_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33},
            "service_tier": "default", **extra}


def test_a_long_completion_is_not_parsed(monkeypatch) -> None:
    """On an OpenAI- or Anthropic-shaped body the scanner never reads the completion's text:
    every text it is handed is short, however long the answer."""
    seen: list[int] = []
    scan = usage_module._scan_once

    def counting_scan(text: str, index: int) -> Any:
        seen.append(len(text) - index)
        return scan(text, index)

    monkeypatch.setattr(usage_module, "_scan_once", counting_scan)
    openai = json.dumps(_openai_body("word " * 20000)).encode()
    anthropic = json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "é" * 30000}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 7}},
        ensure_ascii=False).encode()
    jsonified = json.dumps(_openai_body("word " * 20000), sort_keys=True).encode()
    assert jsonified.index(b'"model"') > jsonified.index(b'"choices"')  # as jsonify sorts
    assert usage_from_json(openai, "asked") == Usage(11, 22, "gpt-4o-1")
    assert usage_from_json(jsonified, "asked") == Usage(11, 22, "gpt-4o-1")
    assert usage_from_json(anthropic, "asked") == Usage(5, 7, "claude-x")
    assert seen and max(seen) < 200


_PAD = "x" * 1200


@pytest.mark.parametrize("body", [
    {"choices": _PAD, 'a"usage': {"prompt_tokens": 5}},  # no member is called usage
    {"choices": _PAD, "usage": {"prompt_tokens": 5}, 'a"usage': {"prompt_tokens": 6}},
    {'a"model': "no", "choices": _PAD, "usage": {"prompt_tokens": 5}},
    {'a"model': "no", "model": "yes", "choices": _PAD, "usage": {"prompt_tokens": 5}},
    {"object": "model", "choices": _PAD, "usage": {"prompt_tokens": 5}},
    {"tags": ["model"], "model": "m2", "choices": _PAD, "usage": {"prompt_tokens": 5}},
    {"usage": {"prompt_tokens": 5}, "choices": [{"usage": {"prompt_tokens": 6}, "t": _PAD}]},
    {"choices": [{"model": "nested", "t": _PAD}], "usage": {"prompt_tokens": 5}},
    {"choices": _PAD, "usage": {"prompt_tokens": 5}, "tail": {"model": "nested"}},
    {"choices": _PAD, "usage": {"prompt_tokens": 5}, "model": "after"},
    {"choices": _PAD, "model": "after-choices", "object": "x", "usage": {"prompt_tokens": 5}},
    {"model": "first", "choices": _PAD, "model ": 1, "usage": {"prompt_tokens": 5}},
    {"choices": [{"model": "nested", "t": _PAD}], "model": 7, "usage": {"prompt_tokens": 5}},
    {"model": "m\u0001x", "choices": _PAD, "usage": {"prompt_tokens": 5}},
])
@pytest.mark.parametrize("indent", [None, 1])
def test_names_inside_strings_and_nested_members_are_not_taken_for_the_body_s(
        body: dict[str, Any], indent: int | None) -> None:
    data = json.dumps(body, indent=indent).encode()
    assert len(data) >= TAIL_READ_MIN_BYTES
    assert usage_from_json(data, "asked") == _reference(data, "asked")


@pytest.mark.parametrize("data", [
    b'{"model": "first", "choices": [{"content": "' + b"x" * 2000 + b'"}], "model": "second",'
    b' "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
    b'{"model": "first", "choices": [{"content": "' + b"x" * 2000 + b'"}], "usage": {},'
    b' "model": "second"}',
])
def test_a_repeated_top_level_model_close_before_or_after_usage_is_the_last_one(data: bytes
                                                                               ) -> None:
    assert usage_from_json(data, "asked") == _reference(data, "asked")
    assert usage_from_json(data, "asked").model == "second"


@pytest.mark.parametrize("data, expected", [
    # A body malformed only inside its choices: the usage it reports is read.
    (b'{"model": "m1", "choices": [{"content": "' + b"x" * 2000 + b'", oops}],'
     b' "usage": {"prompt_tokens": 3, "completion_tokens": 4}}', Usage(3, 4, "m1")),
    # The model member repeated before the choices: the first one's value.
    (b'{"model": "first", "model": "second", "choices": "' + b"x" * 2000 + b'",'
     b' "usage": {"prompt_tokens": 3, "completion_tokens": 4}}', Usage(3, 4, "first")),
])
def test_what_the_tail_read_does_not_check(data: bytes, expected: Usage) -> None:
    """The two documented differences from ``json.loads`` (which refuses the first body and
    keeps the last ``model`` of the second)."""
    assert len(data) >= TAIL_READ_MIN_BYTES
    assert usage_from_json(data, "asked") == expected


@pytest.mark.parametrize("data", [
    json.dumps(_openai_body("x" * 2000)).encode() + b"\xff",  # not UTF-8 at the end
    b'{"a": "\xff' + b"x" * 2000 + b'", "usage": {"prompt_tokens": 1}}',  # nor before
    json.dumps(_openai_body("x" * 2000)).encode() + b" garbage",  # extra data
    json.dumps(_openai_body("x" * 2000)).encode()[:-1],  # unterminated
    json.dumps(_openai_body("x" * 2000)).encode().replace(b'"default"}', b'"default",}'),
])
def test_a_long_body_that_is_not_json_has_no_usage(data: bytes) -> None:
    assert len(data) >= TAIL_READ_MIN_BYTES
    assert usage_from_json(data, "asked") is None


def _content(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if depth > 3 or kind < 0.4:
        return rng.choice(["", "hello", "wörld 🙂", 7, None])
    if kind < 0.7:
        return [_content(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return rng.choice([{"type": "text", "text": _content(rng, depth + 1)}, {"image": "x"}, {},
                       {"type": "tool_result", "content": _content(rng, depth + 1)},
                       {"output": _content(rng, depth + 1), "text": None},
                       {"parts": _content(rng, depth + 1), "content": None}])


def test_text_lengths_are_the_recursive_walk_s() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        content = _content(rng)
        assert usage_module._text_length(content) == len(_reference_text(content)), content


def _deep(depth: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_a_body_nested_deeper_than_the_recursion_limit_is_estimated() -> None:
    """A client can nest a message's content as deep as the JSON parser goes: the size
    estimates read it without recursion (a RecursionError here refused the request)."""
    deep = _deep(5000, "deep text")
    body = {"model": "m", "messages": [{"role": "user", "content": deep}],
            "prompt": _deep(5000, {"text": "more"}), "max_tokens": 3}
    expected = -(-(len("deep text") + 12 + len("more")) // 4)
    assert usage_module.estimate_prompt_tokens(body) == expected
    assert usage_module.body_sizes(body) == (expected, 3)
    stream = usage_module.StreamUsage("m", 0)
    event = {"choices": [{"delta": {"content": _deep(600, "ab")}, "text": _deep(600, "cd")}]}
    stream._event(b"data: " + json.dumps(event).encode())  # noqa: SLF001
    assert stream.result().completion_tokens == 1

