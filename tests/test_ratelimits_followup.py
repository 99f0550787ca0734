"""Rate limits, review follow-up: failed authentications from IPv6 clients counted per
network, a request that alone exceeds a tpm limit, and a parallel slot taken by an admission
whose answer was lost or left by a settlement that failed — on memory:// and on the real
Redis."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from flask import Flask

from flask_llmauth import ConfigurationError
from flask_llmauth.ratelimits import counted_address
from flask_llmauth.signals import rate_limited
from tests.conftest import REDIS_URL
from tests.helpers import ADMIN, assert_error, bearer, new_key, random_key, serve_in_thread
from tests.test_ratelimits import (  # noqa: F401
    CHAT,
    _window_stats,
    add_llm_routes,
    message,
    slots_in_use,
    storage,
)


@pytest.fixture
def make(app_factory: Any, storage: dict[str, Any]) -> Any:  # noqa: F811
    def build(**config: Any) -> Flask:
        app = app_factory({**storage, **config}, routes=False)
        add_llm_routes(app)
        return app

    return build


def fail_from(client: Any, address: str) -> int:
    return client.post(CHAT, json={"model": "m"}, headers=bearer(random_key()),
                       environ_base={"REMOTE_ADDR": address}).status_code


def admin_from(client: Any, address: str) -> int:
    return client.post(CHAT, json={"model": "m"}, headers=ADMIN,
                       environ_base={"REMOTE_ADDR": address}).status_code


# -- failed authentications from IPv6 clients ------------------------------------------------------


def test_an_ipv6_client_rotating_addresses_in_its_64_is_blocked(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="3/minute").test_client()
    rotated = [f"2001:db8:1:2::{i:x}" for i in range(1, 4)]
    assert [fail_from(client, a) for a in rotated] == [401, 401, 401]
    assert fail_from(client, "2001:db8:1:2:ffff:eeee:dddd:cccc") == 429
    assert admin_from(client, "2001:db8:1:2::99") == 429  # before the key is checked
    # the next /64 is another client
    assert admin_from(client, "2001:db8:1:3::1") == 200


def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute").test_client()
    assert fail_from(client, "::ffff:198.51.100.4") == 401
    assert fail_from(client, "198.51.100.4") == 401
    assert admin_from(client, "::ffff:198.51.100.4") == 429
    assert admin_from(client, "198.51.100.4") == 429
    # one IPv4 address does not block its neighbours (no prefix for IPv4)
    assert admin_from(client, "198.51.100.5") == 200
    assert admin_from(client, "::ffff:198.51.100.5") == 200


def test_the_ipv6_prefix_is_a_setting(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute",
                  LLMAUTH_AUTH_FAILURE_IPV6_PREFIX=48).test_client()
    assert fail_from(client, "2001:db8:7:1::1") == 401
    assert fail_from(client, "2001:db8:7:2::1") == 401  # another /64, the same /48
    assert admin_from(client, "2001:db8:7:ffff::1") == 429
    assert admin_from(client, "2001:db8:8::1") == 200
    per_address = make(LLMAUTH_AUTH_FAILURE_LIMIT="1/minute",
                       LLMAUTH_AUTH_FAILURE_IPV6_PREFIX=128).test_client()
    assert fail_from(per_address, "2001:db8:9::1") == 401
    assert admin_from(per_address, "2001:db8:9::1") == 429
    assert admin_from(per_address, "2001:db8:9::2") == 200


def test_forwarded_ipv6_clients_behind_a_trusted_proxy_are_counted_per_64(make: Any) -> None:
    client = make(LLMAUTH_AUTH_FAILURE_LIMIT="2/minute",
                  LLMAUTH_TRUSTED_PROXY_RANGES=["10.0.0.0/8"]).test_client()
    proxy = {"REMOTE_ADDR": "10.1.2.3"}
    for hop in ("2001:db8:5:5::1", "2001:db8:5:5::2"):
        assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
            **bearer(random_key()), "X-Forwarded-For": hop}).status_code == 401
    assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
        **ADMIN, "X-Forwarded-For": "2001:db8:5:5::3"}).status_code == 429
    assert client.post(CHAT, json={"model": "m"}, environ_base=proxy, headers={
        **ADMIN, "X-Forwarded-For": "2001:db8:5:6::3"}).status_code == 200


@pytest.mark.parametrize(("ip", "prefix", "counted"), [
    ("203.0.113.9", 64, "203.0.113.9"),
    ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::7]", 64, "2001:db8:1:2::/64"),
    ("fe80::1%eth0", 64, "fe80::/64"),
    ("2001:db8:1:2:3:4:5:6", 56, "2001:db8:1::/56"),
    ("2001:db8::1", 128, "2001:db8::1/128"),
    ("::ffff:192.0.2.1", 64, "192.0.2.1"),
    ("::1", 64, "::/64"),
    ("not-an-ip", 64, "not-an-ip"),
    (None, 64, "unknown"),
    ("", 64, "unknown"),
])
def test_counted_address(ip: str | None, prefix: int, counted: str) -> None:
    assert counted_address(ip, prefix) == counted


@pytest.mark.parametrize("bad", [0, 129, "wide", 64.5])
def test_a_bad_ipv6_prefix_fails_init_naming_the_key(app_factory: Any, bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="LLMAUTH_AUTH_FAILURE_IPV6_PREFIX"):
        app_factory({"LLMAUTH_AUTH_FAILURE_IPV6_PREFIX": bad})




# -- a request that alone exceeds a tpm limit ------------------------------------------------

HUGE = {"max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}


def chat_as(client: Any, key: str, **body: Any) -> Any:
    return client.post(CHAT, json={"model": "gpt-4o", **body}, headers=bearer(key))


def test_a_request_larger_than_the_tpm_limit_is_told_not_to_retry(make: Any) -> None:
    app = make(LLMAUTH_RATELIMIT_TPM_ESTIMATE=True)
    client = app.test_client()
    key = new_key(client, tpm_limit=100, rpm_limit=10)["key"]
    seen: list[Any] = []
    with rate_limited.connected_to(lambda sender, **data: seen.append(data["limit"]), app):
        refused = chat_as(client, key, **HUGE)
    error = assert_error(refused, 429, "rate_limit_error")
    assert error["message"].startswith("Rate limit exceeded for key: ")
    assert "Limit type: tokens. Current limit: 100. This request alone needs an estimated " \
           in error["message"]
    assert "retrying cannot succeed" in error["message"]
    assert "Retry-After" not in refused.headers
    assert refused.headers["x-should-retry"] == "false"
    assert [(b.descriptor, b.limit_type, b.limit, b.reset_at) for b in seen] == [
        ("key", "tokens", 100, None)]
    # nothing was counted: the rpm window is untouched
    admitted = chat_as(client, key, max_tokens=50)
    assert admitted.status_code == 200
    assert admitted.headers["x-ratelimit-remaining-requests"] == "9"


def test_a_request_that_fits_the_limit_but_not_what_is_left_may_retry(make: Any) -> None:
    client = make(LLMAUTH_RATELIMIT_TPM_ESTIMATE=True).test_client()
    key = new_key(client, tpm_limit=100)["key"]
    assert chat_as(client, key, tokens=70).status_code == 200
    refused = chat_as(client, key, max_tokens=50)
    assert "Current limit: 100, Remaining: 30. Limit resets at: " in message(refused)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "x-should-retry" not in refused.headers


def test_a_broader_limit_too_small_for_the_request_wins_over_a_used_up_narrow_one(
        make: Any) -> None:
    """The key's window is used up (retryable), but the team's limit is below the request's
    estimate: waiting for the key's window would only lead to the team's refusal."""
    client = make(LLMAUTH_RATELIMIT_TPM_ESTIMATE=True).test_client()
    assert client.post("/team/new", json={"team_id": "t-small", "tpm_limit": 200},
                       headers=ADMIN).status_code == 200
    key = new_key(client, team_id="t-small", tpm_limit=1000)["key"]
    assert chat_as(client, key, tokens=1000).status_code == 200  # the key's window used up
    refused = chat_as(client, key, max_tokens=300)
    assert message(refused).startswith("Rate limit exceeded for team: t-small. Limit type: "
                                       "tokens. Current limit: 200. This request alone")
    assert refused.headers["x-should-retry"] == "false"
    assert "Retry-After" not in refused.headers


def test_without_the_estimate_a_large_request_is_admitted_and_charged(make: Any) -> None:
    client = make().test_client()
    key = new_key(client, tpm_limit=100)["key"]
    assert chat_as(client, key, **HUGE).status_code == 200  # tpm is enforced one request late


def test_the_openai_sdk_does_not_retry_a_request_larger_than_the_limit(
        app_factory: Any) -> None:
    import openai
    from werkzeug.serving import make_server

    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": "memory://",
                       "LLMAUTH_RATELIMIT_TPM_ESTIMATE": True,
                       "LLMAUTH_RATELIMIT_WINDOW": 2}, routes=False)
    add_llm_routes(app)
    arrived: list[str] = []
    wsgi = app.wsgi_app

    def counting(environ: Any, start_response: Any) -> Any:
        arrived.append(environ["PATH_INFO"])
        return wsgi(environ, start_response)

    app.wsgi_app = counting  # type: ignore[method-assign]
    key = new_key(app.test_client(), tpm_limit=100)["key"]
    arrived.clear()
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = serve_in_thread(server)
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key=key,
                           max_retries=3) as sdk, pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model="gpt-4o", max_tokens=500,
                                        messages=[{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
        thread.join()
    assert "retrying cannot succeed" in caught.value.message
    assert arrived == [CHAT]  # one attempt, no retries


def test_a_request_larger_than_the_limit_is_answered_while_the_storage_is_down(
        app_factory: Any) -> None:
    from tests.test_ratelimits import _dead_redis_url

    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": _dead_redis_url(),
                       "LLMAUTH_RATELIMIT_TPM_ESTIMATE": True}, routes=False)
    add_llm_routes(app)
    client = app.test_client()
    key = new_key(client, tpm_limit=100)["key"]
    refused = chat_as(client, key, **HUGE)
    assert refused.status_code == 429
    assert refused.headers["x-should-retry"] == "false"
    assert chat_as(client, key, max_tokens=50).status_code == 503  # fail closed, as before


# -- an admission whose answer was lost ----------------------------------------------------------


def lose_answers(monkeypatch: pytest.MonkeyPatch, app: Flask, then_down: bool = False
                 ) -> list[str]:
    """The next script sent to Redis runs, then its answer times out (the client raises as
    on a socket timeout); with ``then_down`` every later script times out without running.
    Returns the SHA1s of the scripts sent."""
    import redis

    counters = app.extensions["llmauth"].ratelimits.counters
    execute = counters._client.execute_command
    sent: list[str] = []

    def answer_lost(*args: Any, **options: Any) -> Any:
        if args[0] != "EVALSHA" or (sent and not then_down):
            return execute(*args, **options)
        sent.append(args[1])
        if len(sent) == 1:
            execute(*args, **options)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(counters._client, "execute_command", answer_lost)
    return sent


def redis_app(app_factory: Any, prefix: str, **config: Any) -> Flask:
    app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": REDIS_URL,
                       "LLMAUTH_RATELIMIT_KEY_PREFIX": prefix,
                       "LLMAUTH_RATELIMIT_RETRY_INTERVAL": 0.05, **config}, routes=False)
    add_llm_routes(app)
    return app


@pytest.mark.redis
def test_a_slot_taken_by_an_admission_whose_answer_was_lost_is_removed(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = redis_app(app_factory, redis_prefix)
    client = app.test_client()
    body = new_key(client, max_parallel_requests=1)
    sent = lose_answers(monkeypatch, app)
    response = chat_as(client, body["key"])
    assert_error(response, 503, "service_unavailable")  # LLMAUTH_RATELIMIT_STORAGE_DOWN=closed
    counters = app.extensions["llmauth"].ratelimits.counters
    assert sent == [counters._acquire_script.sha]  # the admission ran, its answer was lost
    assert slots_in_use(app, body["key_id"], 1) == 0  # ... and its slot is gone
    time.sleep(0.1)  # the retry interval
    assert chat_as(client, body["key"]).status_code == 200


@pytest.mark.redis
def test_a_removal_that_fails_too_leaves_the_slot_to_its_lease(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    for mode, status in (("closed", 503), ("open", 200), ("memory", 200)):
        app = redis_app(app_factory, f"{redis_prefix}-{mode}",
                        LLMAUTH_RATELIMIT_STORAGE_DOWN=mode, LLMAUTH_RATELIMIT_PARALLEL_LEASE=1)
        client = app.test_client()
        body = new_key(client, max_parallel_requests=1)
        with monkeypatch.context() as patch:
            sent = lose_answers(patch, app, then_down=True)  # the removal times out too
            assert chat_as(client, body["key"]).status_code == status, mode
        counters = app.extensions["llmauth"].ratelimits.counters
        assert sent == [counters._acquire_script.sha, counters._settle_script.sha]
        assert "could not remove the parallel slots of request" in caplog.text
        assert slots_in_use(app, body["key_id"], 1) == 1  # leaked, until its lease ends
        time.sleep(1.2)
        assert slots_in_use(app, body["key_id"], 1) == 0
        assert chat_as(client, body["key"]).status_code == 200


def test_memory_counters_have_no_lost_answers() -> None:
    """memory:// never fails a call, so the removal is never needed there; the generic
    counters (one call per counter) undo their own increments when a call fails."""
    from flask_llmauth.ratelimits import Counters, MemoryCounters, RedisCounters

    assert MemoryCounters.forget is Counters.forget
    assert RedisCounters.forget is not Counters.forget


class SlowProxy:
    """A TCP proxy to the test Redis that can hold back the next reply (``hold_next``) past
    the client's socket timeout: the command runs, its answer arrives too late."""

    def __init__(self, upstream: tuple[str, int], delay: float) -> None:
        self.upstream = upstream
        self.delay = delay
        self.hold_next = threading.Event()
        #: Drop the next command sent (it never reaches Redis; the client times out).
        self.drop_next = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += (client, server)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(65536):
                if not replies and self.drop_next.is_set():
                    self.drop_next.clear()
                    continue
                if replies and self.hold_next.is_set():
                    self.hold_next.clear()
                    time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            end.close()

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@contextmanager
def behind_a_slow_proxy(app_factory: Any, redis_prefix: str,
                        ) -> Iterator[tuple[SlowProxy, Flask, Any, dict[str, Any]]]:
    """``(proxy, app, client, key body)``: an app whose rate-limit storage is the test Redis
    behind a :class:`SlowProxy` (socket timeout 0.3 s), a key with one parallel slot, and
    one request made (connected, scripts loaded). The proxy is closed afterwards."""
    from urllib.parse import urlsplit

    url = urlsplit(REDIS_URL)
    proxy = SlowProxy((url.hostname or "127.0.0.1", url.port or 6379), delay=0.6)
    try:
        app = redis_app(app_factory, redis_prefix,
                        LLMAUTH_RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{proxy.port}{url.path}",
                        LLMAUTH_RATELIMIT_STORAGE_OPTIONS={"socket_timeout": 0.3})
        client = app.test_client()
        body = new_key(client, max_parallel_requests=1)
        assert chat_as(client, body["key"]).status_code == 200
        yield proxy, app, client, body
    finally:
        proxy.close()

