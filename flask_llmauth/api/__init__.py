"""The management JSON API: LiteLLM's paths, fields and response shapes.

Views only translate HTTP to service calls: validation here, every rule in the services.
Each view declares its LiteLLM path, which is how the policy classifies it (the URL prefix
is configurable, the path a policy sees is not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import peewee
from flask import Blueprint, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import Conflict, http_error

log = logging.getLogger("flask_llmauth")

BLUEPRINT_NAME = "llmauth_api"
#: endpoint → the LiteLLM path the policy classifies it by.
API_ROUTES: dict[str, str] = {}


def create_blueprint() -> Blueprint:
    from . import customers, keys, spend, teams, users

    bp = Blueprint(BLUEPRINT_NAME, __name__)

    def route(path: str, methods: tuple[str, ...]) -> Callable[[Callable[..., Any]], Any]:
        def register(view: Callable[..., Any]) -> Callable[..., Any]:
            flask_path = path.replace("{key}", "<key>")
            bp.add_url_rule(flask_path, view.__name__, view, methods=list(methods))
            API_ROUTES[f"{BLUEPRINT_NAME}.{view.__name__}"] = path.replace("{key}", "{key_id}")
            return view

        return register

    keys.register(route)
    users.register(route)
    teams.register(route)
    customers.register(route)
    spend.register(route)
    bp.register_error_handler(HTTPException, _http_exception)
    bp.register_error_handler(peewee.IntegrityError, _write_conflict)
    return bp


def _http_exception(exc: HTTPException) -> Any:
    """A 413 (or other HTTP error) inside an endpoint: the JSON envelope, through the
    host's ``error_handler`` like every other error of the API."""
    from ..extension import state

    return state().ext.error_response(http_error(exc))


def _write_conflict(exc: peewee.IntegrityError) -> Any:
    """A unique constraint broken by a concurrent request (two requests creating the same
    key alias, user, team or member at once both pass the service's check on Postgres):
    its transaction was rolled back; a 409 asks the client to retry."""
    from ..extension import state

    log.warning("llmauth: a write conflicted with a concurrent one (%s); answered 409",
                type(exc).__name__)
    return state().ext.error_response(Conflict(
        "Another request changed the same object at the same time; retry.",
        reason="write_conflict"))


def ok(payload: Any, status: int = 200) -> Any:
    response = jsonify(payload)
    response.status_code = status
    return response
