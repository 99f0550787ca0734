"""``/team/*`` endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..extension import require_principal, state
from ..teams import TeamService
from . import ok
from .schema import (
    Field,
    boolean,
    choice,
    duration,
    int_map,
    json_body,
    json_object,
    limit,
    members,
    money,
    parallel_limit,
    query_args,
    string,
    string_list,
    string_map,
)
from .schema import validate as check

TEAM_FIELDS: dict[str, Field] = {
    "team_id": Field(string()),
    "team_alias": Field(string()),
    "organization_id": Field(string()),
    "models": Field(string_list, nullable=False),
    "model_aliases": Field(string_map, nullable=False),
    "max_budget": Field(money),
    "soft_budget": Field(money),
    "budget_duration": Field(duration),
    "tpm_limit": Field(limit),
    "rpm_limit": Field(limit),
    "max_parallel_requests": Field(parallel_limit),
    "model_rpm_limit": Field(int_map, nullable=False),
    "model_tpm_limit": Field(int_map, nullable=False),
    "team_member_permissions": Field(string_list),
    "team_member_budget": Field(money),
    "team_member_budget_duration": Field(duration),
    "team_member_rpm_limit": Field(limit),
    "team_member_tpm_limit": Field(limit),
    "metadata": Field(json_object, when_null=dict),
    "blocked": Field(boolean, nullable=False),
}
_MEMBER_REF: dict[str, Field] = {
    "team_id": Field(string(), required=True),
    "user_id": Field(string()),
    "user_email": Field(string(320)),
}


def _member_ref(extra: dict[str, Field] | None = None) -> dict[str, Any]:
    params = check(json_body(), {**_MEMBER_REF, **(extra or {})})
    if not params.get("user_id") and not params.get("user_email"):
        from ..errors import BadRequest

        raise BadRequest("Either user id or user email must be provided", param="user_id")
    return params


def register(route: Callable[..., Any]) -> None:
    @route("/team/new", ("POST",))
    def team_new() -> Any:
        params = check(json_body(), {**TEAM_FIELDS, "members_with_roles": Field(
            lambda v: [members(m) for m in v] if isinstance(v, list) else members(v))})
        if isinstance(params.get("members_with_roles"), dict):
            params["members_with_roles"] = [params["members_with_roles"]]
        return ok(TeamService(state()).create(require_principal(), params))

    @route("/team/info", ("GET",))
    def team_info() -> Any:
        query = check(query_args(), {"team_id": Field(string(), required=True)}, source="query")
        return ok(TeamService(state()).info(require_principal(), query["team_id"]))

    @route("/team/update", ("POST",))
    def team_update() -> Any:
        fields = {**TEAM_FIELDS, "team_id": Field(string(), required=True)}
        return ok(TeamService(state()).update(require_principal(), check(json_body(), fields)))

    @route("/team/delete", ("POST",))
    def team_delete() -> Any:
        params = check(json_body(), {"team_ids": Field(string_list, required=True)})
        return ok(TeamService(state()).delete(require_principal(), params["team_ids"]))

    @route("/team/list", ("GET",))
    def team_list() -> Any:
        query = check(query_args(), {"user_id": Field(string())}, source="query")
        return ok(TeamService(state()).list(require_principal(), query))

    @route("/team/block", ("POST",))
    def team_block() -> Any:
        params = check(json_body(), {"team_id": Field(string(), required=True)})
        return ok(TeamService(state()).set_blocked(require_principal(), params["team_id"], True))

    @route("/team/unblock", ("POST",))
    def team_unblock() -> Any:
        params = check(json_body(), {"team_id": Field(string(), required=True)})
        return ok(TeamService(state()).set_blocked(require_principal(), params["team_id"], False))

    @route("/team/member_add", ("POST",))
    def team_member_add() -> Any:
        params = check(json_body(), {"team_id": Field(string(), required=True),
                                     "member": Field(members, required=True),
                                     "max_budget_in_team": Field(money)})
        return ok(TeamService(state()).member_add(require_principal(), params))

    @route("/team/member_delete", ("POST",))
    def team_member_delete() -> Any:
        return ok(TeamService(state()).member_delete(require_principal(), _member_ref()))

    @route("/team/member_update", ("POST",))
    def team_member_update() -> Any:
        params = _member_ref({
            "role": Field(choice("admin", "user"), nullable=False),
            "max_budget_in_team": Field(money),
            "tpm_limit": Field(limit), "rpm_limit": Field(limit),
            "allowed_models": Field(string_list, nullable=False),
            "budget_duration": Field(duration),
        })
        return ok(TeamService(state()).member_update(require_principal(), params))