@pytest.mark.redis
def test_a_real_socket_timeout_after_the_admission_ran_frees_the_slot(
        app_factory: Any, redis_prefix: str) -> None:
    """The same through the Redis client's own socket timeout: the connection that timed out
    is dropped and the removal goes over a new one."""
    with behind_a_slow_proxy(app_factory, redis_prefix) as (proxy, app, client, body):
        proxy.hold_next.set()
        assert chat_as(client, body["key"]).status_code == 503
        time.sleep(0.7)  # the held answer arrived (to a closed connection)
        assert slots_in_use(app, body["key_id"], 1) == 0
        assert chat_as(client, body["key"]).status_code == 200


# -- a settlement that failed --------------------------------------------------------------------


def fail_next_settlement(monkeypatch: pytest.MonkeyPatch, app: Flask, ran: bool,
                         then_down: bool = False) -> list[tuple[str, int]]:
    """The next settlement script sent to Redis fails as on a socket timeout: after it ran
    (``ran``: its answer was lost) or before it reached Redis. Later scripts go through, or
    with ``then_down`` time out without running. Returns each script sent from then on as
    ``(which, amount)``: ``which`` is "settle" or "acquire", ``amount`` the settlement's
    charge (0: slots only)."""
    import redis

    counters = app.extensions["llmauth"].ratelimits.counters
    execute = counters._client.execute_command
    names = {counters._settle_script.sha: "settle", counters._acquire_script.sha: "acquire"}
    sent: list[tuple[str, int]] = []

    def settlement_fails(*args: Any, **options: Any) -> Any:
        if args[0] != "EVALSHA" or (not sent and names[args[1]] != "settle"):
            return execute(*args, **options)
        which = names[args[1]]
        sent.append((which, int(args[-2]) if which == "settle" else 0))
        if len(sent) > 1 and not then_down:
            return execute(*args, **options)
        if len(sent) == 1 and ran:
            execute(*args, **options)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(counters._client, "execute_command", settlement_fails)
    return sent


