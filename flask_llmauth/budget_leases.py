"""Per-process budget leases: budget admission without a database round trip per request.

A process reserves a chunk of a budget in the database (a **lease**) with the same
conditional update as a request's reservation, so ``spend + reserved <= max_budget`` still
holds for the row across processes. It then admits requests against its lease in memory (a
lock, no I/O) and goes back to the database only when a request does not fit. The lease's
amount lives in the budget row's ``reserved`` and in one ``llmauth_budget_reservation`` row
per process and budget (``request_id = "lease:..."``), changed together in one transaction,
so a crashed process's lease expires like a request's reservation.

Per lease, the process knows exactly what its row holds (``held``: only its own lease
transactions change it) and what of it is in use (``in_use``): the worst cases of the
requests in flight and of the finished requests whose spend is not yet known to be in the
database. A finished request's worst case stays in use until its spend-log row is seen
committed (the spend ledger writes the spend in the same transaction); the next lease
transaction of the process then takes it out of the lease (``reserved -= worst``). Until
then the request counts twice (spend and lease) — never less than once. A request whose
cost is known when it ends holds that cost instead: above its worst case always, below it
when its lease is out of room (:meth:`Ticket.costs`).

A lease grows by whole worst cases of the request at hand: at most
``LLMAUTH_BUDGET_LEASE_REQUESTS`` of them and at most ``LLMAUTH_BUDGET_LEASE_FRACTION`` of
the room left. Near the limit (room under ``worst / fraction``) a lease holds only what its
requests need: the per-request reservation, exact. Unused lease is given back when the lease
is idle for ``LLMAUTH_BUDGET_LEASE_IDLE`` seconds, at shutdown, and when a request is refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from .budgets import (
    Budget,
    Ledger,
    _Refusal,
    atomic_with_retries,
    next_reset,
)
from .durations import utcnow
from .store.tables import BudgetReservation, SpendLog

log = logging.getLogger("flask_llmauth")

_RESERVATIONS = BudgetReservation._meta.table_name
_SPEND_LOG = SpendLog._meta.table_name
#: Request ids checked against the spend log per statement.
_CHUNK = 400
_INF = math.inf
_NONE: list[Any] = []  # no soft budget crossed (never appended to)
#: ``Ticket.finished`` of a request whose spend event the spend ledger holds: it never
#: expires from a lease (the ledger stamps the time when it drops the event instead).
QUEUED = math.inf


def _epoch(value: datetime | None) -> float:
    if value is None:
        return _INF
    return value.replace(tzinfo=timezone.utc).timestamp()


class Lease:
    """This process's lease of one budget row (all fields guarded by ``lock``)."""

    __slots__ = ("ident", "lease_id", "lock", "held", "in_use", "in_flight", "max_budget",
                 "duration", "window_end", "unit", "last_used", "row", "counter", "order",
                 "dead", "refresh_at", "written", "done_sum")

    def __init__(self, ident: tuple[Any, ...], lease_id: str, budget: Budget) -> None:
        self.ident = ident
        self.lease_id = lease_id
        self.lock = threading.Lock()
        #: What this lease's reservation row holds (and adds to the row's ``reserved``).
        self.held = 0
        #: Worst cases of ``in_flight``, and of the requests whose spend is known to be
        #: written (``done_sum``) until a lease transaction takes them out.
        self.in_use = 0
        #: request id -> ticket of the requests admitted (worst case > 0) whose spend is not
        #: known to be written: in flight, or finished (``ticket.finished``) and not written
        #: yet; in the order they were admitted.
        self.in_flight: dict[str, Ticket] = {}
        #: Worst cases of the requests whose spend is known to be written (out of
        #: ``in_flight``), still in ``in_use``: the next lease transaction takes them out.
        self.done_sum = 0
        #: The limit, window and window end the last lease transaction saw (``-1``: none).
        self.max_budget: int | None = -1
        self.duration: str | None = None
        self.window_end = _INF
        #: The last non-zero worst case admitted (sizes a free request's extension).
        self.unit = 0
        self.last_used = time.time()
        #: ``(table, id)`` of the budget row once a lease transaction found it.
        self.row: tuple[str, int] | None = None
        self.counter = budget.counter is not None
        self.order = budget.order
        #: Dropped from the process's table (or inherited by a forked child): look the
        #: lease up again. Read without the lock first, so a child never takes the lock of
        #: a lease it inherited; set under the lock (or in a fresh child).
        self.dead = False
        self.refresh_at = 0.0
        #: Request ids the spend ledger wrote in a batch, maybe not committed yet (appended
        #: by the ledger's thread without the lock: a deque's append/popleft are atomic).
        self.written: deque[str] = deque()

    def _take(self, ticket: Ticket, budget: Budget, now: float) -> bool:
        """Under ``lock``: admit the ticket's worst case from the lease in memory; ``False``:
        a lease transaction is needed (no room, a new window, another limit)."""
        if (now >= self.window_end or self.max_budget != budget.max_budget
                or self.duration != budget.duration):
            return False
        need = ticket.need
        free = self.held - self.in_use
        if free <= 0 or need > free:  # ``>=``: room must be left, even for a free request
            return False
        self.in_use += need
        if need:
            self.in_flight[ticket.request_id] = ticket
            self.unit = need
        self.last_used = now
        return True

    def release(self, ticket: Ticket) -> None:
        """The request spent nothing (refused later, or no spend is written): its worst case
        is free again at once."""
        with self.lock:
            found = self.in_flight.pop(ticket.request_id, None)
            if found is not None:
                self.in_use -= found.need

    def written_now(self, ticket: Ticket) -> None:
        """The request's spend is in the database (written without the spend ledger)."""
        with self.lock:
            self.mark_done(ticket.request_id)

    def mark_done(self, request_id: str) -> None:
        """Under ``lock``: the request's spend is in the database; its worst case leaves the
        lease with the next lease transaction."""
        found = self.in_flight.pop(request_id, None)
        if found is not None:
            self.done_sum += found.need


