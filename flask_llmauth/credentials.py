"""Where a request's credential is read from, in LiteLLM's order, once per request."""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, NamedTuple

from flask import Request

from .errors import Unauthenticated

#: Headers read raw after the two bearer-capable headers, in order.
_RAW_HEADERS = (("api-key", "HTTP_API_KEY"), ("x-api-key", "HTTP_X_API_KEY"),
                ("x-goog-api-key", "HTTP_X_GOOG_API_KEY"))
#: Room for a scheme (``Bearer``) and surrounding blanks on top of the credential itself.
_SCHEME_ALLOWANCE = 32
MALFORMED_AUTHORIZATION = (
    "Authentication Error, Malformed API Key passed in. Ensure Key has `Bearer ` prefix."
)


class Credentials(NamedTuple):
    """The credential a request presents (``token`` is ``None`` when it presents none).

    Immutable; a named tuple because one is built per request and that is the cheapest
    immutable record Python has.
    """

    token: str | None
    source: str | None = None

    @property
    def looks_like_jwt(self) -> bool:
        return self.token is not None and self.token.count(".") == 2


NO_CREDENTIALS = Credentials(None)
#: ``_credentials((token, source))``: builds one without the Python-level ``__new__`` of a
#: named tuple (the per-request path builds one per request).
_credentials = partial(tuple.__new__, Credentials)


@lru_cache(maxsize=64)
def _environ_key(name: str) -> str:
    """The WSGI environ key of a request header, as Werkzeug's ``EnvironHeaders`` maps it."""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"


def _header(environ: dict[str, Any], environ_key: str, raw_limit: int) -> str | None:
    value = environ.get(environ_key)
    if value and len(value) > raw_limit:
        raise Unauthenticated(reason="credential_too_long")
    return value or None


def _strip_bearer(value: str) -> str | None:
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip() or None
    return None


def _bare_or_bearer(value: str) -> str:
    return _strip_bearer(value) or value.strip()


def read_credentials(
    request: Request,
    max_length: int,
    custom_header: str | None = None,
    query_key_allowed: bool = False,
) -> Credentials:
    """Extract the credential; raise :class:`Unauthenticated` for a malformed one.

    Order: ``x-litellm-api-key`` (bare or ``Bearer``), ``Authorization: Bearer``,
    ``api-key`` (Azure), ``x-api-key`` (Anthropic), ``x-goog-api-key``, ``?key=`` (Gemini
    routes only). A configured custom header (``LLMAUTH_KEY_HEADER_NAME``) replaces all of
    them, as LiteLLM's ``litellm_key_header_name`` does: only that header is read.

    A value longer than ``max_length`` is refused before it is parsed, hashed or logged.
    """
    environ = request.environ
    if not custom_header and "HTTP_X_LITELLM_API_KEY" not in environ:
        # The common case, read without parsing: ``Authorization: Bearer <token>`` with a
        # plain token (anything else takes the general path below, which answers the same).
        value = environ.get("HTTP_AUTHORIZATION")
        if value is not None and value[:7] == "Bearer ":
            bearer = value[7:]
            if 0 < len(bearer) <= max_length and " " not in bearer and bearer.isprintable():
                return _credentials((bearer, "Authorization"))
    raw_limit = max_length + _SCHEME_ALLOWANCE
    token: str | None = None
    source: str | None = None
    malformed = False

    # Headers are read from the environ directly: what ``request.headers.get`` returns, but
    # the headers object raises and catches a KeyError for every absent header.
    if custom_header:
        value = _header(environ, _environ_key(custom_header), raw_limit)
        if value is not None:
            token, source = _bare_or_bearer(value) or None, custom_header
    else:
        litellm_header = _header(environ, "HTTP_X_LITELLM_API_KEY", raw_limit)
        authorization = _header(environ, "HTTP_AUTHORIZATION", raw_limit)
        if litellm_header:
            token, source = _bare_or_bearer(litellm_header) or None, "x-litellm-api-key"
        elif authorization:
            token, source = _strip_bearer(authorization), "Authorization"
            malformed = token is None
        if token is None:
            for name, environ_key in _RAW_HEADERS:
                value = _header(environ, environ_key, raw_limit)
                if value and value.strip():
                    token, source = value.strip(), name
                    break
        if token is None and query_key_allowed:
            value = request.args.get("key")
            if value and len(value) > raw_limit:
                raise Unauthenticated(reason="credential_too_long")
            if value and value.strip():
                token, source = value.strip(), "query"

    if token is None:
        if malformed:
            raise Unauthenticated(MALFORMED_AUTHORIZATION, reason="malformed_authorization")
        return NO_CREDENTIALS
    if len(token) > max_length:
        raise Unauthenticated(reason="credential_too_long")
    if not token.isprintable() or " " in token:
        raise Unauthenticated(reason="credential_bad_characters")
    return _credentials((token, source))
