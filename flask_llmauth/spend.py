"""Spend: every LLM request's cost, written in batches to the spend log and the spend columns.

The spend guard wants every LLM-API request (POST and other unsafe methods). When a request
settles it prices the usage (:func:`flask_llmauth.prices.cost_units`), builds a
:class:`SpendEvent` and hands it to the app's :class:`SpendLedger` — a queue append, no
database round trip on the request path.

The ledger is flushed by the extension's background thread every
``LLMAUTH_SPEND_FLUSH_INTERVAL`` seconds, and once more when the process exits cleanly
(``atexit``) or the extension is closed. Each batch (at most ``LLMAUTH_SPEND_BATCH_SIZE``
events) is one transaction that

1. inserts the spend-log rows; a ``request_id`` already there is skipped (so a batch retried
   after a failed commit, or an event recorded twice, counts once);
2. for the rows it inserted, adds their cost to the ``spend`` of the key, user, team, team
   membership and customer (end user) rows, in that table order and sorted by id within a
   table (so concurrent transactions lock rows in one order);
3. runs every :meth:`SpendLedger.on_batch` callback with those new events.

A batch that fails on a database error goes back to the front of the queue and is retried
on the next flush. What a crash (``kill -9``, power loss) loses is the queue: events
settled since the last flush — at most about one flush interval of traffic. See
docs/spend.md.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, cast

import peewee
from flask import Flask

from .authz.routes import RouteInfo
from .budgets import QUEUED, Ticket
from .errors import ConfigurationError, ServiceUnavailable
from .guards import Admission
from .prices import FEMTO_PER_UNIT, Price, alias_price, cost_units, prices_for, settled_price
from .principal import Principal
from .store.db import Store
from .store.tables import Customer, Key, SpendLog, Team, TeamMembership, User
from .usage import MEDIA_TOKENS, Usage, estimate_prompt_tokens

log = logging.getLogger("flask_llmauth")

#: ``admission.scratch`` slot the budgets guard fills; copied into ``SpendEvent.reservations``.
RESERVATIONS = "budget_reservations"
BatchCallback = Callable[[list["SpendEvent"], peewee.Database], None]


class SpendEvent(NamedTuple):
    """One settled LLM request: who, which model, how many tokens, what it cost.

    A named tuple: built on every LLM request, so it must be cheap (a frozen dataclass
    costs several times more)."""

    request_id: str
    #: Unix time the request started / settled.
    started_at: float
    created_at: float
    key_id: str | None
    user_id: str | None
    team_id: str | None
    organization_id: str | None
    end_user_id: str | None
    model: str | None
    route: str
    auth_method: str
    prompt_tokens: int
    completion_tokens: int
    #: Cost in money units (nano-dollars, :mod:`flask_llmauth.money`).
    spend: int
    estimated: bool
    #: ``"success"`` or ``"failure"``.
    status: str
    #: What the budgets guard reserved for this request (opaque here).
    reservations: Any = ()
    #: The request body, while the prompt of an answer without ``usage`` is still to be
    #: estimated: the ledger estimates and prices it off the request path, before writing.
    #: Always ``None`` in the events callbacks see.
    prompt_body: Any = None

    def values(self) -> tuple[Any, ...]:
        """The spend-log row's values, in the order of ``_COLUMNS``."""
        (request_id, started_at, created_at, key_id, user_id, team_id, organization_id,
         end_user_id, model, route, auth_method, prompt_tokens, completion_tokens, spend,
         estimated, status) = self[:16]
        return (request_id, _EPOCH + timedelta(seconds=created_at),
                _EPOCH + timedelta(seconds=started_at),
                key_id[:255] if key_id else None, user_id[:255] if user_id else None,
                team_id[:255] if team_id else None,
                organization_id[:255] if organization_id else None,
                end_user_id[:255] if end_user_id else None, model[:255] if model else None,
                route[:255], auth_method[:32], prompt_tokens, completion_tokens, spend,
                estimated, status)


_COLUMNS = tuple(f'"{name}"' for name in (
    "request_id", "created_at", "started_at", "key_id", "user_id", "team_id",
    "organization_id", "end_user_id", "model", "route", "auth_method", "prompt_tokens",
    "completion_tokens", "spend", "estimated", "status"))
_COLUMN_LIST = ", ".join(_COLUMNS)
_PG_TYPES = ("varchar", "timestamp", "timestamp", "varchar", "varchar", "varchar", "varchar",
             "varchar", "varchar", "varchar", "varchar", "integer", "integer", "bigint",
             "boolean", "varchar")