class Ticket:
    """What one admitted request holds (``admission.scratch``; the spend event carries it).

    A request that ends sets ``finished`` (no lock, no lease touched): its worst case stays
    in its leases until its spend is known to be written, or ``LLMAUTH_BUDGET_RESERVATION_TTL``
    after ``finished`` when its spend is not going to be written. While the spend ledger
    holds its event (``QUEUED``: the database may be down for longer than the TTL) it stays
    whatever its age; the ledger stamps the time when it drops the event."""

    __slots__ = ("request_id", "leases", "need", "admitted", "finished", "soft_rows")

    def __init__(self, request_id: str, leases: tuple[Lease, ...], need: int,
                 admitted: float) -> None:
        self.request_id = request_id
        #: The leases the request was admitted from.
        self.leases = leases
        #: Its worst case, in money units (the same for every budget).
        self.need = need
        #: ``time.time()`` when it was admitted.
        self.admitted = admitted
        #: ``time.monotonic()`` when it ended and its spend is not going to be written by
        #: the spend ledger (written by the budget guard, or dropped by the ledger);
        #: ``QUEUED`` while the ledger holds its event; ``None``: in flight.
        self.finished: float | None = None
        #: Rows of the soft-only budgets ``(table, id, lock order, is_counter)``.
        self.soft_rows: Sequence[tuple[str, int, tuple[Any, ...], bool]] = ()

    def release(self) -> None:
        """Nothing was spent: free the worst case in every lease at once."""
        for lease in self.leases:
            lease.release(self)

    def costs(self, cost: int) -> None:
        """The request ended and will be charged ``cost``: its leases hold the cost instead
        of the worst case until its spend is written.

        Below the worst case, so a request right behind it is not refused for room the
        worst case took; only done when one of its leases is out of room (read without
        the locks: a stale read skips it, or does it where it was not needed; both are
        safe). Above it (an upstream that answered past the cap), always: counted at its
        worst case, the request left room it had spent to the next ones until it was
        written. The lease may then hold less than it uses (``in_use > held``): nothing
        more is admitted from it in memory, and its next lease transaction reserves the
        difference in the database. Done under every lease's lock at once, taken in one
        order (``id``: no other code holds a lease's lock while taking another's)."""
        need = self.need
        if not need or cost == need:  # a free request holds nothing in its leases
            return
        if cost < need:
            for lease in self.leases:
                if lease.held - lease.in_use < need:
                    break
            else:
                return
        leases = sorted(self.leases, key=id)
        for lease in leases:
            lease.lock.acquire()
        try:
            for lease in leases:
                if lease.in_flight.get(self.request_id) is self:
                    lease.in_use += cost - need
            self.need = cost  # what mark_done takes out of each lease once it is written
        finally:
            for lease in leases:
                lease.lock.release()

    def rows(self, counters: bool) -> list[tuple[str, int, tuple[Any, ...]]]:
        """The counter rows (``counters``) or entity rows the request's cost goes to."""
        out = [(lease.row[0], lease.row[1], lease.order) for lease in self.leases  # type: ignore[index]
               if lease.counter is counters]
        out += [row[:3] for row in self.soft_rows if row[3] is counters]
        return out


