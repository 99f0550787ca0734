"""The real ``openai`` and ``anthropic`` SDKs against the example gateway on a real socket
(gunicorn, 2 workers), authenticated with a virtual key made by the generated master key."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from example_app import fake_model
from tests.helpers import random_key
from tests.integration.conftest import Admin
from tests.integration.gateway import Gateway

pytestmark = pytest.mark.integration

ALLOWED = ["gpt-4o", "text-embedding-3-small"]
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def virtual_key(admin: Admin) -> str:
    return str(admin.new_key(models=ALLOWED, key_alias="sdk-tests")["key"])


@pytest.fixture(autouse=True)
def _no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDKs read credentials and base URLs from the environment: none may leak in."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
                 "ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL",
                 "ANTHROPIC_CUSTOM_HEADERS"):
        monkeypatch.delenv(name, raising=False)


class SentHeaders:
    """Records the credential headers of every request an SDK sends (an httpx2 hook)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.client = httpx2.Client(event_hooks={"request": [self._record]})

    def _record(self, request: Any) -> None:
        self.requests.append({name: request.headers[name] for name in
                              ("authorization", "x-api-key") if name in request.headers})

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def sent() -> Iterator[SentHeaders]:
    """The Anthropic clients of a test share its connection pool, closed when the test ends."""
    recorder = SentHeaders()
    yield recorder
    recorder.close()


#: ``openai_client(gateway, api_key, **options)``
Clients = Callable[..., openai.OpenAI]


@pytest.fixture
def openai_client(sdk_clients: ExitStack) -> Clients:
    """``openai_client(gateway, api_key)``: a client closed when the test ends."""
    def make(gateway: Gateway, api_key: str, **kwargs: Any) -> openai.OpenAI:
        return sdk_clients.enter_context(openai.OpenAI(
            base_url=gateway.base_url + "/v1", api_key=api_key, max_retries=0, timeout=20,
            **kwargs))
    return make


# -- openai ---------------------------------------------------------------------------------------


def test_openai_chat_completion(gateway: Gateway, virtual_key: str,
                                openai_client: Clients) -> None:
    client = openai_client(gateway, virtual_key)
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    expected = fake_model.chat_completion({"model": "gpt-4o", "messages": MESSAGES})
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert completion.choices[0].message.content.startswith("Hello from gpt-4o. You said: Say")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                "total_tokens"}) == expected["usage"]


def test_openai_chat_streaming_with_usage(gateway: Gateway, virtual_key: str,
                                          openai_client: Clients) -> None:
    client = openai_client(gateway, virtual_key)
    plain = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # include_usage: one final chunk with no choices and the usage of the whole answer
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage
    assert all(c.usage is None for c in chunks[:-1])

    without_usage = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                        stream=True))
    assert all(c.usage is None for c in without_usage)
    assert "".join(c.choices[0].delta.content or "" for c in without_usage) == text


def test_openai_completion_and_embeddings(gateway: Gateway, virtual_key: str,
                                          openai_client: Clients) -> None:
    client = openai_client(gateway, virtual_key)
    completion = client.completions.create(model="gpt-4o", prompt="Once upon a time")
    assert completion.choices[0].text.startswith("Hello from gpt-4o. You said: Once upon a time")
    assert completion.usage is not None and completion.usage.prompt_tokens == 4

    embedding = client.embeddings.create(model="text-embedding-3-small",
                                         input=["first text", "second text"])
    assert [d.index for d in embedding.data] == [0, 1]
    assert all(len(d.embedding) == fake_model.EMBEDDING_DIMENSIONS for d in embedding.data)
    assert embedding.data[0].embedding != embedding.data[1].embedding
    assert embedding.usage.prompt_tokens == embedding.usage.total_tokens == 6


def test_openai_models_list_shows_only_the_keys_models(gateway: Gateway, virtual_key: str,
                                                       admin: Admin,
                                                       openai_client: Clients) -> None:
    assert sorted(m.id for m in openai_client(gateway, virtual_key).models.list()) == ALLOWED
    everything = sorted(m.id for m in openai_client(gateway, admin.master_key).models.list())
    assert everything == sorted(["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet-latest",
                                 "text-embedding-3-small"])


def _assert_auth_error(error: openai.APIStatusError, status: int) -> dict[str, Any]:
    assert error.status_code == status
    body = error.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    assert body["code"] == str(status) and error.code == str(status)
    assert error.message.endswith(body["message"])
    return body


def test_openai_without_key_or_with_bad_key_raises_authentication_error(
        gateway: Gateway, virtual_key: str, openai_client: Clients) -> None:
    client = openai_client(gateway, virtual_key)
    with pytest.raises(openai.AuthenticationError) as no_key:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                       extra_headers={"Authorization": openai.Omit()})
    body = _assert_auth_error(no_key.value, 401)
    assert body["type"] == "auth_error" and "No api key passed in" in body["message"]

    bad_bodies = []
    for bad in (random_key(), "not-a-virtual-key", virtual_key[:-2] + "xx"):
        with pytest.raises(openai.AuthenticationError) as bad_key:
            openai_client(gateway, bad).chat.completions.create(model="gpt-4o",
                                                                messages=MESSAGES)
        bad_bodies.append(_assert_auth_error(bad_key.value, 401))
        assert bad not in str(bad_key.value.body)
    assert bad_bodies[0] == bad_bodies[1] == bad_bodies[2]
    with pytest.raises(openai.AuthenticationError):  # streaming requests fail the same way
        openai_client(gateway, random_key()).chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.AuthenticationError):
        openai_client(gateway, random_key()).models.list()


