"""The example gateway's forwarding to a real upstream (``GATEWAY_UPSTREAM_BASE_URL``), as an
operator deploys it: what the upstream sees, and what of the upstream's answer reaches the
caller. The upstream is a real HTTP server on a loopback port, in a thread."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask

from example_app import create_app
from flask_llmauth.spend import flush
from tests.conftest import migrated_sqlite_url
from tests.helpers import ADMIN, MASTER_KEY, assert_error, new_key, record_secret, serve_in_thread

pytestmark = pytest.mark.integration

UPSTREAM_KEY = record_secret("sk-upstream-" + "U9pstreamKey0123456789abcdefghij")
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                       "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

Reply = Callable[[BaseHTTPRequestHandler], None]


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes,
         headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class FakeUpstream:
    """An HTTP server answering every POST with ``self.reply``; it keeps each request's
    headers in ``self.requests`` and its JSON body in ``self.bodies`` (the handler's
    ``body`` while it replies)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.reply: Reply = lambda h: send(h, 200, json.dumps(ANSWER).encode())
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.body = json.loads(raw) if raw else {}
                upstream.requests.append(dict(self.headers))
                upstream.bodies.append(self.body)
                upstream.reply(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = serve_in_thread(self.server)
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


def _gateway(tmp_path: Any, base_url: str, **config: Any) -> Flask:
    return create_app({"TESTING": True, "LLMAUTH_MASTER_KEY": MASTER_KEY,
                       "LLMAUTH_DATABASE_URL": migrated_sqlite_url(tmp_path),
                       "GATEWAY_UPSTREAM_BASE_URL": base_url,
                       "GATEWAY_UPSTREAM_API_KEY": UPSTREAM_KEY, **config})


def _gateway_with(tmp_path: Any, base_url: str, monkeypatch: pytest.MonkeyPatch,
                  source: str, name: str, value: int) -> Flask:
    """A gateway given one ``GATEWAY_*`` setting from its config or from the environment."""
    if source == "environment":
        monkeypatch.setenv(name, str(value))
        return _gateway(tmp_path, base_url)
    return _gateway(tmp_path, base_url, **{name: value})


@pytest.fixture
def gateway(tmp_path: Any, upstream: FakeUpstream) -> Iterator[Flask]:
    app = _gateway(tmp_path, upstream.base_url)
    yield app
    app.extensions["llmauth"].close()


def test_the_upstream_sees_the_gateways_key_only_and_no_cookie(
        gateway: Flask, upstream: FakeUpstream) -> None:
    """No header of the caller is forwarded, and a cookie the upstream sets is neither kept
    (the session's cookie jar used to send it with every later request, whoever made it)
    nor passed on to the caller."""
    upstream.reply = lambda h: send(h, 200, json.dumps(ANSWER).encode(),
                                    {"Set-Cookie": "session=upstream-session; Path=/"})
    client = gateway.test_client()
    caller = new_key(client, models=["gpt-4o"])["key"]
    for headers in ({"Authorization": f"Bearer {caller}"}, {"x-api-key": caller},
                    {"api-key": caller}):
        answer = client.post("/v1/chat/completions", json=CHAT, headers={
            **headers, "Cookie": "caller=cookie", "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Host": "evil.example", "Connection": "keep-alive, X-Secret",
            "X-Secret": "s"})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert answer.get_json() == ANSWER
        assert "Set-Cookie" not in answer.headers
    assert len(upstream.requests) == 3
    for seen in upstream.requests:
        assert seen["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert seen["x-api-key"] == UPSTREAM_KEY
        assert caller not in json.dumps(seen)
        names = {name.lower() for name in seen}
        assert names.isdisjoint({"cookie", "api-key", "x-forwarded-for", "x-forwarded-host",
                                 "x-secret"}), seen
        assert seen["Host"] == upstream.base_url.split("/")[2]


def test_only_end_to_end_headers_of_the_answer_reach_the_caller(
        gateway: Flask, upstream: FakeUpstream) -> None:
    """Hop-by-hop headers, the upstream's server banner and its account headers stay at
    the gateway; the content type, request id and Retry-After pass."""
    upstream.reply = lambda h: send(h, 200, json.dumps(ANSWER).encode(), {
        "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic", "Upgrade": "h2c",
        "openai-organization": "acme-internal", "x-request-id": "req_1",
        "Retry-After": "1", "Strict-Transport-Security": "max-age=1"})
    answer = gateway.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert answer.status_code == 200
    names = {name.lower() for name in answer.headers.keys()}
    assert names.isdisjoint({"keep-alive", "proxy-authenticate", "upgrade",
                             "openai-organization", "server", "strict-transport-security"})
    assert answer.headers["x-request-id"] == "req_1"
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_an_upstream_redirect_is_not_followed_nor_passed_on(
        gateway: Flask, upstream: FakeUpstream, status: int) -> None:
    upstream.reply = lambda h: send(h, status, b"", {
        "Location": "http://169.254.169.254/latest/meta-data/"})
    answer = gateway.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert_error(answer, 502, "upstream_error")
    assert "Location" not in answer.headers
    assert "169.254" not in answer.get_data(as_text=True)
    assert len(upstream.requests) == 1


def _echo_key(status: int) -> Reply:
    def reply(handler: BaseHTTPRequestHandler) -> None:
        send(handler, status, json.dumps({"error": {
            "message": f"Incorrect API key provided: {handler.headers['Authorization']}",
            "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        ).encode(), {"WWW-Authenticate": "Bearer", "Retry-After": "7", "Server": "upstream"})
    return reply


def test_an_upstream_that_refuses_the_gateways_key_is_a_502_without_it(
        gateway: Flask, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    """The upstream's 401 concerns the gateway's credential, not the caller's: passed on,
    it echoed ``GATEWAY_UPSTREAM_API_KEY`` to the caller and told an SDK its own key was
    wrong."""
    upstream.reply = _echo_key(401)
    answer = gateway.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    error = assert_error(answer, 502, "upstream_auth_error")
    assert "GATEWAY_UPSTREAM_API_KEY" in error["message"]
    assert UPSTREAM_KEY not in answer.get_data(as_text=True)
    assert "WWW-Authenticate" not in answer.headers
    assert UPSTREAM_KEY not in caplog.text


@pytest.mark.parametrize("status", [400, 403, 404, 429, 500])
def test_the_gateways_key_is_redacted_from_an_upstream_error_passed_on(
        gateway: Flask, upstream: FakeUpstream, status: int) -> None:
    upstream.reply = _echo_key(status)
    answer = gateway.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    assert answer.status_code == status
    text = answer.get_data(as_text=True)
    assert UPSTREAM_KEY not in text
    assert answer.get_json()["error"]["message"] == (
        "Incorrect API key provided: Bearer [redacted]")
    assert answer.headers["Retry-After"] == "7"  # e.g. when to retry a 429
    assert "WWW-Authenticate" not in answer.headers and "Server" not in answer.headers


@pytest.mark.parametrize("status,expected", [(502, 502), (500, 502), (404, 404), (429, 429),
                                             (200, 502)])
def test_an_upstream_answer_that_is_not_json_is_a_json_error(
        gateway: Flask, upstream: FakeUpstream, status: int, expected: int) -> None:
    """An HTML error page of a proxy in front of the upstream (or a truncated answer) used
    to reach the caller as is; an SDK cannot parse it."""
    upstream.reply = lambda h: send(h, status, b"<html><body>Bad Gateway</body></html>",
                                    {"Content-Type": "text/html", "Retry-After": "3"})
    answer = gateway.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
    error = assert_error(answer, expected, "upstream_error")
    assert str(status) in error["message"]
    assert "html" not in answer.get_data(as_text=True).lower()
    if status >= 400:
        assert answer.headers["Retry-After"] == "3"


@pytest.mark.parametrize("source", ["config", "environment"])
def test_an_upstream_answer_over_the_size_limit_is_a_502(
        tmp_path: Any, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch,
        source: str) -> None:
    app = _gateway_with(tmp_path, upstream.base_url, monkeypatch, source,
                        "GATEWAY_UPSTREAM_MAX_BYTES", 4096)
    try:
        big = dict(ANSWER, id="x" * 5000)
        upstream.reply = lambda h: send(h, 200, json.dumps(big).encode())
        answer = app.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
        assert_error(answer, 502, "upstream_error")
        upstream.reply = lambda h: send(h, 200, json.dumps(ANSWER).encode())
        fits = app.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
        assert fits.get_json() == ANSWER
    finally:
        app.extensions["llmauth"].close()


@pytest.mark.parametrize("value", [0, -1, "big", 1.5, True])
def test_an_invalid_size_limit_fails_at_start(tmp_path: Any, value: Any) -> None:
    with pytest.raises(ValueError, match="GATEWAY_UPSTREAM_MAX_BYTES"):
        _gateway(tmp_path, "http://127.0.0.1:9/v1", GATEWAY_UPSTREAM_MAX_BYTES=value)


def test_an_unreachable_upstream_is_a_503(tmp_path: Any) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = _gateway(tmp_path, f"http://127.0.0.1:{port}/v1")
    try:
        answer = app.test_client().post("/v1/chat/completions", json=CHAT, headers=ADMIN)
        assert_error(answer, 503, "upstream_unavailable")
    finally:
        app.extensions["llmauth"].close()


def test_a_client_that_leaves_mid_stream_closes_the_upstream_connection_and_is_charged(
        gateway: Flask, upstream: FakeUpstream) -> None:
    """The upstream streams until its connection closes: the caller reads one event and
    hangs up, the gateway closes the upstream connection (it used to stay open, its
    response unread) and the request is charged (docs/spend.md)."""
    closed = threading.Event()

    def stream_forever(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        event = b'data: {"choices": [{"index": 0, "delta": {"content": "tok "}}]}\n\n'
        chunk = b"%x\r\n%s\r\n" % (len(event), event)
        handler.close_connection = True
        while True:
            try:
                handler.wfile.write(chunk)
                handler.wfile.flush()
                if not handler.request.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    break  # the gateway closed the connection
            except BlockingIOError:
                continue  # open, nothing sent by the gateway: stream on
            except OSError:
                break  # reset by the gateway
        closed.set()

    upstream.reply = stream_forever
    answer = gateway.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True},
                                        headers=ADMIN, buffered=False)
    assert answer.status_code == 200
    assert b"tok" in next(iter(answer.response))
    assert not closed.is_set()
    answer.close()
    assert closed.wait(10), "the upstream connection is still open"
    assert flush(gateway) == 1


def test_the_first_start_instance_folder_is_private(tmp_path: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance folder holds the generated master key and the SQLite database: created
    owner-only (it was created world-listable, 0755 under the usual umask)."""
    instance = tmp_path / "deploy" / "instance"
    monkeypatch.setenv("GATEWAY_INSTANCE_PATH", str(instance))
    monkeypatch.delenv("LLMAUTH_MASTER_KEY", raising=False)
    app = create_app({"TESTING": True})
    try:
        record_secret(app.config["LLMAUTH_MASTER_KEY"])
        assert stat.S_IMODE(os.stat(instance).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(instance / "master_key").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(instance / "llmauth.db").st_mode) == 0o600
    finally:
        app.extensions["llmauth"].close()


@pytest.mark.parametrize("mode,warned", [(0o644, True), (0o640, True), (0o600, False)])
def test_a_master_key_file_others_may_read_is_warned_about(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        mode: int, warned: bool) -> None:
    """A ``master_key`` file written by hand or copied with a wider mode is used, and the
    start-up says so, naming the file (never the key)."""
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o700)
    key = "sk-" + "HandWritten" * 4
    record_secret(key)
    (instance / "master_key").write_text(key + "\n")
    os.chmod(instance / "master_key", mode)
    monkeypatch.setenv("GATEWAY_INSTANCE_PATH", str(instance))
    monkeypatch.delenv("LLMAUTH_MASTER_KEY", raising=False)
    app = create_app({"TESTING": True})
    try:
        assert app.config["LLMAUTH_MASTER_KEY"] == key
        found = [r.getMessage() for r in caplog.records if "holds the master key" in r.getMessage()]
        assert bool(found) is warned
        if warned:
            assert f"mode {mode:03o}" in found[0] and "chmod 600" in found[0]
        assert key not in caplog.text
    finally:
        app.extensions["llmauth"].close()



# -- streamed usage ---------------------------------------------------------------------------

USAGE = {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}


def _sse_events(path: str) -> tuple[list[bytes], bytes]:
    """A streamed answer of ``path`` as an OpenAI upstream asked for ``include_usage`` sends
    it (every chunk with ``"usage": null``, then a usage-only chunk): (the events, without
    the usage-only one; the usage-only event)."""
    if path == "/v1/chat/completions":
        base = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": "gpt-4o-2024"}
        deltas = [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}},
                  {"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]
    else:
        base = {"id": "cmpl-s", "object": "text_completion", "model": "gpt-4o-2024"}
        deltas = [{"index": 0, "text": "Hel"}, {"index": 0, "text": "lo", "finish_reason": "stop"}]
    events = [b"data: " + json.dumps({**base, "choices": [d], "usage": None}).encode() + b"\n\n"
              for d in deltas]
    usage = b"data: " + json.dumps({**base, "choices": [], "usage": USAGE}).encode() + b"\n\n"
    return [*events, b"data: [DONE]\n\n"], usage


def _stream(pieces: Callable[[bytes], list[bytes]], path: str) -> Reply:
    """An upstream streaming ``path``'s answer in HTTP chunks cut by ``pieces`` (each chunk
    is a separate network read at the gateway); the usage-only chunk only when the request
    asked for it, as OpenAI does."""
    def reply(handler: BaseHTTPRequestHandler) -> None:
        events, usage = _sse_events(path)
        if (getattr(handler, "body", {}).get("stream_options") or {}).get("include_usage"):
            events.insert(-1, usage)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for piece in pieces(b"".join(events)):
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            handler.wfile.flush()
        handler.wfile.write(b"0\r\n\r\n")
    return reply


def _cut_at(marker: bytes, offset: int) -> Callable[[bytes], list[bytes]]:
    """Two pieces, cut ``offset`` bytes into ``marker`` (one piece without the marker)."""
    def pieces(stream: bytes) -> list[bytes]:
        at = stream.find(marker)
        if at < 0:
            return [stream]
        return [stream[:at + offset], stream[at + offset:]]
    return pieces


SPLITS: dict[str, Callable[[bytes], list[bytes]]] = {
    "whole": lambda stream: [stream],
    "inside_usage": _cut_at(b'"usage": {', 4),
    "between_blank_line": _cut_at(b'"total_tokens": 1801}}\n', len(b'"total_tokens": 1801}}\n')),
    "byte_by_byte": lambda stream: [stream[i:i + 1] for i in range(len(stream))],
}


def _spend_rows(app: Flask) -> list[dict[str, Any]]:
    flush(app)
    logs = app.test_client().get("/spend/logs", headers=ADMIN)
    assert logs.status_code == 200, logs.get_data(as_text=True)
    return list(logs.get_json())


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_is_billed_the_upstreams_usage_and_shows_the_caller_what_it_asked(
        gateway: Flask, upstream: FakeUpstream, split: str, path: str,
        include_usage: bool) -> None:
    """The gateway asks the upstream for ``include_usage`` always. A caller who did not ask
    gets the stream without the usage-only chunk (``chunk.choices[0]`` would fail on it);
    one who asked gets it unchanged. Either is billed the upstream's exact counts (without
    ``include_usage`` upstream, the request was charged an estimate), also when the usage
    event arrives cut over several network reads."""
    upstream.reply = _stream(SPLITS[split], path)
    body: dict[str, Any] = ({**CHAT} if path == "/v1/chat/completions"
                            else {"model": "gpt-4o", "prompt": "hi"})
    body["stream"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    answer = gateway.test_client().post(path, json=body, headers=ADMIN)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    events, usage = _sse_events(path)
    if include_usage:
        events.insert(-1, usage)
    assert answer.get_data() == b"".join(events)
    [row] = _spend_rows(gateway)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"],
            row["status"]) == (1234, 567, False, "success")
    assert upstream.bodies[-1]["stream_options"] == {"include_usage": True}


def test_the_upstream_is_asked_for_usage_keeping_the_callers_other_stream_options(
        gateway: Flask, upstream: FakeUpstream) -> None:
    """Only OpenAI streams are asked for usage: an Anthropic stream reports it always, and
    a non-streamed answer carries it in its body."""
    upstream.reply = _stream(SPLITS["whole"], "/v1/chat/completions")
    client = gateway.test_client()
    options = {"include_obfuscation": False}
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", {
            "model": "gpt-4o", "prompt": "hi"})):
        sent = {**body, "stream": True, "stream_options": options}
        assert client.post(path, json=sent, headers=ADMIN).status_code == 200
        assert upstream.bodies[-1] == {**sent, "stream_options": {
            "include_obfuscation": False, "include_usage": True}}
    assert options == {"include_obfuscation": False}  # the caller's body is not changed
    for path, body in (("/v1/messages", {**CHAT, "max_tokens": 8, "stream": True}),
                       ("/v1/chat/completions", CHAT)):
        client.post(path, json=body, headers=ADMIN)
        assert upstream.bodies[-1] == body


# -- the deadline -----------------------------------------------------------------------------

DRIP_SECONDS = 30.0


def _drip(handler: BaseHTTPRequestHandler) -> None:
    """A JSON answer one byte at a time, each well inside any per-read timeout, the whole
    taking ``DRIP_SECONDS``; it stops when the gateway hangs up."""
    body = json.dumps(ANSWER).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    for i in range(len(body)):
        try:
            handler.wfile.write(body[i:i + 1])
            handler.wfile.flush()
        except OSError:
            return
        time.sleep(DRIP_SECONDS / len(body))


def _hold(handler: BaseHTTPRequestHandler) -> None:
    """Sends nothing for ``DRIP_SECONDS`` (or until the gateway hangs up), then answers."""
    handler.connection.settimeout(DRIP_SECONDS)
    try:
        if handler.connection.recv(1) == b"":
            return  # the gateway gave up
    except TimeoutError:
        pass
    send(handler, 200, json.dumps(ANSWER).encode(), {"Content-Type": "text/event-stream"})


@pytest.mark.parametrize("source", ["config", "environment"])
@pytest.mark.parametrize("reply,stream", [(_drip, False), (_hold, False), (_hold, True)])
def test_an_upstream_past_the_deadline_is_a_504(
        tmp_path: Any, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, source: str,
        reply: Reply, stream: bool) -> None:
    """``GATEWAY_UPSTREAM_TIMEOUT`` bounds a non-streamed exchange as a whole — an upstream
    dripping its answer a byte at a time held the request for as long as it liked, each read
    inside the per-read timeout — and the wait for a stream's first answer."""
    app = _gateway_with(tmp_path, upstream.base_url, monkeypatch, source,
                        "GATEWAY_UPSTREAM_TIMEOUT", 1)
    try:
        upstream.reply = reply
        started = time.monotonic()
        answer = app.test_client().post("/v1/chat/completions", json={**CHAT, "stream": stream},
                                        headers=ADMIN)
        assert time.monotonic() - started < DRIP_SECONDS / 2
        assert_error(answer, 504, "upstream_timeout")
        [row] = _spend_rows(app)
        assert row["status"] == "failure"
    finally:
        app.extensions["llmauth"].close()


def test_a_stream_may_run_past_the_deadline(tmp_path: Any, upstream: FakeUpstream) -> None:
    """The deadline bounds a stream's start only: once its first bytes came, a pause longer
    than the deadline between events is waited for (up to the per-read timeout)."""
    def slow_stream(handler: BaseHTTPRequestHandler) -> None:
        events, _ = _sse_events("/v1/chat/completions")
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for event in events:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            handler.wfile.flush()
            time.sleep(1)
        handler.wfile.write(b"0\r\n\r\n")

    app = _gateway(tmp_path, upstream.base_url, GATEWAY_UPSTREAM_TIMEOUT=0.5)
    try:
        upstream.reply = slow_stream
        answer = app.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True},
                                        headers=ADMIN)
        assert answer.status_code == 200
        assert answer.get_data() == b"".join(_sse_events("/v1/chat/completions")[0])
    finally:
        app.extensions["llmauth"].close()


@pytest.mark.parametrize("value", [0, -1, "soon", True, float("nan"), float("inf")])
def test_an_invalid_deadline_fails_at_start(tmp_path: Any, value: Any) -> None:
    with pytest.raises(ValueError, match="GATEWAY_UPSTREAM_TIMEOUT"):
        _gateway(tmp_path, "http://127.0.0.1:9/v1", GATEWAY_UPSTREAM_TIMEOUT=value)


def _stream_raw(stream: bytes) -> Reply:
    """An upstream streaming ``stream`` as it is, in one HTTP chunk."""
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(stream), stream))
    return reply


def _usage_event(usage: Any) -> bytes:
    return b"data: " + json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk",
                                   "model": "gpt-4o-2024", "choices": [],
                                   "usage": usage}).encode()


