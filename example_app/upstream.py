"""Optional forwarding to a real OpenAI-compatible upstream (``GATEWAY_UPSTREAM_BASE_URL``).

The caller's credential is never forwarded: the upstream sees only the gateway's own
``GATEWAY_UPSTREAM_API_KEY``, the JSON body and ``Content-Type``; no header of the caller
(cookies, ``X-Forwarded-*``) goes upstream. Of the upstream's answer, the caller gets:

- a successful (2xx) answer with the headers in :data:`PASSED_HEADERS` only (no
  ``Set-Cookie``, hop-by-hop, server or provider-account headers); a non-streamed one must
  be JSON of at most ``GATEWAY_UPSTREAM_MAX_BYTES`` bytes (else a 502);
- an error (4xx, 5xx) as the upstream's JSON error with its status and those headers, the
  gateway's key redacted from it; one that is not JSON becomes the gateway's own JSON error
  (a 5xx as 502; ``Retry-After`` kept);
- a redirect is never followed nor passed on (a 502), and an upstream 401 (the upstream
  refused the gateway's key, not the caller's) is a 502 ``upstream_auth_error``.

No cookie the upstream sets is kept, so nothing of one caller's answer rides on another's
request.

A streamed OpenAI answer (``/chat/completions``, ``/completions``) is always asked for its
usage (``stream_options.include_usage``), so the request is billed the upstream's counts
rather than an estimate; when the caller did not ask for it, the usage-only chunk is taken
out of the relayed stream and its counts reported with :func:`flask_llmauth.record_usage`.

``GATEWAY_UPSTREAM_TIMEOUT`` (seconds) bounds a non-streamed exchange as a whole, connect to
last byte, and a stream's wait for its answer to start (then each read of it waits up to
300 s): past it, the caller gets a 504 ``upstream_timeout``.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections.abc import Iterator, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
from flask import Response, current_app, stream_with_context

from flask_llmauth import record_usage
from flask_llmauth.authn.deadline import exchange_timeout, read_body
from flask_llmauth.errors import ConfigurationError, LLMAuthError, ServiceUnavailable

#: Seconds a forwarded exchange may take (the OpenAI SDK's own default timeout: the gateway
#: does not give up on a long generation before its caller would).
DEFAULT_TIMEOUT = 600.0
#: Seconds the connect may take, within that deadline.
_CONNECT_TIMEOUT = 5.0
#: Seconds each read of a stream may wait once the stream started (a stream as a whole may
#: run longer than any deadline).
_STREAM_READ_TIMEOUT = 300.0
DEFAULT_MAX_BYTES = 128 << 20
_MAX_ERROR_BYTES = 1 << 20
#: Response headers passed on to the caller; every other one stays at the gateway.
PASSED_HEADERS = frozenset({"content-type", "cache-control", "retry-after", "x-request-id",
                            "request-id"})
REDACTED = "[redacted]"


class UpstreamError(LLMAuthError):
    status = 502
    error_type = "upstream_error"


class UpstreamTimeout(LLMAuthError):
    status = 504
    error_type = "upstream_timeout"
    default_message = "The upstream model provider did not answer in time."


#: Paths whose streams report usage only when asked (``stream_options.include_usage``).
_OPENAI_STREAMS = frozenset({"/chat/completions", "/completions"})


class Upstream:
    def __init__(self, base_url: str, api_key: str | None,
                 max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.session = requests.Session()
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keep none

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Upstream | None:
        base_url = config.get("GATEWAY_UPSTREAM_BASE_URL")
        if not base_url:
            return None
        max_bytes = config.get("GATEWAY_UPSTREAM_MAX_BYTES", DEFAULT_MAX_BYTES)
        if type(max_bytes) is not int or max_bytes < 1:
            raise ConfigurationError(
                "GATEWAY_UPSTREAM_MAX_BYTES must be a positive number of bytes.")
        timeout = config.get("GATEWAY_UPSTREAM_TIMEOUT", DEFAULT_TIMEOUT)
        if type(timeout) not in (int, float) or not math.isfinite(timeout) or timeout <= 0:
            raise ConfigurationError(
                "GATEWAY_UPSTREAM_TIMEOUT must be a positive number of seconds.")
        return cls(base_url, config.get("GATEWAY_UPSTREAM_API_KEY"), max_bytes, float(timeout))

    def forward(self, path: str, body: Mapping[str, Any]) -> Response:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
            headers["x-api-key"] = self.api_key
        stream = bool(body.get("stream"))
        hide_usage = stream and path in _OPENAI_STREAMS and not _asks_for_usage(body)
        if hide_usage:
            body = {**body, "stream_options": {**(body.get("stream_options") or {}),
                                               "include_usage": True}}
        deadline = time.monotonic() + self.timeout
        timeout = exchange_timeout(self.timeout, _CONNECT_TIMEOUT)
        try:
            upstream = self.session.post(self.base_url + path, json=body, headers=headers,
                                         stream=True, timeout=timeout, allow_redirects=False)
        except requests.ReadTimeout:
            raise UpstreamTimeout() from None
        except requests.RequestException:
            raise ServiceUnavailable("The upstream model provider is unreachable.",
                                     error_type="upstream_unavailable") from None
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        if not 200 <= upstream.status_code < 300:
            return self._error(upstream, passed, deadline)
        if stream:
            _set_read_timeout(upstream, _STREAM_READ_TIMEOUT)
            relay = _relay_without_usage(upstream) if hide_usage else _relay(upstream)
            return Response(stream_with_context(relay), status=upstream.status_code,
                            headers=passed)
        content = self._read(upstream, self.max_bytes, deadline)
        if content is None or not _is_json(content):
            raise UpstreamError(f"The upstream model provider answered {upstream.status_code} "
                                "with a body that is not JSON or is too large.")
        return Response(content, status=upstream.status_code, headers=passed)

    def _read(self, upstream: requests.Response, limit: int, deadline: float) -> bytes | None:
        """The (decoded) body read before ``deadline``, or ``None`` past ``limit`` bytes; the
        connection is closed."""
        try:
            content = read_body(upstream, limit, deadline)
        except requests.ReadTimeout:
            raise UpstreamTimeout() from None
        except requests.RequestException:
            raise ServiceUnavailable("The upstream model provider broke off its answer.",
                                     error_type="upstream_unavailable") from None
        finally:
            upstream.close()
        return None if len(content) > limit else content

    def _error(self, upstream: requests.Response, passed: dict[str, str],
               deadline: float) -> Response:
        status = upstream.status_code
        content = self._read(upstream, _MAX_ERROR_BYTES, deadline)
        if status == 401:
            current_app.logger.warning("the upstream refused GATEWAY_UPSTREAM_API_KEY (401)")
            raise UpstreamError("The upstream model provider refused the gateway's credential "
                                "(GATEWAY_UPSTREAM_API_KEY).", error_type="upstream_auth_error")
        if status < 400:
            raise UpstreamError(f"The upstream model provider answered {status}; the gateway "
                                "follows no redirect.")
        if content is None or not _is_json(content):
            raise UpstreamError(f"The upstream model provider answered {status} without a JSON "
                                "error.", status=502 if status >= 500 else status,
                                headers={k: v for k, v in passed.items()
                                         if k.lower() == "retry-after"})
        if self.api_key:
            content = content.replace(self.api_key.encode(), REDACTED.encode())
        passed = {k: v for k, v in passed.items() if k.lower() != "content-type"}
        return Response(content, status=status, headers=passed, mimetype="application/json")


def _is_json(content: bytes) -> bool:
    try:
        json.loads(content)
    except (ValueError, RecursionError):
        return False
    return True


def _asks_for_usage(body: Mapping[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _set_read_timeout(upstream: requests.Response, seconds: float) -> None:
    """Let each further read of ``upstream`` wait ``seconds`` (the socket kept the time left
    of the exchange's deadline when the answer started)."""
    sock = getattr(getattr(upstream.raw, "connection", None), "sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def _relay(upstream: requests.Response) -> Iterator[bytes]:
    """The streamed body as it arrives; the upstream connection closes when the stream
    ends, breaks off, or the caller leaves."""
    try:
        yield from upstream.iter_content(chunk_size=None)
    finally:
        upstream.close()


#: An event ends with a blank line (``\n`` or ``\r\n`` line ends).
_EVENT_END = re.compile(rb"\n\r?\n")
#: An empty ``choices`` list, as in the usage-only chunk (and in no content chunk).
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
#: Bytes of an unfinished event held back at most; past it they are passed on as they are.
_MAX_PENDING = 1 << 20


def _relay_without_usage(upstream: requests.Response) -> Iterator[bytes]:
    """The streamed body as it arrives, less the usage-only chunk the gateway asked for and
    the caller did not, whose counts are reported to the extension instead.

    Complete events are passed on as soon as they arrive and an unfinished one (an event may
    arrive over several reads) is held until its end; an event is parsed only when its text
    has both ``"usage"`` and an empty ``choices`` list, which no content delta has.
    """
    pending = b""
    try:
        for chunk in upstream.iter_content(chunk_size=None):
            data = pending + chunk if pending else chunk
            cut = _after_last_event(data)
            if not cut and len(data) <= _MAX_PENDING:
                pending = data
                continue
            cut = cut or len(data)
            complete, pending = data[:cut], data[cut:]
            if b'"usage"' in complete and _EMPTY_CHOICES.search(complete):
                complete = _drop_usage_chunks(complete)
            if complete:
                yield complete
        if pending:  # the stream ended without a blank line after its last event
            yield _drop_usage_chunks(pending)
    finally:
        upstream.close()


def _after_last_event(data: bytes) -> int:
    """The index just past the last blank line in ``data`` (0 when there is none)."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _drop_usage_chunks(data: bytes) -> bytes:
    """``data`` (whole events, the last maybe unfinished) without its usage-only chunks,
    whose counts go to :func:`flask_llmauth.record_usage`."""
    kept, start = [], 0
    ends = [m.end() for m in _EVENT_END.finditer(data)]
    if not ends or ends[-1] < len(data):
        ends.append(len(data))
    for end in ends:
        event = data[start:end]
        start = end
        if not (b'"usage"' in event and _EMPTY_CHOICES.search(event)
                and _record_usage_chunk(event)):
            kept.append(event)
    return b"".join(kept)


def _record_usage_chunk(event: bytes) -> bool:
    """Whether ``event`` is a usage-only chunk (``choices`` empty, ``usage`` an object); its
    counts are recorded when it gives both (else the extension estimates the usage)."""
    lines = [line[5:].removeprefix(b" ") for line in event.splitlines()
             if line.startswith(b"data:")]
    try:
        chunk = json.loads(b"\n".join(lines))
    except (ValueError, RecursionError):
        return False
    if not (isinstance(chunk, dict) and chunk.get("choices") == []
            and isinstance(chunk.get("usage"), dict)):
        return False
    usage, model = chunk["usage"], chunk.get("model")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if all(type(n) is int and n >= 0 for n in (prompt, completion)):  # a missing one is None
        record_usage(prompt, completion,
                     model=model if isinstance(model, str) and model else None)
    return True
