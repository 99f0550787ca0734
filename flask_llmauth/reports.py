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
from .durations import isoformat, utcnow
from .errors import BadRequest, Forbidden
from .keys import key_info, read_confinement
from .money import to_usd
from .principal import Principal, Role
from .store.tables import (
    BudgetCounter,
    DeletedKey,
    Key,
    SpendLog,
    Team,
    TeamMembership,
    User,
)
from .teams import team_info
from .users import user_info

if TYPE_CHECKING:
    from .extension import LLMAuthState

M = TypeVar("M", bound=peewee.Model)
#: A table whose rows carry a running ``spend`` (:meth:`SpendReports._ranked`).
Spender = TypeVar("Spender", Key, User, Team)

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
#: Rows per page of the spend reports when the request names no ``limit`` / ``page_size``,
#: and the most a request may ask for.
PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
#: Ids per ``IN (...)`` list; also the most spenders the database is asked to skip with
#: ``NOT IN`` (more are skipped while reading ids in order).
_CHUNK = 500
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


def _rows_by_id(select: peewee.ModelSelect[Spender], ids: list[int]) -> list[Spender]:
    """The rows of ``select`` with these ids, in this order."""
    model = select.model
    found: dict[int, Spender] = {}
    for chunk in range(0, len(ids), _CHUNK):
        found.update((row.id, row) for row in
                     select.where(model.id.in_(ids[chunk:chunk + _CHUNK])).order_by())
    return [found[row_id] for row_id in ids if row_id in found]


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
        #: The key id ``api_key`` named (a raw key is looked up by its digest): what the
        #: next page's link says instead of the raw key.
        self.named_key_id: str | None = None

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
            self.named_key_id = self._key_id(actor, query["api_key"])
            conditions.append(SpendLog.key_id == self.named_key_id)
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

    def logs(self, actor: Principal, query: Mapping[str, Any]
             ) -> tuple[list[dict[str, Any]], int | None, bool]:
        """``(body, total rows or None, whether another page follows)``: the rows, newest
        first, one page; or with both dates and ``summarize`` (LiteLLM's default), one
        entry per day with spend, ``page_size`` such days per page."""
        page, size = query.get("page", 1), query.get("page_size") or PAGE_SIZE
        with self.state.store.use():
            condition = self._scope(actor, query)
            dated = query.get("start_date") is not None and query.get("end_date") is not None
            if dated and query.get("summarize", True):
                window, more = self._day_window(condition, page, size)
                if window is None:
                    return [], None, False
                return self._daily(_and(condition, window)), None, more
            select = self._where(SpendLog.select(), condition)
            total = select.count()
            rows = select.order_by(SpendLog.created_at.desc(), SpendLog.id.desc()).paginate(
                page, size)
            return [log_info(r) for r in rows], total, page * size < total

    def _day_window(self, condition: peewee.Expression | None, page: int, days: int
                    ) -> tuple[peewee.Expression | None, bool]:
        """The spend-log condition of the ``page``-th run of ``days`` days with spend
        (UTC, oldest first) and whether more such days follow; ``None``: no day left."""
        day = fn.DATE(SpendLog.created_at)
        select: peewee.ModelSelect[Any] = self._where(  # rows are tuples (see _daily)
            SpendLog.select(day).distinct(), condition)
        found = [str(when)[:10] for (when,) in
                 select.order_by(day).offset((page - 1) * days).limit(days + 1).tuples()]
        if not found:
            return None, False
        opens = datetime.strptime(found[0], "%Y-%m-%d")
        closes = datetime.strptime(found[:days][-1], "%Y-%m-%d") + timedelta(days=1)
        return (SpendLog.created_at >= opens) & (SpendLog.created_at < closes), len(found) > days

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

    def _spenders(self, column: peewee.Field, query: Mapping[str, Any],
                  within: peewee.ModelSelect[Any] | None) -> dict[str, int]:
        """Each entity that spent in the range, with its sum in units (> 0); ``within``:
        the caller's entity ids (a subquery) when it does not see every entity."""
        total = fn.SUM(SpendLog.spend)
        scope = column.in_(within) if within is not None else None
        select: peewee.ModelSelect[Any] = self._where(  # rows are tuples (see _daily)
            SpendLog.select(column, total), _and(date_range(query), scope))
        return {ident: int(units) for ident, units in
                select.group_by(column).having(total > 0).tuples() if ident is not None}

    def _ranked(self, select: peewee.ModelSelect[Spender], id_field: str,
                info: Callable[[Spender], dict[str, Any]], column: peewee.Field,
                query: Mapping[str, Any], scoped: bool) -> tuple[list[dict[str, Any]], bool]:
        """One page of entity rows (``select``: the caller's; ``scoped``: not every entity)
        with their spend, and whether another page follows. The ranking: the row's running
        total, or with a date the spend log's sum in the range; highest first, then oldest
        first. ``page`` and ``limit`` (default :data:`PAGE_SIZE`) pick the page: the
        database ranks and pages undated rows; dated, only the rows that spent in the range
        down to the page's end, and the others the page needs, are read."""
        limit = query.get("limit") or PAGE_SIZE
        skip = (query.get("page", 1) - 1) * limit
        model = select.model
        if query.get("start_date") is None and query.get("end_date") is None:
            rows = list(select.order_by(model.spend.desc(), model.id)
                        .offset(skip).limit(limit + 1))
            return [info(row) for row in rows[:limit]], len(rows) > limit
        field = getattr(model, id_field)
        sums = self._spenders(column, query,
                              select.select(field).order_by() if scoped else None)
        spent = self._spent_ids(select, field, sums, skip + limit + 1)
        if len(spent) > skip + limit:  # the page ends among the spenders
            ids = spent[skip:skip + limit + 1]
        else:  # every spender is ranked: the others follow, oldest first
            ids = spent[skip:]
            ids += self._other_ids(select, field, sums, max(0, skip - len(spent)),
                                   limit + 1 - len(ids))
        rows = _rows_by_id(select, ids[:limit])
        out = []
        for row in rows:
            item = info(row)
            item["spend"] = to_usd(sums.get(getattr(row, id_field), 0))
            out.append(item)
        return out, len(ids) > limit

    @staticmethod
    def _spent_ids(select: peewee.ModelSelect[Spender], field: peewee.Field,
                   sums: Mapping[str, int], wanted: int) -> list[int]:
        """Row ids of the caller's spenders, highest sum first, then oldest first: at least
        ``wanted`` of them when there are as many. Spenders are looked up from the highest
        sum down, a batch of ids at a time, each batch ending with a whole group of equal
        sums (a group is ordered by row id), until ``wanted`` are found."""
        model = select.model
        ordered = sorted(sums.items(), key=lambda item: -item[1])
        found: list[tuple[int, int]] = []
        at = 0
        while at < len(ordered) and len(found) < wanted:
            batch = ordered[at:at + _CHUNK]
            at += len(batch)
            while at < len(ordered) and ordered[at][1] == batch[-1][1]:
                batch.append(ordered[at])
                at += 1
            idents = [ident for ident, _ in batch]
            for chunk in range(0, len(idents), _CHUNK):
                lookup: peewee.ModelSelect[Any] = select.select(model.id, field).where(
                    field.in_(idents[chunk:chunk + _CHUNK])).order_by()
                found += [(sums[ident], row_id) for row_id, ident in lookup.tuples()]
        found.sort(key=lambda pair: (-pair[0], pair[1]))
        return [row_id for _, row_id in found]

    @staticmethod
    def _other_ids(select: peewee.ModelSelect[Spender], field: peewee.Field,
                   sums: Mapping[str, int], skip: int, count: int) -> list[int]:
        """Row ids of the caller's rows that did not spend in the range, oldest first:
        ``count`` of them after the first ``skip``."""
        model = select.model
        ordered: peewee.ModelSelect[Any] = select.select(model.id, field).order_by(model.id)
        if len(sums) <= _CHUNK:  # the database skips the few spenders
            if sums:
                ordered = ordered.where(field.not_in(list(sums)))
            return [row_id for row_id, _ in ordered.offset(skip).limit(count).tuples()]
        ids: list[int] = []
        for row_id, ident in ordered.tuples().iterator():
            if ident in sums:
                continue
            if skip:
                skip -= 1
                continue
            ids.append(row_id)
            if len(ids) == count:
                break
        return ids

    def keys(self, actor: Principal, query: Mapping[str, Any]
             ) -> tuple[list[dict[str, Any]], bool]:
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
            return self._ranked(select, "key_id", key_info, SpendLog.key_id, query,
                                not self.sees_all(actor))

    def users(self, actor: Principal, query: Mapping[str, Any]
             ) -> tuple[list[dict[str, Any]], bool]:
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
            return self._ranked(select, "user_id", user_info, SpendLog.user_id, query,
                                user_id is not None)

    def teams(self, actor: Principal, query: Mapping[str, Any]
             ) -> tuple[list[dict[str, Any]], bool]:
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
            return self._ranked(select, "team_id", team_info, SpendLog.team_id, query,
                                query.get("team_id") is not None or not self.sees_all(actor))

    def global_spend(self, actor: Principal, query: Mapping[str, Any]) -> dict[str, Any]:
        """LiteLLM's ``{spend, max_budget}``: every request's spend (a non-admin: its own)
        in the range, all time without one; for admins, with a global budget, also what the
        budget counts: ``budget_spend`` in its current window and ``budget_reset_at``."""
        max_budget = getattr(self.state.settings, "max_budget", None)
        window: dict[str, Any] = {"budget_spend": None, "budget_reset_at": None}
        with self.state.store.use():
            condition = date_range(query)
            sees_all = self.sees_all(actor)
            if not sees_all:
                condition = _and(condition, self.own_rows(actor))
            total = self._where(SpendLog.select(fn.SUM(SpendLog.spend)), condition).scalar()
            if sees_all and max_budget is not None:
                window = self._global_window()
        return {"spend": to_usd(int(total or 0)), "max_budget": to_usd(max_budget), **window}

    def _global_window(self) -> dict[str, Any]:
        """The global budget's spend in its current window (its counter, which starts
        when the budget is first used and counts what the budget admitted) and the window's
        end; ``budget_reset_at`` is ``None`` when no window is running (none configured, or
        the next request starts one)."""
        duration = getattr(self.state.settings, "budget_duration", None)
        counter = (BudgetCounter.select()
                   .where(BudgetCounter.scope == "global", BudgetCounter.entity_id == "all",
                          BudgetCounter.model == "")
                   .first())
        if counter is None:
            return {"budget_spend": 0.0, "budget_reset_at": None}
        reset_at = counter.budget_reset_at
        if duration is None or counter.budget_duration != duration:
            reset_at = None  # no window, or the next request starts the new schedule
        elif reset_at is not None and reset_at <= utcnow():
            return {"budget_spend": 0.0, "budget_reset_at": None}  # over: spend goes to 0
        return {"budget_spend": to_usd(int(counter.spend)), "budget_reset_at": isoformat(reset_at)}
