"""Review of the money path, third round: what the worst case counts of a request's prompt
beyond its messages' text — system instructions, tool and schema definitions, tool calls,
images, audio and files (``LLMAUTH_PROMPT_MEDIA_TOKENS``) — and the price it is reserved at
when the name asked is priced by no table but the response reports a priced model — on
SQLite and Postgres."""

from __future__ import annotations

from typing import Any

import pytest

from flask_llmauth.store.tables import Key
from flask_llmauth.usage import MEDIA_TOKENS, TOOLS_TOKENS, body_sizes, estimate_prompt_tokens
from tests.helpers import assert_error, bearer, new_key
from tests.test_budgets import CHAT, PRICES, budget_gateway, give_back, row, usd

#: 40,000 characters: 10,000 tokens at 4 characters per token.
TEXT = "x" * 40_000


@pytest.fixture
def make(app_factory: Any, db_url: str) -> Any:
    return budget_gateway(app_factory, db_url)


def post(client: Any, key: str, **fields: Any) -> Any:
    return client.post(CHAT, json={"model": "budget-model", "max_tokens": 10, **fields},
                       headers=bearer(key))


# -- prompt text outside the messages' content --------------------------------------------------


@pytest.mark.parametrize("sent", [
    # Gemini: the system instruction (a content object, either spelling), function
    # declarations, the answer's schema in the generation config
    {"systemInstruction": {"parts": [{"text": TEXT}]}, "contents": []},
    {"system_instruction": {"role": "system", "parts": [{"text": TEXT}]}},
    {"tools": [{"functionDeclarations": [{"name": "f", "description": TEXT}]}]},
    {"generationConfig": {"responseSchema": {"type": "OBJECT", "description": TEXT}}},
    {"generation_config": {"response_json_schema": {"description": TEXT}}},
    # Gemini: a function call and its response in the contents' parts
    {"contents": [{"role": "model", "parts": [{"functionCall": {
        "name": "f", "args": {"q": TEXT}}}]}]},
    {"contents": [{"role": "user", "parts": [{"functionResponse": {
        "name": "f", "response": {"result": TEXT}}}]}]},
    # OpenAI: tool and function definitions, a structured answer's JSON schema (chat and
    # Responses), an assistant's tool calls, a Responses function call item
    {"tools": [{"type": "function", "function": {"name": "f", "description": TEXT,
                                                 "parameters": {"type": "object"}}}]},
    {"functions": [{"name": "f", "parameters": {"properties": {"q": {"description": TEXT}}}}]},
    {"response_format": {"type": "json_schema", "json_schema": {
        "name": "s", "schema": {"description": TEXT}}}},
    {"text": {"format": {"type": "json_schema", "name": "s", "schema": {"description": TEXT}}}},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": TEXT}}]}]},
    {"messages": [{"role": "assistant", "content": "", "function_call": {
        "name": "f", "arguments": TEXT}}]},
    {"messages": [{"role": "assistant", "tool_calls": [{  # no content member at all
        "id": "c", "type": "function", "function": {"name": "f", "arguments": TEXT}}]}]},
    {"messages": [{"content": "hi", "tool_calls": [{"function": {"arguments": TEXT}}]}]},
    {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": TEXT}]},
    # Anthropic: the system prompt as text blocks, tool definitions, a tool use's input,
    # a plain-text document's text, a structured answer's schema
    {"system": [{"type": "text", "text": TEXT, "cache_control": {"type": "ephemeral"}}]},
    {"tools": [{"name": "f", "description": TEXT, "input_schema": {"type": "object"}}]},
    {"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {"q": TEXT}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "text", "media_type": "text/plain", "data": TEXT}}]}]},
    {"output_format": {"type": "json_schema", "schema": {"description": TEXT}}},
])
def test_prompt_text_outside_the_messages_text_is_estimated(sent: dict[str, Any]) -> None:
    """Providers bill as input what the model reads besides the messages' text: a system
    instruction, tool and schema definitions, tool calls. A body could put 40,000
    characters in any of these and was estimated at a few tokens: the request reserved
    (and, answered without usage, was charged) nothing for them."""
    assert estimate_prompt_tokens(sent) >= 10_000
    assert body_sizes(sent)[0] == estimate_prompt_tokens(sent)


def test_tool_definitions_count_the_tool_use_system_prompt() -> None:
    """A request with tools pays for the system prompt the provider adds for tool use
    (Anthropic: up to 530 tokens), however short the definitions."""
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    with_tools = estimate_prompt_tokens({"messages": [], "tools": tools})
    assert with_tools >= TOOLS_TOKENS
    assert estimate_prompt_tokens({"messages": [], "tools": []}) < 10
    assert body_sizes({"messages": [], "functions": tools})[0] >= TOOLS_TOKENS


def test_a_large_system_instruction_does_not_pass_the_budget(make: Any) -> None:
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(15_000))  # a worst case of 10,000 fits; 20,000 not
    error = assert_error(post(client, key["key"], systemInstruction={"parts": [{"text": TEXT}]},
                              contents=[]), 429, "budget_exceeded")
    assert "Budget too small for this request" in error["message"]
    error = assert_error(post(client, key["key"], messages=[], tools=[{
        "type": "function", "function": {"name": "f", "description": TEXT}}]),
        429, "budget_exceeded")
    assert "Budget too small for this request" in error["message"]
    assert post(client, key["key"], completion=1).status_code == 200
    assert row(app, Key, key_id=key["key_id"]).spend == 1_000


# -- images, audio, video and files ---------------------------------------------------------------

IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 10


@pytest.mark.parametrize("sent", [
    # OpenAI chat: an image (URL or inline), audio, a file
    {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png",
                                            "detail": "high"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": IMAGE}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "UklGRg==", "format": "wav"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "file", "file": {
        "file_id": "file-abc"}}]}]},
    # an image part that also names a text member still counts as an image
    {"messages": [{"role": "user", "content": [{"type": "image_url", "text": "",
                                                 "image_url": {"url": IMAGE}}]}]},
    # an assistant's earlier audio answer, referenced by id
    {"messages": [{"role": "assistant", "content": None, "audio": {"id": "audio_abc"}}]},
    # OpenAI Responses: an image and a file in an input item
    {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "describe"},
        {"type": "input_image", "image_url": IMAGE}]}]},
    {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-x"}]}]},
    # Anthropic: an image and a PDF, also inside a tool result
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "url", "url": "https://example.com/a.pdf"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "image", "source": {
                                                     "type": "url", "url": "https://x"}}]}]}]},
    # Gemini: inline bytes and a file's URI, in contents and the system instruction
    {"contents": [{"role": "user", "parts": [{"inlineData": {
        "mimeType": "image/png", "data": "iVBORw0KGgo="}}]}]},
    {"contents": [{"role": "user", "parts": [{"file_data": {
        "mime_type": "audio/mp3", "file_uri": "gs://bucket/a.mp3"}}]}]},
    {"systemInstruction": {"parts": [{"fileData": {"fileUri": "gs://bucket/a.pdf"}}]}},
])
def test_every_image_audio_or_file_counts_the_media_tokens(sent: dict[str, Any]) -> None:
    """An image, audio clip or file in a prompt counted nothing: a request with one
    reserved (and, answered without usage, was charged) only its text. Each counts
    ``LLMAUTH_PROMPT_MEDIA_TOKENS`` (the default: one high-detail gpt-4o-mini image)."""
    assert body_sizes(sent)[0] >= MEDIA_TOKENS
    assert estimate_prompt_tokens(sent) == body_sizes(sent)[0]
    small = body_sizes(sent, 1_000)[0]
    assert 1_000 <= small < 1_100
    assert estimate_prompt_tokens(sent, 1_000) == small
    assert body_sizes(sent, 0)[0] < 100