class Leases:
    """The leases of one app in one process."""

    def __init__(self, ledger: Ledger, settings: Any) -> None:
        self.ledger = ledger
        self.settings = settings
        self.requests = int(settings.budget_lease_requests)
        self.fraction = float(settings.budget_lease_fraction)
        self.idle = float(settings.budget_lease_idle)
        self.ttl = int(settings.budget_reservation_ttl)
        self._leases: dict[tuple[Any, ...], Lease] = {}
        self._lock = threading.Lock()
        self._reseed()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: None if (o := ref()) is None else o._reseed())

    def _reseed(self) -> None:
        """A new process: no lease of the parent is ours (the guard's plans may still point
        at them: they are marked dead, so they are looked up again, without their locks)."""
        for lease in self._leases.values():
            lease.dead = True
        self._token = uuid.uuid4().hex[:16]
        self._leases = {}
        self._lock = threading.Lock()

    @property
    def has_leases(self) -> bool:
        return bool(self._leases)

    def live_ids(self) -> set[str]:
        """The reservation rows of this process's leases (the expiry sweep keeps them)."""
        return {lease.lease_id for lease in list(self._leases.values()) if not lease.dead}

    # -- admission -----------------------------------------------------------------------------

    def lease(self, budget: Budget) -> Lease:
        ident = budget.ident
        found = self._leases.get(ident)
        if found is not None:
            return found
        with self._lock:
            found = self._leases.get(ident)
            if found is None:
                digest = hashlib.sha256(repr(ident).encode()).hexdigest()[:24]
                found = Lease(ident, f"lease:{self._token}:{digest}", budget)
                self._leases[ident] = found
            return found

    def admit(self, ticket: Ticket, budget: Budget) -> tuple[Lease, list[tuple[Budget, int]]]:
        """Admit the ticket's worst case against ``budget`` (in memory, else with a lease
        transaction). Returns the lease and the soft budgets seen crossed; raises
        :class:`_Refusal`. (The guard admits from the leases it knows first, inline.)"""
        while True:
            lease = self._leases.get(budget.ident) or self.lease(budget)
            with lease.lock:  # one acquisition: in memory, else the lease transaction
                if lease.dead:  # dropped from the table: look it up again
                    continue
                if lease._take(ticket, budget, ticket.admitted):
                    return lease, _NONE
                return lease, self._transact(lease, budget, ticket, give_back=False)

    # -- the lease transaction -----------------------------------------------------------------

    def _transact(self, lease: Lease, budget: Budget, ticket: Ticket | None, *,
                  give_back: bool) -> list[tuple[Budget, int]]:
        """Under ``lease.lock``: one transaction that takes the finished requests whose
        spend is written out of the lease, then admits the ticket's ``need`` (no ticket:
        none) with the lease grown by a chunk, or gives back the unused part (``give_back``,
        or when ``need`` does not fit: then raises :class:`_Refusal` after committing)."""
        need = None if ticket is None else ticket.need
        self._confirm(lease)
        trimmed = lease.done_sum
        in_use = lease.in_use - trimmed
        # use() outside the retries: it turns a database error into a 503, which must not
        # happen before a busy/locked database or a deadlock is retried
        with self.ledger.store.use() as db:
            held, row, refusal, crossed = atomic_with_retries(
                db, self._statements, db, lease, budget, need, in_use, give_back)
        lease.done_sum = 0
        lease.in_use = in_use
        lease.held = held
        lease.refresh_at = time.monotonic() + self.ttl / 2
        if row is not None:
            lease.row = row[0]
            if need is not None:  # the sweep's transaction knows no limit or window
                lease.max_budget, lease.window_end = row[1], row[2]
                lease.duration = budget.duration
        self.ledger.reserved_once = True
        if refusal is not None:
            refusal.crossed = crossed  # marked in the row: the caller signals them
            raise refusal
        if ticket is not None:
            need = ticket.need
            lease.in_use += need
            if need:
                lease.in_flight[ticket.request_id] = ticket
                lease.unit = need
            lease.last_used = time.time()
        return crossed

    def _statements(self, db: Any, lease: Lease, budget: Budget, need: int | None,
                    in_use: int, give_back: bool) -> tuple[Any, ...]:
        ledger, p = self.ledger, self.ledger.p
        now = utcnow()
        # 1. our reservation row first (lock order: reservation rows, then budget rows)
        got = db.execute_sql(
            f'UPDATE "{_RESERVATIONS}" SET "expires_at" = {p} '  # noqa: S608
            f'WHERE "request_id" = {p} RETURNING "parts"',
            [now + timedelta(seconds=self.ttl), lease.lease_id]).fetchone()
        had = got is not None
        held_db = 0
        if had:
            parts = BudgetReservation.parts.python_value(got[0]) or []
            held_db = int(parts[0][2]) if parts else 0
        elif lease.held:
            log.warning("llmauth: a budget lease of this process expired while it was alive "
                        "(stalled longer than LLMAUTH_BUDGET_RESERVATION_TTL / 2?); "
                        "reserving what is in use again")
        # 2. the budget row: reset its window if over, lock it, read it
        state = ledger._touch(db, budget, now)
        if state is None and budget.counter is not None:
            ledger._create_counter(db, budget, now)
            state = ledger._touch(db, budget, now)
        refusal: _Refusal | None = None
        crossed: list[tuple[Budget, int]] = []
        if state is None:  # the row is gone (deleted entity): nothing can be admitted
            new_held = 0
            limit = budget.max_budget or 0
            if need is not None:
                refusal = _Refusal(budget, 0, 0, limit, None, need)
            row = None
        else:
            row_id, spend, reserved, reset_at, alerted = state
            limit = budget.max_budget if budget.max_budget is not None else 0
            others = reserved - held_db  # what other processes' leases hold
            room = limit - spend - others - in_use
            if need is None:  # the sweep: keep the unused part unless giving it back
                keep = 0 if give_back or not had else max(0, lease.held - lease.in_use)
                new_held = in_use + keep
            elif room > 0 and need <= room:  # ``>=``: a used-up budget refuses even 0
                unit = need or lease.unit
                chunk = 0
                if unit > 0 and self.requests > 0:
                    chunk = min(self.requests, int(self.fraction * (room - need)) // unit) * unit
                new_held = in_use + need + chunk
            else:
                new_held = in_use  # refused: give back what is not in use
                if budget.duration and (reset_at is None or reset_at <= now):
                    reset_at = next_reset(budget.duration, reset_at, now)
                refusal = _Refusal(budget, spend, others + in_use, limit, reset_at, need)
            table = ledger._table(budget)
            delta = new_held - held_db
            if delta:
                where, args = ledger.row_where(row_id, budget.born)
                db.execute_sql(f'UPDATE "{table}" SET "reserved" = "reserved" + {p} '  # noqa: S608
                               f'WHERE {where}', [delta, *args])
            if (budget.soft_budget is not None and spend >= budget.soft_budget
                    and not alerted and ledger._mark_soft(db, table, row_id)):
                crossed.append((budget, spend))
            window_end = _epoch(reset_at) if budget.duration else _INF
            row = ((table, row_id), budget.max_budget, window_end)
        # 3. our reservation row follows the lease
        if new_held and row is not None:
            # the incarnation too: the expiry sweep releases it from this row only
            born = None if budget.born is None else budget.born.isoformat()
            parts = [[row[0][0], row[0][1], new_held, lease.counter, born]]
            if had:  # the statement by hand: Peewee's query builder costs more than it
                db.execute_sql(
                    f'UPDATE "{_RESERVATIONS}" SET "parts" = {p} '  # noqa: S608
                    f'WHERE "request_id" = {p}',
                    [BudgetReservation.parts.db_value(parts), lease.lease_id])
            else:
                BudgetReservation.insert(request_id=lease.lease_id, parts=parts,
                                         created_at=now,
                                         expires_at=now + timedelta(seconds=self.ttl)).execute()
        elif had:
            BudgetReservation.delete().where(
                BudgetReservation.request_id == lease.lease_id).execute()
        return new_held, row, refusal, crossed

    # -- spend written -------------------------------------------------------------------------

    def _confirm(self, lease: Lease) -> None:
        """Under ``lease.lock``: mark the requests whose spend-log row is committed (their
        spend is then in the budget rows). Only requests the spend ledger wrote in a batch
        are looked up."""
        ids: list[str] = []
        in_flight = lease.in_flight
        while lease.written:
            rid = lease.written.popleft()
            if rid in in_flight:  # else released, expired or marked already
                ids.append(rid)
        if not ids:
            return
        found: set[str] = set()
        p = self.ledger.p
        try:
            with self.ledger.store.use() as db:
                for start in range(0, len(ids), _CHUNK):
                    chunk = ids[start:start + _CHUNK]
                    marks = ", ".join([p] * len(chunk))
                    rows = db.execute_sql(
                        f'SELECT "request_id" FROM "{_SPEND_LOG}" '  # noqa: S608
                        f'WHERE "request_id" IN ({marks})', chunk).fetchall()
                    found.update(r[0] for r in rows)
        except BaseException:  # the database is down: look them up again next time
            lease.written.extend(ids)
            raise
        for rid in ids:
            if rid in found:
                lease.mark_done(rid)
            else:  # its batch is not committed yet (or rolled back and will be retried)
                lease.written.append(rid)

    def _expire(self, lease: Lease) -> None:
        """Under ``lease.lock``: a finished request whose spend was not written within the
        reservation TTL (the spend ledger dropped it) leaves the lease, as a crashed
        request's reservation does. Requests in flight stay, and so do those whose spend
        event the spend ledger still holds (``QUEUED``: it is written when the database
        answers again, however long after the TTL)."""
        limit = time.monotonic() - self.ttl
        admitted_by = time.time() - self.ttl
        expired = []
        for rid, ticket in lease.in_flight.items():  # in the order they were admitted
            if ticket.admitted > admitted_by:  # the rest cannot have finished before limit
                break  # (a wall clock set back only delays this: never too early)
            finished = ticket.finished
            if finished is not None and finished <= limit:
                expired.append(rid)
        for rid in expired:
            lease.mark_done(rid)

    # -- background ----------------------------------------------------------------------------

    def sweep(self, *, final: bool = False) -> int:
        """Take written spend out of the leases, give back idle leases' unused part (all of
        it when ``final``), keep the rows of live leases from expiring and drop empty idle
        leases. Returns how many lease transactions ran."""
        now = time.time()
        leases = list(self._leases.values())
        count = 0
        failure: BaseException | None = None
        for lease in leases:
            try:
                count += self._sweep_one(lease, now, final)
            except Exception as exc:  # the database is down: try the other leases, report
                failure = failure or exc
        if failure is not None:
            raise failure
        return count

    def _sweep_one(self, lease: Lease, now: float, final: bool) -> int:
        count = 0
        with lease.lock:
            if lease.dead:
                return 0
            self._confirm(lease)
            self._expire(lease)
            idle = final or now - lease.last_used >= self.idle
            trim = bool(lease.done_sum)
            give_back = idle and lease.held > lease.in_use
            # a finished request charged above its worst case (Ticket.costs): reserve it
            short = lease.in_use > lease.held
            refresh = lease.held > 0 and time.monotonic() >= lease.refresh_at
            if trim or give_back or short or refresh:
                budget = _sweep_budget(lease)
                if budget is not None:
                    self._transact(lease, budget, None, give_back=idle)
                    count = 1
            if idle and not lease.held and not lease.in_flight and not lease.in_use:
                lease.dead = True
                with self._lock:
                    if self._leases.get(lease.ident) is lease:
                        del self._leases[lease.ident]
        return count

    def close(self) -> None:
        """Give every lease's unused part back (shutdown)."""
        self.sweep(final=True)


def _sweep_budget(lease: Lease) -> Budget | None:
    """The budget of a sweep's lease transaction: it admits nothing and resets no window."""
    if lease.row is None or lease.max_budget == -1:
        return None
    if lease.counter:
        return Budget("sweep", "", None, lease.ident[1:], lease.max_budget, None, None)
    table, row_id, born = lease.ident
    return Budget("sweep", "", (table, row_id), None, lease.max_budget, None, None,
                  born=born)
