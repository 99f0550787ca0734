"""Optional forwarding to a real OpenAI-compatible upstream (``GATEWAY_UPSTREAM_BASE_URL``).

The caller's credential is never forwarded: the upstream sees only the gateway's own
``GATEWAY_UPSTREAM_API_KEY``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import requests
from flask import Response, stream_with_context

from flask_llmauth.errors import ServiceUnavailable

_TIMEOUT = (5, 300)
_HOP_HEADERS = {"content-encoding", "content-length", "transfer-encoding", "connection"}


class Upstream:
    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.session = requests.Session()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Upstream | None:
        base_url = config.get("GATEWAY_UPSTREAM_BASE_URL")
        return cls(base_url, config.get("GATEWAY_UPSTREAM_API_KEY")) if base_url else None

    def forward(self, path: str, body: Mapping[str, Any]) -> Response:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
            headers["x-api-key"] = self.api_key
        try:
            upstream = self.session.post(self.base_url + path, json=body, headers=headers,
                                         stream=bool(body.get("stream")), timeout=_TIMEOUT,
                                         allow_redirects=False)
        except requests.RequestException:
            raise ServiceUnavailable("The upstream model provider is unreachable.",
                                     error_type="upstream_unavailable") from None
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
        if body.get("stream"):
            return Response(stream_with_context(upstream.iter_content(chunk_size=None)),
                            status=upstream.status_code, headers=passed)
        return Response(upstream.content, status=upstream.status_code, headers=passed)
