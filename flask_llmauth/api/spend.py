"""Spend reports: ``/spend/logs``, ``/spend/keys``, ``/spend/users``, ``/spend/teams`` and
``/global/spend`` (see :mod:`flask_llmauth.reports`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..extension import require_principal, state
from ..reports import SpendReports, parse_date
from . import ok
from .schema import Field, integer, query_args, query_boolean, string
from .schema import validate as check


def _date(param: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a date")
        parse_date(value, param)  # 400 naming the parameter when it is not a date
        return value

    return parse


_DATES = {"start_date": Field(_date("start_date")), "end_date": Field(_date("end_date"))}
_LIMIT = {"limit": Field(integer(1, 100_000))}


def _query(fields: dict[str, Field]) -> dict[str, Any]:
    return check(query_args(), {**_DATES, **fields}, source="query")


def register(route: Callable[..., Any]) -> None:
    @route("/spend/logs", ("GET",))
    def spend_logs() -> Any:
        query = _query({
            "api_key": Field(string(512)), "user_id": Field(string()),
            "team_id": Field(string()), "end_user_id": Field(string()),
            "model": Field(string()), "request_id": Field(string(64)),
            "summarize": Field(query_boolean), "page": Field(integer(1, 1_000_000)),
            "page_size": Field(integer(1, 1000)),
        })
        body, total = SpendReports(state()).logs(require_principal(), query)
        response = ok(body)
        if total is not None:
            response.headers["X-Total-Count"] = str(total)
        return response

    @route("/spend/keys", ("GET",))
    def spend_keys() -> Any:
        return ok(SpendReports(state()).keys(require_principal(), _query(_LIMIT)))

    @route("/spend/users", ("GET",))
    def spend_users() -> Any:
        query = _query({**_LIMIT, "user_id": Field(string())})
        return ok(SpendReports(state()).users(require_principal(), query))

    @route("/spend/teams", ("GET",))
    def spend_teams() -> Any:
        query = _query({**_LIMIT, "team_id": Field(string())})
        return ok(SpendReports(state()).teams(require_principal(), query))

    @route("/global/spend", ("GET",))
    def global_spend() -> Any:
        return ok(SpendReports(state()).global_spend(require_principal(), _query({})))
