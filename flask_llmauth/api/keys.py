"""``/key/*`` endpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import BadRequest
from ..extension import require_principal, state
from ..keys import KEY_TYPES, KeyService
from . import ok
from .schema import (
    Field,
    boolean,
    choice,
    int_map,
    integer,
    ip_list,
    json_body,
    json_object,
    key_duration,
    limit,
    model_budgets,
    money,
    page,
    parallel_limit,
    query_args,
    query_boolean,
    string,
    string_list,
    string_map,
    strings,
)
from .schema import duration as budget_duration
from .schema import validate as check

#: Fields of a key that ``/key/generate``, ``/key/update`` and ``/key/regenerate`` accept.
KEY_FIELDS: dict[str, Field] = {
    "key_alias": Field(string()),
    "user_id": Field(string()),
    "team_id": Field(string()),
    "organization_id": Field(string()),
    "duration": Field(key_duration),
    "models": Field(string_list, nullable=False),
    "aliases": Field(string_map, nullable=False),
    "allowed_routes": Field(string_list, nullable=False),
    "key_type": Field(choice(*KEY_TYPES)),
    "allowed_ips": Field(ip_list),
    "max_budget": Field(money),
    "soft_budget": Field(money),
    "budget_duration": Field(budget_duration),
    "spend": Field(money, nullable=False),
    "tpm_limit": Field(limit),
    "rpm_limit": Field(limit),
    "max_parallel_requests": Field(parallel_limit),
    "model_rpm_limit": Field(int_map, nullable=False),
    "model_tpm_limit": Field(int_map, nullable=False),
    "model_max_budget": Field(model_budgets, nullable=False),
    "metadata": Field(json_object, when_null=dict),
    "tags": Field(string_list),
    "blocked": Field(boolean, nullable=False),
    "send_invite_email": Field(boolean),
}
_LIST_QUERY: dict[str, Field] = {
    "page": Field(page),
    "size": Field(integer(1, 100)),
    "user_id": Field(string()),
    "team_id": Field(string()),
    "organization_id": Field(string()),
    "key_alias": Field(string()),
    "key_hash": Field(string()),
    "return_full_object": Field(query_boolean),
    "include_team_keys": Field(query_boolean),
    "include_created_by_keys": Field(query_boolean),
    "sort_by": Field(choice("spend", "max_budget", "created_at", "updated_at", "token",
                            "key_alias")),
    "sort_order": Field(choice("asc", "desc")),
    "status": Field(choice("deleted")),
}


def _key_params(extra: dict[str, Field] | None = None) -> dict[str, Any]:
    params = check(json_body(), {**KEY_FIELDS, **(extra or {})})
    params.pop("send_invite_email", None)
    return params


def _path_key(key: str) -> str:
    """The key (or key id) of a ``/key/{key}/...`` path, held to the body's rule."""
    return str(check({"key": key}, {"key": Field(string(256))}, source="path")["key"])


def register(route: Callable[..., Any]) -> None:
    @route("/key/generate", ("POST",))
    def key_generate() -> Any:
        params = _key_params({"key": Field(string(256))})
        return ok(KeyService(state()).generate(require_principal(), params))

    @route("/key/update", ("POST",))
    def key_update() -> Any:
        params = _key_params({"key": Field(string(256), required=True)})
        identifier = params.pop("key")
        return ok(KeyService(state()).update(require_principal(), identifier, params))

    @route("/key/info", ("GET",))
    def key_info() -> Any:
        query = check(query_args(), {"key": Field(string(256))}, source="query")
        return ok(KeyService(state()).info(require_principal(), query.get("key")))

    @route("/v2/key/info", ("POST",))
    def key_info_v2() -> Any:
        params = check(json_body(), {"keys": Field(strings(256), required=True)})
        if not params["keys"]:
            raise BadRequest("Pass at least one key in `keys`.", param="keys")
        return ok(KeyService(state()).info_many(require_principal(), params["keys"]))

    @route("/key/list", ("GET",))
    def key_list() -> Any:
        query = {"page": 1, "size": 10, "sort_by": "created_at", "sort_order": "desc",
                 **check(query_args(), _LIST_QUERY, source="query")}
        return ok(KeyService(state()).list(require_principal(), query))

    def regenerate(identifier: str | None) -> Any:
        extra = {"key": Field(string(256)), "new_key": Field(string(256)),
                 "grace_period": Field(budget_duration), "new_master_key": Field(string(256))}
        params = _key_params(extra)
        body_key = params.pop("key", None)
        if "new_master_key" in params:
            raise BadRequest(
                "The master key is configuration, not data: change LLMAUTH_MASTER_KEY (set "
                "LLMAUTH_SALT_KEY first so virtual keys survive) and restart.",
                param="new_master_key",
            )
        identifier = identifier or body_key
        if not identifier:
            raise BadRequest("No key passed in.", param="key")
        return ok(KeyService(state()).regenerate(require_principal(), identifier, params))

    @route("/key/regenerate", ("POST",))
    def key_regenerate() -> Any:
        return regenerate(None)

    @route("/key/{key}/regenerate", ("POST",))
    def key_regenerate_path(key: str) -> Any:
        return regenerate(_path_key(key))

    @route("/key/{key}/reset_spend", ("POST",))
    def key_reset_spend(key: str) -> Any:
        from ..budgets import reset_key_spend

        key = _path_key(key)
        params = check(json_body(), {"reset_to": Field(money, required=True)})
        return ok(reset_key_spend(state(), require_principal(), key, params["reset_to"]))

    @route("/key/delete", ("POST",))
    def key_delete() -> Any:
        params = check(json_body(), {"keys": Field(string_list), "key_aliases": Field(string_list)})
        if not params.get("keys") and not params.get("key_aliases"):
            raise BadRequest("Pass `keys` or `key_aliases`.", param="keys")
        deleted = KeyService(state()).delete(
            require_principal(), params.get("keys") or [], params.get("key_aliases") or [])
        return ok({"deleted_keys": deleted})

    @route("/key/block", ("POST",))
    def key_block() -> Any:
        params = check(json_body(), {"key": Field(string(256), required=True)})
        return ok(KeyService(state()).set_blocked(require_principal(), params["key"], True))

    @route("/key/unblock", ("POST",))
    def key_unblock() -> Any:
        params = check(json_body(), {"key": Field(string(256), required=True)})
        return ok(KeyService(state()).set_blocked(require_principal(), params["key"], False))
