"""``/customer/*`` endpoints (and LiteLLM's older ``/end_user/new``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..customers import CustomerService
from ..errors import BadRequest
from ..extension import require_principal, state
from . import ok
from .schema import (
    Field,
    boolean,
    choice,
    duration,
    id_list,
    integer,
    json_body,
    json_object,
    limit,
    money,
    page,
    parallel_limit,
    query_args,
    string,
)
from .schema import validate as check

CUSTOMER_FIELDS: dict[str, Field] = {
    "user_id": Field(string(), required=True),
    "alias": Field(string()),
    "blocked": Field(boolean),
    "max_budget": Field(money),
    "soft_budget": Field(money),
    "spend": Field(money),
    "budget_duration": Field(duration),
    "tpm_limit": Field(limit),
    "rpm_limit": Field(limit),
    "max_parallel_requests": Field(parallel_limit),
    "allowed_model_region": Field(choice("eu", "us")),
    "default_model": Field(string()),
    "metadata": Field(json_object),
    "budget_id": Field(lambda value: value),  # refused below with a clear message
}
_IDS = {"user_ids": Field(id_list, required=True)}


def _customer_params() -> dict[str, Any]:
    params = check(json_body(), CUSTOMER_FIELDS)
    if "budget_id" in params:
        raise BadRequest("budget_id is not supported: set max_budget, budget_duration, "
                         "tpm_limit, rpm_limit... on the customer itself.", param="budget_id")
    return params


def _ids() -> list[str]:
    ids = check(json_body(), _IDS)["user_ids"]
    if not ids:
        raise BadRequest("Pass at least one end-user id in `user_ids`.", param="user_ids")
    return ids


def register(route: Callable[..., Any]) -> None:
    @route("/customer/new", ("POST",))
    def customer_new() -> Any:
        return ok(CustomerService(state()).create(require_principal(), _customer_params()))

    @route("/end_user/new", ("POST",))
    def end_user_new() -> Any:
        return ok(CustomerService(state()).create(require_principal(), _customer_params()))

    @route("/customer/info", ("GET",))
    def customer_info() -> Any:
        query = check(query_args(), {"end_user_id": Field(string(), required=True)},
                      source="query")
        return ok(CustomerService(state()).info(require_principal(), query["end_user_id"]))

    @route("/customer/update", ("POST",))
    def customer_update() -> Any:
        return ok(CustomerService(state()).update(require_principal(), _customer_params()))

    @route("/customer/delete", ("POST",))
    def customer_delete() -> Any:
        return ok(CustomerService(state()).delete(require_principal(), _ids()))

    @route("/customer/block", ("POST",))
    def customer_block() -> Any:
        return ok(CustomerService(state()).set_blocked(require_principal(), _ids(), True))

    @route("/customer/unblock", ("POST",))
    def customer_unblock() -> Any:
        return ok(CustomerService(state()).set_blocked(require_principal(), _ids(), False))

    @route("/customer/list", ("GET",))
    def customer_list() -> Any:
        fields = {"page": Field(page), "page_size": Field(integer(1, 1000))}
        return ok(CustomerService(state()).list(require_principal(),
                                                check(query_args(), fields, source="query")))
