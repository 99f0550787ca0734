"""Prices: the shipped table, overrides, unknown models, exact integer cost and worst case."""

from __future__ import annotations

import json
import logging
import math
from decimal import Decimal
from importlib import resources
from typing import Any

import pytest

from flask_llmauth.config import load_settings
from flask_llmauth.errors import BadRequest
from flask_llmauth.money import UNITS_PER_USD
from flask_llmauth.prices import (
    PriceTable,
    cost_units,
    parse_price,
    prices_for,
    shipped_prices,
    worst_case_units,
)
from flask_llmauth.usage import Usage


def settings(**values: object):  # noqa: ANN201
    return load_settings({}, values, environ={})


def exact_units(input_usd: str, output_usd: str, prompt: int, completion: int) -> Decimal:
    return (Decimal(input_usd) * prompt + Decimal(output_usd) * completion) * UNITS_PER_USD


def test_shipped_table_covers_common_models_of_three_providers() -> None:
    table = shipped_prices()
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini", "text-embedding-3-small",
                  "claude-3-5-sonnet-20241022", "claude-sonnet-4-20250514",
                  "claude-3-haiku-20240307", "gemini-2.5-pro", "gemini-1.5-flash"):
        assert model in table, model
        assert table[model].input > 0
    assert table["text-embedding-3-small"].output == 0
    # gpt-4o: $2.50 / $10.00 per million tokens.
    s = settings()
    assert cost_units("gpt-4o", Usage(1_000_000, 0), s) == 2_500_000_000
    assert cost_units("gpt-4o", Usage(0, 1_000_000), s) == 10_000_000_000


def test_shipped_table_is_package_data_with_decimal_strings() -> None:
    raw = json.loads(resources.files("flask_llmauth").joinpath("prices.json").read_text())
    assert len(raw) >= 40
    for name, entry in raw.items():
        assert set(entry) == {"input_cost_per_token", "output_cost_per_token"}, name
        for value in entry.values():
            assert isinstance(value, str) and Decimal(value) >= 0  # exact, not a float


@pytest.mark.parametrize("prompt,completion", [(1, 0), (0, 1), (7, 13), (12345, 6789),
                                               (10**9, 10**9)])
def test_cost_is_exact_integer_math_rounded_up(prompt: int, completion: int) -> None:
    s = settings(model_prices={"m": {"input_cost_per_token": "0.0000000375",
                                     "output_cost_per_token": "0.00000015"}})
    units = cost_units("m", Usage(prompt, completion), s)
    exact = exact_units("0.0000000375", "0.00000015", prompt, completion)
    assert units == math.ceil(exact)
    assert units - exact < 1


def test_a_priced_request_is_never_free_by_rounding() -> None:
    s = settings(model_prices={"tiny": {"input_cost_per_token": "1e-15"}})
    assert cost_units("tiny", Usage(1, 0), s) == 1
    assert cost_units("tiny", Usage(0, 0), s) == 0


def test_config_override_wins_over_model_list_and_shipped_table() -> None:
    model_list = [{"model_name": "gpt-4o", "litellm_params": {
        "model": "openai/gpt-4o", "input_cost_per_token": 1e-06, "output_cost_per_token": 0}},
        {"model_name": "house", "model_info": {"output_cost_per_token": "0.000003"}}]
    s = settings(model_list=model_list)
    assert cost_units("gpt-4o", Usage(1000, 1000), s) == 1_000_000
    assert cost_units("house", Usage(1000, 1000), s) == 3_000_000
    s = settings(model_list=model_list,
                 model_prices={"gpt-4o": {"input_cost_per_token": 2e-06}})
    assert cost_units("gpt-4o", Usage(1000, 1000), s) == 2_000_000  # output: 0 (missing)


def test_lookup_strips_provider_prefix_and_finds_dated_versions() -> None:
    s = settings()
    gpt4o = cost_units("gpt-4o", Usage(100, 100), s)
    assert cost_units("openai/gpt-4o", Usage(100, 100), s) == gpt4o
    assert cost_units("gpt-4o-2099-01-01", Usage(100, 100), s) == gpt4o
    mini = cost_units("gpt-4o-mini", Usage(100, 100), s)
    assert mini != gpt4o
    assert cost_units("gpt-4o-mini-2099-01-01", Usage(100, 100), s) == mini
    # A prefix must end at a "-": "gpt-4" is not the price of "gpt-4o".
    assert prices_for(s).lookup("gpt-4") != prices_for(s).lookup("gpt-4o")


