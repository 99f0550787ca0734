"""Gemini's ``usageMetadata``: read from ``generateContent`` answers and from each chunk of a
``streamGenerateContent`` stream (before, a Gemini answer was charged its prompt estimate
only: its candidates and thinking were free)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request, stream_with_context

from flask_llmauth.spend import flush
from flask_llmauth.store.tables import SpendLog
from flask_llmauth.usage import (
    UNDECIDED,
    StreamUsage,
    Usage,
    usage_from_body,
    usage_from_json,
    usage_from_object,
)
from tests.helpers import bearer, new_key

PRICES = {"gemini-x": {"input_cost_per_token": "0.000001", "output_cost_per_token": "0.000002"}}
IN, OUT = 1000, 2000  # units per token

ANSWER = {"candidates": [{"content": {"role": "model", "parts": [{"text": "Hello"}]},
                          "finishReason": "STOP"}],
          "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 30,
                            "thoughtsTokenCount": 8, "toolUsePromptTokenCount": 3,
                            "totalTokenCount": 53},
          "modelVersion": "gemini-x-002"}


@pytest.mark.parametrize("meta,expected", [
    (ANSWER["usageMetadata"], (15, 38)),
    ({"promptTokenCount": 7, "candidatesTokenCount": 4, "totalTokenCount": 11}, (7, 4)),
    ({"promptTokenCount": 7, "totalTokenCount": 20}, (7, 13)),  # total only: the rest
    ({"promptTokenCount": 7}, (7, 0)),
    ({"promptTokenCount": "7", "candidatesTokenCount": -4, "thoughtsTokenCount": True},
     (0, 0)),  # not counts
])
def test_usage_metadata_is_read_from_a_json_answer(meta: dict[str, Any],
                                                   expected: tuple[int, int]) -> None:
    body = {**ANSWER, "usageMetadata": meta}
    found = usage_from_json(json.dumps(body).encode(), "gemini-x")
    # the model stays the one asked for: modelVersion is a version name no table prices
    assert found == Usage(*expected, "gemini-x")
    assert usage_from_body(body, "gemini-x") == found
    # a dict answer is left to its written text, which reads the same
    assert usage_from_object(body, "gemini-x") is UNDECIDED


def test_an_openai_usage_block_wins_and_other_shapes_read_nothing() -> None:
    both = {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 60}}
    assert usage_from_json(json.dumps(both).encode(), "gemini-x") == Usage(1, 2, "m")
    for meta in (None, [], "12", 5):
        assert usage_from_json(json.dumps({"usageMetadata": meta}).encode(), "g") is None
    assert usage_from_json(b'{"usageMetadata": {"promptTokenCount": 1', "g") is None  # cut
    assert usage_from_json(b'{"candidates": []}', "g") is None
    assert usage_from_object({"candidates": []}, "g") is None  # no usage at all: told


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\r\n\r\n"


def test_a_stream_is_charged_the_last_chunks_usage_metadata() -> None:
    stream = StreamUsage("gemini-x", prompt_estimate=99)
    for at, word in enumerate(["Hel", "lo", " there"]):
        stream.feed(_sse({"candidates": [{"content": {"parts": [{"text": word}]}}],
                          "usageMetadata": {"promptTokenCount": 12,
                                            "candidatesTokenCount": at + 1,
                                            "totalTokenCount": 13 + at}}))
    stream.feed(_sse({"candidates": [{"content": {"parts": [{"text": ""}]},
                                      "finishReason": "STOP"}],
                      "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 9,
                                        "thoughtsTokenCount": 4}}))
    assert stream.result() == Usage(12, 13, "gemini-x")


def test_a_stream_without_usage_metadata_is_estimated_from_its_text() -> None:
    stream = StreamUsage("gemini-x", prompt_estimate=5)
    stream.feed(_sse({"candidates": [{"content": {"parts": [{"text": "x" * 40}]}}]}))
    stream.feed(_sse({"candidates": [{"content": {"parts": [{"text": "y" * 40}]}},
                                     "not a candidate"]}))
    stream.feed(_sse({"candidates": "not a list"}))
    assert stream.result() == Usage(5, 20, "gemini-x", estimated=True)


def add_gemini_views(app: Flask) -> None:
    @app.post("/v1beta/models/<path:model_name>:generateContent")
    def generate(model_name: str) -> Any:
        return jsonify(ANSWER)

    @app.post("/v1beta/models/<path:model_name>:streamGenerateContent")
    def stream(model_name: str) -> Any:
        assert request.args.get("alt") == "sse"

        def events() -> Any:
            yield _sse({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}],
                        "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 1}})
            yield _sse({"candidates": [{"content": {"parts": [{"text": " all"}]}}],
                        "usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 6,
                                          "thoughtsTokenCount": 10}})

        return Response(stream_with_context(events()), mimetype="text/event-stream")


def test_gemini_answers_are_charged_their_reported_tokens(app_factory: Any,
                                                          db_url: str) -> None:
    app = app_factory({"LLMAUTH_MODEL_PRICES": PRICES, "LLMAUTH_SPEND_FLUSH_INTERVAL": 3600},
                      db_url=db_url, routes=False)
    add_gemini_views(app)
    client = app.test_client()
    key = new_key(client)
    body = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}
    response = client.post("/v1beta/models/gemini-x:generateContent", json=body,
                           headers=bearer(key["key"]))
    assert response.status_code == 200
    response = client.post("/v1beta/models/gemini-x:streamGenerateContent?alt=sse", json=body,
                           headers=bearer(key["key"]))
    assert response.status_code == 200
    response.get_data()
    flush(app)
    with app.extensions["llmauth"].store.use():
        logged = [(r.model, r.prompt_tokens, r.completion_tokens, r.spend, r.estimated)
                  for r in SpendLog.select().order_by(SpendLog.id)]
    assert logged == [("gemini-x", 15, 38, 15 * IN + 38 * OUT, False),
                      ("gemini-x", 20, 16, 20 * IN + 16 * OUT, False)]
