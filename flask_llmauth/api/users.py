"""``/user/*`` endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..extension import require_principal, state
from ..users import UserService
from . import ok
from .schema import (
    Field,
    boolean,
    duration,
    integer,
    json_body,
    json_object,
    key_duration,
    limit,
    money,
    page,
    parallel_limit,
    query_args,
    string,
    string_list,
    user_role,
)
from .schema import validate as check

USER_FIELDS: dict[str, Field] = {
    "user_id": Field(string()),
    "user_email": Field(string(320)),
    "user_alias": Field(string()),
    "user_role": Field(user_role, nullable=False),
    "models": Field(string_list, nullable=False),
    "max_budget": Field(money),
    "soft_budget": Field(money),
    "budget_duration": Field(duration),
    "tpm_limit": Field(limit),
    "rpm_limit": Field(limit),
    "max_parallel_requests": Field(parallel_limit),
    "model_max_budget": Field(json_object, nullable=False),
    "metadata": Field(json_object, when_null=dict),
    "blocked": Field(boolean, nullable=False),
    "spend": Field(money, nullable=False),
}
_NEW_ONLY: dict[str, Field] = {
    "teams": Field(string_list),
    "auto_create_key": Field(boolean),
    "key_alias": Field(string()),
    "duration": Field(key_duration),
    "send_invite_email": Field(boolean),
}


def register(route: Callable[..., Any]) -> None:
    @route("/user/new", ("POST",))
    def user_new() -> Any:
        new_fields = {k: v for k, v in USER_FIELDS.items() if k not in ("blocked", "spend")}
        params = check(json_body(), {**new_fields, **_NEW_ONLY})
        params.pop("send_invite_email", None)
        return ok(UserService(state()).create(require_principal(), params))

    @route("/user/info", ("GET",))
    def user_info() -> Any:
        query = check(query_args(), {"user_id": Field(string())}, source="query")
        return ok(UserService(state()).info(require_principal(), query.get("user_id")))

    @route("/user/update", ("POST",))
    def user_update() -> Any:
        params = check(json_body(), {**USER_FIELDS, "password": Field(string())})
        if "password" in params:
            from ..errors import BadRequest

            raise BadRequest("Passwords are not supported: users sign in through SSO.",
                             param="password")
        return ok(UserService(state()).update(require_principal(), params))

    @route("/user/delete", ("POST",))
    def user_delete() -> Any:
        params = check(json_body(), {"user_ids": Field(string_list, required=True)})
        return ok(UserService(state()).delete(require_principal(), params["user_ids"]))

    @route("/user/list", ("GET",))
    def user_list() -> Any:
        fields = {"page": Field(page), "page_size": Field(integer(1, 100)),
                  "role": Field(user_role), "user_ids": Field(string())}
        query = {"page": 1, "page_size": 25, **check(query_args(), fields, source="query")}
        if query.get("user_ids"):
            query["user_ids"] = [u for u in query["user_ids"].split(",") if u]
        return ok(UserService(state()).list(require_principal(), query))