def test_requested_name_wins_then_reported_name() -> None:
    s = settings(model_prices={"alias": {"input_cost_per_token": "0.00001"}})
    assert cost_units("alias", Usage(10, 0, model="gpt-4o"), s) == 100_000
    # The requested name is unknown: the name the response reported prices it.
    assert cost_units("my-deployment", Usage(1_000_000, 0, model="gpt-4o"), s) == 2_500_000_000


def test_unknown_model_is_free_by_default_and_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    s = settings()
    with caplog.at_level(logging.WARNING, logger="flask_llmauth"):
        assert cost_units("no-such-model", Usage(1000, 1000), s) == 0
        assert cost_units("no-such-model", Usage(5, 5), s) == 0
        assert cost_units("other-model", Usage(5, 5), s) == 0
    warnings = [r.getMessage() for r in caplog.records if "no price for model" in r.getMessage()]
    assert len(warnings) == 2
    assert "'no-such-model'" in warnings[0] and "'other-model'" in warnings[1]


def test_unknown_model_price_setting() -> None:
    s = settings(unknown_model_price={"input_cost_per_token": "0.000001",
                                      "output_cost_per_token": "0.000002"})
    assert cost_units("no-such-model", Usage(1000, 1000), s) == 3_000_000
    assert cost_units(None, Usage(1000, 0), s) == 1_000_000
    assert cost_units("gpt-4o", Usage(1000, 0), s) == 2_500_000  # known: its own price


def test_worst_case_uses_prompt_estimate_and_max_tokens() -> None:
    s = settings(model_prices={"m": {"input_cost_per_token": "0.000001",
                                     "output_cost_per_token": "0.000002"}})
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}],
            "max_tokens": 500}
    prompt = 103  # 400 characters + 12 per message of framing, at 4 per token
    assert worst_case_units("m", body, s) == prompt * 1000 + 500 * 2000
    # several caps: the largest (upstreams differ in which one they obey)
    body["max_completion_tokens"] = 50
    assert worst_case_units("m", body, s) == prompt * 1000 + 500 * 2000
    body["max_completion_tokens"] = 800
    assert worst_case_units("m", body, s) == prompt * 1000 + 800 * 2000


def test_worst_case_default_max_tokens_setting() -> None:
    prices = {"m": {"output_cost_per_token": "0.000002"}}
    assert worst_case_units("m", {"input": "hi"}, settings(model_prices=prices)) == 4096 * 2000
    s = settings(model_prices=prices, default_max_tokens=10)
    assert worst_case_units("m", {"input": "hi"}, s) == 10 * 2000
    assert worst_case_units("m", None, s) == 10 * 2000
    assert worst_case_units("m", "not a body", s) == 10 * 2000
    assert worst_case_units("m", {"max_tokens": 0, "max_output_tokens": 3}, s) == 3 * 2000


@pytest.mark.parametrize("cap", ["9", 9.0, True, -1, [9]])
def test_worst_case_refuses_a_cap_that_is_not_a_count(cap: Any) -> None:
    s = settings(model_prices={"m": {"output_cost_per_token": "0.000002"}})
    with pytest.raises(BadRequest) as refused:
        worst_case_units("m", {"max_tokens": cap, "max_output_tokens": 3}, s)
    assert (refused.value.status, refused.value.param) == (400, "max_tokens")


def test_worst_case_of_an_unknown_model_uses_the_highest_price() -> None:
    """A name no table prices is charged at the price of the model its answer reports
    (else the unknown-model price): its worst case is reserved at the highest of them all
    (the shipped table's highest output price: gpt-4-32k's, 120,000 units per token)."""
    s = settings(unknown_model_price={"output_cost_per_token": "0.000001"},
                 default_max_tokens=100)
    assert worst_case_units("mystery", {}, s) == 12_000_000
    assert worst_case_units("mystery", {}, s) == 12_000_000  # the memo knows it is unknown
    assert worst_case_units("mystery", {}, settings(default_max_tokens=100)) == 12_000_000
    assert worst_case_units(None, {}, settings(default_max_tokens=100)) == 12_000_000
    dearer = settings(unknown_model_price={"output_cost_per_token": "0.001"},
                      default_max_tokens=100)
    assert worst_case_units("mystery", {}, dearer) == 100_000_000
    # a name a table prices, even at 0, is reserved (and charged) at its own price
    free = settings(model_prices={"mystery": {"output_cost_per_token": 0}})
    assert worst_case_units("mystery", {}, free) == 0


