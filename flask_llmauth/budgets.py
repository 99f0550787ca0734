"""Budgets: global, team, team member, user, key, end user and per-model key budgets, with
``budget_duration`` windows, soft budgets and reservations that hold across processes.

Which budgets apply to a request (LiteLLM's precedence, see docs/budgets.md):

* the **global** budget (``LLMAUTH_MAX_BUDGET``), for every request;
* the **key**'s own budget, and its **per-model** budgets (``model_max_budget``);
* a key (or JWT) **with a team**: the **team** budget and the caller's **team member**
  budget (its own ``max_budget_in_team``, else the team's ``team_member_budget``) — the
  user's personal budget does *not* apply;
* a key **without a team**: the **user**'s personal budget;
* the **end user** (customer) the request is for: its own budget, else
  ``LLMAUTH_MAX_END_USER_BUDGET``;
* budgets a custom auth hook or proxy headers asserted (``principal.limits``).

A budget is used up when ``spend >= max_budget``. Before the view runs, the guard admits the
request's worst-case cost (:func:`flask_llmauth.prices.worst_case_units`) against every
budget, from this process's **lease** of it (:mod:`flask_llmauth.budget_leases`): a chunk
reserved in the database with a conditional update, so ``spend + reserved <= max_budget``
holds across processes, and spent in memory. Only a request that does not fit the lease
costs a transaction. The spend ledger writes real spend (``on_batch`` adds it to the counter
rows); the lease then drops the request's worst case. What a crashed process leased expires
after ``LLMAUTH_BUDGET_RESERVATION_TTL``.

Windows reset lazily: the first lease transaction after a window's end resets it (a
conditional update, so exactly one process does). ``flask llmauth reset-budgets`` and the optional
scheduler (``LLMAUTH_BUDGET_RESET_INTERVAL``) reset idle rows too, and delete the counter rows
that hold nothing (:meth:`Ledger.sweep_counters`). Principals without any
budget cost nothing: the guard does not want their requests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ParamSpec, TypeVar

import peewee
from flask import Flask, current_app

from .authz.routes import RouteInfo
from .config import Settings
from .durations import Duration, add_months, parse_duration, utcnow
from .errors import BudgetExceeded
from .guards import Admission
from .money import UNITS_PER_USD, to_units, to_usd
from .prices import FEMTO_PER_UNIT, Price, prices_for, reserved_price, settled_price
from .principal import Principal
from .signals import budget_exceeded, soft_budget_crossed
from .signals import send as send_signal
from .store.tables import (
    BudgetCounter,
    BudgetReservation,
    Customer,
    Key,
    Team,
    TeamMembership,
    User,
)
from .usage import Usage, body_sizes, refuse_unreadable_cap

log = logging.getLogger("flask_llmauth")

#: ``admission.scratch`` slot the spend guard copies into ``SpendEvent.reservations``.
SCRATCH = "budget_reservations"
#: Entity tables in lock order (the spend ledger updates them in this order too); counters
#: (one table) come after them.
ENTITY_TABLES = {
    Key._meta.table_name: 0,
    User._meta.table_name: 1,
    Team._meta.table_name: 2,
    TeamMembership._meta.table_name: 3,
}
COUNTER_TABLE = BudgetCounter._meta.table_name
MEMBERSHIP_TABLE = TeamMembership._meta.table_name
_RETRIES = 4
#: Rows per transaction of the counter sweep (:meth:`Ledger.sweep_counters`).
SWEEP_BATCH = 500
#: A counter row the sweep may delete: nothing reserved (``reserved`` is the sum of the live
#: reservation rows' and leases' parts on it, changed in their transactions: 0 means none
#: holds anything on it), not touched by a request since the cutoff (a request with a soft
#: budget only, or a free one, holds its id without reserving until its spend is written),
#: not the global budget's, not the newest row (SQLite gives a new row the id of a deleted
#: newest one: an id held in memory never names another budget's row), and either no spend
#: (in its window: ``reset_due`` runs first) and no soft budget marked crossed in its window,
#: or a per-model budget of a key that no longer exists (deleted: nothing can spend on it
#: again, whatever it spent). Arguments: ``"global"``, the cutoff, ``False``, ``"key_model"``.
SWEEP_WHERE = ('"scope" <> {p} AND "reserved" = 0 '
               'AND ("touched_at" IS NULL OR "touched_at" <= {p}) '
               'AND "id" < (SELECT MAX("id") FROM "{table}") '
               'AND (("spend" = 0 AND "soft_alerted" = {p}) OR ("scope" = {p} AND NOT EXISTS '
               '(SELECT 1 FROM "{keys}" WHERE "{keys}"."key_id" = "{table}"."entity_id")))')


# -- which budgets apply -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Budget:
    """One budget a request is held to."""

    level: str
    #: Printable, non-secret name for messages and signals.
    label: str
    #: ``(table, id)`` of an entity row, or ``None`` for a counter row.
    row: tuple[str, int] | None
    #: ``(scope, entity_id, model)`` of a counter row.
    counter: tuple[str, str, str] | None
    max_budget: int | None
    soft_budget: int | None
    duration: str | None
    #: The window end the cached record knows (entity rows).
    reset_at: datetime | None = None
    #: The entity row's ``created_at``: which incarnation of ``row`` this is. SQLite gives a
    #: new row the id of a deleted newest row, so statements on the row match it too
    #: (``None``: by id alone).
    born: datetime | None = None
    #: The day of the month the entity row's month windows end on (``budget_reset_day``).
    reset_day: int | None = None
    #: The row's identity (the key of this process's lease of it).
    ident: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        ident = ((*self.row, self.born) if self.row is not None
                 else ("counter", *(self.counter or ())))
        object.__setattr__(self, "ident", ident)

    @property
    def order(self) -> tuple[int, str, str, str, int]:
        """Lock order: entity tables first (by table, then id), then counters."""
        if self.row is not None:
            return (ENTITY_TABLES[self.row[0]], "", "", "", self.row[1])
        scope, entity, model = self.counter or ("", "", "")
        return (9, scope, entity, model, 0)


def _units(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    return None


def _usd(value: Any) -> int | None:
    try:
        return to_units(value)
    except ValueError:
        return None


def _duration(value: Any) -> str | None:
    if not value:
        return None
    try:
        return parse_duration(value).text
    except ValueError:
        return None


def _entity(level: str, label: str, table: Any, record: Any, max_budget: int | None,
            soft_budget: int | None, duration: str | None) -> Budget | None:
    if max_budget is None and soft_budget is None:
        return None
    return Budget(level, label, (table._meta.table_name, record.id), None, max_budget,
                  soft_budget, _duration(duration), record.budget_reset_at,
                  getattr(record, "created_at", None),
                  getattr(record, "budget_reset_day", None))


def has_budget(principal: Principal) -> bool:
    """Whether a budget of the principal's own records applies (end users and the global
    budget are decided elsewhere)."""
    key, user = principal.key, principal.user
    # The common case in one expression: no team, no budget field set at all.
    if (principal.team is None and (key is not None or not principal.limits)
            and (key is None or (key.max_budget is None and key.soft_budget is None
                                 and not key.model_max_budget))
            and (user is None or (user.max_budget is None and user.soft_budget is None))):
        return False
    if key is not None and any(isinstance(spec, Mapping) for spec in
                               (key.model_max_budget or {}).values()):
        return True
    return bool(resolve(principal, (), None, None, None))


def resolve(principal: Principal, model_names: Sequence[str], end_user_id: str | None,
            customer: Any, settings: Settings | None) -> list[Budget]:
    """Every budget that applies to this request, in lock order."""
    out: list[Budget] = []
    key, user, team, member = principal.key, principal.user, principal.team, principal.membership
    if key is not None:
        found = _entity("key", key.key_name, Key, key, _units(key.max_budget),
                        _units(key.soft_budget), key.budget_duration)
        if found:
            out.append(found)
        budgets = key.model_max_budget or {}
        for name in model_names:
            spec = budgets.get(name)
            if not isinstance(spec, Mapping):
                continue
            limit = _usd(spec.get("budget_limit", spec.get("max_budget")))
            if limit is not None:
                out.append(Budget("key_model", f"{key.key_name}:{name[:100]}", None,
                                  ("key_model", key.key_id, name[:255]), limit, None,
                                  _duration(spec.get("time_period")
                                            or spec.get("budget_duration"))))
                break
    if team is not None:
        found = _entity("team", team.team_id, Team, team, _units(team.max_budget),
                        _units(team.soft_budget), team.budget_duration)
        if found:
            out.append(found)
        if member is not None:
            limit = _units(member.max_budget)
            if limit is None:
                limit = _units(team.team_member_budget)
            found = _entity("team_member", f"{team.team_id}:{member.user_id}", TeamMembership,
                            member, limit, None,
                            member.budget_duration or team.team_member_budget_duration)
            if found:
                out.append(found)
    elif user is not None:  # a team key is bound by the team budget, not the personal one
        found = _entity("user", user.user_id, User, user, _units(user.max_budget),
                        _units(user.soft_budget), user.budget_duration)
        if found:
            out.append(found)
    asserted = principal.limits
    if key is None and asserted:  # a custom auth hook or proxy headers asserted a budget
        limit, soft = _units(asserted.get("max_budget")), _units(asserted.get("soft_budget"))
        if limit is not None or soft is not None:
            out.append(Budget("principal", principal.identity[:100], None,
                              ("principal", f"{principal.method}:{principal.identity}"[:255],
                               ""), limit, soft, _duration(asserted.get("budget_duration"))))
    if end_user_id:
        limit = soft = None
        duration = None
        if customer is not None:
            limit = _units(getattr(customer, "max_budget", None))
            soft = _units(getattr(customer, "soft_budget", None))
            duration = getattr(customer, "budget_duration", None)
        if limit is None and settings is not None:  # also under a soft budget of its own
            limit = settings.max_end_user_budget
            duration = duration or settings.end_user_budget_duration
        if limit is not None or soft is not None:
            out.append(Budget("end_user", end_user_id[:100], None,
                              ("end_user", end_user_id[:255], ""), limit, soft,
                              _duration(duration)))
    if settings is not None and settings.max_budget is not None:
        out.append(Budget("global", "proxy", None, ("global", "all", ""), settings.max_budget,
                          None, settings.budget_duration))
    out.sort(key=lambda b: b.order)
    return out


# -- windows ---------------------------------------------------------------------------------------


def next_reset(duration: str, previous: datetime | None, now: datetime,
               day: int | None = None) -> datetime:
    """The end of the window that contains ``now``: ``previous`` stepped forward by whole
    durations (the schedule is kept), or ``now + duration`` when there was none.

    Month windows end on ``day`` of the month (the schedule's ``budget_reset_day``; default
    ``previous``'s day), clamped to shorter months: a schedule set on a 31st ends on Feb 28,
    then on Mar 31 — not on the 28th for good once a short month clamped it. Windows
    skipped at once are counted from ``previous``, never one clamped step after another."""
    parsed = parse_duration(duration)
    if previous is None or previous > now + timedelta(days=400 * 100):
        return parsed.after(now)
    if previous > now:
        return previous
    if not parsed.months:
        steps = int((now - previous).total_seconds() // parsed.seconds) + 1
        return previous + timedelta(seconds=parsed.seconds * steps)
    elapsed = (now.year - previous.year) * 12 + now.month - previous.month
    steps = max(1, elapsed // parsed.months - 1)  # every earlier step ends before now
    while True:
        current = add_months(previous, parsed.months * steps, day)
        if current > now:
            return current
        steps += 1


def schedule_day(parsed: Duration, window_end: datetime | None, stored: int | None,
                 start: datetime) -> int | None:
    """The day of the month a schedule of month windows ends on (``budget_reset_day``):
    ``stored`` — for a row written before it was recorded, its window end's day — or, for a
    schedule without a window end yet, ``start``'s; ``None`` for windows not in months."""
    if window_end is None:
        return parsed.day(start)
    return parsed.day(window_end) and (stored or window_end.day)


def first_window_end(duration: str, created_at: datetime | None) -> datetime | None:
    """The end of a membership's first window when its row has a window but no
    ``budget_reset_at`` (a row written before the window was known, e.g. by an older
    version): its schedule runs from the row's ``created_at``, so it is neither reset at
    once nor left without a reset."""
    if created_at is None:
        return None
    return parse_duration(duration).after(created_at)


def set_window(row: Any, duration: Duration | None, now: datetime,
               default: Duration | None = None) -> None:
    """Give a key, user, team, membership or customer row a new ``budget_duration``
    (``None``: none, or the ``default`` window it then follows: a team member follows its
    team's ``team_member_budget_duration``), in the caller's transaction: a new schedule
    starts now. What was spent stays in the first window (a schedule is not a spend reset:
    that is ``/key/{key}/reset_spend``'s, audited), except the spend of a window that is
    already over, whose due reset is made first — as the lazy reset or ``flask llmauth
    reset-budgets`` would have made it; the change must not cancel it."""
    table = type(row)
    if (row.id is not None and (row.budget_duration or default is not None)
            and row.budget_reset_at is not None and row.budget_reset_at <= now):
        over = {"spend": 0}
        if "soft_alerted" in table._meta.fields:
            over["soft_alerted"] = False
        done = table.update(**over).where(  # locks the row: no spend lands in between
            (table.id == row.id) & (table.budget_reset_at <= now)).execute()
        if done:
            for name, value in over.items():
                setattr(row, name, value)
    window = duration if duration is not None else default
    row.budget_duration = None if duration is None else duration.text
    row.budget_reset_at = None if window is None else window.after(now)
    row.budget_reset_day = None if window is None else window.day(now)


def _as_datetime(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return BudgetCounter.budget_reset_at.python_value(value)


# -- the reservation -------------------------------------------------------------------------------


class _Refusal(Exception):
    def __init__(self, budget: Budget, spend: int, reserved: int, max_budget: int,
                 reset_at: datetime | None, need: int) -> None:
        super().__init__(budget.level)
        self.budget, self.spend, self.reserved = budget, spend, reserved
        self.max_budget, self.reset_at, self.need = max_budget, reset_at, need
        #: Soft budgets the refusing transaction marked crossed (committed with it).
        self.crossed: list[tuple[Budget, int]] = []


def _is_retryable(exc: Exception) -> bool:
    """A Postgres deadlock or serialization failure, or SQLite's busy/locked."""
    original = getattr(exc, "__cause__", None) or getattr(exc, "__context__", None)
    code = getattr(original, "pgcode", None) or getattr(original, "sqlstate", None)
    if code in ("40P01", "40001"):
        return True
    text = str(exc).lower()
    return "deadlock" in text or "database is locked" in text or "database is busy" in text


_P = ParamSpec("_P")
_T = TypeVar("_T")


def atomic_with_retries(db: Any, work: Callable[_P, _T], *args: _P.args,
                        **kwargs: _P.kwargs) -> _T:
    """Run ``work(*args, **kwargs)`` in one transaction of ``db`` (``db.atomic()``) and
    return its result once committed. A retryable error (:func:`_is_retryable`: deadlock,
    serialization failure, SQLite busy/locked), raised by the work or by the commit, rolls
    the transaction back and runs the whole work again in a new one, after 5 ms times the
    attempt number: ``_RETRIES`` attempts in all, the last one's error is raised. Any other
    error is raised at once. The caller opens the connection (``store.use()``) around it, so a
    retryable error is retried before ``use()`` turns it into a 503."""
    for attempt in range(_RETRIES):
        try:
            with db.atomic():
                return work(*args, **kwargs)
        except peewee.OperationalError as exc:
            if attempt == _RETRIES - 1 or not _is_retryable(exc):
                raise
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


class Ledger:
    """The SQL of budgets, bound to one app's store."""

    def __init__(self, store: Any, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        p = store.db.param
        self.p = p
        self.reserved_once = False

    # -- statements ----------------------------------------------------------------------------

    def _where(self, budget: Budget) -> tuple[str, list[Any]]:
        p = self.p
        if budget.row is not None:
            return self.row_where(budget.row[1], budget.born)
        scope, entity, model = budget.counter  # type: ignore[misc]
        return f'"scope" = {p} AND "entity_id" = {p} AND "model" = {p}', [scope, entity, model]

    def row_where(self, row_id: int, born: datetime | None) -> tuple[str, list[Any]]:
        """An entity row by id and, when known, by incarnation (``created_at``)."""
        p = self.p
        if born is None:
            return f'"id" = {p}', [row_id]
        return f'"id" = {p} AND "created_at" = {p}', [row_id, born]

    def _table(self, budget: Budget) -> str:
        return budget.row[0] if budget.row is not None else COUNTER_TABLE

    def _touch(self, db: Any, budget: Budget, now: datetime
               ) -> tuple[int, int, int, datetime | None, bool] | None:
        """Reset the row's window if it is over, lock the row and read it, in one statement.
        Returns ``(id, spend, reserved, reset_at, soft_alerted)`` or ``None`` when
        the row does not exist (a counter not created yet, a deleted entity)."""
        p = self.p
        where, args = self._where(budget)
        sets: list[str] = []
        values: list[Any] = []
        if budget.duration is not None:
            parsed = parse_duration(budget.duration)
            # a membership row without a window end (see first_window_end): its windows
            # count from created_at, so it is not reset before its first window is over
            first = (first_window_end(budget.duration, budget.born)
                     if budget.row is not None and budget.row[0] == MEMBERSHIP_TABLE else None)
            previous = budget.reset_at or first
            day = schedule_day(parsed, budget.reset_at, budget.reset_day,
                               budget.born if first is not None and budget.born else now)
            new = next_reset(budget.duration, previous, now, day)
            if first is None or first <= now:
                due = f'("budget_reset_at" IS NULL OR "budget_reset_at" <= {p})'
                ends, ends_values = f'CASE WHEN {due} THEN {p}', [now, new]
                days, days_values = f'CASE WHEN {due} THEN {p}', [now, day]
            else:  # in its first window: it gets the window's end, its spend stays
                due = f'("budget_reset_at" <= {p})'
                ends = f'CASE WHEN "budget_reset_at" IS NULL THEN {p} WHEN {due} THEN {p}'
                ends_values = [first, now, new]
                days = f'CASE WHEN "budget_reset_at" IS NULL OR {due} THEN {p}'
                days_values = [now, day]
            sets += [f'"spend" = CASE WHEN {due} THEN 0 ELSE "spend" END',
                     f'"soft_alerted" = CASE WHEN {due} THEN {p} ELSE "soft_alerted" END',
                     f'"budget_reset_at" = {ends} ELSE "budget_reset_at" END',
                     f'"budget_reset_day" = {days} ELSE "budget_reset_day" END']
            values += [now, now, False, *ends_values, *days_values]
            if budget.counter is not None:  # the CLI resets counters by their own duration
                # another duration starts a new schedule (as setting an entity's does)
                changed = f'"budget_duration" IS NULL OR "budget_duration" <> {p}'
                sets[-2] = (f'"budget_reset_at" = CASE WHEN {due} THEN {p} WHEN {changed} '
                            f'THEN {p} ELSE "budget_reset_at" END')
                sets[-1] = (f'"budget_reset_day" = CASE WHEN {due} OR {changed} THEN {p} '
                            f'ELSE "budget_reset_day" END')
                sets.append(f'"budget_duration" = {p}')
                values[-4:] = [now, new, budget.duration, parsed.after(now), now,
                               budget.duration, day, budget.duration]
        elif budget.counter is not None and budget.level != "sweep":
            # no window (any more): the CLI must not reset it by a duration it had
            sets += ['"budget_duration" = NULL', '"budget_reset_at" = NULL',
                     '"budget_reset_day" = NULL']
        else:
            sets.append('"reserved" = "reserved"')
        if budget.counter is not None:  # in use: the counter sweep keeps it (sweep_counters)
            sets.append(f'"touched_at" = {p}')
            values.append(now)
        sql = (f'UPDATE "{self._table(budget)}" SET {", ".join(sets)} '  # noqa: S608
               f'WHERE {where} RETURNING "id", "spend", "reserved", '
               f'"budget_reset_at", "soft_alerted"')
        row = db.execute_sql(sql, [*values, *args]).fetchone()
        if row is None:
            return None
        return row[0], row[1], row[2], _as_datetime(row[3]), bool(row[4])

    def _read(self, db: Any, budget: Budget) -> tuple[int, int, datetime | None] | None:
        where, args = self._where(budget)
        sql = (f'SELECT "spend", "reserved", "budget_reset_at" '  # noqa: S608
               f'FROM "{self._table(budget)}" WHERE {where}')
        row = db.execute_sql(sql, args).fetchone()
        return None if row is None else (row[0], row[1], _as_datetime(row[2]))

    def _create_counter(self, db: Any, budget: Budget, now: datetime) -> None:
        p = self.p
        scope, entity, model = budget.counter  # type: ignore[misc]
        parsed = parse_duration(budget.duration) if budget.duration else None
        reset = parsed.after(now) if parsed else None
        day = parsed.day(now) if parsed else None
        sql = (f'INSERT INTO "{COUNTER_TABLE}" ("scope", "entity_id", "model", "spend", '  # noqa: S608
               f'"reserved", "budget_duration", "budget_reset_at", "budget_reset_day", '
               f'"soft_alerted", "touched_at") VALUES ({p}, {p}, {p}, 0, 0, {p}, {p}, {p}, '
               f'{p}, {p}) ON CONFLICT ("scope", "entity_id", "model") DO NOTHING')
        db.execute_sql(sql, [scope, entity, model, budget.duration, reset, day, False, now])

    def _mark_soft(self, db: Any, table: str, row_id: int) -> bool:
        p = self.p
        sql = (f'UPDATE "{table}" SET "soft_alerted" = {p} '  # noqa: S608
               f'WHERE "id" = {p} AND "soft_alerted" = {p}')
        return bool(db.execute_sql(sql, [True, row_id, False]).rowcount)

    # -- soft-only budgets, spend without the spend ledger ----------------------------------------

    def touch_soft(self, budgets: Sequence[Budget]
                   ) -> tuple[list[tuple[str, int, tuple[Any, ...], bool]],
                              list[tuple[Budget, int]]]:
        """Budgets without a limit (soft budgets only) reserve nothing: one transaction
        resets their windows and reads their spend for the soft-budget signal (once per
        window). Returns their rows ``(table, id, order, is_counter)`` and the crossings."""
        with self.store.use() as db:
            return atomic_with_retries(db, self._touch_soft, db, budgets)

    def _touch_soft(self, db: Any, budgets: Sequence[Budget]
                    ) -> tuple[list[tuple[str, int, tuple[Any, ...], bool]],
                               list[tuple[Budget, int]]]:
        now = utcnow()
        rows: list[tuple[str, int, tuple[Any, ...], bool]] = []
        crossed: list[tuple[Budget, int]] = []
        for budget in budgets:
            got = self._touch(db, budget, now)
            if got is None and budget.counter is not None:
                self._create_counter(db, budget, now)
                got = self._touch(db, budget, now)
            if got is None:
                continue
            row_id, spend, _reserved, _reset_at, alerted = got
            table = self._table(budget)
            rows.append((table, row_id, budget.order, budget.counter is not None))
            if (budget.soft_budget is not None and spend >= budget.soft_budget
                    and not alerted and self._mark_soft(db, table, row_id)):
                crossed.append((budget, spend))
        return rows, crossed

    def add_spend(self, rows: Iterable[tuple[str, int, tuple[Any, ...]]], cost: int) -> None:
        """Add one request's cost to its budget rows, in lock order, in one transaction
        (requests settled without the spend ledger)."""
        p = self.p
        ordered = sorted(set(rows), key=lambda r: r[2])

        def add(db: Any) -> None:
            for table, row_id, _order in ordered:
                db.execute_sql(f'UPDATE "{table}" SET "spend" = "spend" + {p} '  # noqa: S608
                               f'WHERE "id" = {p}', [cost, row_id])

        with self.store.use() as db:
            atomic_with_retries(db, add, db)

    def sweep(self, now: datetime | None = None, keep: Container[str] = ()) -> int:
        """Release reservations past their expiry (their process crashed, or a stream ran
        longer than ``LLMAUTH_BUDGET_RESERVATION_TTL``), except those named in ``keep``
        (the sweeping process's own live leases); return how many."""
        now = now or utcnow()
        count = 0
        with self.store.use():
            expired = list(BudgetReservation.select(BudgetReservation.request_id,
                                                    BudgetReservation.parts)
                           .where(BudgetReservation.expires_at <= now).limit(10_000))
        for row in expired:
            if row.request_id not in keep:
                count += self._release_expired(row.request_id, now)
        if count:
            log.warning("llmauth: released %d expired budget reservation(s)", count)
        return count

    def _release_expired(self, request_id: str, now: datetime) -> int:
        """Release one reservation if it is still expired, by what its row holds when it is
        deleted (a lease's owner may have refreshed or resized it since it was read)."""
        p = self.p
        table = BudgetReservation._meta.table_name

        def release(db: Any) -> int:
            got = db.execute_sql(
                f'DELETE FROM "{table}" WHERE "request_id" = {p} '  # noqa: S608
                f'AND "expires_at" <= {p} RETURNING "parts"',
                [request_id, now]).fetchone()
            if got is None:
                return 0
            parts = BudgetReservation.parts.python_value(got[0]) or []
            for name, row_id, amount, *rest in sorted(
                    parts, key=lambda x: (ENTITY_TABLES.get(x[0], 9), x[1])):
                # parts written before the incarnation was recorded: by id
                born = rest[1] if len(rest) > 1 and name in ENTITY_TABLES else None
                where, args = self.row_where(
                    row_id, None if born is None else datetime.fromisoformat(born))
                db.execute_sql(f'UPDATE "{name}" SET "reserved" = "reserved" - {p} '  # noqa: S608
                               f'WHERE {where}', [amount, *args])
            return 1

        with self.store.use() as db:
            return atomic_with_retries(db, release, db)

    # -- resets --------------------------------------------------------------------------------

    def reset_due(self, now: datetime | None = None) -> dict[str, int]:
        """Reset every budget window that is over (all levels); return counts per table."""
        now = now or utcnow()
        done: dict[str, int] = {}
        p = self.p
        team = Team._meta.table_name
        with self.store.use() as db:
            for table in (*ENTITY_TABLES, COUNTER_TABLE, Customer._meta.table_name):
                soft = '"soft_alerted" = ' + p + ", " if table != Customer._meta.table_name else ""
                if table == MEMBERSHIP_TABLE:
                    # a member without a window of its own follows its team's default one
                    rows = db.execute_sql(
                        f'SELECT m."id", m."budget_reset_at", COALESCE(m."budget_duration", '  # noqa: S608
                        f't."team_member_budget_duration"), m."created_at", '
                        f'm."budget_reset_day" FROM "{table}" m '
                        f'LEFT JOIN "{team}" t ON t."team_id" = m."team_id" '
                        f'WHERE (m."budget_duration" IS NOT NULL OR '
                        f't."team_member_budget_duration" IS NOT NULL) AND '
                        f'(m."budget_reset_at" IS NULL OR m."budget_reset_at" <= {p})',
                        [now]).fetchall()
                else:
                    rows = db.execute_sql(
                        f'SELECT "id", "budget_reset_at", "budget_duration", NULL, '  # noqa: S608
                        f'"budget_reset_day" FROM "{table}" WHERE "budget_duration" IS NOT NULL '
                        f'AND ("budget_reset_at" IS NULL OR "budget_reset_at" <= {p})',
                        [now]).fetchall()
                count = 0
                for row_id, previous, duration, created_at, day in rows:
                    duration = _duration(duration)
                    if duration is None:
                        continue
                    previous = _as_datetime(previous)
                    parsed = parse_duration(duration)
                    if previous is None and table == MEMBERSHIP_TABLE:
                        created_at = _as_datetime(created_at)
                        first = first_window_end(duration, created_at)
                        if first is not None and first > now:
                            # in its first window (from created_at): not over, not reset
                            with db.atomic():
                                db.execute_sql(
                                    f'UPDATE "{table}" SET "budget_reset_at" = {p}, '  # noqa: S608
                                    f'"budget_reset_day" = {p} '
                                    f'WHERE "id" = {p} AND "budget_reset_at" IS NULL',
                                    [first, created_at and parsed.day(created_at), row_id])
                            continue
                        if first is not None and created_at is not None:
                            previous, day = first, parsed.day(created_at)
                    day = schedule_day(parsed, previous, day, now)
                    new = next_reset(duration, previous, now, day)
                    with db.atomic():
                        cursor = db.execute_sql(
                            f'UPDATE "{table}" SET "spend" = 0, {soft}'  # noqa: S608
                            f'"budget_reset_at" = {p}, "budget_reset_day" = {p} '
                            f'WHERE "id" = {p} AND '
                            f'("budget_reset_at" IS NULL OR "budget_reset_at" <= {p})',
                            [*([False] if soft else []), new, day, row_id, now])
                    count += cursor.rowcount
                done[table] = count
        return done

    # -- the counter sweep -----------------------------------------------------------------------

    def sweep_counters(self, now: datetime | None = None, idle: float | None = None,
                       batch: int = SWEEP_BATCH) -> int:
        """Delete the counter rows that hold nothing (see :data:`SWEEP_WHERE`): no spend in
        their window (an ended window was reset by :meth:`reset_due` first), nothing
        reserved, no soft budget marked crossed, not touched by a request for ``idle``
        seconds (default ``LLMAUTH_BUDGET_RESERVATION_TTL``) — and the idle, unreserved
        per-model rows of deleted keys, whatever they spent. The next request that needs
        one creates it again in the same state. Batches of ``batch`` rows, one transaction
        each; the condition is checked again by the ``DELETE`` itself on the row it deletes
        (on Postgres after the rows are locked, skipping rows a transaction holds), so a
        request that reserves on, spends on or touches a row first keeps it. Returns how
        many rows were deleted."""
        now = now or utcnow()
        if idle is None:
            idle = float(self.settings.budget_reservation_ttl)
        cutoff = now - timedelta(seconds=idle)
        p = self.p
        where = SWEEP_WHERE.format(table=COUNTER_TABLE, keys=Key._meta.table_name, p=p)
        args = ["global", cutoff, False, "key_model"]
        deleted = 0
        after = 0

        def delete_batch(db: Any, start: int, lock: str) -> tuple[list[int], int]:
            """One batch: the ids of up to ``batch`` sweepable rows past ``start``, and how
            many of them the ``DELETE`` deleted."""
            ids = [row[0] for row in db.execute_sql(
                f'SELECT "id" FROM "{COUNTER_TABLE}" WHERE "id" > {p} '  # noqa: S608
                f'AND {where} ORDER BY "id" LIMIT {int(batch)}{lock}',
                [start, *args]).fetchall()]
            if not ids:
                return ids, 0
            marks = ", ".join([p] * len(ids))
            return ids, db.execute_sql(
                f'DELETE FROM "{COUNTER_TABLE}" WHERE "id" IN ({marks}) '  # noqa: S608
                f'AND {where}', [*ids, *args]).rowcount

        with self.store.use() as db:
            postgres = not isinstance(db, peewee.SqliteDatabase)
            lock = " FOR UPDATE SKIP LOCKED" if postgres else ""
            while True:
                # SQLite: the transaction holds the write lock from its start
                ids, count = atomic_with_retries(db, delete_batch, db, after, lock)
                deleted += count
                if len(ids) < batch:
                    break
                after = ids[-1]
        if deleted:
            log.info("llmauth: deleted %d idle budget counter row(s)", deleted)
        return deleted


# -- the guard -------------------------------------------------------------------------------------


def _fmt(units: int) -> str:
    """``units`` as USD for a refusal message: exact, in plain digits (a float printed
    huge worst cases with invented digits and rounded amounts below $0.0000005 to 0)."""
    sign = "-" if units < 0 else ""
    whole, part = divmod(abs(units), UNITS_PER_USD)
    return sign + (f"{whole}.{part:09d}".rstrip("0").rstrip(".") if part else str(whole))


class _BudgetPlan:
    """The budgets of one principal object, model and end user, with this process's leases
    of those with a limit (looked up again when one is dropped) and the model's price."""

    __slots__ = ("principal", "model", "end_user_id", "customer", "limited", "soft_only",
                 "using", "price", "per_token")

    def __init__(self, principal: Principal, model: str | None, end_user_id: str | None,
                 customer: Any, budgets: Sequence[Budget], leases: Any, price: Price) -> None:
        self.principal = principal
        self.model = model
        self.end_user_id = end_user_id
        self.customer = customer
        #: Those with a limit (admitted from leases), in lock order.
        self.limited = tuple(b for b in budgets if b.max_budget is not None)
        #: Those with a soft budget only (read, not reserved).
        self.soft_only = tuple(b for b in budgets if b.max_budget is None)
        self.price = price
        #: The price in whole money units per token, when it is one (most are: a price
        #: with at most 9 decimals): the worst case is then exact without rounding.
        self.per_token = ((price.input // FEMTO_PER_UNIT, price.output // FEMTO_PER_UNIT)
                          if not price.input % FEMTO_PER_UNIT
                          and not price.output % FEMTO_PER_UNIT else None)
        #: The leases of ``limited`` and their ``(lease, budget)`` pairs, replaced together
        #: (one attribute: a request reads one consistent pair); ``None``: no budget applies.
        self.using: tuple[tuple[Lease, ...], tuple[tuple[Lease, Budget], ...]] | None = None
        if budgets:
            self.use(tuple(leases.lease(b) for b in self.limited))

    def use(self, leases: tuple[Lease, ...]) -> None:
        self.using = (leases, tuple(zip(leases, self.limited, strict=True)))


_new_ticket = object.__new__

_NAMES = {"key": "Key", "user": "User", "team": "Team", "team_member": "Team member",
          "end_user": "End User", "key_model": "Key model", "global": "Proxy",
          "principal": "Caller"}


class Budgets:
    """The budget guard (after rate limits, before spend)."""

    name = "budgets"
    #: Budgets add no response headers (refusals carry theirs on the error).
    adds_headers = False

    def __init__(self, state: Any, app: Flask) -> None:
        self.state = state
        self.settings: Settings = state.settings
        self.ledger = Ledger(state.store, self.settings)
        from .budget_leases import Leases

        self.leases = Leases(self.ledger, self.settings)
        self.app = app
        self._model_names = state.models.names_for
        #: ``(id(principal), model, end user, id(customer))`` -> plan.
        self._plans: dict[tuple[Any, ...], _BudgetPlan] = {}
        #: ``id(principal)`` -> its plan used last (a cheaper look-up than the tuple's).
        self._latest: dict[int, _BudgetPlan] = {}
        self.default_max_tokens = int(self.settings.default_max_tokens or 0)
        #: Prompt tokens an image, audio clip, video or file counts in a worst case.
        self.media = self.settings.prompt_media_tokens
        #: Every LLM request must be seen: there is a global budget.
        self.always = self.settings.max_budget is not None
        #: Set when the spend ledger takes over settlement (``ledger.on_batch``): the
        #: ledger and the spend guard, whose events write the spend of the requests it sees.
        self.spend_ledger: Any = None
        self.spend_guard: Any = None

    # -- Guard protocol ------------------------------------------------------------------------

    def wants(self, principal: Principal, route: RouteInfo, unsafe: bool) -> bool:
        if not unsafe or not route.is_llm or principal.is_master_key:
            return False
        return self.always or has_budget(principal)

    def wants_end_user(self, principal: Principal, route: RouteInfo, customer: Any,
                       unsafe: bool) -> bool:
        """A request naming an end user that has a budget (its own, or the default)."""
        if not unsafe or not route.is_llm or principal.is_master_key:
            return False
        if self.settings.max_end_user_budget is not None:
            return True
        return customer is not None and (
            _units(getattr(customer, "max_budget", None)) is not None
            or _units(getattr(customer, "soft_budget", None)) is not None)

    def settles(self, principal: Principal, route: RouteInfo, unsafe: bool,
                wanted: tuple[Any, ...]) -> bool:
        """Whether :meth:`settle` runs after the view (see :mod:`~flask_llmauth.guards`): not
        when the spend guard settles the request too. Its event carries the ticket and the
        ledger's batch tells the leases when the spend is written; the spend guard marks the
        ticket finished (``ticket.finished``), the one thing left to do here. A request
        refused by a later guard is still settled here (its reservation released)."""
        return self.spend_guard is None or self.spend_guard not in wanted

    def admit(self, admission: Admission) -> None:
        principal = admission.principal
        plan = self._latest.get(id(principal))  # the principal's last plan, else by model...
        if (plan is None or plan.principal is not principal or plan.model != admission.model
                or plan.end_user_id != admission.end_user_id
                or plan.customer is not admission.customer):
            plan = self._plan(admission)
        using = plan.using
        if using is None:  # no budget applies
            return
        leases, pairs = using
        # worst_case_units(model, body, settings), with the plan's price and the
        # admission's token estimate (which the rate-limit guard may read too):
        # admission.sizes(self.media), inline
        sizes = admission._sizes
        if sizes is None:
            sizes = admission._sizes = body_sizes(admission.body, self.media)
        prompt, asked = sizes
        if asked < 0:
            refuse_unreadable_cap(admission.body)
        per_token = plan.per_token
        if per_token is not None:  # whole units per token: small integers, no rounding
            need = prompt * per_token[0] + (asked or self.default_max_tokens) * per_token[1]
        else:
            price = plan.price
            need = -(-(prompt * price[0] + (asked or self.default_max_tokens) * price[1])
                     // FEMTO_PER_UNIT)
        now = admission.started
        request_id = admission.request_id
        ticket = _new_ticket(Ticket)  # Ticket(request_id, leases, need, now), inline
        ticket.request_id = request_id
        ticket.leases = leases
        ticket.need = need
        ticket.admitted = now
        ticket.finished = None
        ticket.soft_rows = ()
        taken = 0
        for lease, budget in pairs:  # in lock order: in memory from the plan's leases
            if lease.dead:  # read before the lock: a forked child never takes it
                break
            lock = lease.lock
            lock.acquire()  # not ``with``: the statement costs twice the two calls
            try:
                if lease.dead or not lease._take(ticket, budget, now):
                    break
            finally:
                lock.release()
            taken += 1
        else:
            if not plan.soft_only:
                admission.scratch[SCRATCH] = ticket
                return
        self._admit_rest(admission, plan, ticket, taken)

    def _admit_rest(self, admission: Admission, plan: _BudgetPlan, ticket: Ticket,
                    taken: int) -> None:
        """Admit the ticket from its plan's leases after the first ``taken`` (a lease
        transaction, or a lease looked up again) and its soft-only budgets."""
        leases = list(ticket.leases[:taken])  # the plan's, when the ticket was made
        crossed: list[tuple[Budget, int]] = []
        admit = self.leases.admit
        try:
            for budget in plan.limited[taken:]:  # in lock order; the soft-only rows after them
                lease, seen = admit(ticket, budget)
                leases.append(lease)
                if seen:
                    crossed += seen
            if plan.soft_only:
                ticket.soft_rows, seen = self.ledger.touch_soft(list(plan.soft_only))
                crossed += seen
        except BaseException as exc:
            for lease in leases:
                lease.release(ticket)
            # the crossings seen are marked in their rows (once per window): signal them
            # now, or they are never signalled in this window
            if isinstance(exc, _Refusal):
                self._crossed(admission, crossed + exc.crossed)
                self._refuse(admission, exc)
            else:
                self._crossed(admission, crossed)
            raise
        if leases != list(ticket.leases):  # a lease was replaced: the plan uses the new one
            plan.use(tuple(leases))
        ticket.leases = tuple(leases)
        admission.scratch[SCRATCH] = ticket
        self._crossed(admission, crossed)

    def _crossed(self, admission: Admission, crossed: list[tuple[Budget, int]]) -> None:
        """Send ``soft_budget_crossed`` for the soft budgets a transaction marked crossed."""
        if crossed and soft_budget_crossed.receivers:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
            for budget, spend in crossed:
                send_signal(soft_budget_crossed, app, principal=admission.principal,
                            level=budget.level, entity_id=budget.label, spend=to_usd(spend),
                            soft_budget=to_usd(budget.soft_budget))

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None:
        scratch = admission.scratch
        ticket: Ticket | None = scratch.get(SCRATCH)
        if ticket is None:
            return
        if "_refused" in scratch:  # never reached the view: nothing was spent (only set True)
            ticket.release()
            return
        spend_guard = self.spend_guard
        if spend_guard is not None and spend_guard in admission.guards:
            # the spend ledger writes the spend; the leases learn it from its batch (the
            # spend guard stamps the ticket when it settles: see ``settles``)
            ticket.finished = QUEUED
            return
        cost = 0
        if usage is None and not failed:  # an answer without usage: its prompt estimate,
            prompt = admission.sizes(self.media)[0]  # as the ledger's
            usage = Usage(prompt, 0, admission.model, True)
        if usage is not None:
            model, principal = admission.model, admission.principal
            price = settled_price(prices_for(self.settings), model, usage.model,
                                  lambda name: self._model_names(principal, name))
            cost = -(-(usage.prompt_tokens * price.input
                       + usage.completion_tokens * price.output) // FEMTO_PER_UNIT)
        if not cost:
            ticket.release()
            return
        written = False
        try:
            self.ledger.add_spend(ticket.rows(False) + ticket.rows(True), cost)
            written = True
        finally:
            if written:
                for lease in ticket.leases:
                    lease.written_now(ticket)
            else:  # in use until the reservation TTL
                ticket.finished = time.monotonic()

    def headers(self, admission: Admission) -> Mapping[str, str]:
        return {}

    # -- spend ledger --------------------------------------------------------------------------

    def on_batch(self, events: Sequence[Any], db: Any) -> None:
        """``SpendLedger.on_batch`` callback, in the ledger's transaction: add the batch's
        costs to the counter budgets (the ledger adds them to the entity rows) and tell
        each lease which of its requests' spend is being written."""
        p = self.ledger.p
        spends: dict[tuple[str, int], int] = {}
        orders: dict[tuple[str, int], tuple[Any, ...]] = {}
        for event in events:
            ticket = getattr(event, "reservations", None)
            if not isinstance(ticket, Ticket):
                continue
            for lease in ticket.leases:
                lease.written.append(ticket.request_id)  # no lock here: see Lease.written
            cost = int(getattr(event, "spend", 0) or 0)
            if cost:
                for table, row_id, order in ticket.rows(True):
                    spends[(table, row_id)] = spends.get((table, row_id), 0) + cost
                    orders[(table, row_id)] = order
        for where in sorted(spends, key=lambda w: orders[w]):
            db.execute_sql(f'UPDATE "{where[0]}" SET "spend" = "spend" + {p} '  # noqa: S608
                           f'WHERE "id" = {p}', [spends[where], where[1]])

    # -- internals -----------------------------------------------------------------------------

    def _plan(self, admission: Admission) -> _BudgetPlan:
        """The budgets of this request, kept per principal object, model and end user (a
        cached key's principal is reused until it changes); ``admit`` looks at the
        principal's last plan first."""
        principal, customer = admission.principal, admission.customer
        cache_key = (id(principal), admission.model, admission.end_user_id, id(customer))
        plan = self._plans.get(cache_key)
        if plan is None or plan.principal is not principal or plan.customer is not customer:
            plan = self._new_plan(admission)
            if len(self._plans) >= 10_000:
                self._plans.clear()
            self._plans[cache_key] = plan
        if len(self._latest) >= 10_000:
            self._latest.clear()
        self._latest[id(principal)] = plan
        return plan

    def _new_plan(self, admission: Admission) -> _BudgetPlan:
        principal, customer = admission.principal, admission.customer
        names: Sequence[str] = ()
        resolved: Sequence[str] = ()
        if admission.model:
            resolved = self._model_names(principal, admission.model) or (admission.model,)
            if principal.key is not None and principal.key.model_max_budget:
                names = resolved
        budgets = resolve(principal, names, admission.end_user_id, customer, self.settings)
        return _BudgetPlan(principal, admission.model, admission.end_user_id, customer,
                           budgets, self.leases,
                           reserved_price(prices_for(self.settings), admission.model, resolved))

    def _refuse(self, admission: Admission, refusal: _Refusal) -> None:
        budget = refusal.budget
        now = datetime.now(timezone.utc).replace(tzinfo=None)
        spend, reserved, limit = refusal.spend, refusal.reserved, refusal.max_budget
        name = _NAMES.get(budget.level, budget.level)
        headers: dict[str, str] = {}
        resets = refusal.reset_at is not None and budget.duration is not None
        when = ""
        if resets:
            seconds = max(1, math.ceil((refusal.reset_at - now).total_seconds()))  # type: ignore[operator]
            stamp = refusal.reset_at.strftime("%Y-%m-%d %H:%M:%S")  # type: ignore[union-attr]
            when = f" Budget resets at: {stamp} UTC ({budget.duration} window)."
        if spend >= limit or spend + refusal.need > limit:
            if spend >= limit:
                message = (f"Budget has been exceeded! {name}={budget.label} Current cost: "
                           f"{_fmt(spend)}, Max budget: {_fmt(limit)}.")
            else:
                message = (f"Budget too small for this request: {name}={budget.label} "
                           f"Current cost: {_fmt(spend)}, Max budget: {_fmt(limit)}, this "
                           f"request may cost up to {_fmt(refusal.need)}. Lower max_tokens "
                           "or raise the budget.")
            if resets and refusal.need <= limit:
                headers["Retry-After"] = str(seconds)
                message += when
            else:
                headers["x-should-retry"] = "false"
                if spend >= limit and resets:
                    message += (f"{when} This request may cost up to {_fmt(refusal.need)}, "
                                "more than the whole budget: lower max_tokens or ask an "
                                "admin to raise it.")
                elif spend >= limit:
                    message += " This budget does not reset; ask an admin to raise it."
        else:
            # The reservations may all be another worker's: nothing need be in flight here.
            message = (f"Budget has been exceeded! {name}={budget.label}: what is left is held "
                       "by reservations of requests in flight or just finished (in this or "
                       "another worker process) and by other worker processes' budget "
                       f"leases. Current cost: {_fmt(spend)}, reserved: {_fmt(reserved)}, "
                       f"Max budget: {_fmt(limit)}. Retry shortly.")
            headers["Retry-After"] = "1"
        if budget_exceeded.receivers:
            send_signal(budget_exceeded, current_app._get_current_object(),  # type: ignore[attr-defined]
                        principal=admission.principal, level=budget.level,
                        entity_id=budget.label, spend=to_usd(spend), max_budget=to_usd(limit))
        raise BudgetExceeded(message, headers=headers, reason=f"budget_exceeded_{budget.level}")


def install(state: Any, app: Flask) -> None:
    """Add the budget guard and its background work (called by ``init_app``)."""
    settings: Settings = state.settings
    state.budgets = None
    if not settings.budgets_enabled:
        return
    guard = Budgets(state, app)
    state.budgets = guard
    state.guards.add(guard)
    ledger = guard.ledger

    # While this process's expiry sweep cannot reach the database (an outage: no process
    # can refresh its lease rows meanwhile), when it last could; when it last swept.
    lost: list[datetime | None] = [None]
    swept: list[datetime | None] = [None]

    def sweep_expired() -> None:
        """Release expired reservations but this process's live leases (they are refreshed
        by its lease sweep; they expire while it lives only when it cannot reach the
        database, and its queued spend is still held by them). The first sweep after the
        database could not be reached releases only what had expired before: the rows that
        expired during the outage belong to processes that could not refresh them either;
        they refresh them within ``LLMAUTH_BUDGET_LEASE_IDLE`` of its return, and a
        crashed one's are released at the next sweep."""
        now = utcnow()
        cutoff = now if lost[0] is None else min(now, lost[0])
        try:
            ledger.sweep(cutoff, keep=guard.leases.live_ids())
        except Exception:
            if lost[0] is None:
                lost[0] = swept[0] or now
            raise
        lost[0], swept[0] = None, now

    def sweep() -> None:
        if ledger.reserved_once:
            sweep_expired()

    def reset() -> None:
        ledger.reset_due()
        sweep_expired()
        ledger.sweep_counters()

    def leases() -> None:
        final = not state.background.started  # the last pass (shutdown)
        if final and guard.spend_ledger is not None and guard.leases.has_leases:
            guard.spend_ledger.flush()  # so what finished is taken out of the leases
        guard.leases.sweep(final=final)

    state.background.every(min(60.0, max(1.0, settings.budget_reservation_ttl / 4)),
                           "budget-reservations", sweep)
    state.background.every(settings.budget_lease_idle, "budget-leases", leases)
    if settings.budget_reset_interval:
        state.background.every(settings.budget_reset_interval, "budget-reset", reset,
                               at_stop=False)


# -- /key/{key}/reset_spend ----------------------------------------------------------------------


def reset_key_spend(state: Any, actor: Principal, identifier: str, reset_to: int
                    ) -> dict[str, Any]:
    """Set a key's spend back to ``reset_to`` (0 ≤ reset_to ≤ spend, and ≤ its budget), with
    its per-model budget windows; proxy admins only; audited."""
    from .audit import write_audit
    from .durations import isoformat
    from .errors import BadRequest, Forbidden
    from .keys import KeyService

    if not actor.is_admin:
        raise Forbidden("Only a proxy admin can reset a key's spend.",
                        reason="reset_spend_denied")
    with state.store.use() as db, db.atomic():
        key = KeyService(state)._get(identifier)
        key = Key.select().where(Key.id == key.id).for_update().get() if not isinstance(
            db, peewee.SqliteDatabase) else key
        previous = key.spend
        if reset_to > previous:
            raise BadRequest(f"reset_to ({_fmt(reset_to)}) must not exceed the key's current "
                             f"spend ({_fmt(previous)}).", param="reset_to")
        if key.max_budget is not None and reset_to > key.max_budget:
            raise BadRequest(f"reset_to ({_fmt(reset_to)}) must not exceed the key's "
                             f"max_budget ({_fmt(key.max_budget)}).", param="reset_to")
        Key.update(spend=reset_to, soft_alerted=False).where(Key.id == key.id).execute()
        BudgetCounter.update(spend=0, soft_alerted=False).where(
            (BudgetCounter.scope == "key_model") & (BudgetCounter.entity_id == key.key_id)
        ).execute()
        write_audit(state.settings.store_audit_logs, actor, "reset_spend", "key", key.key_id,
                    before={"spend": to_usd(previous)}, after={"spend": to_usd(reset_to)})
    state.invalidate(f"key:{key.key_id}")
    return {"key_hash": key.key_id, "spend": to_usd(reset_to),
            "previous_spend": to_usd(previous), "max_budget": to_usd(key.max_budget),
            "budget_reset_at": isoformat(key.budget_reset_at)}


# The leases use the statements above (a circular import, resolved here at the end).
from .budget_leases import QUEUED, Lease, Ticket  # noqa: E402