def test_openai_model_outside_the_keys_list_raises_permission_denied(
        gateway: Gateway, virtual_key: str, openai_client: Clients) -> None:
    client = openai_client(gateway, virtual_key)
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES),
        lambda: client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                               stream=True),
        lambda: client.completions.create(model="claude-3-5-sonnet", prompt="hi"),
        lambda: client.embeddings.create(model="text-embedding-3-large", input="hi"),
    ):
        with pytest.raises(openai.PermissionDeniedError) as denied:
            call()
        body = _assert_auth_error(denied.value, 403)
        assert body["param"] == "model"
    # the key itself still works for its own models
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices


# -- anthropic ------------------------------------------------------------------------------------


def anthropic_client(gateway: Gateway, sent: SentHeaders, api_key: str | None = None,
                     x_api_key: str | None = None) -> anthropic.Anthropic:
    """``api_key=`` as the SDK sends it, or the key in ``x-api-key`` only."""
    headers: dict[str, Any] = {}
    if x_api_key is not None:
        headers = {"Authorization": anthropic.Omit(), "x-api-key": x_api_key}
        api_key = api_key or x_api_key
    return anthropic.Anthropic(base_url=gateway.base_url, api_key=api_key, max_retries=0,
                               timeout=20, http_client=sent.client, default_headers=headers)


ANTHROPIC_WAYS = ["api_key", "x-api-key"]


def _client_for(way: str, gateway: Gateway, sent: SentHeaders, key: str) -> anthropic.Anthropic:
    if way == "api_key":
        return anthropic_client(gateway, sent, api_key=key)
    return anthropic_client(gateway, sent, x_api_key=key)


@pytest.mark.parametrize("way", ANTHROPIC_WAYS)
def test_anthropic_messages_create_and_stream(gateway: Gateway, virtual_key: str,
                                              sent: SentHeaders, way: str) -> None:
    client = _client_for(way, gateway, sent, virtual_key)
    message = client.messages.create(model="gpt-4o", max_tokens=256, messages=MESSAGES)
    expected = fake_model.anthropic_message({"model": "gpt-4o", "messages": MESSAGES,
                                             "max_tokens": 256})
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == expected["content"][0]["text"]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        expected["usage"]["input_tokens"], expected["usage"]["output_tokens"])

    with client.messages.stream(model="gpt-4o", max_tokens=256, messages=MESSAGES) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == message.content[0].text == final.content[0].text
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.stop_reason == "end_turn"

    # how the key travelled
    assert len(sent.requests) == 2
    for headers in sent.requests:
        if way == "x-api-key":
            assert headers == {"x-api-key": virtual_key}
        else:  # this SDK version sends api_key as a bearer token
            assert virtual_key in (headers.get("x-api-key"),
                                   headers.get("authorization", "").removeprefix("Bearer "))


@pytest.mark.parametrize("way", ANTHROPIC_WAYS)
def test_anthropic_errors(gateway: Gateway, virtual_key: str, sent: SentHeaders,
                          way: str) -> None:
    with pytest.raises(anthropic.AuthenticationError) as bad:
        _client_for(way, gateway, sent, random_key()).messages.create(
            model="gpt-4o", max_tokens=16, messages=MESSAGES)
    assert bad.value.status_code == 401
    assert isinstance(bad.value.body, dict)
    assert bad.value.body["error"]["type"] == "auth_error"

    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        _client_for(way, gateway, sent, virtual_key).messages.create(
            model="claude-3-5-sonnet", max_tokens=16, messages=MESSAGES)
    assert denied.value.status_code == 403
    assert isinstance(denied.value.body, dict)
    assert denied.value.body["error"]["param"] == "model"

    with pytest.raises(anthropic.PermissionDeniedError):
        with _client_for(way, gateway, sent, virtual_key).messages.stream(
                model="claude-3-5-sonnet", max_tokens=16, messages=MESSAGES) as stream:
            stream.get_final_message()


def test_anthropic_without_key_raises_authentication_error(gateway: Gateway,
                                                           sent: SentHeaders) -> None:
    client = anthropic.Anthropic(base_url=gateway.base_url, max_retries=0, timeout=20,
                                 http_client=sent.client,
                                 default_headers={"Authorization": anthropic.Omit()})
    with pytest.raises(anthropic.AuthenticationError) as error:
        client.messages.create(model="gpt-4o", max_tokens=16, messages=MESSAGES)
    assert error.value.status_code == 401
    assert "No api key passed in" in error.value.body["error"]["message"]
    assert sent.requests == [{}]
