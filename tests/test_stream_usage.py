"""``usage.StreamUsage``: events that cannot report usage are parsed only when needed, with
the answer of parsing every event as it passes."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from flask_llmauth import usage as usage_module
from flask_llmauth.usage import StreamUsage, Usage

_TEXTS = ["hello", ' "usage": {"prompt_tokens": 9}', "é🙂", "", "message_delta", "\\"]
_MODELS: list[Any] = ["gpt-4o-1", "gpt-4o-2", "claude-x", 7, None]


def _data(payload: Any, rng: random.Random) -> str:
    text = json.dumps(payload, separators=rng.choice([None, (",", ":")]))
    if rng.random() < 0.1:  # one JSON text over two data lines
        half = len(text) // 2
        return f"data: {text[:half]}\ndata: {text[half:]}"
    return f"data: {text}"


def _openai_chunk(rng: random.Random) -> Any:
    chunk: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": rng.choice(_TEXTS)}, "finish_reason": None}]}
    if rng.random() < 0.7:
        chunk["model"] = rng.choice(_MODELS)
    roll = rng.random()
    if roll < 0.5:
        chunk["usage"] = None
    elif roll < 0.6:
        chunk["usage"] = rng.choice([{"prompt_tokens": 3, "completion_tokens": 5}, {}, 1])
        chunk["choices"] = []
    if rng.random() < 0.1:
        chunk["choices"] = [{"index": 0, "text": rng.choice(_TEXTS)}]
    return chunk


def _anthropic_event(rng: random.Random) -> Any:
    kind = rng.choice(["message_start", "content_block_delta", "content_block_delta",
                       "message_delta", "ping", "message_stop"])
    if kind == "message_start":
        message: dict[str, Any] = {"id": "m1", "role": "assistant"}
        if rng.random() < 0.7:
            message["model"] = rng.choice(_MODELS)
        if rng.random() < 0.7:
            message["usage"] = rng.choice([{"input_tokens": 4, "output_tokens": 1},
                                           {"input_tokens": 0}, None])
        return {"type": kind, "message": message}
    if kind == "content_block_delta":
        return {"type": kind, "index": 0, "delta": {"type": "text_delta",
                                                    "text": rng.choice(_TEXTS)}}
    if kind == "message_delta":
        return {"type": kind, "delta": {"stop_reason": "end_turn"},
                "usage": rng.choice([{"output_tokens": 6}, None])}
    return {"type": kind}


def _gemini_chunk(rng: random.Random) -> Any:
    chunk: dict[str, Any] = {"candidates": [{"content": {"role": "model", "parts": [
        {"text": rng.choice(_TEXTS)}]}}]}
    roll = rng.random()
    if roll < 0.5:
        chunk["usageMetadata"] = rng.choice([
            {"promptTokenCount": 6, "candidatesTokenCount": rng.randint(0, 9)},
            {"promptTokenCount": 6, "totalTokenCount": 20, "thoughtsTokenCount": 2}, {}, None])
    elif roll < 0.6:
        chunk["candidates"] = rng.choice([[], "x", [1, {"content": None}]])
    if rng.random() < 0.2:
        chunk["modelVersion"] = rng.choice(_MODELS)
    return chunk


def _responses_event(rng: random.Random) -> Any:
    kind = rng.choice(["response.created", "response.output_text.delta",
                       "response.output_text.delta", "response.completed",
                       "response.in_progress", "response.output_item.added"])
    if kind == "response.output_text.delta":
        return {"type": kind, "item_id": "m1", "delta": rng.choice(_TEXTS)}
    if kind == "response.output_item.added":
        return {"type": kind, "item": {"type": "message", "content": []}}
    response: dict[str, Any] = {"id": "r1", "object": "response"}
    if rng.random() < 0.7:
        response["model"] = rng.choice(_MODELS)
    response["usage"] = (rng.choice([{"input_tokens": 4, "output_tokens": 9}, {}, None])
                         if kind == "response.completed" else None)
    return {"type": kind, "response": rng.choice([response, response, None])}


def _stream(rng: random.Random) -> bytes:
    make = rng.choice([_openai_chunk, _anthropic_event, _gemini_chunk, _responses_event])
    events = []
    for _ in range(rng.randint(0, 25)):
        roll = rng.random()
        if roll < 0.05:
            events.append(": keep-alive")
        elif roll < 0.08:
            events.append("data: not json")
        elif roll < 0.1:
            events.append("data: [1, 2]")
        else:
            event = _data(make(rng), rng)
            if rng.random() < 0.2:
                event = f"event: {rng.choice(['x', 'message_delta'])}\n{event}"
            events.append(event)
    if rng.random() < 0.5:
        events.append("data: [DONE]")
    separator = rng.choice(["\n\n", "\r\n\r\n"])
    raw = "".join(event.replace("\n", separator[:len(separator) // 2]) + separator
                  for event in events).encode()
    if rng.random() < 0.2:  # the client went away mid-stream
        raw = raw[:rng.randint(0, len(raw))]
    return raw


def _feed(raw: bytes, rng: random.Random, model: Any) -> StreamUsage:
    stream = StreamUsage(model, prompt_estimate=11)
    at = 0
    while at < len(raw):
        step = rng.choice([1, 7, 50, 400, len(raw)])
        stream.feed(raw[at:at + step])
        at += step
    return stream


@pytest.mark.parametrize("kept_limit", [1 << 20, 300])
def test_the_result_is_what_parsing_every_event_in_order_gives(monkeypatch, kept_limit: int
                                                                ) -> None:
    rng = random.Random(kept_limit)
    outcomes = {"reported": 0, "estimated": 0}
    kept_some = 0
    for _ in range(1500):
        raw = _stream(rng)
        seed = rng.random()
        monkeypatch.setattr(usage_module, "_MAX_KEPT_BYTES", kept_limit)
        stream = _feed(raw, random.Random(seed), "asked")
        kept_some += bool(stream._kept)  # noqa: SLF001
        with monkeypatch.context() as every_event:  # the reference: no event is kept
            every_event.setattr(usage_module, "_adds_text_or_model_only", lambda event: False)
            reference = _feed(raw, random.Random(seed), "asked")
            assert not reference._kept  # noqa: SLF001
            expected = reference.result()
        assert stream.result() == expected, raw
        assert stream.result() == expected  # asked again: the same answer
        outcomes["estimated" if expected.estimated else "reported"] += 1
    assert min(outcomes.values()) > 300
    assert kept_some > 500


def test_text_deltas_of_a_stream_that_reports_usage_are_never_parsed(monkeypatch) -> None:
    parsed: list[bytes] = []
    loads = json.loads

    def counting_loads(data: Any, *args: Any, **kwargs: Any) -> Any:
        parsed.append(data)
        return loads(data, *args, **kwargs)

    monkeypatch.setattr(usage_module.json, "loads", counting_loads)
    stream = StreamUsage("asked", prompt_estimate=11)
    for word in ["Hel", "lo", " there"] * 100:
        stream.feed(b'data: {"id":"c1","model":"gpt-4o-1","choices":[{"index":0,"delta":'
                    b'{"content":"' + word.encode() + b'"}}],"usage":null}\n\n')
    stream.feed(b'data: {"id":"c1","model":"gpt-4o-1","choices":[],"usage":'
                b'{"prompt_tokens":8,"completion_tokens":300,"total_tokens":308}}\n\n')
    stream.feed(b"data: [DONE]\n\n")
    assert stream.result() == Usage(8, 300, "gpt-4o-1")
    assert len(parsed) == 1  # the usage chunk only

    parsed.clear()
    anthropic = StreamUsage(None, prompt_estimate=11)
    anthropic.feed(b'event: message_start\ndata: {"type":"message_start","message":{"model":'
                   b'"claude-x","usage":{"input_tokens":25,"output_tokens":1}}}\n\n')
    for _ in range(100):
        anthropic.feed(b'event: content_block_delta\ndata: {"type":"content_block_delta",'
                       b'"index":0,"delta":{"type":"text_delta","text":"word "}}\n\n')
    anthropic.feed(b'event: message_delta\ndata: {"type":"message_delta","delta":{},'
                   b'"usage":{"output_tokens":100}}\n\n')
    assert anthropic.result() == Usage(25, 100, "claude-x")
    assert len(parsed) == 2


def test_kept_events_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(usage_module, "_MAX_KEPT_BYTES", 1000)
    stream = StreamUsage("asked", prompt_estimate=11)
    for _ in range(200):
        stream.feed(b'data: {"choices":[{"delta":{"content":"abcd"}}]}\n\n')
        assert stream._kept_bytes <= 1000  # noqa: SLF001
    assert stream.result() == Usage(11, 200, "asked", estimated=True)


@pytest.mark.parametrize("step", [1, 2, 3])
def test_a_stream_fed_a_byte_or_two_at_a_time_loses_none(step: int) -> None:
    raw = (b'data: {"model":"gpt-4o-1","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
           b'data: {"model":"gpt-4o-1","choices":[],"usage":{"prompt_tokens":8,'
           b'"completion_tokens":2}}\n\n')
    stream = StreamUsage("asked", prompt_estimate=11)
    for at in range(0, len(raw), step):
        stream.feed(raw[at:at + step])
    assert stream.result() == Usage(8, 2, "gpt-4o-1")
    stream = StreamUsage("asked", prompt_estimate=11)
    stream.feed(b"d")  # a first chunk of one byte
    stream.feed(raw[1:])
    assert stream.result() == Usage(8, 2, "gpt-4o-1")


def test_a_responses_api_stream_is_charged_its_completed_usage() -> None:
    """The Responses API's usage sits in ``response.completed``'s ``response`` (a stream
    was charged its prompt estimate only: its output was free)."""
    stream = StreamUsage("asked", prompt_estimate=11)
    stream.feed(b'event: response.created\ndata: {"type":"response.created","response":'
                b'{"id":"r1","model":"gpt-4o-1","usage":null}}\n\n')
    for word in ["Hel", "lo"]:
        stream.feed(b'event: response.output_text.delta\ndata: {"type":'
                    b'"response.output_text.delta","delta":"' + word.encode() + b'"}\n\n')
    stream.feed(b'event: response.completed\ndata: {"type":"response.completed","response":'
                b'{"id":"r1","model":"gpt-4o-1","usage":{"input_tokens":30,"output_tokens":'
                b'12,"output_tokens_details":{"reasoning_tokens":4}}}}\n\n')
    assert stream.result() == Usage(30, 12, "gpt-4o-1")
    cut = StreamUsage("asked", prompt_estimate=11)  # ended before response.completed
    cut.feed(b'data: {"type":"response.output_text.delta","delta":"' + b"x" * 40 + b'"}\n\n')
    assert cut.result() == Usage(11, 10, "asked", estimated=True)