_TABLE = f'"{SpendLog._meta.table_name}"'


#: Unix time 0 as a naive UTC datetime (the columns hold naive UTC).
_EPOCH = datetime(1970, 1, 1)
#: The most a token count column holds (32-bit on Postgres): larger counts are clipped.
MAX_TOKENS = 2**31 - 1
#: The most one event charges (the columns are 64-bit: half of it, so a row's sum still
#: fits): a larger cost is clipped instead of the database refusing the event.
MAX_SPEND = 2**62


# -- the ledger ---------------------------------------------------------------------------------


class AliasBody(NamedTuple):
    """A request body whose prompt the ledger estimates at ``price``: the request named an
    alias no price table knows (``SpendEvent.prompt_body``; a JSON body is never a
    tuple)."""

    body: Any
    price: Price


#: ``_spend_event((all 18 fields))``: a :class:`SpendEvent` built without the Python-level
#: ``__new__`` of a named tuple (one per LLM request).
_spend_event = partial(tuple.__new__, SpendEvent)


class SpendLedger:
    """Queue of spend events and their batched, idempotent writer."""

    def __init__(self, store: Store, *, batch_size: int = 500, queue_limit: int = 100_000,
                 price: Callable[[str | None, Usage], int] | None = None,
                 media: int = MEDIA_TOKENS) -> None:
        self.store = store
        #: Prompt tokens an image, audio clip, video or file counts in the estimate of an
        #: answer without usage (``LLMAUTH_PROMPT_MEDIA_TOKENS``, as the budgets reserve).
        self.media = media
        #: Prices the estimated usage of events queued with a ``prompt_body``.
        self.price = price
        self.batch_size = batch_size
        self.queue_limit = queue_limit
        #: Events to write, in order: :class:`SpendEvent` s, or their fields as a plain
        #: ``tuple`` (as the spend guard queues them: cheaper to make on the request path).
        self._queue: deque[tuple[Any, ...]] = deque()
        self._callbacks: list[BatchCallback] = []
        self._flush_lock = threading.Lock()
        self._dropped = 0
        self._dropped_reported = 0.0
        #: Events written (rows inserted) and duplicates skipped, by this process.
        self.written = 0
        self.duplicates = 0
        #: Events dropped because they could not be written (see :meth:`flush`).
        self.failed = 0
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: None if (o := ref()) is None else o._forked())

    def _forked(self) -> None:
        """A forked child: the flush lock may have been held by the parent's background
        thread (which the child does not have), and the queued events are the parent's to
        write (its ``on_batch`` callbacks hold their reservations). Start empty."""
        self._flush_lock = threading.Lock()
        self._queue = deque()
        self._dropped = 0
        self.written = self.duplicates = self.failed = 0

    def on_batch(self, fn: BatchCallback) -> BatchCallback:
        """Register ``fn(events, db)``, run in each batch's transaction with the events it
        inserted (never a duplicate). It may write; an exception rolls the batch back (it is
        retried). Lock rows after the ledger's: key, user, team, membership, customer."""
        if fn not in self._callbacks:
            self._callbacks.append(fn)
        return fn

    def record(self, event: SpendEvent) -> None:
        """Queue ``event`` (the request path: an append, no I/O)."""
        if len(self._queue) >= self.queue_limit:
            self._note_dropped(event)
            return
        self._queue.append(event)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def flush(self) -> int:
        """Write every queued event, one transaction per batch; return the rows inserted.

        When the database cannot answer (:class:`ServiceUnavailable`: an outage, a
        deadlock, a serialization failure) the batch and everything after it stay queued,
        in order, and the error is raised for the caller (the background thread) to report;
        the next flush retries. Any other error is not going to pass on a retry (a value
        the database refuses, a failing ``on_batch`` callback): the batch is then written
        event by event, and an event that fails alone is logged and dropped, so one bad
        event never holds up the others.
        """
        inserted = 0
        with self._flush_lock:
            while self._queue:
                batch = self._take()
                try:
                    inserted += self._write(batch)
                except ServiceUnavailable:
                    self._queue.extendleft(reversed(batch))
                    raise
                except Exception:
                    inserted += self._write_each(batch)
        return inserted

    def _write_each(self, batch: list[SpendEvent]) -> int:
        inserted = 0
        for index, event in enumerate(batch):
            try:
                inserted += self._write([event])
            except ServiceUnavailable:
                self._queue.extendleft(reversed(batch[index:]))
                raise
            except Exception as exc:
                self.failed += 1
                _drop(event)
                log.error("llmauth: spend of request %s (%d units, key_id=%s) cannot be "
                          "written and is dropped: %s", event.request_id, event.spend,
                          event.key_id, type(exc).__name__, exc_info=True)
        return inserted

    def _take(self) -> list[SpendEvent]:
        """The next batch, estimated and within the columns' ranges; never raises (an
        event taken off the queue is in the batch)."""
        batch: list[SpendEvent] = []
        queue = self._queue
        while queue and len(batch) < self.batch_size:
            queued = queue.popleft()
            # queued as its fields (by the spend guard), or as a SpendEvent (``record``)
            event = (_spend_event(queued) if type(queued) is tuple
                     else cast(SpendEvent, queued))
            if event.prompt_body is not None:
                event = self._estimate(event)
            batch.append(_fit(event))
        return batch

    def _estimate(self, event: SpendEvent) -> SpendEvent:
        body = event.prompt_body
        price: Price | None = None
        if type(body) is AliasBody:  # an alias no table knows: priced as it stands for
            body, price = body
        try:  # walks any JSON body without recursion; an event is never lost to it
            prompt = estimate_prompt_tokens(body, self.media)
        except Exception:
            log.exception("llmauth: the prompt of request %s cannot be estimated; it is "
                          "logged with none", event.request_id)
            prompt = 0
        try:
            if price is not None:
                cost = -(-prompt * price.input // FEMTO_PER_UNIT)
            else:
                cost = (0 if self.price is None
                        else self.price(event.model, Usage(prompt, 0, event.model)))
        except Exception:
            log.exception("llmauth: the estimated prompt of request %s (model %r) cannot be "
                          "priced; it is logged at no cost", event.request_id, event.model)
            cost = 0
        # event._replace(prompt_tokens=prompt, spend=cost, prompt_body=None), by position
        return _spend_event((*event[:11], prompt, event[12], cost, *event[14:17], None))

    def _write(self, batch: Sequence[SpendEvent]) -> int:
        unique: dict[str, SpendEvent] = {}
        for event in batch:
            unique.setdefault(event.request_id, event)
        events = list(unique.values())  # in settlement order
        with self.store.use() as db, db.atomic():
            new_ids = self._insert(db, events)
            fresh = [e for e in events if e.request_id in new_ids]
            if fresh:
                self._add_spend(db, fresh)
                for callback in self._callbacks:
                    callback(fresh, db)
        self.written += len(fresh)
        self.duplicates += len(batch) - len(fresh)
        return len(fresh)

    def _insert(self, db: peewee.Database, events: Sequence[SpendEvent]) -> set[str]:
        """Insert the rows; the request ids actually inserted (the others were there).

        The statements are built by hand: Peewee spends ~300 µs per row composing a
        multi-row INSERT. Postgres gets one column array per column (``unnest``), so the
        statement has 16 parameters whatever the batch size; SQLite gets multi-row
        ``VALUES`` within its limit of 999 parameters per statement."""
        rows = [event.values() for event in events]
        tail = ' ON CONFLICT ("request_id") DO NOTHING RETURNING "request_id"'
        if isinstance(db, peewee.PostgresqlDatabase):
            columns = [list(column) for column in zip(*rows, strict=True)]
            arrays = ", ".join(f"%s::{kind}[]" for kind in _PG_TYPES)
            # Identifiers and types are constants; every value is a bound parameter.
            sql = f"INSERT INTO {_TABLE} ({_COLUMN_LIST}) SELECT * FROM unnest({arrays})"  # noqa: S608
            return {row[0] for row in db.execute_sql(sql + tail, columns).fetchall()}
        inserted: set[str] = set()
        placeholders = "(" + ", ".join([db.param] * len(_COLUMNS)) + ")"
        per_statement = 999 // len(_COLUMNS)
        for start in range(0, len(rows), per_statement):
            chunk = rows[start:start + per_statement]
            # Identifiers are constants; every value is a bound parameter.
            sql = (f"INSERT INTO {_TABLE} ({_COLUMN_LIST}) VALUES "  # noqa: S608
                   + ", ".join([placeholders] * len(chunk)) + tail)
            params = [value for row in chunk for value in row]
            inserted.update(row[0] for row in db.execute_sql(sql, params).fetchall())
        return inserted

    @staticmethod
    def _add_spend(db: peewee.Database, events: Sequence[SpendEvent]) -> None:
        """``spend = spend + cost`` on every row the events name, in lock order. Rows with
        nothing to add are updated too (``+ 0``), so a callback that writes them later
        finds them already locked in this order."""
        sums: list[dict[Any, int]] = [{}, {}, {}, {}, {}]
        for e in events:
            for slot, ident in ((0, e.key_id), (1, e.user_id), (2, e.team_id),
                                (4, e.end_user_id)):
                if ident:
                    sums[slot][ident] = sums[slot].get(ident, 0) + e.spend
            if e.team_id and e.user_id:
                pair = (e.team_id, e.user_id)
                sums[3][pair] = sums[3].get(pair, 0) + e.spend
        p = db.param
        targets: list[tuple[type[peewee.Model], tuple[str, ...], dict[Any, int]]] = [
            (Key, ("key_id",), sums[0]), (User, ("user_id",), sums[1]),
            (Team, ("team_id",), sums[2]), (TeamMembership, ("team_id", "user_id"), sums[3]),
            (Customer, ("user_id",), sums[4])]
        for table, columns, amounts in targets:
            if not amounts:
                continue
            name = table._meta.table_name
            where = " AND ".join(f'"{c}" = {p}' for c in columns)
            # Identifiers are constants; the amount and ids are bound parameters.
            sql = f'UPDATE "{name}" SET "spend" = "spend" + {p} WHERE {where}'  # noqa: S608
            for ident in sorted(amounts):
                ids = ident if isinstance(ident, tuple) else (ident,)
                db.execute_sql(sql, (amounts[ident], *ids))

    def _note_dropped(self, event: SpendEvent) -> None:
        _drop(event)
        self._dropped += 1
        now = time.monotonic()
        if now - self._dropped_reported >= 60.0:
            self._dropped_reported = now
            log.error("llmauth: spend queue full (%d events; is the database down?): %d "
                      "spend event(s) dropped so far, the latest request %s cost %d units",
                      self.queue_limit, self._dropped, event.request_id, event.spend)


def _drop(event: SpendEvent) -> None:
    """The ledger drops ``event``: the budget leases that hold its worst case (``QUEUED``
    while the ledger held it) release it ``LLMAUTH_BUDGET_RESERVATION_TTL`` from now."""
    ticket = event.reservations
    if type(ticket) is Ticket and ticket.finished is QUEUED:
        ticket.finished = time.monotonic()


#: Characters no column can hold: NUL (Postgres text) and lone UTF-16 surrogates (no driver
#: encodes them; JSON's ``"\\ud800"`` escape brings one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _fit(event: SpendEvent) -> SpendEvent:
    """``event`` with what its columns cannot hold made to fit, so the database never
    refuses it (and the request goes uncharged): token counts and cost clipped, NUL
    characters and lone surrogates (a request's ``model`` may bring either) replaced by
    U+FFFD."""
    prompt, completion, spend = event[11:14]
    texts: tuple[str | None, ...] = event[3:11]  # key_id ... auth_method
    # the texts searched as one formatted string: ~0.5 µs per event, a loop ~2.5 µs
    joined = "%s%s%s%s%s%s%s%s" % texts  # noqa: UP031
    if (prompt <= MAX_TOKENS and completion <= MAX_TOKENS and spend <= MAX_SPEND
            and "\x00" not in joined
            and (joined.isascii() or _UNSTORABLE.search(joined) is None)):
        return event
    texts = tuple(_UNSTORABLE.sub("\ufffd", text) if text else text for text in texts)
    return _spend_event((*event[:3], *texts, min(prompt, MAX_TOKENS),
                         min(completion, MAX_TOKENS), min(spend, MAX_SPEND), *event[14:]))


# -- the guard ----------------------------------------------------------------------------------


class SpendGuard:
    """Prices each settled LLM request and queues its :class:`SpendEvent` (last guard)."""

    name = "spend"
    #: :meth:`headers` adds nothing (see :class:`~flask_llmauth.guards.Guards`).
    adds_headers = False
    #: :meth:`admit` does nothing: not called (see :class:`~flask_llmauth.guards.Guards`).
    admits = False

    def __init__(self, settings: Any, ledger: SpendLedger,
                 names_for: Callable[[Principal, str], Sequence[str]] | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.prices = prices_for(settings)
        #: The names a requested model stands for (aliases, ``model_list`` deployments).
        self.names_for = names_for or (lambda principal, model: (model,))
        #: Model name -> its price in whole money units per token, when the price table's
        #: memo knows the name and the price is one (most are): a cost is then exact
        #: without the femto-dollar products and their rounding.
        self._per_token: dict[str, tuple[int, int]] = {}

    def wants(self, principal: Principal, route: RouteInfo, unsafe: bool) -> bool:
        return unsafe and route.is_llm

    def admit(self, admission: Admission) -> None:
        return None

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None:
        model = admission.model
        body = None
        if usage is not None:
            prompt, completion, reported, estimated = usage
            # cost_units(model, usage, settings), with the memos of known names read first
            per_token = self._per_token.get(model) if model else None
            if per_token is not None:  # whole units per token: small integers, no rounding
                cost = prompt * per_token[0] + completion * per_token[1]
            else:
                price = self.prices.memo.get(model) if model else None
                if price is None:  # not known (yet): maybe an alias answered by an
                    principal = admission.principal  # unknown model
                    price = settled_price(self.prices, model, reported,
                                          partial(self.names_for, principal))
                elif (not price[0] % FEMTO_PER_UNIT and not price[1] % FEMTO_PER_UNIT
                        and len(self._per_token) < 4096):
                    self._per_token[model] = (price[0] // FEMTO_PER_UNIT,  # type: ignore[index]
                                              price[1] // FEMTO_PER_UNIT)
                cost = -(-(prompt * price[0] + completion * price[1]) // FEMTO_PER_UNIT)
            model = model or reported
        else:
            prompt = completion = cost = 0
            estimated = not failed  # an answer without usage: charged its prompt estimate,
            if estimated:  # which the ledger computes later, off the request path
                body = admission.body
                if model and self.prices.memo.get(model) is None:  # an alias no table
                    table = self.prices  # knows: its estimate is priced as it stands for
                    price = (alias_price(table, self.names_for(admission.principal, model))
                             if table.lookup(model) is None else None)
                    if price is not None:
                        body = AliasBody(body, price)
        principal = admission.principal
        reservations = admission.scratch.get(RESERVATIONS, ())
        if type(reservations) is Ticket:  # the budget guard's: it ends here (Budgets.settles)
            if cost or estimated:  # in its leases while the ledger holds the event (``_drop``)
                reservations.finished = QUEUED
                if usage is not None and cost != reservations.need:
                    reservations.costs(cost)  # held at its cost until it is written
            else:  # nothing spent: the worst case goes back at once, not when this is written
                reservations.release()
                reservations = ()
        # the fields of a SpendEvent, queued as a plain tuple: the ledger makes the event
        # when it takes it off the queue (off the request path)
        fields = (
            admission.request_id, admission.started, time.time(),
            principal.key_id, principal.user_id, principal.team_id, principal.org_id,
            admission.end_user_id or principal.end_user_id, model, admission.route.route,
            principal.method, prompt, completion, cost, estimated,
            "failure" if failed else "success", reservations, body,
        )
        ledger = self.ledger
        queue = ledger._queue
        if len(queue) < ledger.queue_limit:  # ledger.record(event), inline
            queue.append(fields)
        else:
            ledger.record(_spend_event(fields))

    def headers(self, admission: Admission) -> Mapping[str, str]:
        return {}


def install(state: Any, app: Flask) -> None:
    """Add the spend guard and its ledger (called by ``init_app``, after budgets)."""
    settings = state.settings
    state.spend_ledger = None
    try:
        prices_for(settings)  # a bad model_list price fails start-up, not a request
    except ValueError as exc:
        raise ConfigurationError(f"LLMAUTH_MODEL_LIST: {exc}") from None
    if not settings.spend_enabled:
        return
    ledger = SpendLedger(state.store, batch_size=settings.spend_batch_size,
                         queue_limit=settings.spend_queue_limit,
                         price=lambda model, usage: cost_units(model, usage, settings),
                         media=settings.prompt_media_tokens)
    state.spend_ledger = ledger
    guard = SpendGuard(settings, ledger, state.models.names_for)
    state.guards.add(guard)
    background = state.background

    def write() -> None:
        try:
            ledger.flush()
        except ServiceUnavailable:
            if background.stopping:  # the last pass: no flush comes after this one
                log.error("llmauth: the database did not answer the last spend flush: %d "
                          "spend event(s) are lost (%d units)", ledger.pending,
                          sum(e[13] for e in ledger._queue))  # spend
            raise

    background.every(settings.spend_flush_interval, "spend", write)
    budgets = getattr(state, "budgets", None)
    if budgets is not None and callable(getattr(budgets, "on_batch", None)):
        budgets.spend_ledger = ledger  # budgets release reservations in the batch
        budgets.spend_guard = guard
        ledger.on_batch(budgets.on_batch)


def flush(app: Flask) -> int:
    """Write the app's queued spend now (tests, scripts); the rows inserted."""
    ledger: SpendLedger | None = app.extensions["llmauth"].spend_ledger
    return 0 if ledger is None else ledger.flush()
