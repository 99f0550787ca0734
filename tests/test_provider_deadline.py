"""The identity provider's timeouts bound the whole exchange, not each socket read: a
provider that sends its headers at once and then its body a byte every 0.2 s (each read
well inside the timeout) is given up on after ``LLMAUTH_*_TIMEOUT``, with the answer a
timeout gets (503 ``auth_provider_unavailable``, or the cached keys for a JWKS), for the
JWKS/discovery fetch, OIDC userinfo and OAuth2 introspection/token-info alike. Real
sockets on loopback; the only time assertions are generous upper bounds."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from flask_llmauth.authn.jwks import JwksCache
from flask_llmauth.errors import ServiceUnavailable
from tests.helpers import assert_error, bearer, record_secret

TIMEOUT = 1.0
#: Far below the 3 s the provider keeps dripping; generous for a loaded 2-core machine.
GIVES_UP_WITHIN = 2.5
ISSUER, AUDIENCE = "https://idp.test", "gateway"
OPAQUE = record_secret("opaque-token-" + "Qw3Er5Ty7Ui9")
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
PRIVATE = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = {"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(PRIVATE.public_key())),
                  "kid": "k1", "use": "sig", "alg": "RS256"}]}


class Provider:
    """An HTTP/1.1 server on 127.0.0.1: answers ``body`` (JSON) at once, or, with
    ``drip`` set, sends the headers at once and then the body one byte every 0.2 s for
    about 3 s (never all of it); with ``truncate`` set, half the body and closes. Counts the
    requests it got."""

    def __init__(self, body: Any) -> None:
        self.body = json.dumps(body).encode()
        self.drip = False
        self.truncate = False
        self.requests = 0
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}{path}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(65536)
                    if not data:
                        return
                    request += data
                self.requests += 1
                body = self.body + b" " * 64 if self.drip else self.body
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body))
                if self.truncate:  # half of what Content-Length promised, then close
                    conn.sendall(body[:len(body) // 2])
                    return
                if not self.drip:
                    conn.sendall(body)
                    return
                for byte in body[:15]:  # 15 bytes × 0.2 s: 3 s, never the whole body
                    if self.stop.wait(0.2):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


@pytest.fixture
def provider() -> Iterator[Any]:
    made: list[Provider] = []

    def make(body: Any) -> Provider:
        made.append(Provider(body))
        return made[-1]
    yield make
    for server in made:
        server.close()


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def chat(client: Any, token: str) -> Any:
    return client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))


def signed(**claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now,
                       "exp": now + 300, **claims}, PRIVATE, algorithm="RS256",
                      headers={"kid": "k1"})


def jwt_app(app_factory: Any, keys_url: str, **extra: Any) -> Any:
    config = {"LLMAUTH_ENABLE_JWT_AUTH": True, "LLMAUTH_JWT_PUBLIC_KEY_URL": keys_url,
              "LLMAUTH_JWT_AUDIENCE": AUDIENCE, "LLMAUTH_JWT_ISSUER": ISSUER,
              "LLMAUTH_JWT_HTTP_TIMEOUT": TIMEOUT}
    config.update({"LLMAUTH_JWT_" + k.upper(): v for k, v in extra.items()})
    return app_factory(config)


# -- JWKS / discovery -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/jwks.json", "/.well-known/openid-configuration"])
def test_dripping_jwks_or_discovery_is_given_up_on(app_factory: Any, provider: Any,
                                                   path: str, caplog: Any) -> None:
    server = provider(JWKS)
    server.drip = True
    client = jwt_app(app_factory, server.url(path)).test_client()
    with caplog.at_level(logging.WARNING, "flask_llmauth"):
        response, took = timed(lambda: chat(client, signed()))
    assert_error(response, 503, "auth_provider_unavailable")
    assert took < GIVES_UP_WITHIN
    assert server.requests == 1  # no retry once the time is spent
    assert "could not fetch signing keys" in caplog.text and "(ReadTimeout)" in caplog.text


def test_fast_jwks_still_works(app_factory: Any, provider: Any) -> None:
    server = provider(JWKS)
    client = jwt_app(app_factory, server.url("/jwks.json")).test_client()
    response = chat(client, signed())
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["principal"]["user_id"] == "alice"


def test_dripping_refetch_keeps_serving_the_cached_keys(provider: Any) -> None:
    server = provider(JWKS)
    cache = JwksCache([server.url("/jwks.json")], ttl=0, stale_ttl=3600, timeout=TIMEOUT)
    assert cache.key_for("k1").kid == "k1"
    server.drip = True
    key, took = timed(lambda: cache.key_for("k1"))  # ttl 0: a refetch, which drips
    assert key.kid == "k1" and server.requests == 2
    assert took < GIVES_UP_WITHIN


def test_dripping_jwks_without_a_cached_copy_is_503(provider: Any) -> None:
    server = provider(JWKS)
    server.drip = True
    cache = JwksCache([server.url("/jwks.json")], timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        cache.key_for("k1")
    assert time.monotonic() - started < GIVES_UP_WITHIN


# -- OIDC userinfo --------------------------------------------------------------------------------


def userinfo_app(app_factory: Any, provider: Any) -> tuple[Any, Provider]:
    keys, userinfo = provider(JWKS), provider({"sub": "bob", "email": "bob@corp.example"})
    app = jwt_app(app_factory, keys.url("/jwks.json"), oidc_userinfo_enabled=True,
                  oidc_userinfo_endpoint=userinfo.url("/userinfo"))
    return app.test_client(), userinfo


def test_dripping_userinfo_is_given_up_on(app_factory: Any, provider: Any,
                                          caplog: Any) -> None:
    client, userinfo = userinfo_app(app_factory, provider)
    userinfo.drip = True
    with caplog.at_level(logging.WARNING, "flask_llmauth"):
        response, took = timed(lambda: chat(client, OPAQUE))
    assert_error(response, 503, "auth_provider_unavailable")
    assert took < GIVES_UP_WITHIN
    assert "the userinfo endpoint cannot be reached" in caplog.text


def test_fast_userinfo_still_works(app_factory: Any, provider: Any) -> None:
    client, _ = userinfo_app(app_factory, provider)
    response = chat(client, OPAQUE)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["principal"]["user_id"] == "bob@corp.example"


# -- OAuth2 introspection / token-info ----------------------------------------------------------


def oauth_app(app_factory: Any, endpoint: str) -> Any:
    return app_factory({"LLMAUTH_ENABLE_OAUTH2_AUTH": True,
                        "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT": endpoint,
                        "LLMAUTH_OAUTH2_CLIENT_ID": "gateway",
                        "LLMAUTH_OAUTH2_CLIENT_SECRET": record_secret("gw-secret-" + "Lk2Mn4"),
                        "LLMAUTH_OAUTH2_TIMEOUT": TIMEOUT})


@pytest.mark.parametrize("path", ["/introspect", "/tokeninfo"])
def test_dripping_oauth2_endpoint_is_given_up_on(app_factory: Any, provider: Any, path: str,
                                                 caplog: Any) -> None:
    server = provider({"active": True, "sub": "carol"})
    server.drip = True
    client = oauth_app(app_factory, server.url(path)).test_client()
    with caplog.at_level(logging.ERROR, "flask_llmauth"):
        response, took = timed(lambda: chat(client, OPAQUE))
    assert_error(response, 503, "auth_provider_unavailable")
    assert took < GIVES_UP_WITHIN
    assert "endpoint unreachable (ReadTimeout)" in caplog.text
    server.drip = False  # a timeout is never cached: the next call asks again
    assert chat(client, OPAQUE).get_json()["principal"]["user_id"] == "carol"


@pytest.mark.parametrize("path", ["/introspect", "/tokeninfo"])
def test_fast_oauth2_endpoint_still_works(app_factory: Any, provider: Any, path: str) -> None:
    server = provider({"active": True, "sub": "carol"})
    response = chat(oauth_app(app_factory, server.url(path)).test_client(), OPAQUE)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["principal"]["user_id"] == "carol"


# -- a connection that breaks mid-body ----------------------------------------------------------


def test_truncated_jwks_or_userinfo_is_503_not_500(app_factory: Any, provider: Any) -> None:
    keys = provider(JWKS)
    keys.truncate = True
    client = jwt_app(app_factory, keys.url("/jwks.json")).test_client()
    assert_error(chat(client, signed()), 503, "auth_provider_unavailable")
    client, userinfo = userinfo_app(app_factory, provider)
    userinfo.truncate = True
    assert_error(chat(client, OPAQUE), 503, "auth_provider_unavailable")


def test_the_connect_may_be_bounded_more_tightly_than_the_exchange() -> None:
    """A caller with a long deadline (a model provider's answer) still gives up on an
    unreachable host soon; the connect never outlives the exchange."""
    from flask_llmauth.authn.deadline import exchange_timeout

    long = exchange_timeout(600, 5)
    assert (long.connect_timeout, long.total) == (5, 600)
    assert exchange_timeout(2, 5).connect_timeout == 2
    assert exchange_timeout(3).connect_timeout == 3
