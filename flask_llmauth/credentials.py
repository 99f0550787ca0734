"""Where a request's credential is read from, in LiteLLM's order, once per request."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Request

from .errors import Unauthenticated

#: Headers read raw after the two bearer-capable headers, in order.
_RAW_HEADERS = ("api-key", "x-api-key", "x-goog-api-key")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The credential a request presents (``token`` is ``None`` when it presents none)."""

    token: str | None
    source: str | None = None

    @property
    def looks_like_jwt(self) -> bool:
        return self.token is not None and self.token.count(".") == 2


NO_CREDENTIALS = Credentials(None)


def _strip_bearer(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return None


def read_credentials(
    request: Request,
    *,
    max_length: int,
    custom_header: str | None = None,
    query_key_allowed: bool = False,
) -> Credentials:
    """Extract the credential; raise :class:`Unauthenticated` for a malformed one.

    Order: ``x-litellm-api-key`` (bare or ``Bearer``), ``Authorization: Bearer``,
    ``api-key`` (Azure), ``x-api-key`` (Anthropic), ``x-goog-api-key``, ``?key=`` (Gemini
    routes only). A configured custom header replaces all of them when present.
    """
    headers = request.headers
    token: str | None = None
    source: str | None = None
    malformed = False

    if custom_header and headers.get(custom_header):
        value = headers[custom_header]
        token, source = (_strip_bearer(value) or value.strip()), custom_header
    else:
        litellm_header = headers.get("x-litellm-api-key")
        authorization = headers.get("Authorization")
        if litellm_header:
            token = _strip_bearer(litellm_header) or litellm_header.strip()
            source = "x-litellm-api-key"
        elif authorization:
            token, source = _strip_bearer(authorization), "Authorization"
            malformed = token is None
        if token is None:
            for name in _RAW_HEADERS:
                value = headers.get(name)
                if value:
                    token, source = value.strip(), name
                    break
        if token is None and query_key_allowed and request.args.get("key"):
            token, source = request.args["key"], "query"

    if token is None:
        if malformed:
            raise Unauthenticated(
                "Authentication Error, Malformed API Key passed in. "
                "Ensure Key has `Bearer ` prefix.",
                reason="malformed_authorization",
            )
        return NO_CREDENTIALS
    if len(token) > max_length:
        raise Unauthenticated(reason="credential_too_long")
    if not token.isprintable() or " " in token:
        raise Unauthenticated(reason="credential_bad_characters")
    return Credentials(token, source)
