"""OAuth2 introspection/token-info: configuration, the request it sends, and the error paths
a real provider cannot produce on demand (timeouts, 5xx, redirects, malformed answers) —
those with requests-mock or a real misbehaving socket. The happy paths against the real
provider are in tests/integration/test_oauth2_idp.py."""

from __future__ import annotations

import base64
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
from flask import Flask

from flask_llmauth import ConfigurationError
from tests.helpers import ADMIN, assert_error, bearer, record_secret

ENDPOINT = "https://idp.example/oauth2/introspect"
TOKEN_INFO = "https://idp.example/oauth2/tokeninfo"
SECRET = record_secret("gateway-secret-" + "Zq81xLmP0vB7")
TOKEN = record_secret("opaque-token-" + "A1b2C3d4E5f6G7h8")
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def oauth_app(app_factory: Any, endpoint: str = ENDPOINT, **config: Any) -> Flask:
    base = {"enable_oauth2_auth": True, "oauth2_token_info_endpoint": endpoint,
            "oauth2_client_id": "gateway", "oauth2_client_secret": SECRET}
    base.update(config)
    return app_factory({f"LLMAUTH_{k.upper()}": v for k, v in base.items() if v is not None})


def chat(client: Any, token: str = TOKEN) -> Any:
    return client.post("/v1/chat/completions", json=CHAT, headers=bearer(token))


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("config, message", [
    ({"oauth2_token_info_endpoint": None},
     "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT: required"),
    ({"oauth2_token_info_endpoint": "http://idp.example/introspect"},
     "must use https.*LLMAUTH_OAUTH2_ALLOW_INSECURE_HTTP"),
    ({"oauth2_token_info_endpoint": "https://u:p@idp.example/introspect"}, "credentials in"),
    ({"oauth2_token_info_endpoint": "https://10.0.0.1:8443/introspect",
      "oauth2_client_secret": None}, "looks like an introspection"),
    ({"oauth2_token_info_endpoint": "ftp://idp.example/x"}, r"must be an http\(s\) URL"),
    ({"oauth2_client_secret": None}, "looks like an introspection endpoint"),
    ({"oauth2_token_info_endpoint": TOKEN_INFO, "oauth2_mode": "introspection",
      "oauth2_client_id": None}, "introspection needs"),
    ({"oauth2_mode": "both"}, "LLMAUTH_OAUTH2_MODE"),
    ({"oauth2_unknown_role_default": "god"}, "LLMAUTH_OAUTH2_UNKNOWN_ROLE_DEFAULT"),
    ({"oauth2_timeout": 0}, "LLMAUTH_OAUTH2_TIMEOUT"),
])
def test_bad_configuration_fails_init(app_factory: Any, config: dict[str, Any],
                                      message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        oauth_app(app_factory, **config)


@pytest.mark.parametrize("endpoint, mode, introspection", [
    (ENDPOINT, "auto", True),
    (TOKEN_INFO, "auto", False),
    (ENDPOINT, "token_info", False),
    (TOKEN_INFO, "introspection", True),
    ("http://127.0.0.1:9/introspect", "auto", True),
    ("http://[::1]:9/userinfo", "auto", False),
    ("http://localhost:9/userinfo", "auto", False),
])
def test_mode_selection(app_factory: Any, endpoint: str, mode: str, introspection: bool) -> None:
    app = oauth_app(app_factory, endpoint, oauth2_mode=mode)
    assert app.extensions["llmauth"].authenticators["oauth2"].introspection is introspection


def test_plain_http_elsewhere_needs_the_explicit_opt_in(app_factory: Any) -> None:
    app = oauth_app(app_factory, "http://idp.internal/userinfo",
                    oauth2_allow_insecure_http=True)
    assert app.extensions["llmauth"].authenticators["oauth2"].endpoint == (
        "http://idp.internal/userinfo")


def test_litellm_yaml_flat_keys_and_environment_secret(app_factory: Any, tmp_path: Any,
                                                       monkeypatch: Any) -> None:
    monkeypatch.setenv("MY_OAUTH_SECRET", SECRET)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        general_settings:
          enable_oauth2_auth: true
          oauth_token_info_endpoint: {ENDPOINT}
          oauth_client_id: gateway
          oauth_client_secret: os.environ/MY_OAUTH_SECRET
          oauth_user_id_field_name: uid
          oauth_user_role_field_name: litellm_role
          oauth_user_team_id_field_name: grp
    """))
    app = app_factory({"LLMAUTH_CONFIG_FILE": str(path)})
    settings = app.extensions["llmauth"].settings
    assert settings.oauth2_client_secret == SECRET
    auth = app.extensions["llmauth"].authenticators["oauth2"]
    assert auth.introspection is True
    assert (auth.id_field, auth.role_field, auth.team_field) == ("uid", "litellm_role", "grp")


# -- the request sent --------------------------------------------------------------------------


def test_introspection_request_is_a_basic_auth_form_post(app_factory: Any,
                                                         requests_mock: Any) -> None:
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "u-1"})
    client = oauth_app(app_factory).test_client()
    r = chat(client)
    assert r.status_code == 200 and r.get_json()["principal"]["user_id"] == "u-1"
    sent = requests_mock.last_request
    assert sent.method == "POST"
    assert sent.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert parse_qs(sent.text) == {"token": [TOKEN], "token_type_hint": ["access_token"]}
    expected = base64.b64encode(f"gateway:{SECRET}".encode()).decode()
    assert sent.headers["Authorization"] == f"Basic {expected}"


def test_token_info_request_is_a_bearer_get(app_factory: Any, requests_mock: Any) -> None:
    requests_mock.get(TOKEN_INFO, json={"sub": "u-2", "team_id": "t-2"})
    client = oauth_app(app_factory, TOKEN_INFO).test_client()
    assert client.post("/team/new", json={"team_id": "t-2"}, headers=ADMIN).status_code == 200
    r = chat(client)
    assert r.get_json()["principal"]["team_id"] == "t-2"
    sent = requests_mock.last_request
    assert sent.method == "GET" and sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert sent.body is None


def test_claims_are_the_answer_without_its_token_members(app_factory: Any,
                                                      requests_mock: Any) -> None:
    """``current_principal.claims`` is the provider's answer, less any member that carries a
    token (a userinfo-style endpoint may echo one): host code may log claims."""
    echoed = {name: record_secret(f"{name}-" + "Qw3rTy9UiOp2") for name in
              ("access_token", "refresh_token", "id_token", "token")}
    requests_mock.get(TOKEN_INFO, json={"sub": "u-9", "email": "u9@corp.example", **echoed})
    app = oauth_app(app_factory, TOKEN_INFO)
    seen: dict[str, Any] = {}

    @app.post("/v1/claims")
    @app.llmauth.route_group("llm_api_routes")  # type: ignore[attr-defined]
    def claims() -> Any:
        from flask_llmauth import current_principal
        seen.update(current_principal.claims)
        return {"ok": True}

    assert app.test_client().post("/v1/claims", json={"model": "gpt-4o"},
                                  headers=bearer(TOKEN)).status_code == 200
    assert seen == {"sub": "u-9", "email": "u9@corp.example"}


@pytest.mark.parametrize("endpoint", [ENDPOINT, TOKEN_INFO])
def test_team_named_by_the_provider_must_exist(app_factory: Any, requests_mock: Any,
                                               endpoint: str) -> None:
    """A team the provider names that does not exist is a 403, not a team principal without
    the team's models, budget and limits; the refusal is not kept, so creating the team
    lets the same token in."""
    answer = {"active": True, "sub": "u-3", "team_id": "t-ghost"}
    requests_mock.post(ENDPOINT, json=answer)
    requests_mock.get(TOKEN_INFO, json=answer)
    client = oauth_app(app_factory, endpoint).test_client()
    error = assert_error(chat(client), 403)
    assert error["message"] == ("Team doesn't exist in db. Team=t-ghost. Create team via "
                                "`/team/new` call.")
    assert client.get("/team/info?team_id=t-ghost", headers=ADMIN).status_code == 404
    assert client.post("/team/new", json={"team_id": "t-ghost"},
                       headers=ADMIN).status_code == 200
    assert chat(client).get_json()["principal"]["team_id"] == "t-ghost"


def test_cache_is_keyed_by_the_whole_token(app_factory: Any, requests_mock: Any) -> None:
    prefix = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9" + "x" * 30
    first, second = record_secret(prefix + "-first"), record_secret(prefix + "-second")

    def answer(request: Any, context: Any) -> dict[str, Any]:
        token = parse_qs(request.text)["token"][0]
        return {"active": True, "sub": "victim" if token == first else "attacker"}

    requests_mock.post(ENDPOINT, json=answer)
    client = oauth_app(app_factory).test_client()
    assert chat(client, first).get_json()["principal"]["user_id"] == "victim"
    assert chat(client, second).get_json()["principal"]["user_id"] == "attacker"
    assert chat(client, first).get_json()["principal"]["user_id"] == "victim"
    assert requests_mock.call_count == 2  # one call per token, then the cache


def test_cache_entry_ends_at_exp(app_factory: Any, requests_mock: Any) -> None:
    exps: list[float] = []

    def answer(request: Any, context: Any) -> dict[str, Any]:
        if not exps:  # the token's exp, fixed when it is first introspected
            exps.append(time.time() + 2)
        return {"active": True, "sub": "u", "exp": exps[0]}

    requests_mock.post(ENDPOINT, json=answer)
    client = oauth_app(app_factory, oauth2_cache_ttl=600).test_client()
    assert chat(client).status_code == 200
    assert chat(client).status_code == 200
    assert requests_mock.call_count == 1
    time.sleep(max(0.0, exps[0] + 0.1 - time.time()))
    assert_error(chat(client), 401)


def test_refusals_are_remembered_briefly(app_factory: Any, requests_mock: Any) -> None:
    requests_mock.post(ENDPOINT, json={"active": False})
    client = oauth_app(app_factory, negative_cache_ttl=3).test_client()
    assert_error(chat(client), 401)
    refused = time.monotonic()
    assert_error(chat(client), 401)
    assert requests_mock.call_count == 1
    time.sleep(max(0.0, refused + 3.1 - time.monotonic()))
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "u"})
    assert chat(client).status_code == 200


# -- answers that refuse the token (401) -------------------------------------------------------


@pytest.mark.parametrize("answer", [
    {"active": False},
    {"active": False, "sub": "u", "role": "proxy_admin"},
    {"active": True, "sub": "u", "exp": 1},
    {"active": True, "sub": "u", "exp": "soon"},
    {"active": True, "sub": "u", "exp": True},
    {"active": True, "sub": "u", "role": "god"},
    {"active": True},
    {"active": True, "sub": ""},
    {"active": True, "sub": "a,b"},
    {"active": True, "sub": ["u"]},
], ids=repr)
def test_introspection_answers_that_refuse(app_factory: Any, requests_mock: Any,
                                           answer: dict[str, Any]) -> None:
    requests_mock.post(ENDPOINT, json=answer)
    assert_error(chat(oauth_app(app_factory).test_client()), 401)


def test_exp_as_digit_string_is_accepted(app_factory: Any, requests_mock: Any) -> None:
    exp = str(int(time.time()) + 60)
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "u", "exp": exp})
    assert chat(oauth_app(app_factory).test_client()).status_code == 200


@pytest.mark.parametrize("status", [400, 401, 403])
def test_token_info_refusal_statuses_are_401(app_factory: Any, requests_mock: Any,
                                             status: int) -> None:
    requests_mock.get(TOKEN_INFO, status_code=status, json={"error": "invalid_token"})
    assert_error(chat(oauth_app(app_factory, TOKEN_INFO).test_client()), 401)


def test_token_info_active_false_is_401(app_factory: Any, requests_mock: Any) -> None:
    requests_mock.get(TOKEN_INFO, json={"active": False, "sub": "u"})
    assert_error(chat(oauth_app(app_factory, TOKEN_INFO).test_client()), 401)


# -- provider failures (503, never a pass, never cached) ---------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"status_code": 500, "json": {"active": True, "sub": "u"}},
    {"status_code": 502, "text": "bad gateway"},
    {"status_code": 503, "text": ""},
    {"status_code": 401, "json": {"error": "invalid_client"}},  # our client credentials
    {"status_code": 400, "json": {"error": "invalid_request"}},
    {"status_code": 429, "text": "slow down"},
    {"text": "{not json"},
    {"text": ""},
    {"json": ["active", True]},
    {"json": "active"},
    {"json": {"sub": "u"}},                    # no `active`
    {"json": {"active": "true", "sub": "u"}},  # not a boolean
    {"json": {"active": 1, "sub": "u"}},
    {"text": '{"active": true, "sub": "u", "pad": "' + "x" * 300_000 + '"}'},
    {"exc": requests.exceptions.ConnectTimeout},
    {"exc": requests.exceptions.ReadTimeout},
    {"exc": requests.exceptions.ConnectionError},
    {"exc": requests.exceptions.SSLError},
    {"exc": requests.exceptions.ChunkedEncodingError},
], ids=repr)
def test_introspection_failures_are_503(app_factory: Any, requests_mock: Any,
                                        kwargs: dict[str, Any]) -> None:
    requests_mock.post(ENDPOINT, **kwargs)
    client = oauth_app(app_factory).test_client()
    error = assert_error(chat(client), 503, "auth_provider_unavailable")
    assert TOKEN not in error["message"]
    assert_error(chat(client), 503)
    assert requests_mock.call_count == 2  # not cached
    requests_mock.post(ENDPOINT, json={"active": True, "sub": "u"})
    assert chat(client).status_code == 200


@pytest.mark.parametrize("status", [302, 307, 404, 405, 500])
def test_token_info_failures_are_503_and_redirects_not_followed(
        app_factory: Any, requests_mock: Any, status: int) -> None:
    elsewhere = "https://attacker.example/steal"
    requests_mock.get(TOKEN_INFO, status_code=status, headers={"Location": elsewhere})
    requests_mock.get(elsewhere, json={"sub": "attacker"})
    assert_error(chat(oauth_app(app_factory, TOKEN_INFO).test_client()), 503)
    assert not any(r.url.startswith(elsewhere) for r in requests_mock.request_history)


# -- real sockets that misbehave ---------------------------------------------------------------


@contextmanager
def misbehaving_server(reply: bytes | None) -> Iterator[int]:
    """A TCP server on loopback that never answers (``reply=None``) or answers ``reply``
    and closes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            if reply is None:
                held.append(conn)  # keep it open, say nothing
                continue
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


@pytest.mark.parametrize("reply", [None, b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\n"
                                   b"Content-Length: 100\r\n\r\n{\"active\": true"])
def test_silent_or_broken_provider_is_503(app_factory: Any, reply: bytes | None) -> None:
    with misbehaving_server(reply) as port:
        client = oauth_app(app_factory, f"http://127.0.0.1:{port}/introspect",
                           oauth2_timeout=0.3).test_client()
        started = time.monotonic()
        assert_error(chat(client), 503, "auth_provider_unavailable")
        assert time.monotonic() - started < 5


def test_nothing_listening_is_503(app_factory: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = oauth_app(app_factory, f"http://127.0.0.1:{port}/introspect").test_client()
    assert_error(chat(client), 503, "auth_provider_unavailable")
