"""Spend reports over the spend log: ``/spend/logs``, ``/spend/keys``, ``/spend/users``,
``/spend/teams`` and ``/global/spend``.

Sums are taken in SQL over integer units, so they are exact; USD appears only in the
response. A proxy admin and an admin viewer see everything. Anyone else sees only its own
spend: rows of its user (a key without a user: of that key; a team identity without a key:
of that team). A non-admin's team key sees its user's rows and keys inside its team and
that team only, never the user's total. Naming another user, or a key it does not own, is
a 403 — not an empty answer that would hide the refusal.

Dates (``start_date``, ``end_date``) are UTC. ``YYYY-MM-DD`` covers the whole day (an
``end_date`` includes its day); an ISO 8601 date-time is an instant (an offset is
converted to UTC) and the range includes both ends. A row's time is when its request
finished (``created_at`` of the spend log).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

import peewee
from peewee import fn

from .crypto import KEY_PREFIX
from .durations import isoformat
from .errors import BadRequest, Forbidden
from .keys import key_info, read_confinement
from .money import to_usd
from .principal import Principal, Role
from .store.tables import DeletedKey, Key, SpendLog, Team, TeamMembership, User
from .teams import team_info
from .users import user_info

if TYPE_CHECKING:
    from .extension import LLMAuthState

M = TypeVar("M", bound=peewee.Model)
#: A table whose rows carry a running ``spend`` (:meth:`SpendReports._ranked`).
Spender = TypeVar("Spender", Key, User, Team)

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Oldest and newest instants a date may name (keeps every database's datetime type happy).
_MIN = datetime(1970, 1, 1)
_MAX = datetime(9999, 12, 30)


def parse_date(value: str, param: str, *, end: bool = False) -> tuple[datetime, bool]:
    """``(bound, inclusive)`` for a query date; 400 naming ``param`` when it is not one.

    A day as an end bound becomes the next midnight, exclusive.
    """
    try:
        if _DAY.match(value):
            day = datetime.strptime(value, "%Y-%m-%d")
            bound, inclusive = (day + timedelta(days=1), False) if end else (day, True)
        else:
            if len(value) > 40 or "T" not in value and " " not in value:
                raise ValueError
            parsed = datetime.fromisoformat(value)
            if parsed.tzinfo is not None:
                parsed = parsed.astimezone(timezone.utc).replace(tzinfo=None)
            bound, inclusive = parsed, True
    except (ValueError, OverflowError):
        raise BadRequest(f"`{param}` must be a date (YYYY-MM-DD) or an ISO 8601 date-time.",
                         param=param, reason="invalid_date") from None
    if not _MIN <= bound <= _MAX:
        raise BadRequest(f"`{param}` is out of range.", param=param, reason="invalid_date")
    return bound, inclusive


def date_range(query: Mapping[str, Any]) -> peewee.Expression | None:
    """The spend-log condition of ``start_date``/``end_date`` (either may be absent)."""
    conditions = []
    start = end = None
    if query.get("start_date") is not None:
        start, _ = parse_date(query["start_date"], "start_date")
        conditions.append(SpendLog.created_at >= start)
    if query.get("end_date") is not None:
        end, inclusive = parse_date(query["end_date"], "end_date", end=True)
        conditions.append(SpendLog.created_at <= end if inclusive else SpendLog.created_at < end)
        if start is not None and (end < start or (end == start and not inclusive)):
            raise BadRequest("`end_date` is before `start_date`.", param="end_date",
                             reason="invalid_date_range")
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else conditions[0] & conditions[1]


def _and(*conditions: peewee.Expression | None) -> peewee.Expression | None:
    found = [c for c in conditions if c is not None]
    if not found:
        return None
    out = found[0]
    for condition in found[1:]:
        out = out & condition
    return out


def log_info(row: Any) -> dict[str, Any]:
    """One spend-log row, in LiteLLM's ``SpendLogs`` field names."""
    return {
        "request_id": row.request_id,
        "call_type": row.route,
        "api_key": row.key_id,
        "spend": to_usd(row.spend),
        "total_tokens": row.prompt_tokens + row.completion_tokens,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "startTime": isoformat(row.started_at),
        "endTime": isoformat(row.created_at),
        "model": row.model,
        "user": row.user_id,
        "team_id": row.team_id,
        "organization_id": row.organization_id,
        "end_user": row.end_user_id,
        "auth_method": row.auth_method,
        "status": row.status,
        "estimated": bool(row.estimated),
    }