def test_worst_case_is_the_same_with_the_price_memo_cold_and_warm() -> None:
    s = settings(default_max_tokens=100)
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 7}
    for model in ("openai/gpt-4o", "gpt-4o-2099-01-01", "gpt-4o", None, ""):
        expected = cost_units(model or "gpt-4-32k", Usage(13, 7), s)  # unnamed: the highest
        assert [worst_case_units(model, body, s) for _ in range(2)] == [expected] * 2, model
    assert worst_case_units("gpt-4o", body, s) > 0


@pytest.mark.parametrize("bad,fragment", [
    ({"input_cost_per_token": True}, "must be a number"),
    ({"input_cost_per_token": "1e400"}, "at most 1"),
    ({"input_cost_per_token": "inf"}, "finite"),
    ({"input_cost_per_token": [1]}, "must be a number"),
    ("0.1", "must be a mapping"),
])
def test_bad_prices_are_refused(bad: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_price(bad)


def test_memo_of_model_names_is_bounded() -> None:
    table = PriceTable({})
    for i in range(5000):
        table.price(f"hostile-{i}")
    assert len(table.memo) <= 4096 and len(table._warned) <= 4096


#: The media tokens of the reference estimate (the default of LLMAUTH_PROMPT_MEDIA_TOKENS).
_MEDIA = 48_169


def _reference_text(content: Any) -> str:
    """A content's text as first written (recursively): strings, and lists of parts
    (strings, objects, lists) joined by spaces; an object's text is its first member of
    ``text``, ``content``, ``output``, ``parts`` that is not null; an image, audio or file
    part holds the media tokens' worth of characters (a document, its text too), an object
    part without text its JSON."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_reference_text(_reference_part(part)) if isinstance(part, dict)
                        else _reference_text(part) for part in content)
    return ""


def _reference_part(part: dict[str, Any]) -> Any:
    if part.get("type") in ("image_url", "input_audio", "file", "video_url", "input_image",
                            "input_file", "image", "document", "audio") or any(
            name in part for name in ("inlineData", "inline_data", "fileData", "file_data")):
        media = "m" * 4 * _MEDIA
        if part.get("type") != "document":
            return media
        source = part.get("source") if isinstance(part.get("source"), dict) else {}
        texts = [part.get("title"), part.get("context"),
                 source.get("data") if source.get("type") == "text" else
                 source.get("content") if source.get("type") == "content" else None]
        return media + _reference_text([text for text in texts if text is not None])
    found = [part[name] for name in ("text", "content", "output", "parts")
             if part.get(name) is not None]
    return found[0] if found else json.dumps(part, separators=(",", ":"), ensure_ascii=False)


def _reference_prompt_estimate(body: Any) -> int:
    """The prompt estimate as first written: build the text, then count it."""
    from collections.abc import Mapping

    from flask_llmauth.usage import estimate_tokens

    _text = _reference_text

    def _json(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    if not isinstance(body, Mapping):
        return 0
    text = ""
    messages = body.get("messages")
    if isinstance(messages, list):
        text += " ".join(_text(m.get("content")) for m in messages if isinstance(m, Mapping))
        text += " " * 12 * len(messages)
        for m in messages:  # a message's other members: "name": value,
            if isinstance(m, Mapping):
                for name, value in m.items():
                    if name not in ("role", "content"):
                        text += f'"{name}":{_json(value)},'
                        if name == "audio" and value is not None:
                            text += "m" * 4 * _MEDIA
    for name in ("prompt", "input", "system", "instructions", "contents", "systemInstruction",
                 "system_instruction"):
        value = body.get(name)
        if isinstance(value, str):
            text += value
        elif isinstance(value, dict):
            text += _text([value])
        elif isinstance(value, list):
            if any(isinstance(v, Mapping) for v in value):
                text += _text(value)
            elif all(type(v) is int for v in value):  # token ids: one token each
                text += "x" * 4 * len(value)
            elif all(type(v) is list and all(type(t) is int for t in v) for v in value):
                text += "x" * 4 * sum(len(v) for v in value)
            else:
                text += " ".join(str(v) for v in value)
    for name in ("tools", "functions", "response_format", "text", "output_format"):
        if body.get(name) is not None:
            text += _json(body[name])
            if name in ("tools", "functions") and body[name]:
                text += "t" * 4 * 530
    for name in ("generationConfig", "generation_config"):
        config = body.get(name)
        if isinstance(config, dict):
            for schema in ("responseSchema", "response_schema", "responseJsonSchema",
                           "response_json_schema"):
                if config.get(schema) is not None:
                    text += _json(config[schema])
    return estimate_tokens(text)


def test_prompt_estimate_counts_what_the_text_would_hold() -> None:
    """The estimate computes only the text's length: it must equal counting the text built
    the long way, for every shape of body (plain and multi-part contents, non-mapping
    messages, prompt/input/system strings and lists, bodies that are not objects)."""
    import random

    from flask_llmauth.usage import estimate_prompt_tokens

    rng = random.Random(7)

    def content(depth: int = 0) -> Any:
        pick = rng.random()
        if pick < 0.5:
            return "x" * rng.randint(0, 30)
        if pick < 0.7 and depth < 3:
            return [{"type": "text", "text": content(depth + 1)} if rng.random() < 0.6
                    else {rng.choice(["content", "output", "parts", "image_url"]):
                          content(depth + 1), "text": rng.choice([None, None, "t"])}
                    if rng.random() < 0.3 else content(depth + 1)
                    for _ in range(rng.randint(0, 3))]
        if pick < 0.8 and depth < 3:  # media, tool calls, documents, Gemini parts
            return [rng.choice([
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "image", "source": {"type": "base64", "data": "AAAA"}, "text": "t"},
                {"type": "document", "source": {"type": "text", "data": "d" * 9},
                 "title": "ti", "context": None},
                {"type": "document", "source": {"type": "content", "content": content(
                    depth + 1)}},
                {"type": "document", "source": "bad", "title": 5},
                {"inlineData": {"mimeType": "image/png", "data": "AAAA"}},
                {"file_data": {"file_uri": "gs://b/f"}},
                {"type": "tool_use", "id": "t", "name": "f", "input": {"q": [1, 2.5, None]}},
                {"functionCall": {"name": "f", "args": {"a": True, "b": False}}},
                {"type": ["image"], "x": "y"},
            ]) for _ in range(rng.randint(1, 3))]
        return rng.choice([None, 5, {"a": 1}, ""])

    def message() -> Any:
        made = {"role": "user", "content": content()}
        if rng.random() < 0.3:
            made.update(rng.choice([
                {"tool_calls": [{"id": "c", "type": "function", "function": {
                    "name": "f", "arguments": "{q: 1}"}}]},
                {"name": "ann"}, {"tool_call_id": "c1"}, {"audio": {"id": "a1"}},
                {"audio": None}, {"function_call": {"name": "f", "arguments": "{}"}}]))
        if rng.random() < 0.1:
            del made[rng.choice(["role", "content"])]
        return made

    def body() -> Any:
        made: dict[str, Any] = {}
        if rng.random() < 0.8:
            made["messages"] = [message() if rng.random() < 0.85
                                else rng.choice(["s", 3, None])
                                for _ in range(rng.randint(0, 5))]
        for name in ("prompt", "input", "system", "instructions", "contents",
                     "systemInstruction", "system_instruction"):
            if rng.random() < 0.3:
                made[name] = rng.choice(["abc" * rng.randint(0, 5), [1, "a", 2.5],
                                         [0, 12345, 7], [[1, 2], [3]], [[1], "a"], [True],
                                         [{"text": "hi"}], [{"role": "u", "content": "ho"}],
                                         [{"parts": [{"text": "gem"}]}], [], 7,
                                         {"parts": [{"text": "sys"}]}, ["a", {"text": "b"}],
                                         {"role": "system", "parts": content()}])
        for name in ("tools", "functions", "response_format", "text", "output_format"):
            if rng.random() < 0.15:
                made[name] = rng.choice([[], [{"type": "function", "function": {
                    "name": "f", "parameters": {"type": "object", "x": [1, None]}}}],
                    {"type": "json_schema", "json_schema": {"schema": {"a": "b"}}}, "s", 3])
        if rng.random() < 0.15:
            made[rng.choice(["generationConfig", "generation_config"])] = rng.choice([
                {"responseSchema": {"type": "OBJECT"}, "maxOutputTokens": 5},
                {"response_json_schema": {"a": [1, 2]}}, "bad", {}])
        return made if rng.random() < 0.97 else rng.choice([None, [], "x"])

    for _ in range(5000):
        sample = body()
        assert estimate_prompt_tokens(sample) == _reference_prompt_estimate(sample), sample
    assert estimate_prompt_tokens({"messages": [{"role": "user", "content": "a" * 40}]}) == 13