def test_each_media_item_counts() -> None:
    parts = [{"type": "image_url", "image_url": {"url": IMAGE}}] * 3
    sent = {"messages": [{"role": "user", "content": parts}],
            "contents": [{"parts": [{"inlineData": {"data": "AA=="}}] * 2}]}
    assert 5 * 1_000 <= body_sizes(sent, 1_000)[0] < 5 * 1_000 + 20


def test_an_image_counts_in_the_worst_case_as_configured(make: Any) -> None:
    """A key whose budget fits a text request's worst case (10,000) is refused a request
    with an image at the default (48,169 prompt tokens, at 1 unit each); an app that
    counts 100 tokens per image admits it and reserves them."""
    content = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {
        "url": IMAGE}}]
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(30_000))
    error = assert_error(post(client, key["key"], messages=[{"role": "user", "content": content}]),
                         429, "budget_exceeded")
    assert "Budget too small for this request" in error["message"]
    assert post(client, key["key"], completion=1).status_code == 200

    small = make(LLMAUTH_PROMPT_MEDIA_TOKENS=100, LLMAUTH_SPEND_FLUSH_INTERVAL=3600)
    client = small.test_client()
    key = new_key(client, max_budget=usd(30_000))
    response = post(client, key["key"], messages=[{"role": "user", "content": content}],
                    completion=1)
    assert response.status_code == 200
    state = small.extensions["llmauth"]
    # its worst case: "hi", a separator, 100 tokens for the image, 12 characters of
    # framing ((2 + 1 + 400 + 12) / 4 = 104 tokens at 1 unit), + 10 completion tokens
    assert body_sizes({"messages": [{"role": "user", "content": content}]}, 100)[0] == 104
    with state.store.use():  # what its lease transaction reserved (no chunk this close)
        assert Key.get(Key.key_id == key["key_id"]).reserved == 104 + 10_000
    give_back(small)
    assert row(small, Key, key_id=key["key_id"]).spend == 1_000


