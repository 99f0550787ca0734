"""Exceptions and the OpenAI/LiteLLM error envelope.

Every failure the extension reports is an :class:`LLMAuthError`. Its response body is
``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status as a
string, which the OpenAI and Anthropic SDKs parse into their typed errors.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException


class ConfigurationError(ValueError):
    """Invalid configuration, raised by ``init_app``; the message names the setting."""


class LLMAuthError(Exception):
    """Base class of every error answered with the JSON error envelope."""

    status: int = 400
    error_type: str = "invalid_request_error"
    default_message: str = "Bad request."

    def __init__(
        self,
        message: str | None = None,
        *,
        error_type: str | None = None,
        param: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)
        if error_type is not None:
            self.error_type = error_type
        if status is not None:
            self.status = status
        self.param = param
        self.headers = dict(headers or {})
        #: Why the request failed, for the server log only (never sent to the client).
        self.reason = reason or self.error_type

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": str(self.status),
            }
        }


class BadRequest(LLMAuthError):
    status = 400
    error_type = "invalid_request_error"


class Unauthenticated(LLMAuthError):
    status = 401
    error_type = "auth_error"
    default_message = "Authentication Error, invalid API key."


class Forbidden(LLMAuthError):
    status = 403
    error_type = "permission_error"
    default_message = "You are not allowed to do this."


class NotFound(LLMAuthError):
    status = 404
    error_type = "not_found_error"
    default_message = "Not found."


class Conflict(LLMAuthError):
    status = 409
    error_type = "conflict_error"
    default_message = "Conflict."


class PayloadTooLarge(LLMAuthError):
    status = 413
    error_type = "invalid_request_error"
    default_message = "Request body too large."


class TooManyRequests(LLMAuthError):
    status = 429
    error_type = "rate_limit_error"
    default_message = "Rate limit exceeded."


class BudgetExceeded(TooManyRequests):
    error_type = "budget_exceeded"
    default_message = "Budget has been exceeded."


class ServiceUnavailable(LLMAuthError):
    status = 503
    error_type = "service_unavailable"
    default_message = "Service unavailable, try again later."


def error_response(error: LLMAuthError) -> Response:
    """The default error callback: the JSON envelope with the error's status and headers."""
    response = jsonify(error.to_dict())
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    if error.status == 401 and "WWW-Authenticate" not in response.headers:
        response.headers["WWW-Authenticate"] = 'Bearer realm="llmauth"'
    return response


def http_error(exc: HTTPException) -> LLMAuthError:
    """A werkzeug ``HTTPException`` (404, 405, 413, ...) as an error with its headers."""
    status = exc.code or 500
    return LLMAuthError(
        exc.description or exc.name, error_type=_HTTP_TYPES.get(status, "invalid_request_error"),
        status=status,
        headers={name: value for name, value in exc.get_headers()
                 if name.lower() != "content-type"},
    )


def http_exception_response(exc: HTTPException) -> Response:
    """Turn a werkzeug ``HTTPException`` (404, 405, 413, ...) into the JSON envelope."""
    return error_response(http_error(exc))


_HTTP_TYPES = {
    401: "auth_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
