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
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from http.cookiejar import DefaultCookiePolicy
from typing import Any

import requests
from flask import Response, current_app, stream_with_context

from flask_llmauth.errors import ConfigurationError, LLMAuthError, ServiceUnavailable

_TIMEOUT = (5, 300)  # connect, and each read (a stream may run longer between reads)
DEFAULT_MAX_BYTES = 128 << 20
_MAX_ERROR_BYTES = 1 << 20
#: Response headers passed on to the caller; every other one stays at the gateway.
PASSED_HEADERS = frozenset({"content-type", "cache-control", "retry-after", "x-request-id",
                            "request-id"})
REDACTED = "[redacted]"


class UpstreamError(LLMAuthError):
    status = 502
    error_type = "upstream_error"


class Upstream:
    def __init__(self, base_url: str, api_key: str | None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.max_bytes = max_bytes
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
        return cls(base_url, config.get("GATEWAY_UPSTREAM_API_KEY"), max_bytes)

    def forward(self, path: str, body: Mapping[str, Any]) -> Response:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
            headers["x-api-key"] = self.api_key
        try:
            upstream = self.session.post(self.base_url + path, json=body, headers=headers,
                                         stream=True, timeout=_TIMEOUT, allow_redirects=False)
        except requests.RequestException:
            raise ServiceUnavailable("The upstream model provider is unreachable.",
                                     error_type="upstream_unavailable") from None
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        if not 200 <= upstream.status_code < 300:
            return self._error(upstream, passed)
        if body.get("stream"):
            return Response(stream_with_context(_relay(upstream)), status=upstream.status_code,
                            headers=passed)
        content = self._read(upstream, self.max_bytes)
        if content is None or not _is_json(content):
            raise UpstreamError(f"The upstream model provider answered {upstream.status_code} "
                                "with a body that is not JSON or is too large.")
        return Response(content, status=upstream.status_code, headers=passed)

    def _read(self, upstream: requests.Response, limit: int) -> bytes | None:
        """The (decoded) body, or ``None`` past ``limit`` bytes; the connection is closed."""
        chunks, size = [], 0
        try:
            for chunk in upstream.iter_content(chunk_size=1 << 16):
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
        except requests.RequestException:
            raise ServiceUnavailable("The upstream model provider broke off its answer.",
                                     error_type="upstream_unavailable") from None
        finally:
            upstream.close()
        return b"".join(chunks)

    def _error(self, upstream: requests.Response, passed: dict[str, str]) -> Response:
        status = upstream.status_code
        content = self._read(upstream, _MAX_ERROR_BYTES)
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


def _relay(upstream: requests.Response) -> Iterator[bytes]:
    """The streamed body as it arrives; the upstream connection closes when the stream
    ends, breaks off, or the caller leaves."""
    try:
        yield from upstream.iter_content(chunk_size=None)
    finally:
        upstream.close()
