"""``LLMAUTH_MAX_REQUEST_SIZE_MB`` (LiteLLM's ``general_settings.max_request_size_mb``): the
request body of every guarded route is bounded; a larger one is a 413 JSON error, declared
(``Content-Length``, refused before a byte is read) or chunked (read up to the limit only).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import yaml

from flask_llmauth.config import UNIMPLEMENTED_PROTECTIONS, load_settings
from flask_llmauth.errors import ConfigurationError
from tests.helpers import ADMIN, MASTER_KEY, assert_error, bearer, new_key

CHAT = "/v1/chat/completions"
#: 0.01 MB = 10485 bytes.
LIMIT_MB = 0.01
LIMIT = int(LIMIT_MB * 1024 * 1024)


class Unreadable(io.RawIOBase):
    """A request stream that must not be read."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise AssertionError("the body was read")


class Endless(io.RawIOBase):
    """A request stream that never ends; counts what was read from it."""

    def __init__(self) -> None:
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer)
        buffer[:size] = b"a" * size
        self.read_bytes += size
        return size


def chunked(client: Any, path: str, stream: Any, headers: dict[str, str]) -> Any:
    """A body with no Content-Length, as a server that decodes chunked framing hands it over
    (``wsgi.input_terminated``)."""
    return client.post(path, headers={**headers, "Transfer-Encoding": "chunked",
                                      "Content-Type": "application/json"},
                       environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True})


# -- configuration ----------------------------------------------------------------------------


def test_the_setting_is_off_by_default_and_read_from_config_yaml(tmp_path: Path) -> None:
    assert load_settings({}, environ={}).max_request_size_mb is None
    assert load_settings({"LLMAUTH_MAX_REQUEST_SIZE_MB": "2.5"}, environ={}
                         ).max_request_size_mb == 2.5
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"general_settings": {"max_request_size_mb": 4}}))
    settings = load_settings({"LLMAUTH_CONFIG_FILE": str(config_file)}, environ={})
    assert settings.max_request_size_mb == 4
    assert settings.max_request_body_bytes == 4 * 1024 * 1024
    assert "general_settings.max_request_size_mb" not in UNIMPLEMENTED_PROTECTIONS


@pytest.mark.parametrize("value", [0, -1, "lots", float("inf"), True, 1e-7])
def test_a_bad_size_is_refused_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="LLMAUTH_MAX_REQUEST_SIZE_MB"):
        load_settings({"LLMAUTH_MAX_REQUEST_SIZE_MB": value}, environ={})


# -- declared bodies --------------------------------------------------------------------------


def test_a_declared_body_over_the_limit_is_a_413_before_it_is_read(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB})
    client = app.test_client()
    key = new_key(client, models=["gpt-4o"])["key"]
    for path, headers in ((CHAT, bearer(key)), ("/v1beta/models/gpt-4o:generateContent",
                                                bearer(key)), (CHAT, {}), (CHAT, ADMIN)):
        response = client.post(path, headers={**headers, "Content-Type": "application/json"},
                               environ_overrides={"wsgi.input": Unreadable(),
                                                  "CONTENT_LENGTH": str(LIMIT + 1)})
        error = assert_error(response, 413, "invalid_request_error")
        assert "10485 bytes" in error["message"]
    # Within the limit: answered as before.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (LIMIT - 200)}]}
    response = client.post(CHAT, json=body, headers=bearer(key))
    assert response.status_code == 200, response.get_data(as_text=True)


def test_unset_it_bounds_nothing(app_factory: Any) -> None:
    app = app_factory()
    client = app.test_client()
    key = new_key(client, models=["gpt-4o"])["key"]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * (3 << 20)}]}
    assert client.post(CHAT, json=body, headers=bearer(key)).status_code == 200


def test_the_smaller_of_the_two_limits_bounds_the_management_api(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB,
                       "LLMAUTH_MAX_API_BODY_SIZE": 4096})
    client = app.test_client()
    metadata = {"metadata": {"x": "a" * 5000}}  # over 4096, under the request limit
    assert_error(client.post("/key/generate", json=metadata, headers=ADMIN), 413)
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB})  # 1 MiB API bound
    client = app.test_client()
    metadata = {"metadata": {"x": "a" * (LIMIT + 10)}}
    assert_error(client.post("/key/generate", json=metadata, headers=ADMIN), 413)
    assert client.post("/key/generate", json={"metadata": {"x": "a" * 5000}},
                       headers=ADMIN).status_code == 200


def test_the_host_callback_answers_the_413(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB})

    @app.llmauth.error_handler
    def answer(error: Any) -> Any:
        return {"failed": error.status}, error.status

    response = app.test_client().post(CHAT, data=b"x" * (LIMIT + 1), headers=ADMIN)
    assert (response.status_code, response.get_json()) == (413, {"failed": 413})


# -- chunked bodies ---------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_a_413_read_only_up_to_the_limit(
        app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB})
    client = app.test_client()
    key = new_key(client, models=["gpt-4o"])["key"]
    for path in (CHAT, "/v1beta/models/gpt-4o:generateContent", "/key/generate"):
        stream = Endless()
        response = chunked(client, path, stream, bearer(key) if path != "/key/generate"
                           else ADMIN)
        assert_error(response, 413, "invalid_request_error")
        assert stream.read_bytes <= LIMIT + 65536
    # A chunked body within the limit reaches the view whole.
    body = b'{"model": "gpt-4o", "messages": []}'
    response = chunked(client, CHAT, io.BytesIO(body), bearer(key))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json()["model"] == "gpt-4o"


def test_a_chunked_body_is_not_read_for_a_caller_without_a_credential(
        app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB})
    response = chunked(app.test_client(), CHAT, Unreadable(), {})
    assert_error(response, 401)


def test_the_master_key_is_bounded_too(app_factory: Any) -> None:
    app = app_factory({"LLMAUTH_MAX_REQUEST_SIZE_MB": LIMIT_MB})
    response = chunked(app.test_client(), CHAT, Endless(), bearer(MASTER_KEY))
    assert_error(response, 413)


# -- over a real socket -----------------------------------------------------------------------


@pytest.mark.integration
def test_a_chunked_upload_over_a_socket_to_the_gateway(tmp_path: Path) -> None:
    """gunicorn decodes the chunked framing itself: the gateway still answers 413 (the
    extension's envelope) for a chunked body over the limit, and serves one within it."""
    from tests.integration.gateway import gunicorn
    from tests.test_hostile_input import assert_clean, raw

    gateway = gunicorn(tmp_path, {"LLMAUTH_MASTER_KEY": MASTER_KEY,
                                  "LLMAUTH_DATABASE_URL": f"sqlite:///{tmp_path / 'gw.db'}",
                                  "LLMAUTH_MAX_REQUEST_SIZE_MB": "0.05"},
                       workers=1, threads=2, name="request-size")

    def upload(path: str, body: bytes) -> Any:
        chunks = [body[i:i + 4096] for i in range(0, len(body), 4096)]
        framed = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in chunks) + b"0\r\n\r\n"
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {MASTER_KEY}\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
        return raw(gateway.port, head + framed)

    big = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + (
        b"x" * 200_000) + b'"}]}'
    small = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    with gateway.start():
        for path in ("/v1/chat/completions", "/key/generate"):
            reply = upload(path, big)
            assert_clean(reply, 413)
            assert reply.json()["error"]["type"] == "invalid_request_error"
            assert "52428 bytes" in reply.json()["error"]["message"]
        reply = upload("/v1/chat/completions", small)
        assert reply.status == 200, reply.text[:500]
        assert "Traceback" not in gateway.output()
