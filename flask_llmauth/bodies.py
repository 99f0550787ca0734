"""Reading JSON request bodies safely: once, and never into a 500.

Flask's ``get_json(silent=True)`` turns syntax errors into ``None`` but lets a
``RecursionError`` (a body such as ``[[[[...`` nested a few thousand levels deep) escape,
which would answer 500. Everything here maps that to "invalid JSON" instead.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import repeat
from typing import Any

from flask import Request
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .errors import BadRequest, PayloadTooLarge

#: Returned by :func:`get_json` for a body that is present but not valid JSON.
INVALID: Any = object()
UNREADABLE_BODY = "The request body could not be read."


def unreadable_body() -> BadRequest:
    """The 400 of a body the server's stream fails to deliver (a chunked body it cannot
    decode: gunicorn raises its own parse errors, Werkzeug's server ``OSError``)."""
    return BadRequest(UNREADABLE_BODY, reason="unreadable_body")


def read_data(request: Request) -> bytes:
    """The raw body, read once (Flask caches it); 400 when the stream fails."""
    try:
        return request.get_data(cache=True)
    except HTTPException:  # 413, a client gone before Content-Length: Flask answers them
        raise
    except Exception:
        raise unreadable_body() from None


def read_within_limit(request: Request) -> bytes:
    """The raw body (:func:`read_data`), or 413 when it is over ``max_content_length``.

    Werkzeug refuses a declared ``Content-Length`` over the limit before reading; a chunked
    body (no ``Content-Length``) it reads up to the limit and cuts there, silently: one that
    fills the limit is refused as too large rather than handed on truncated."""
    data = read_data(request)
    limit = request.max_content_length
    if limit is not None and request.content_length is None and len(data) >= limit:
        raise RequestEntityTooLarge()
    return data


def too_large(request: Request) -> PayloadTooLarge:
    """The 413 of a body over the request's ``max_content_length``."""
    return PayloadTooLarge(f"Request body too large: the limit is "
                           f"{request.max_content_length} bytes.", reason="request_too_large")


def refuse_declared_oversize(request: Request) -> None:
    """413 for a ``Content-Length`` over ``max_content_length``, before a byte is read."""
    length = request.content_length
    limit = request.max_content_length
    if length is not None and limit is not None and length > limit:
        raise too_large(request)


def read_chunked_within_limit(request: Request) -> None:
    """Read a chunked body (no ``Content-Length``) now, up to ``max_content_length`` only,
    and 413 when it does not end within it: refused in the extension's envelope here rather
    than cut short (or refused by the host's own handler) when the view reads it. The body
    stays cached for the view (Flask parses forms from the cached bytes)."""
    try:
        read_within_limit(request)
    except RequestEntityTooLarge:
        raise too_large(request) from None


def form(request: Request) -> MultiDict[str, str]:
    """The parsed form fields; 400 when the stream fails."""
    try:
        return request.form
    except HTTPException:
        raise
    except Exception:
        raise unreadable_body() from None


def is_json_mimetype(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json"))


def get_json(request: Request, *, force: bool = False) -> Any:
    """The parsed body (cached by Flask), ``None`` when there is none, or :data:`INVALID`."""
    if not force and not request.is_json:
        return None
    read_data(request)
    try:
        body = request.get_json(silent=True, force=True)
    except RecursionError:
        return INVALID
    if body is None:  # an empty body, or one that is not JSON (or is the literal ``null``)
        return INVALID if request.get_data(cache=True) else None
    return body


class JSONBody:
    """One request's JSON body, read at most once and shared by the policy and the guards.

    :meth:`parsed` answers like ``get_json(request, force=True)`` (the body is read as JSON
    whatever its ``Content-Type``, as the model check does); calling the object answers the
    same but ``None`` for an invalid body.
    """

    __slots__ = ("request", "value")

    def __init__(self, request: Request, value: Any = None, read: bool = False) -> None:
        self.request = request
        #: The parsed body once read (``read=True``: ``value`` is what :func:`get_json`
        #: with ``force=True`` answered for this request).
        self.value: Any = value if read else _UNREAD

    def parsed(self) -> Any:
        if self.value is _UNREAD:
            self.value = get_json(self.request, force=True)
        return self.value

    def __call__(self) -> Any:
        value = self.value
        if value is _UNREAD:
            value = self.parsed()
        return None if value is INVALID else value


_UNREAD: Any = object()


def known_body(value: Any) -> Callable[[], Any]:
    """The reader of a body parsed already (a JSON object): what a :class:`JSONBody` of it
    answers, as a C-level callable (no Python frame per call: guards read it per request)."""
    return repeat(value).__next__


def require_json_object(request: Request) -> Any:
    """The body of a JSON API call: ``{}`` when empty; 400 for a wrong content type,
    invalid JSON or a JSON value that is not an object."""
    data = read_within_limit(request)
    if not data:
        return {}
    mimetype = request.mimetype
    if mimetype and not is_json_mimetype(mimetype):
        raise BadRequest("Content-Type must be application/json.", reason="bad_content_type")
    body = get_json(request, force=True)
    if body is INVALID:
        raise BadRequest("Invalid JSON in request body.", reason="invalid_json")
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object.", reason="body_not_object")
    return body