@pytest.mark.redis
def test_a_settlement_that_never_ran_has_its_slot_removed_and_nothing_charged(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    app = redis_app(app_factory, redis_prefix)
    client = app.test_client()
    body = new_key(client, max_parallel_requests=1, tpm_limit=1000)
    sent = fail_next_settlement(monkeypatch, app, ran=False)
    assert chat_as(client, body["key"], tokens=40).status_code == 200  # answered before
    assert sent == [("settle", 40), ("settle", 0)]  # the slot removal charges nothing
    assert slots_in_use(app, body["key_id"], 1) == 0  # not left to its 600 s lease
    assert _window_stats(app, body, "tpm", 1000, 60)[1] == 1000  # at most once: lost
    logged = [r.getMessage() for r in caplog.records if "could not settle" in r.getMessage()]
    assert len(logged) == 1 and "removed by request id" in logged[0]
    assert "TimeoutError" in logged[0] and "tpm charge (40 tokens)" in logged[0]
    assert body["key"] not in caplog.text
    time.sleep(0.1)  # the retry interval
    assert chat_as(client, body["key"]).status_code == 200


@pytest.mark.redis
def test_a_settlement_whose_answer_was_lost_charges_the_tokens_once(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = redis_app(app_factory, redis_prefix)
    client = app.test_client()
    body = new_key(client, max_parallel_requests=1, tpm_limit=1000)
    sent = fail_next_settlement(monkeypatch, app, ran=True)
    assert chat_as(client, body["key"], tokens=40).status_code == 200
    assert sent == [("settle", 40), ("settle", 0)]
    assert _window_stats(app, body, "tpm", 1000, 60)[1] == 1000 - 40  # not 80
    assert slots_in_use(app, body["key_id"], 1) == 0


@pytest.mark.redis
def test_a_removal_after_a_failed_settlement_that_fails_too_is_logged_not_raised(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    app = redis_app(app_factory, redis_prefix, LLMAUTH_RATELIMIT_PARALLEL_LEASE=1)
    client = app.test_client()
    body = new_key(client, max_parallel_requests=1)
    with monkeypatch.context() as patch:
        sent = fail_next_settlement(patch, app, ran=False, then_down=True)
        streaming = client.post(CHAT, json={"model": "gpt-4o", "stream": True},
                                headers=bearer(body["key"]), buffered=False)
        assert b"[DONE]" in b"".join(streaming.response)
        streaming.close()  # settled here, at the end of the stream: nothing raised
    assert sent == [("settle", 10), ("settle", 0)]  # one removal, not a loop
    assert "parallel slots not removed (TimeoutError), left to their leases (1s)" in caplog.text
    assert slots_in_use(app, body["key_id"], 1) == 1
    time.sleep(1.2)
    assert slots_in_use(app, body["key_id"], 1) == 0
    assert chat_as(client, body["key"]).status_code == 200


@pytest.mark.redis
def test_no_removal_is_tried_while_the_storage_is_known_down(
        app_factory: Any, redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request admitted before an outage settles during it: one failed call (one
    timeout), as before; its slots wait for their leases."""
    from flask_llmauth.ratelimits import StorageDown

    app = redis_app(app_factory, redis_prefix, LLMAUTH_RATELIMIT_RETRY_INTERVAL=30)
    client = app.test_client()
    body = new_key(client, max_parallel_requests=1)
    streaming = client.post(CHAT, json={"model": "gpt-4o", "stream": True},
                            headers=bearer(body["key"]), buffered=False)
    app.extensions["llmauth"].ratelimits.health.failed(StorageDown(OSError()), "test")
    sent = fail_next_settlement(monkeypatch, app, ran=False, then_down=True)
    assert b"[DONE]" in b"".join(streaming.response)
    streaming.close()
    assert sent == [("settle", 10)]
    assert slots_in_use(app, body["key_id"], 1) == 1


@pytest.mark.redis
def test_a_settlement_lost_on_a_real_socket_has_its_slot_removed(
        app_factory: Any, redis_prefix: str) -> None:
    """The settlement's command never reaches Redis (dropped on the way); the client's
    socket timeout ends the call and the removal goes over a new connection."""
    with behind_a_slow_proxy(app_factory, redis_prefix) as (proxy, app, client, body):
        streaming = client.post(CHAT, json={"model": "gpt-4o", "stream": True},
                                headers=bearer(body["key"]), buffered=False)
        assert slots_in_use(app, body["key_id"], 1) == 1
        proxy.drop_next.set()
        started = time.monotonic()
        assert b"[DONE]" in b"".join(streaming.response)
        streaming.close()
        assert 0.3 <= time.monotonic() - started < 2
        assert slots_in_use(app, body["key_id"], 1) == 0
        time.sleep(0.1)  # the retry interval
        assert chat_as(client, body["key"]).status_code == 200


def test_redis_gets_one_second_socket_timeouts_unless_configured(app_factory: Any) -> None:
    """rate_limits.md: no request hangs on an unreachable Redis — its client gets a 1 s
    socket and connect timeout unless ``LLMAUTH_RATELIMIT_STORAGE_OPTIONS`` sets them."""
    def client_options(**config: Any) -> dict[str, Any]:
        app = app_factory({"LLMAUTH_RATELIMIT_STORAGE_URI": REDIS_URL, **config})
        limits_storage = app.extensions["llmauth"].limiter.storage
        return dict(limits_storage.storage.connection_pool.connection_kwargs)

    default = client_options()
    assert (default["socket_timeout"], default["socket_connect_timeout"]) == (1.0, 1.0)
    chosen = client_options(LLMAUTH_RATELIMIT_STORAGE_OPTIONS={"socket_timeout": 0.3})
    assert (chosen["socket_timeout"], chosen["socket_connect_timeout"]) == (0.3, 1.0)