@pytest.mark.parametrize("sent", [
    {"tools": "not a list"}, {"tools": 5}, {"tools": [5, None, True, 2.5, "x"]},
    {"functions": {"name": "f"}}, {"response_format": [[[]]]}, {"text": 12},
    {"systemInstruction": 5}, {"system_instruction": [None, 7]},
    {"systemInstruction": {"parts": 5}}, {"systemInstruction": {"parts": [{"text": 5}]}},
    {"generationConfig": {"responseSchema": 5}}, {"generationConfig": 5},
    {"messages": [{"role": "user", "content": [{"type": ["image_url"]},
                                               {"type": {"a": 1}}, {"inlineData": 5},
                                               {"type": "document", "source": 5, "title": 7},
                                               {"type": "document", "source": {
                                                   "type": "content", "content": 5}}]}]},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": "x", "name": 5,
                   "audio": "x"}]},
    {"tools": [{"x": 1.5e308, "y": -0.0, "z": [[[[]]]]}]},
])
def test_fields_of_the_wrong_type_are_counted_or_ignored(
        make: Any, sent: dict[str, Any]) -> None:
    """A field of the wrong type counts what text it holds (or nothing): never a 500."""
    assert body_sizes(sent)[0] == estimate_prompt_tokens(sent) >= 0
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(10**12))
    response = post(client, key["key"], completion=1, **sent)
    assert response.status_code == 200, response.get_json()


def test_an_integer_too_long_to_print_counts_at_least_its_digits() -> None:
    """Python refuses to print an integer of more than 4,300 digits (a caller's body, not a
    parsed one: the JSON parser refuses them too); it counts at least its digits."""
    sent = {"messages": [{"role": "assistant", "tool_calls": [{"arguments": 10**5000}]}]}
    assert body_sizes(sent)[0] >= 5000 // 4


def test_deeply_nested_definitions_are_walked_without_recursion() -> None:
    nested: Any = "x"
    for _ in range(100_000):
        nested = [nested]
    deep: Any = {"q": TEXT}
    for _ in range(100_000):
        deep = {"d": deep}
    assert estimate_prompt_tokens({"tools": nested}) >= 1
    assert body_sizes({"tools": [deep]})[0] >= 10_000
    assert body_sizes({"messages": [{"role": "assistant", "tool_calls": deep}]})[0] >= 10_000


# -- the price an unpriced name is reserved at ---------------------------------------------------


def test_an_unpriced_model_answered_by_a_priced_one_is_reserved_at_the_highest_price(
        make: Any) -> None:
    """A name no table prices (nor stands for priced models) was reserved at the
    unknown-model price — free by default — while the answer was charged at the price of
    the model it reported: reserving nothing, a key with 15,000 units left had every such
    request admitted, and passed its budget (10,000 + 10,000). It is reserved at the
    highest price of the table, the most the answer can be charged at."""
    app = make()
    client = app.test_client()
    key = new_key(client, max_budget=usd(15_000))
    for _ in range(2):
        error = assert_error(post(client, key["key"], model="mystery-model",
                                  reported="budget-model", completion=10), 429,
                             "budget_exceeded")
        assert "Budget too small for this request" in error["message"]
    assert row(app, Key, key_id=key["key_id"]).spend == 0
    # with room for the highest price's worst case (the shipped table's gpt-4-32k:
    # 120,000 units per completion token here), it is admitted and charged what the
    # reported model costs
    roomy = new_key(client, max_budget=usd(2_000_000))
    assert post(client, roomy["key"], model="mystery-model", reported="budget-model",
                completion=10).status_code == 200
    assert row(app, Key, key_id=roomy["key_id"]).spend == 10_000
    assert post(client, roomy["key"], model="mystery-model", reported="another-mystery",
                completion=10).status_code == 200  # unknown too: the unknown price, 0
    assert row(app, Key, key_id=roomy["key_id"]).spend == 10_000


def test_a_model_priced_zero_is_charged_zero_whatever_the_answer_reports(make: Any) -> None:
    """A name a table prices at 0 is reserved at 0 and charged at 0: the requested name's
    price wins over the reported model's, so the reservation holds the whole charge."""
    app = make(LLMAUTH_MODEL_PRICES={**PRICES, "free-model": {
        "input_cost_per_token": 0, "output_cost_per_token": 0}})
    client = app.test_client()
    key = new_key(client, max_budget=usd(15_000))
    for _ in range(3):
        assert post(client, key["key"], model="free-model", reported="budget-model",
                    completion=10).status_code == 200
    assert row(app, Key, key_id=key["key_id"]).spend == 0
