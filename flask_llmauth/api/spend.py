"""Spend reports: ``/spend/logs``, ``/spend/keys``, ``/spend/users``, ``/spend/teams`` and
``/global/spend`` (see :mod:`flask_llmauth.reports`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from flask import request

from ..extension import require_principal, state
from ..reports import MAX_PAGE_SIZE, SpendReports, parse_date
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
_PAGE = {"page": Field(integer(1, 1_000_000))}
_LIMIT = {**_PAGE, "limit": Field(integer(1, MAX_PAGE_SIZE))}


def _query(fields: dict[str, Field]) -> dict[str, Any]:
    return check(query_args(), {**_DATES, **fields}, source="query")


def paged(query: dict[str, Any], body: Any, more: bool, total: int | None = None,
          replace: dict[str, str] | None = None) -> Any:
    """The response of one page of ``query``: with ``Link: <...page=N+1>; rel="next"`` when
    another page follows (the request's own query, its page moved on, the parameters of
    ``replace`` given those values), ``X-Total-Count`` when the total is known."""
    response = ok(body)
    if total is not None:
        response.headers["X-Total-Count"] = str(total)
    if more:
        page = query.get("page", 1)
        replace = replace or {}
        args = [(name, replace.get(name, value))
                for name, value in request.args.items(multi=True) if name != "page"]
        following = urlencode([*args, ("page", str(page + 1))])
        response.headers["Link"] = (
            f'<{request.script_root}{request.path}?{following}>; rel="next"')
    return response


def register(route: Callable[..., Any]) -> None:
    @route("/spend/logs", ("GET",))
    def spend_logs() -> Any:
        query = _query({
            **_PAGE, "api_key": Field(string(512)), "user_id": Field(string()),
            "team_id": Field(string()), "end_user_id": Field(string()),
            "model": Field(string()), "request_id": Field(string(64)),
            "summarize": Field(query_boolean), "page_size": Field(integer(1, MAX_PAGE_SIZE)),
        })
        reports = SpendReports(state())
        body, total, more = reports.logs(require_principal(), query)
        # the link names the key by its id, never by the raw key the request may have used
        named = reports.named_key_id
        return paged(query, body, more, total, None if named is None else {"api_key": named})

    @route("/spend/keys", ("GET",))
    def spend_keys() -> Any:
        query = _query(_LIMIT)
        return paged(query, *SpendReports(state()).keys(require_principal(), query))

    @route("/spend/users", ("GET",))
    def spend_users() -> Any:
        query = _query({**_LIMIT, "user_id": Field(string())})
        return paged(query, *SpendReports(state()).users(require_principal(), query))

    @route("/spend/teams", ("GET",))
    def spend_teams() -> Any:
        query = _query({**_LIMIT, "team_id": Field(string())})
        return paged(query, *SpendReports(state()).teams(require_principal(), query))

    @route("/global/spend", ("GET",))
    def global_spend() -> Any:
        return ok(SpendReports(state()).global_spend(require_principal(), _query({})))

