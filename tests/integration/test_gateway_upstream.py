"""Upstream forwarding: one example gateway forwards to a second one serving as the model
provider. The caller's virtual key authenticates the caller at the gateway and is never sent
upstream; the upstream sees only the gateway's own ``GATEWAY_UPSTREAM_API_KEY``."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import anthropic
import openai
import pytest
import requests

from example_app import fake_model
from tests.helpers import record_secret
from tests.integration.conftest import Admin, check_no_leaks
from tests.integration.gateway import Gateway, gunicorn

pytestmark = pytest.mark.integration

#: The upstream logs every credential header it receives (a test-only access-log format).
CREDENTIAL_LOG = ('%(p)s "%(r)s" %(s)s authorization=%({authorization}i)s '
                  'x-api-key=%({x-api-key}i)s api-key=%({api-key}i)s '
                  'x-litellm-api-key=%({x-litellm-api-key}i)s')
MESSAGES = [{"role": "user", "content": "forward me"}]


def _master_key() -> str:
    return record_secret("sk-" + secrets.token_urlsafe(32))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Admin, Gateway,
                                                                    str]]:
    """(gateway, its admin, upstream, the gateway's key at the upstream)."""
    root = tmp_path_factory.mktemp("upstream")
    upstream_master = _master_key()
    upstream = gunicorn(root / "upstream", {"LLMAUTH_MASTER_KEY": upstream_master},
                        workers=1, name="upstream", access_format=CREDENTIAL_LOG)
    with upstream.start():
        # the gateway's own credential at the provider: allowed gpt-4o only
        upstream_key = Admin(upstream, upstream_master).new_key(
            models=["gpt-4o"], key_alias="gateway")["key"]
        gateway_master = _master_key()
        gateway = gunicorn(root / "gateway", {
            "LLMAUTH_MASTER_KEY": gateway_master,
            "GATEWAY_UPSTREAM_BASE_URL": upstream.base_url + "/v1",
            "GATEWAY_UPSTREAM_API_KEY": upstream_key,
            "LLMAUTH_SPEND_FLUSH_INTERVAL": "0.2",
        }, name="gateway")
        with gateway.start():
            yield gateway, Admin(gateway, gateway_master), upstream, upstream_key
        check_no_leaks(gateway)
    check_no_leaks(upstream)


def _upstream_requests(upstream: Gateway, at_least: int = 0) -> list[str]:
    """The upstream's access-log lines for API calls (waiting for ``at_least`` of them:
    gunicorn writes the line just after the response)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in upstream.access_log.read_text().splitlines()
                 if "/v1/" in line]
        if len(lines) >= at_least or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_forwarded_requests_carry_only_the_gateways_key(
        pair: tuple[Gateway, Admin, Gateway, str], sdk_clients: ExitStack) -> None:
    gateway, admin, upstream, upstream_key = pair
    caller_key = admin.new_key(models=["gpt-4o", "gpt-4o-mini"])["key"]
    before = len(_upstream_requests(upstream))

    client = sdk_clients.enter_context(openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=caller_key, max_retries=0, timeout=20))
    chat = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.choices[0].message.content.startswith("Hello from gpt-4o. You said: forward me")
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True) if c.choices)
    assert streamed == chat.choices[0].message.content
    assert client.completions.create(model="gpt-4o", prompt="p").choices[0].text
    assert client.embeddings.create(model="gpt-4o", input="e").data
    message = sdk_clients.enter_context(anthropic.Anthropic(
        base_url=gateway.base_url, api_key=caller_key, max_retries=0,
        timeout=20)).messages.create(
        model="gpt-4o", max_tokens=64, messages=MESSAGES)
    assert message.content[0].text.startswith("Hello from gpt-4o.")

    forwarded = _upstream_requests(upstream, before + 5)[before:]
    assert [line.split('"')[1].split()[1] for line in forwarded] == [
        "/v1/chat/completions", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
        "/v1/messages"]
    for line in forwarded:
        assert caller_key not in line
        assert f"authorization=Bearer {upstream_key} " in line
        assert " 200 " in line


def test_the_callers_key_means_nothing_upstream(
        pair: tuple[Gateway, Admin, Gateway, str]) -> None:
    gateway, admin, upstream, _ = pair
    caller_key = admin.new_key(models=["gpt-4o"])["key"]
    direct = requests.post(upstream.base_url + "/v1/chat/completions",
                           json={"model": "gpt-4o", "messages": MESSAGES},
                           headers={"Authorization": f"Bearer {caller_key}"}, timeout=10)
    assert direct.status_code == 401


def test_upstream_refusals_reach_the_caller_and_gateway_refusals_stay_local(
        pair: tuple[Gateway, Admin, Gateway, str], sdk_clients: ExitStack) -> None:
    gateway, admin, upstream, _ = pair
    caller_key = admin.new_key(models=["gpt-4o", "gpt-4o-mini"])["key"]
    client = sdk_clients.enter_context(openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=caller_key, max_retries=0, timeout=20))
    before = len(_upstream_requests(upstream))
    # the caller may use gpt-4o-mini, the gateway's upstream key may not: the upstream's 403
    with pytest.raises(openai.PermissionDeniedError) as upstream_denied:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert upstream_denied.value.body["param"] == "model"
    assert len(_upstream_requests(upstream, before + 1)) == before + 1
    # refused at the gateway (model outside the caller's key; bad key): nothing forwarded
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="claude-3-5-sonnet", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        sdk_clients.enter_context(openai.OpenAI(
            base_url=gateway.base_url + "/v1", api_key=record_secret(
                "sk-" + secrets.token_urlsafe(32)), max_retries=0)).chat.completions.create(
            model="gpt-4o", messages=MESSAGES)
    time.sleep(0.5)  # a wrongly forwarded request would be logged by now
    assert len(_upstream_requests(upstream)) == before + 1


def _spend_row(admin: Admin, key_id: str) -> dict[str, Any]:
    """The one spend-log row of the key ``key_id`` (waiting for the gateway's ledger to
    write it; named by its id, as a raw key in a URL would be logged)."""
    deadline = time.monotonic() + 10
    while True:
        rows = admin.get("/spend/logs", api_key=key_id).json()
        if rows or time.monotonic() > deadline:
            assert len(rows) == 1, rows
            return dict(rows[0])
        time.sleep(0.1)


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_is_billed_the_upstreams_usage(
        pair: tuple[Gateway, Admin, Gateway, str], sdk_clients: ExitStack,
        include_usage: bool) -> None:
    """The gateway asks the upstream for the stream's usage whatever the caller asked: a
    caller who did not ask sees no usage chunk (``chunk.choices[0]`` works on every chunk),
    one who did sees it as the upstream sent it, and both are billed the upstream's counts,
    not an estimate."""
    gateway, admin, _, _ = pair
    caller = admin.new_key(models=["gpt-4o"])
    client = sdk_clients.enter_context(openai.OpenAI(
        base_url=gateway.base_url + "/v1", api_key=caller["key"], max_retries=0, timeout=20))
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                 stream=True, **options))
    answer = fake_model.chat_completion({"model": "gpt-4o", "messages": MESSAGES})
    usage = answer["usage"]
    with_usage = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert [(c.choices, c.usage.prompt_tokens, c.usage.completion_tokens)
                for c in with_usage] == [([], usage["prompt_tokens"],
                                          usage["completion_tokens"])]
        assert chunks[-1] is with_usage[0]
    else:
        assert with_usage == []
        assert all(c.choices for c in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer["choices"][0]["message"]["content"]
    row = _spend_row(admin, caller["key_id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"], row["status"]) == (
        usage["prompt_tokens"], usage["completion_tokens"], False, "success")