@pytest.mark.parametrize("usage", [
    {}, {"total_tokens": 1801}, {"prompt_tokens": 1234}, {"completion_tokens": 567},
    {"prompt_tokens": 1234, "completion_tokens": "567"},
    {"prompt_tokens": -1, "completion_tokens": 567},
])
def test_a_usage_chunk_without_both_counts_leaves_the_request_estimated(
        gateway: Flask, upstream: FakeUpstream, usage: dict[str, Any]) -> None:
    """A usage-only chunk the caller did not ask for is hidden; billed as it says only when
    it gives both counts — one that leaves a count out is not a count of 0 (the prompt, or
    the answer, would go unbilled): the request is estimated, as without the chunk."""
    events, _ = _sse_events("/v1/chat/completions")
    upstream.reply = _stream_raw(b"".join(events[:-1]) + _usage_event(usage) + b"\n\n"
                                 + events[-1])
    answer = gateway.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True},
                                        headers=ADMIN)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_data() == b"".join(events)
    [row] = _spend_rows(gateway)
    assert row["estimated"] is True
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0


@pytest.mark.parametrize("end", [b"", b"\n", b"\r\n"])
def test_a_usage_chunk_that_ends_the_stream_without_a_blank_line_is_billed(
        gateway: Flask, upstream: FakeUpstream, end: bytes) -> None:
    """An upstream whose last bytes are the usage-only chunk (no blank line, no
    ``[DONE]``): the chunk is still taken out and its counts billed."""
    events, _ = _sse_events("/v1/chat/completions")
    upstream.reply = _stream_raw(b"".join(events[:-1]) + _usage_event(USAGE) + end)
    answer = gateway.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True},
                                        headers=ADMIN)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.get_data() == b"".join(events[:-1])
    [row] = _spend_rows(gateway)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        1234, 567, False)
