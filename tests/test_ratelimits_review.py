"""Rate limits under adversarial timing: parallel slots whose lease runs out under
continuous traffic, undo across a window boundary, and streams whose response is dropped —
on memory:// and on the real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Response, request

from flask_llmauth.errors import TooManyRequests
from tests.helpers import bearer, new_key
from tests.test_ratelimits import add_llm_routes, chat, message, storage  # noqa: F401

STREAM = "/v1/completions"


def add_plain_stream(app: Flask) -> None:
    """A streamed route without ``stream_with_context``: each stream can be closed in any
    order by the test client."""

    @app.post(STREAM)
    def completions() -> Any:
        request.get_json()

        def events() -> Iterator[str]:
            yield 'data: {"choices":[{"text":"hi"}]}\n\n'
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream")


@pytest.fixture
def make(app_factory: Any, storage: dict[str, Any]) -> Any:  # noqa: F811
    def build(**config: Any) -> Flask:
        app = app_factory({**storage, **config}, routes=False)
        add_llm_routes(app)
        add_plain_stream(app)
        return app

    return build


def open_stream(client: Any, key: str) -> Any:
    response = client.post(STREAM, json={"model": "gpt-4o"}, headers=bearer(key),
                           buffered=False)
    assert response.status_code == 200, response.get_data()
    next(iter(response.response))
    return response


def test_parallel_slots_are_leased_each_on_its_own_under_continuous_traffic(
        make: Any, storage: dict[str, Any]) -> None:  # noqa: F811
    """The slot count never drops to 0, so a lease per counter (set when it went 0 -> 1)
    expires under requests younger than the lease and admits a third one over a limit of
    2; each slot has its own lease."""
    if storage["LLMAUTH_RATELIMIT_STORAGE_URI"].startswith("memcached"):
        pytest.skip("memcached keeps one counter per descriptor, leased as a whole "
                    "(documented in docs/rate_limits.md, Storage)")
    client = make(LLMAUTH_RATELIMIT_PARALLEL_LEASE=2).test_client()
    key = new_key(client, max_parallel_requests=2)["key"]
    first = open_stream(client, key)
    time.sleep(1.2)
    second = open_stream(client, key)
    first.close()
    third = open_stream(client, key)  # in flight now: second and third, both < 1 s old
    time.sleep(0.9)  # the counter, created 2.1 s ago, would have expired
    refused = chat(client, key)
    assert refused.status_code == 429, "a third request admitted over max_parallel_requests=2"
    assert "max_parallel_requests" in message(refused)
    second.close()
    third.close()
    assert chat(client, key).status_code == 200


def test_a_leaked_slot_is_freed_by_its_own_lease(make: Any) -> None:
    """A slot never released (a crashed process) stops counting after the lease, while a
    slot taken later keeps counting."""
    app = make(LLMAUTH_RATELIMIT_PARALLEL_LEASE=1)
    client = app.test_client()
    key = new_key(client, max_parallel_requests=1)["key"]
    leaked = open_stream(client, key)  # never closed: its slot is leaked
    assert chat(client, key).status_code == 429
    time.sleep(1.2)
    assert chat(client, key).status_code == 200  # the leaked slot's lease ran out
    held = open_stream(client, key)
    assert chat(client, key).status_code == 429
    held.close()
    leaked.close()  # a release after the lease neither frees nor blocks a slot
    assert chat(client, key).status_code == 200


class SlowRefusal:
    """A guard after the rate limits that refuses a request (as a budget would) after
    ``refuse_after`` seconds."""

    name = "slow_refusal"
    adds_headers = False

    def wants(self, principal: Any, route: Any, unsafe: bool) -> bool:
        return bool(route.is_llm)

    def admit(self, admission: Any) -> None:
        delay = (admission.body or {}).get("refuse_after")
        if delay is not None:
            time.sleep(delay)
            raise TooManyRequests("refused by a later guard", reason="slow_refusal")

    def settle(self, admission: Any, usage: Any, failed: bool) -> None:
        pass

    def headers(self, admission: Any) -> dict[str, str]:
        return {}


def test_a_count_undone_after_its_window_ended_does_not_lower_the_next_window(
        make: Any) -> None:
    """A later guard refuses a request after its rpm window ended: the undo must not take
    one off the next window (it would admit limit + 1 there)."""
    app = make(LLMAUTH_RATELIMIT_WINDOW=1)
    app.extensions["llmauth"].guards.add(SlowRefusal())
    client = app.test_client()
    key = new_key(client, rpm_limit=2)["key"]
    assert chat(client, key, refuse_after=1.2).status_code == 429  # counted, then undone
    assert [chat(client, key).status_code for _ in range(3)] == [200, 200, 429]


def test_a_stream_that_fails_midway_releases_its_slot_and_is_charged(make: Any) -> None:
    app = make()
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.post("/v1/responses")
    def failing_stream() -> Any:
        request.get_json()

        def events() -> Iterator[str]:
            yield 'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
            raise RuntimeError("upstream went away")

        return Response(events(), mimetype="text/event-stream")

    client = app.test_client()
    key = new_key(client, max_parallel_requests=1, tpm_limit=1_000_000)["key"]
    response = client.post("/v1/responses", json={"model": "gpt-4o"}, headers=bearer(key),
                           buffered=False)
    chunks = iter(response.response)
    next(chunks)
    with pytest.raises(RuntimeError):
        next(chunks)
    after = chat(client, key)
    assert after.status_code == 200
    assert int(after.headers["x-ratelimit-remaining-tokens"]) < 1_000_000  # it was charged


def _failing_stream_hook(make: Any, propagate: bool) -> tuple[Any, str]:
    """An app whose host ``after_request`` hook raises on a streamed answer (after the
    guards wrapped it), with ``PROPAGATE_EXCEPTIONS`` as given; its client and a key with
    ``max_parallel_requests=1``."""
    app = make()
    app.config["PROPAGATE_EXCEPTIONS"] = propagate

    @app.after_request
    def failing_hook(response: Any) -> Any:
        if request.path == STREAM and response.status_code == 200:
            raise RuntimeError("host hook failed")
        return response

    client = app.test_client()
    return client, new_key(client, max_parallel_requests=1)["key"]


def test_a_stream_dropped_by_a_failing_after_request_hook_releases_its_slot(
        make: Any) -> None:
    """Flask answers 500 and the stream is never sent nor closed; the slot must not stay
    taken."""
    client, key = _failing_stream_hook(make, propagate=False)
    assert client.post(STREAM, json={"model": "gpt-4o"}, headers=bearer(key)).status_code == 500
    assert chat(client, key).status_code == 200


def test_forwarded_for_from_an_untrusted_peer_never_picks_the_counted_address(
        make: Any) -> None:
    from tests.helpers import random_key

    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="3/minute",
                  LLMAUTH_TRUSTED_PROXY_RANGES=["10.0.0.0/8"]).test_client()
    attacker = {"REMOTE_ADDR": "203.0.113.50"}
    for i in range(3):  # a new forwarded address each time, even a trusted-looking one
        assert client.post(STREAM, json={"model": "m"}, environ_base=attacker, headers={
            **bearer(random_key()), "X-Forwarded-For": f"10.0.0.1, 198.51.100.{i}"},
        ).status_code == 401
    blocked = client.post(STREAM, json={"model": "m"}, environ_base=attacker, headers={
        **bearer(random_key()), "X-Forwarded-For": "198.51.100.99"})
    assert blocked.status_code == 429
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    # behind the trusted proxy, entries the client prepends do not change its address
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    for i in range(3):
        assert client.post(STREAM, json={"model": "m"}, environ_base=proxy, headers={
            **bearer(random_key()), "X-Forwarded-For": f"192.0.2.{i}, 198.51.100.7"},
        ).status_code == 401
    assert client.post(STREAM, json={"model": "m"}, environ_base=proxy, headers={
        **bearer(random_key()), "X-Forwarded-For": "192.0.2.200, 198.51.100.7"},
    ).status_code == 429
    assert client.post(STREAM, json={"model": "m"}, environ_base=proxy, headers={
        **bearer(random_key()), "X-Forwarded-For": "198.51.100.8"}).status_code == 401


def test_a_stream_dropped_by_an_exception_that_propagates_releases_its_slot(
        make: Any) -> None:
    """The same with ``PROPAGATE_EXCEPTIONS`` (debug and testing): Flask runs no
    after-request function again, so only the exception signal can release the slot."""
    client, key = _failing_stream_hook(make, propagate=True)
    with pytest.raises(RuntimeError, match="host hook failed"):
        client.post(STREAM, json={"model": "gpt-4o"}, headers=bearer(key))
    assert chat(client, key).status_code == 200