class SpendReports:
    def __init__(self, state: LLMAuthState) -> None:
        self.state = state

    # -- who sees what -------------------------------------------------------------------------

    @staticmethod
    def sees_all(actor: Principal) -> bool:
        return actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER

    @staticmethod
    def own_rows(actor: Principal) -> peewee.Expression:
        """The spend-log rows that are the caller's own (a team key's: its user's inside its
        team); 403 for a caller that has none."""
        if actor.user_id:
            confined = read_confinement(actor)
            if confined is not None:
                return (SpendLog.user_id == actor.user_id) & (SpendLog.team_id == confined)
            return SpendLog.user_id == actor.user_id
        if actor.key_id:
            return SpendLog.key_id == actor.key_id
        if actor.team_id:
            return SpendLog.team_id == actor.team_id
        raise Forbidden("This credential has no spend of its own to report.",
                        reason="no_spend_scope")

    def _key_id(self, actor: Principal, value: str) -> str:
        """The key id a filter names (a key id, or a raw key, looked up by digest); 403
        for a non-admin naming a key that is not its own, as for one that does not exist
        (no oracle for which keys exist)."""
        key_id = value
        owner: Key | DeletedKey | None
        if value.startswith(KEY_PREFIX):
            row = Key.get_or_none(Key.digest == self.state.digester.digest(value))
            key_id = row.key_id if row is not None else ""
            owner = row
        else:
            owner = (Key.get_or_none(Key.key_id == value)
                     or DeletedKey.get_or_none(DeletedKey.key_id == value))
        if not self.sees_all(actor):
            confined = read_confinement(actor)
            mine = owner is not None and (
                (actor.user_id is not None and owner.user_id == actor.user_id
                 and confined in (None, owner.team_id))
                or (actor.key_id is not None and owner.key_id == actor.key_id))
            if not mine:
                raise Forbidden("You can only see the spend of your own keys.",
                                param="api_key", reason="other_key_spend")
        return key_id

    def _check_user(self, actor: Principal, user_id: str | None) -> None:
        if user_id is not None and not self.sees_all(actor) and user_id != actor.user_id:
            raise Forbidden("You can only see your own spend.", param="user_id",
                            reason="other_user_spend")

    def _scope(self, actor: Principal, query: Mapping[str, Any]) -> peewee.Expression | None:
        """Filters of ``query`` (checked for the caller) and the caller's own-rows scope."""
        conditions: list[peewee.Expression | None] = [date_range(query)]
        if not self.sees_all(actor):
            conditions.append(self.own_rows(actor))
        self._check_user(actor, query.get("user_id"))
        if query.get("user_id") is not None:
            conditions.append(SpendLog.user_id == query["user_id"])
        if query.get("api_key") is not None:
            conditions.append(SpendLog.key_id == self._key_id(actor, query["api_key"]))
        for name, column in (("team_id", SpendLog.team_id), ("end_user_id", SpendLog.end_user_id),
                             ("model", SpendLog.model), ("request_id", SpendLog.request_id)):
            if query.get(name) is not None:
                conditions.append(column == query[name])
        return _and(*conditions)

    @staticmethod
    def _where(select: peewee.ModelSelect[M], condition: peewee.Expression | None
               ) -> peewee.ModelSelect[M]:
        return select if condition is None else select.where(condition)

    # -- endpoints -------------------------------------------------------------------------------

    def logs(self, actor: Principal, query: Mapping[str, Any]) -> tuple[Any, int | None]:
        """``(body, total rows or None)``: the rows, newest first, one page; or with both
        dates and ``summarize`` (LiteLLM's default), one entry per day."""
        with self.state.store.use():
            condition = self._scope(actor, query)
            dated = query.get("start_date") is not None and query.get("end_date") is not None
            if dated and query.get("summarize", True):
                return self._daily(condition), None
            select = self._where(SpendLog.select(), condition)
            total = select.count()
            page, size = query.get("page", 1), query.get("page_size", 100)
            rows = select.order_by(SpendLog.created_at.desc(), SpendLog.id.desc()).paginate(
                page, size)
            return [log_info(r) for r in rows], total

    def _daily(self, condition: peewee.Expression | None) -> list[dict[str, Any]]:
        """Per day: total spend and spend per key, user and model (exact sums)."""
        day = fn.DATE(SpendLog.created_at)
        # selected columns: rows are tuples, not the model the stubs' ModelSelect yields
        select: peewee.ModelSelect[Any] = self._where(
            SpendLog.select(day.alias("day"), SpendLog.key_id, SpendLog.user_id,
                            SpendLog.model, fn.SUM(SpendLog.spend).alias("total")),
            condition).group_by(day, SpendLog.key_id, SpendLog.user_id, SpendLog.model)
        days: dict[str, dict[str, Any]] = {}
        for row in select.tuples():
            when, key_id, user_id, model, total = row
            total = int(total or 0)
            entry = days.setdefault(str(when)[:10], {"spend": 0, "api_keys": {}, "users": {},
                                                    "models": {}})
            entry["spend"] += total
            for field, name in (("api_keys", key_id), ("users", user_id), ("models", model)):
                if name is not None:
                    entry[field][name] = entry[field].get(name, 0) + total
        return [{"startTime": when, "spend": to_usd(entry["spend"]),
                 **{field: {k: to_usd(v) for k, v in entry[field].items()}
                    for field in ("api_keys", "users", "models")}}
                for when, entry in sorted(days.items())]

    def _sums(self, column: peewee.Field, condition: peewee.Expression | None
              ) -> dict[str, int]:
        select: peewee.ModelSelect[Any] = self._where(  # rows are tuples (see _daily)
            SpendLog.select(column, fn.SUM(SpendLog.spend)), condition)
        return {ident: int(total or 0) for ident, total in
                select.group_by(column).tuples() if ident is not None}

    def _ranked(self, select: peewee.ModelSelect[Spender], id_field: str,
                info: Callable[[Spender], dict[str, Any]],
                column: peewee.Field, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Entity rows (``select``: the caller's, by row id) with their spend: the row's
        running total, or with a date the spend log's sum in the range; highest first, then
        oldest first. Without a date the database ranks and limits them: an admin's
        ``?limit=10`` among a million keys reads ten rows; with a date and a limit, the rows
        that spent in the range and then only as many others as the limit needs."""
        limit = query.get("limit")
        model = select.model
        if query.get("start_date") is None and query.get("end_date") is None:
            select = select.order_by(model.spend.desc(), model.id)
            return [info(row) for row in (select.limit(limit) if limit else select)]
        sums = self._sums(column, date_range(query))  # each entity's spend-log rows summed

        def dated(row: Any, units: int) -> dict[str, Any]:
            item = info(row)
            item["spend"] = to_usd(units)
            return item

        if not limit:
            ranked = sorted(((sums.get(getattr(row, id_field), 0), row) for row in select),
                            key=lambda pair: -pair[0])  # stable: ties stay oldest first
            return [dated(row, units) for units, row in ranked]
        # With a limit: the rows that spent in the range (as many as spent), then the
        # others oldest first, read only until the list is full.
        spent = [ident for ident, units in sums.items() if units > 0]
        field = getattr(model, id_field)
        rows: list[Spender] = []
        for chunk in range(0, len(spent), 500):
            rows.extend(select.where(field.in_(spent[chunk:chunk + 500])))
        rows.sort(key=lambda row: (-sums[getattr(row, id_field)], row.id))
        out = [dated(row, sums[getattr(row, id_field)]) for row in rows[:limit]]
        if len(out) < limit:
            for row in select.order_by(model.id).iterator():
                if sums.get(getattr(row, id_field), 0) <= 0:
                    out.append(dated(row, 0))
                    if len(out) == limit:
                        break
        return out

    def keys(self, actor: Principal, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        with self.state.store.use():
            select = Key.select().order_by(Key.id)
            if not self.sees_all(actor):
                confined = read_confinement(actor)
                if actor.user_id:
                    select = select.where(Key.user_id == actor.user_id)
                    if confined is not None:
                        select = select.where(Key.team_id == confined)
                elif actor.key_id:
                    select = select.where(Key.key_id == actor.key_id)
                else:
                    raise Forbidden("This credential has no keys.", reason="no_spend_scope")
            return self._ranked(select, "key_id", key_info, SpendLog.key_id, query)

    def users(self, actor: Principal, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        user_id = query.get("user_id")
        if not self.sees_all(actor):
            if actor.user_id is None:
                raise Forbidden("This credential has no user.", reason="no_spend_scope")
            if read_confinement(actor) is not None:
                raise Forbidden("A team key reports its team's spend only: its user's spend "
                                "covers other teams and personal keys. Use /spend/teams, "
                                "/spend/keys or a personal key.", reason="team_key_user_spend")
            self._check_user(actor, user_id)
            user_id = actor.user_id
        with self.state.store.use():
            select = User.select().order_by(User.id)
            if user_id is not None:
                select = select.where(User.user_id == user_id)
            return self._ranked(select, "user_id", user_info, SpendLog.user_id, query)

    def teams(self, actor: Principal, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Teams with their spend; a non-admin sees the teams it belongs to, as
        ``/team/info`` shows them to their members."""
        with self.state.store.use():
            select = Team.select().order_by(Team.id)
            if query.get("team_id") is not None:
                select = select.where(Team.team_id == query["team_id"])
            if not self.sees_all(actor):
                mine = set()
                if actor.user_id:
                    mine |= {m.team_id for m in TeamMembership.select(TeamMembership.team_id)
                             .where(TeamMembership.user_id == actor.user_id)}
                if actor.team_id:
                    mine.add(actor.team_id)
                confined = read_confinement(actor)
                if confined is not None:  # a team key: its own team only
                    mine &= {confined}
                if query.get("team_id") is not None and query["team_id"] not in mine:
                    raise Forbidden("You are not a member of this team.", param="team_id",
                                    reason="other_team_spend")
                select = select.where(Team.team_id.in_(sorted(mine) or [""]))
            return self._ranked(select, "team_id", team_info, SpendLog.team_id, query)

    def global_spend(self, actor: Principal, query: Mapping[str, Any]) -> dict[str, Any]:
        """LiteLLM's ``{spend, max_budget}``: every request's spend (a non-admin: its own)
        in the range, all time without one."""
        with self.state.store.use():
            condition = date_range(query)
            if not self.sees_all(actor):
                condition = _and(condition, self.own_rows(actor))
            total = self._where(SpendLog.select(fn.SUM(SpendLog.spend)), condition).scalar()
        max_budget = getattr(self.state.settings, "max_budget", None)
        return {"spend": to_usd(int(total or 0)), "max_budget": to_usd(max_budget)}
