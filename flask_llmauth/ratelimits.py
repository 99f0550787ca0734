"""Rate limits: rpm, tpm and max_parallel_requests per key, user, team, team member, end user,
model per key and for the whole deployment, plus a per-IP limit on failed authentications.

Flask-Limiter is the engine: :func:`create_limiter` builds one ``Limiter`` per app (its
storage comes from ``LLMAUTH_RATELIMIT_STORAGE_URI`` or ``LLMAUTH_REDIS_URL``, strategy
``fixed-window``), and :class:`RateLimits` — a guard, see :mod:`flask_llmauth.guards` — drives
the limits strategy's storage directly, because the limits are per principal and read from
its records on every request.

Per request (LLM API routes with a body-carrying method; the master key is exempt):

1. **tpm pre-check**: refuse when a token window is already used up (or, with
   ``LLMAUTH_RATELIMIT_TPM_ESTIMATE``, cannot fit the prompt estimate + ``max_tokens``;
   an estimate above a tpm limit itself is refused without a storage call, not to retry).
2. **rpm**: one increment per descriptor; a count above the limit refuses the request.
3. **max_parallel_requests**: one slot per descriptor, named by the request id and leased
   on its own (``LLMAUTH_RATELIMIT_PARALLEL_LEASE``), released in ``settle``.

A refused request is not counted: every increment it made is undone. ``settle`` (exactly
once per admitted request, at the end of the stream for streams) charges the real token
count to every tpm window — fixed windows keep an overshoot, so the next request is refused
— and releases the parallel slots.

Each of the two steps is one storage call (:class:`Counters`): on Redis one Lua script
(steps 1-3 with their undo, atomic; then the settlement), on ``memory://`` one locked pass
over ``MemoryStorage``'s own tables; other storages (memcached, MongoDB, Redis Cluster) get
one call per counter (memcached decrements with its ``decr``: :class:`MemcachedCounters`).
The keys and values are limits' fixed-window ones, so limits' ``get_window_stats`` and
``limiter.reset()`` see the same windows.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from math import ceil
from time import time as _now
from typing import Any, NoReturn
from urllib.parse import quote

from flask import Flask, current_app, request
from flask_limiter import Limiter
from limits import RateLimitItem, RateLimitItemPerSecond, parse_many
from limits.errors import StorageError
from limits.storage import (
    MemcachedStorage,
    MemoryStorage,
    RedisClusterStorage,
    RedisStorage,
    Storage,
)
from limits.strategies import FixedWindowRateLimiter

from .authz.routes import RouteInfo
from .config import Settings
from .errors import ConfigurationError, ServiceUnavailable, TooManyRequests
from .guards import Admission, HeaderPairs
from .network import client_ip, parse_address
from .principal import Principal, get_principal
from .signals import rate_limited
from .signals import send as send_signal
from .usage import Usage, body_sizes, refuse_unreadable_cap

log = logging.getLogger("flask_llmauth")

#: The order descriptors are checked in: the narrowest first, so a caller over its own
#: limit is refused before it touches a shared (team, end user, global) counter.
KINDS = ("key", "model_per_key", "team_member", "user", "team", "end_user", "global")
#: Client options applied to Redis storages unless configured (no request ever hangs on a
#: black-holed Redis).
REDIS_DEFAULT_OPTIONS = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
_REDIS_SCHEMES = ("redis", "rediss", "redis+", "valkey", "valkeys", "valkey+")
_SCRATCH = "ratelimits"


def storage_uri(settings: Settings) -> str:
    """The limits storage URI: the explicit setting, else the Redis URL, else memory."""
    return settings.ratelimit_storage_uri or settings.redis_url or "memory://"


def storage_options(settings: Settings, uri: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    scheme = uri.partition("://")[0]
    if scheme in _REDIS_SCHEMES or scheme.startswith(("redis+", "valkey+")):
        options.update(REDIS_DEFAULT_OPTIONS)
    options.update(settings.ratelimit_storage_options)
    if scheme != "memory":  # storage errors surface as limits' StorageError (memory has none)
        options["wrap_exceptions"] = True
    return options


def _principal_key() -> str:
    """Flask-Limiter ``key_func`` for limits the host app declares with ``state.limiter``:
    the principal (key, user, team) when there is one, else the client IP."""
    principal = get_principal()
    if principal is not None:
        if principal.key_id:
            return f"key:{principal.key_id}"
        if principal.user_id:
            return f"user:{principal.user_id}"
        return f"{principal.method}:{principal.identity}"
    settings = current_app.extensions["llmauth"].settings
    return f"ip:{client_ip(request, settings.trusted_proxy_ranges)}"


def create_limiter(app: Flask, settings: Settings) -> Limiter:
    """The app's Flask-Limiter (fixed-window; no headers or limits of its own).

    The host app may declare its own limits with it (``app.extensions["llmauth"].limiter
    .limit("10/minute")``); their key is the principal, else the client IP. Flask-Limiter's
    own request hooks run only once the host has declared a limit.
    """
    uri = storage_uri(settings)
    mode = settings.ratelimit_storage_down
    limiter = Limiter(
        _principal_key,
        storage_uri=uri,
        storage_options=storage_options(settings, uri),
        strategy="fixed-window",
        headers_enabled=False,
        key_prefix=settings.ratelimit_key_prefix,
        swallow_errors=mode == "open",
        in_memory_fallback_enabled=mode == "memory",
    )
    limiter.init_app(app)
    if limiter.enabled:
        quiet_memory_storage(limiter.storage)
    app.register_error_handler(StorageError, _storage_error)
    return limiter


def _limits_declared(limiter: Limiter) -> bool:
    """Whether the host has declared any Flask-Limiter limit (default, application, meta,
    blueprint or decorated). Unknown internals (another Flask-Limiter version) count as yes."""
    try:
        manager = limiter.limit_manager
        return bool(manager._application_limits or manager._default_limits
                    or manager._blueprint_limits or manager._decorated_limits
                    or limiter._meta_limits)
    except AttributeError:
        return True


#: The ``LimitManager`` methods through which Flask-Limiter records a declared limit.
_DECLARING_METHODS = ("set_application_limits", "set_default_limits", "add_decorated_limit",
                      "add_blueprint_limit")


class HostLimitHooks:
    """Flask-Limiter's three request hooks, taken off the app; once the host has declared a
    limit, the extension's ``before_request`` runs the first and registers the second for
    the request (``after_this_request``). The third only resets per-request state that dies
    with the request context, so it is not needed.

    Without a declared limit they do nothing, yet they cost about as much as authenticating
    the request, and even an idle Flask hook costs a call. ``active`` (whether a limit is
    declared) is a plain attribute, recomputed whenever the limiter's limit manager records
    a limit, so a limit declared later applies at once and a request pays one attribute
    read. A limiter whose manager cannot be watched (another Flask-Limiter version) keeps
    its hooks active.
    """

    def __init__(self, limiter: Limiter, before: Any, after: Any, teardown: Any) -> None:
        self.limiter = limiter
        self.before = before
        self.after = after
        self.teardown = teardown
        self.active = True
        manager = getattr(limiter, "limit_manager", None)
        methods = [getattr(manager, name, None) for name in _DECLARING_METHODS]
        if manager is None or not all(callable(method) for method in methods):
            return
        for name, method in zip(_DECLARING_METHODS, methods, strict=True):
            setattr(manager, name, self._watching(method))
        self.active = _limits_declared(limiter)

    def _watching(self, method: Any) -> Any:
        def declare(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                self.active = _limits_declared(self.limiter)

        return declare

    @classmethod
    def take(cls, app: Flask, limiter: Limiter) -> HostLimitHooks | None:
        """Remove the limiter's hooks from ``app``; ``None`` (hooks left alone) unless all
        three are found."""

        def owned(hook: Any) -> bool:
            bound = getattr(hook, "__self__", None)
            args: tuple[Any, ...] = getattr(hook, "args", ())
            return bound is limiter or (bool(args) and args[0] is limiter)

        #: each hook with the registry (``{blueprint: [hooks]}``) that holds it
        found: list[tuple[dict[Any, list[Any]], Any]] = []
        for funcs in (app.before_request_funcs, app.after_request_funcs,
                      app.teardown_request_funcs):
            hooks = [h for h in funcs.get(None, []) if owned(h)]
            if len(hooks) != 1:
                return None
            found.append((funcs, hooks[0]))
        for funcs, hook in found:
            funcs[None].remove(hook)
            if not funcs[None]:
                # Flask looks the app's entry up per request and iterates it even when it is
                # empty (~1.4k instructions per registry); ``setdefault`` adds it back.
                del funcs[None]
        return cls(limiter, *(hook for _, hook in found))


def _storage_error(error: StorageError) -> Any:
    """A host-declared limit whose storage is down (``closed`` mode): 503, not 500."""
    state = current_app.extensions["llmauth"]
    log.error("llmauth: rate-limit storage error in %s: %s", request.endpoint,
              type(error.storage_error).__name__)
    retry = max(1, math.ceil(state.settings.ratelimit_retry_interval))
    return state.ext.error_response(ServiceUnavailable(
        "Rate limiting is temporarily unavailable; try again shortly.",
        headers={"Retry-After": str(retry)}, reason="ratelimit_storage_down"))


# -- worker processes and memory storage -------------------------------------------------------


def detect_worker_processes(settings: Settings) -> tuple[int, str] | None:
    """How many worker processes serve this app, and how we know (``None``: unknown).

    Order: ``LLMAUTH_WORKER_PROCESSES``; gunicorn's own configuration (found on the call
    stack while gunicorn loads the app, so ``-w``, ``GUNICORN_CMD_ARGS``, ``WEB_CONCURRENCY``
    and config files all count); uWSGI's ``numproc``.
    """
    if settings.worker_processes is not None:
        return settings.worker_processes, "LLMAUTH_WORKER_PROCESSES"
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        cfg = getattr(owner, "cfg", None)
        workers = getattr(cfg, "workers", None)
        if isinstance(workers, int) and type(cfg).__module__.startswith("gunicorn"):
            return workers, "gunicorn --workers"
        frame = frame.f_back  # type: ignore[assignment]
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None and isinstance(getattr(uwsgi, "numproc", None), int):
        return uwsgi.numproc, "uWSGI processes"
    return None


def check_storage_for_workers(settings: Settings, uri: str) -> None:
    """Warn loudly (or refuse, ``LLMAUTH_RATELIMIT_MULTIPROCESS_MEMORY=refuse``) when
    per-process ``memory://`` storage serves several worker processes: each process would
    admit the whole limit."""
    if not uri.startswith("memory://"):
        return
    detected = detect_worker_processes(settings)
    if detected is None or detected[0] <= 1:
        return
    workers, source = detected
    message = (
        f"LLMAUTH_RATELIMIT_STORAGE_URI: rate limits use memory:// storage but {workers} "
        f"worker processes serve this app ({source}); every process counts on its own, so "
        f"each limit admits up to {workers}x its value and the failed-authentication limit "
        "is per process. Set LLMAUTH_REDIS_URL (or LLMAUTH_RATELIMIT_STORAGE_URI) to a "
        "shared storage such as redis://host:6379/0."
    )
    if settings.ratelimit_multiprocess_memory == "refuse":
        raise ConfigurationError(message)
    log.warning("llmauth: WARNING: %s", message)


# -- descriptors ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One thing a request is counted against, with the limits that apply to it."""

    kind: str
    #: Printable, non-secret name for messages (``sk-...abcd``, a team id ...).
    label: str
    #: The storage identifier (quoted, bounded).
    ident: str
    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None


@dataclass(frozen=True, slots=True)
class RateLimitBreach:
    """What refused a request (sent with the ``rate_limited`` signal)."""

    descriptor: str
    value: str
    limit_type: str
    limit: int
    remaining: int
    reset_at: float | None


def limit_value(value: Any) -> int | None:
    """A stored rpm/tpm/parallel limit as the limiter applies it: a number of at least 1,
    its fraction dropped; anything else (0, a fraction below 1, a negative, ``None``, a
    string, a boolean, NaN) sets no limit at that level, so a lower-precedence level applies.
    The escalation checks (:mod:`flask_llmauth.keys`) read per-model limits with it too."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1:
        return None
    return int(value) if value < 2**53 else 2**53


def _ident(*parts: str) -> str:
    text = ":".join(quote(part, safe="") for part in parts)
    if len(text) > 200:
        import hashlib

        text = "sha256-" + hashlib.sha256(text.encode()).hexdigest()
    return text


def _model_tables(principal: Principal, field: str) -> list[Any]:
    """The tables of model name -> limit :func:`_model_limit` reads, in its order (an entry
    that is not a mapping is skipped there)."""
    key, team = principal.key, principal.team
    tables: list[Any] = []
    if key is not None:
        tables.append(getattr(key, field, None))
        tables.append((key.metadata or {}).get(field))
        budgets = key.model_max_budget or {}
        tables.append({m: b.get(field.replace("model_", "", 1)) for m, b in budgets.items()
                       if isinstance(b, Mapping)})
    if team is not None:
        tables.append(getattr(team, field, None))
    return tables


def _model_limit(principal: Principal, names: Sequence[str], field: str) -> tuple[str, int] | None:
    """A per-model limit: key field > key metadata > key ``model_max_budget`` > team field."""
    for table in _model_tables(principal, field):
        if not isinstance(table, Mapping):
            continue
        for name in names:
            limit = limit_value(table.get(name))
            if limit is not None:
                return name, limit
    return None


_LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "max_parallel_requests")


def _any_positive(values: Iterable[Any]) -> bool:
    for value in values:
        if value is not None and limit_value(value) is not None:
            return True
    return False


def has_limits(principal: Principal) -> bool:
    """Whether any limit can apply to this principal's requests (its own records only; end
    users and the global limit are decided elsewhere). Runs once per principal object (a
    cold key lookup makes one): plain loops, most fields are ``None``."""
    key, user, team, member = principal.key, principal.user, principal.team, principal.membership
    limits = principal.limits
    # The common case in one expression: no team, no membership, no limit field set at all.
    if (not limits and team is None and member is None
            and (user is None or (user.rpm_limit is None and user.tpm_limit is None
                                  and user.max_parallel_requests is None))
            and (key is None or (key.rpm_limit is None and key.tpm_limit is None
                                 and key.max_parallel_requests is None
                                 and not key.model_rpm_limit and not key.model_tpm_limit
                                 and not key.metadata and not key.model_max_budget))):
        return False
    if limits and _any_positive(limits.get(name) for name in _LIMIT_FIELDS):
        return True
    for record in (key, user, team):
        if record is not None and _any_positive(
                (getattr(record, "rpm_limit", None), getattr(record, "tpm_limit", None),
                 getattr(record, "max_parallel_requests", None))):
            return True
    if member is not None and _any_positive((member.rpm_limit, member.tpm_limit)):
        return True
    if team is not None and (_any_positive((team.team_member_rpm_limit,
                                            team.team_member_tpm_limit))
                             or team.model_rpm_limit or team.model_tpm_limit):
        return True
    if key is not None:
        metadata = key.metadata
        if (key.model_rpm_limit or key.model_tpm_limit or (metadata and (
                metadata.get("model_rpm_limit") or metadata.get("model_tpm_limit")))):
            return True
        if key.model_max_budget:
            for budget in key.model_max_budget.values():
                if isinstance(budget, Mapping) and _any_positive(
                        (budget.get("rpm_limit"), budget.get("tpm_limit"))):
                    return True
    return False


def descriptors(principal: Principal, model_names: Sequence[str], end_user_id: str | None,
                customer: Any, settings: Settings) -> list[Descriptor]:
    """Every descriptor of this request that has at least one limit, narrowest first."""
    out: list[Descriptor] = []
    key, user, team, member = principal.key, principal.user, principal.team, principal.membership
    asserted = principal.limits
    if key is None and asserted:  # limits a custom auth hook or proxy headers asserted
        rpm, tpm = limit_value(asserted.get("rpm_limit")), limit_value(asserted.get("tpm_limit"))
        parallel = limit_value(asserted.get("max_parallel_requests"))
        if rpm or tpm or parallel:
            out.append(Descriptor("key", principal.key_name or principal.identity,
                                  _ident(principal.method, principal.identity), rpm, tpm,
                                  parallel))
    if key is not None:
        rpm, tpm = limit_value(key.rpm_limit), limit_value(key.tpm_limit)
        parallel = limit_value(key.max_parallel_requests)
        if rpm or tpm or parallel:
            out.append(Descriptor("key", key.key_name, _ident(key.key_id), rpm, tpm, parallel))
        if model_names:
            rpm_model = _model_limit(principal, model_names, "model_rpm_limit")
            tpm_model = _model_limit(principal, model_names, "model_tpm_limit")
            for found, is_rpm in ((rpm_model, True), (tpm_model, False)):
                if found is not None:
                    name, limit = found
                    out.append(Descriptor(
                        "model_per_key", f"{key.key_name}:{name[:100]}",
                        _ident(key.key_id, name),
                        rpm=limit if is_rpm else None, tpm=None if is_rpm else limit))
    if team is not None and principal.user_id:
        rpm = limit_value(member.rpm_limit if member else None) or limit_value(
            team.team_member_rpm_limit)
        tpm = limit_value(member.tpm_limit if member else None) or limit_value(
            team.team_member_tpm_limit)
        if rpm or tpm:
            out.append(Descriptor("team_member", f"{team.team_id}:{principal.user_id}",
                                  _ident(team.team_id, principal.user_id), rpm, tpm))
    if user is not None:
        rpm, tpm = limit_value(user.rpm_limit), limit_value(user.tpm_limit)
        parallel = limit_value(user.max_parallel_requests)
        if rpm or tpm or parallel:
            out.append(Descriptor("user", user.user_id, _ident(user.user_id), rpm, tpm,
                                  parallel))
    if team is not None:
        rpm, tpm = limit_value(team.rpm_limit), limit_value(team.tpm_limit)
        parallel = limit_value(team.max_parallel_requests)
        if rpm or tpm or parallel:
            out.append(Descriptor("team", team.team_id, _ident(team.team_id), rpm, tpm,
                                  parallel))
    if end_user_id and customer is not None:
        rpm = limit_value(getattr(customer, "rpm_limit", None))
        tpm = limit_value(getattr(customer, "tpm_limit", None))
        parallel = limit_value(getattr(customer, "max_parallel_requests", None))
        if rpm or tpm or parallel:
            out.append(Descriptor("end_user", end_user_id[:100], _ident(end_user_id), rpm, tpm,
                                  parallel))
    if (settings.ratelimit_global_rpm or settings.ratelimit_global_tpm
            or settings.ratelimit_global_max_parallel_requests):
        out.append(Descriptor("global", "deployment", "all", settings.ratelimit_global_rpm,
                              settings.ratelimit_global_tpm,
                              settings.ratelimit_global_max_parallel_requests))
    return out


# -- storage access ------------------------------------------------------------------------------


class StorageDown(Exception):
    """The rate-limit storage did not answer."""


#: The ``x-ratelimit-*`` header names (OpenAI's) of each limit type.
_HEADER_NAMES = {kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}",
                        f"x-ratelimit-reset-{kind}") for kind in ("requests", "tokens")}


class _RateLimitHeaders(HeaderPairs):
    __slots__ = ()
    names = frozenset(name for names in _HEADER_NAMES.values() for name in names)


class _Limit:
    """One limit of a request's plan: its descriptor, the storage key and the value."""

    __slots__ = ("descriptor", "key", "limit", "text", "shown")

    def __init__(self, descriptor: Descriptor, key: str, limit: int) -> None:
        self.descriptor = descriptor
        self.key = key
        self.limit = limit
        self.text = str(limit)
        #: In the headers of admitted requests (never the deployment's global window).
        self.shown = descriptor.kind != "global"


class _Plan:
    """The limits of one request, in the order they are checked (narrowest descriptor
    first): tpm windows, rpm windows, parallel slots. Built once per principal, model and
    end user; ``prepared`` is what a storage-specific backend derives from it once."""

    __slots__ = ("tpm", "rpm", "parallel", "tpm_ceiling", "shown", "prepared", "charges")

    def __init__(self, tpm: tuple[_Limit, ...], rpm: tuple[_Limit, ...],
                 parallel: tuple[_Limit, ...]) -> None:
        self.tpm = tpm
        self.rpm = rpm
        self.parallel = parallel
        #: The smallest tpm limit: a request estimated above it fits no window, ever.
        self.tpm_ceiling = min((line.limit for line in tpm), default=sys.maxsize)
        #: For the headers of admitted requests, per kind (requests first, kinds without a
        #: window left out): the header names and the windows shown, each with the position
        #: of its count in ``Counters.acquire``'s values.
        self.shown = tuple(
            (names, shown) for names, shown in (
                (_HEADER_NAMES["requests"], tuple((2 * len(tpm) + 2 * i, line)
                                                  for i, line in enumerate(rpm) if line.shown)),
                (_HEADER_NAMES["tokens"], tuple((2 * i, line)
                                                for i, line in enumerate(tpm) if line.shown)))
            if shown)
        self.prepared: Any = None
        #: Whether the settlement of an admitted request has anything to do: charge a tpm
        #: window or release a parallel slot (an rpm-only plan's settlement changes nothing
        #: unless a later guard refused the request).
        self.charges = bool(tpm or parallel)


#: ``Counters.acquire`` outcomes: admitted, or refused by a tpm window, an rpm window or a
#: parallel-slot count (with the index of the refusing limit in its tuple of the plan).
ADMITTED, TPM_REFUSED, RPM_REFUSED, PARALLEL_REFUSED = 0, 1, 2, 3


class Counters:
    """Fixed-window counters on a limits storage (what ``FixedWindowRateLimiter`` does, but
    returning the count, so one storage call both decides and fills the headers).

    :meth:`acquire` and :meth:`settle` are a request's two steps. This base class makes one
    storage call per counter and works on every limits storage; :class:`MemoryCounters`
    and :class:`RedisCounters` do each step in one locked pass / one Lua script.
    """

    def __init__(self, strategy: FixedWindowRateLimiter, prefix: str) -> None:
        self.strategy = strategy
        self.storage: Storage = strategy.storage
        self.prefix = prefix
        self._items: dict[tuple[int, int], RateLimitItem] = {}
        self._resets: dict[str, float] = {}

    def item(self, amount: int, seconds: int) -> RateLimitItem:
        item = self._items.get((amount, seconds))
        if item is None:
            item = self._items[(amount, seconds)] = RateLimitItemPerSecond(
                amount, seconds, namespace="LLMAUTH")
        return item

    def key(self, item: RateLimitItem, *parts: str) -> str:
        return item.key_for(self.prefix, *parts)

    def window_key(self, seconds: int, *parts: str) -> str:
        """The storage key of a window of ``seconds`` for ``parts``, whatever the limit's
        value: a changed limit keeps the count of its current window (lowered below it:
        refused until the window resets; raised: what is left of the new value)."""
        return self.item(1, seconds).key_for(self.prefix, *parts)

    # -- one request's two steps ---------------------------------------------------------------

    def acquire(self, plan: _Plan, need: int, window: int, lease: int,
                member: str) -> tuple[int, int, list[float]]:
        """Check every tpm window (refused when fewer than ``need`` tokens are left), count
        the request in every rpm window, take every parallel slot (``member``: the request's
        id) — all of it or, when a limit refuses, none of it (every increment is undone).

        Returns ``(outcome, index, values)``: ``values`` holds ``used, reset_at`` of each tpm
        window checked, then ``count, reset_at`` of each rpm window counted (up to the
        refusing one).

        This generic version (memcached, MongoDB) counts a descriptor's slots in one counter
        whose lease starts when it goes from 0 to 1; the memory, Redis and Redis Cluster
        versions lease each slot on its own."""
        values: list[float] = []
        for i, line in enumerate(plan.tpm):
            used = self.get(line.key)
            values += (used, self.reset_at(line.key, window))
            if line.limit - used < need:
                return TPM_REFUSED, i, values
        counted: list[_Limit] = []
        taken: list[_Limit] = []
        try:
            for i, line in enumerate(plan.rpm):
                count = self.incr(line.key, window, 1)
                counted.append(line)
                values += (count, self.reset_at(line.key, window))
                if count > line.limit:
                    self._undo(counted, taken, window, lease, member)
                    return RPM_REFUSED, i, values
            for i, line in enumerate(plan.parallel):
                if not self._take_slot(line, lease, member):
                    self._undo(counted, taken, window, lease, member)
                    return PARALLEL_REFUSED, i, values
                taken.append(line)
        except StorageDown:
            try:
                self._undo(counted, taken, window, lease, member)
            except StorageDown:
                pass
            raise
        return ADMITTED, 0, values

    def settle(self, plan: _Plan, tokens: int, uncount: bool, window: int, lease: int,
               member: str) -> None:
        """Release the parallel slots; then undo the rpm counts (``uncount``: a later guard
        refused the request; a window that ended meanwhile is left alone) or charge
        ``tokens`` to every tpm window."""
        for line in plan.parallel:
            self._give_slot(line, lease, member)
        if uncount:
            for line in plan.rpm:
                self._release(line.key, window)
        elif tokens > 0:
            for line in plan.tpm:
                self.incr(line.key, window, tokens)

    def forget(self, plan: _Plan, window: int, lease: int, member: str) -> bool:
        """Remove ``member``'s parallel slots after a call that failed (its answer may have
        been lost after it ran); whether this version can. It cannot: it undoes its own
        increments when a call fails, and its counters do not tell whose slot is whose (a
        decrement made twice would free another request's slot)."""
        return False

    def _undo(self, counted: list[_Limit], taken: list[_Limit], window: int,
              lease: int, member: str) -> None:
        for line in counted:
            self.incr(line.key, window, -1)
        for line in taken:
            self._give_slot(line, lease, member)
        counted.clear()
        taken.clear()

    def _take_slot(self, line: _Limit, lease: int, member: str) -> bool:
        """Take one of ``line``'s parallel slots for ``member``; ``False`` (nothing taken)
        when all are in use. Here one counter per descriptor, whose lease starts when it
        goes from 0 to 1."""
        if self.incr(line.key, lease, 1) > line.limit:
            self._release(line.key, lease)
            return False
        return True

    def _give_slot(self, line: _Limit, lease: int, member: str) -> None:
        self._release(line.key, lease)

    def _release(self, key: str, seconds: int) -> None:
        """Decrement a counter, never below 0 (it may have expired meanwhile)."""
        left = self.incr(key, seconds, -1)
        if left < 0:
            self.incr(key, seconds, -left)

    # -- single counters -----------------------------------------------------------------------

    def incr(self, key: str, seconds: int, amount: int) -> int:
        try:
            count = self.storage.incr(key, seconds, amount=amount)
        except Exception as exc:
            raise StorageDown(exc) from exc
        if count == amount and amount > 0:  # this increment opened the window
            self._remember_reset(key, time.time() + seconds)
        return count

    def get(self, key: str) -> int:
        try:
            return self.storage.get(key)
        except Exception as exc:
            raise StorageDown(exc) from exc

    def reset_at(self, key: str, seconds: int) -> float:
        """When the window of ``key`` ends (cached: a fixed window's end never moves)."""
        now = time.time()
        reset = self._resets.get(key)
        if reset is not None and reset > now:
            return reset
        try:
            reset = self.storage.get_expiry(key)
        except Exception as exc:
            raise StorageDown(exc) from exc
        # limits' storages answer the time of the call for a key without a window (Redis:
        # TTL -2 counted as 0): read the clock after it, or that answer looks like a window
        # ending a moment from now
        now = time.time()
        if reset <= now:  # no window yet: it would start now
            return now + seconds
        self._remember_reset(key, reset)
        return reset

    def _remember_reset(self, key: str, reset: float) -> None:
        if len(self._resets) > 50_000:
            now = time.time()
            self._resets = {k: v for k, v in self._resets.items() if v > now}
            if len(self._resets) > 50_000:
                self._resets.clear()
        self._resets[key] = reset


#: Take a parallel slot on Redis Cluster (one key: one node). ``KEYS[1]``: the descriptor's
#: sorted set of request ids scored by their lease's end (server time), as the Redis
#: script keeps it; ``ARGV``: the request id, the limit, the lease in seconds. Returns 1
#: when taken, 0 when every slot is in use.
_TAKE_SLOT_LUA = """
if redis.replicate_commands then redis.replicate_commands() end  -- writes after TIME
local clock = redis.call('time')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('expire', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class RedisClusterCounters(Counters):
    """The generic counters on limits' ``RedisClusterStorage`` (a request's keys may sit on
    different nodes, so one call per counter), with each parallel slot leased on its own
    as on a single Redis: a sorted set per descriptor, taken by a script on that one key,
    released by request id."""

    def __init__(self, strategy: FixedWindowRateLimiter, prefix: str) -> None:
        super().__init__(strategy, prefix)
        storage: Any = self.storage
        self._prefixed = storage.prefixed_key
        self._client = client = storage.get_connection()
        self._take_script = client.register_script(_TAKE_SLOT_LUA)

    @staticmethod
    def supports(storage: Storage) -> bool:
        return isinstance(storage, RedisClusterStorage)

    def _take_slot(self, line: _Limit, lease: int, member: str) -> bool:
        try:
            return bool(self._take_script(keys=[self._prefixed(line.key)],
                                          args=[member, line.limit, lease]))
        except Exception as exc:
            raise StorageDown(exc) from exc

    def _give_slot(self, line: _Limit, lease: int, member: str) -> None:
        try:
            self._client.zrem(self._prefixed(line.key), member)
        except Exception as exc:
            raise StorageDown(exc) from exc

    def forget(self, plan: _Plan, window: int, lease: int, member: str) -> bool:
        """Remove ``member``'s slots (doing it twice does nothing more)."""
        for line in plan.parallel:
            self._give_slot(line, lease, member)
        return True


class MemcachedCounters(Counters):
    """The generic counters on limits' ``MemcachedStorage``: memcached's ``incr`` takes no
    negative delta, so an undo or a slot release is its ``decr`` (which stops at 0, as
    :meth:`Counters._release` wants)."""

    @staticmethod
    def supports(storage: Storage) -> bool:
        return isinstance(storage, MemcachedStorage)

    def incr(self, key: str, seconds: int, amount: int) -> int:
        if amount >= 0:
            return super().incr(key, seconds, amount)
        storage: Any = self.storage
        try:
            left = storage.call_memcached_func(storage.storage.decr, key, -amount,
                                               noreply=False)
        except Exception as exc:
            raise StorageDown(exc) from exc
        return 0 if left is None else int(left)  # None: the counter expired meanwhile


class MemoryCounters(Counters):
    """Counters on limits' ``MemoryStorage``, read and written in its own tables (the count
    table and the expiry table, so ``storage.get``, ``get_expiry``, ``reset`` and its purge
    see them) under one lock: each step is one pass over plain dicts, atomic.

    Same rules as ``MemoryStorage.incr``: an expired counter counts as 0, and an increment
    that brings a counter to exactly its amount starts a new window. The storage's purge of
    expired keys takes the same lock, so it cannot drop a counter being written.

    Parallel slots are kept apart (``_slots``: per key, request id -> lease end, oldest
    first), each with its own lease.
    """

    def __init__(self, strategy: FixedWindowRateLimiter, prefix: str) -> None:
        super().__init__(strategy, prefix)
        storage = self.storage
        self._counts: dict[str, int] = storage.storage  # type: ignore[attr-defined]
        self._ends: dict[str, float] = storage.expirations  # type: ignore[attr-defined]
        self._lock = threading.Lock()
        self._slots: dict[str, dict[str, float]] = {}
        self._purge = getattr(storage, "_MemoryStorage__schedule_expiry", None)
        self._purge_due = 0.0
        purge = getattr(storage, "_MemoryStorage__expire_events", None)
        if purge is not None:
            lock = self._lock

            def locked_purge() -> None:
                with lock:
                    purge()

            storage._MemoryStorage__expire_events = locked_purge  # type: ignore[attr-defined]

    @staticmethod
    def supports(storage: Storage) -> bool:
        return (isinstance(storage, MemoryStorage)
                and isinstance(getattr(storage, "storage", None), dict)
                and isinstance(getattr(storage, "expirations", None), dict))

    def _uncount(self, key: str, now: float) -> None:
        """Take one back from a window's count, under the lock; a window that ended (or
        was never opened) is left alone, so no window starts below 0."""
        end = self._ends.get(key)
        if end is not None and end > now:
            count = self._counts.get(key, 0)
            if count > 0:
                self._counts[key] = count - 1

    def _free(self, lines: Iterable[_Limit], member: str) -> None:
        """Release ``member``'s slot on each limit, under the lock."""
        slots_of = self._slots
        for line in lines:
            slots = slots_of.get(line.key)
            if slots is not None:
                slots.pop(member, None)
                if not slots:
                    del slots_of[line.key]

    def acquire(self, plan: _Plan, need: int, window: int, lease: int,
                member: str) -> tuple[int, int, list[float]]:
        values: list[float] = []
        counts, ends = self._counts, self._ends
        lock = self._lock
        lock.acquire()  # not ``with``: the statement costs twice the two calls
        try:
            now = _now()
            for line in plan.tpm:
                key = line.key
                end = ends.get(key)
                if end is None or end <= now:
                    used, end = 0, now + window
                else:
                    used = counts.get(key, 0)
                values += (used, end)
                if line.limit - used < need:
                    return TPM_REFUSED, plan.tpm.index(line), values
            # the increments of MemoryStorage.incr, inline (see _add)
            for line in plan.rpm:
                key = line.key
                end = ends.get(key)
                count = counts.get(key, 0) + 1 if end is not None and end > now else 1
                counts[key] = count
                if count == 1:
                    ends[key] = end = now + window
                # a count above 1 was counted in an open window: ``end`` is set
                values += (count, end)  # type: ignore[arg-type]
                if count > line.limit:
                    index = plan.rpm.index(line)
                    for undo in plan.rpm[:index + 1]:
                        self._uncount(undo.key, now)
                    return RPM_REFUSED, index, values
            slots_of = self._slots
            for line in plan.parallel:
                slots = slots_of.get(line.key)
                if slots is None:
                    slots = slots_of[line.key] = {}
                elif slots and next(iter(slots.values())) <= now:  # the oldest lease ended
                    for ended in [m for m, until in slots.items() if until <= now]:
                        del slots[ended]
                if len(slots) >= line.limit:
                    index = plan.parallel.index(line)
                    for undo in plan.rpm:
                        self._uncount(undo.key, now)
                    self._free(plan.parallel[:index], member)
                    return PARALLEL_REFUSED, index, values
                slots[member] = now + lease
        finally:
            lock.release()
        if now >= self._purge_due and self._purge is not None:
            self._purge_due = now + 1.0
            self._purge()
        return ADMITTED, 0, values

    def settle(self, plan: _Plan, tokens: int, uncount: bool, window: int, lease: int,
               member: str) -> None:
        counts, ends = self._counts, self._ends
        lock = self._lock
        lock.acquire()  # not ``with``: the statement costs twice the two calls
        try:
            now = _now()
            if plan.parallel:
                self._free(plan.parallel, member)
            if uncount:
                for line in plan.rpm:
                    self._uncount(line.key, now)
            elif tokens > 0:
                for line in plan.tpm:
                    key = line.key
                    end = ends.get(key)
                    count = tokens + (counts.get(key, 0) if end is not None and end > now
                                      else 0)
                    counts[key] = count
                    if count == tokens:
                        ends[key] = now + window
        finally:
            lock.release()


#: One request's admission on Redis, atomic. ``KEYS``: its tpm, rpm and parallel keys;
#: ``ARGV[1]``: the tokens the request needs; ``ARGV[2]``: "#tpm #rpm #parallel window lease"
#: and each key's limit, space-separated (two arguments: the client encodes less);
#: ``ARGV[3]``: the request id. The windows follow limits' ``incr_expire`` script: an
#: increment bringing a counter to exactly its amount sets the expiry. A parallel key is a
#: sorted set of request ids scored by their lease's end (server time): ended leases are
#: dropped before counting. Returns "outcome index" then "used|count pttl" per window reached.
_ACQUIRE_LUA = """
local spec = {}
for word in string.gmatch(ARGV[2], '%S+') do spec[#spec + 1] = tonumber(word) end
local need, ntpm, nrpm, npar = tonumber(ARGV[1]), spec[1], spec[2], spec[3]
local window, lease = spec[4], spec[5]
local out = {0, 0}
local function reply(outcome, index)
  out[1], out[2] = outcome, index
  return table.concat(out, ' ')
end
for i = 1, ntpm do
  local used = tonumber(redis.call('get', KEYS[i]) or 0)
  out[#out + 1] = string.format('%d', used)
  out[#out + 1] = redis.call('pttl', KEYS[i])
  if spec[5 + i] - used < need then return reply(1, i - 1) end
end
for i = 1, nrpm do
  local key = KEYS[ntpm + i]
  local count = redis.call('incrby', key, 1)
  if count == 1 then redis.call('expire', key, window) end
  out[#out + 1] = string.format('%d', count)
  out[#out + 1] = redis.call('pttl', key)
  if count > spec[5 + ntpm + i] then
    for j = 1, i do redis.call('decrby', KEYS[ntpm + j], 1) end
    return reply(2, i - 1)
  end
end
local base = ntpm + nrpm
if npar > 0 then
  if redis.replicate_commands then redis.replicate_commands() end  -- writes after TIME
  local clock = redis.call('time')
  local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
  local member = ARGV[3]
  for i = 1, npar do
    local key = KEYS[base + i]
    redis.call('zremrangebyscore', key, '-inf', now)
    if redis.call('zcard', key) >= spec[5 + base + i] then
      for j = 1, nrpm do redis.call('decrby', KEYS[ntpm + j], 1) end
      for j = 1, i - 1 do redis.call('zrem', KEYS[base + j], member) end
      return reply(3, i - 1)
    end
    redis.call('zadd', key, now + lease, member)
    redis.call('expire', key, lease)
  end
end
return reply(0, 0)
"""

#: One request's settlement on Redis, atomic. ``KEYS``: the parallel slots to release, then
#: the windows to add to; ``ARGV``: "#slots lease window", the amount to add (-1: undo an
#: rpm count, never below 0 nor into a window that ended), the request id.
_SETTLE_LUA = """
local spec = {}
for word in string.gmatch(ARGV[1], '%S+') do spec[#spec + 1] = tonumber(word) end
local nrelease, window = spec[1], spec[3]
local amount = tonumber(ARGV[2])
for i = 1, nrelease do redis.call('zrem', KEYS[i], ARGV[3]) end
for i = nrelease + 1, #KEYS do
  if amount < 0 then
    if tonumber(redis.call('get', KEYS[i]) or 0) > 0 then redis.call('decrby', KEYS[i], 1) end
  else
    local value = redis.call('incrby', KEYS[i], amount)
    if value == amount then redis.call('expire', KEYS[i], window) end
  end
end
return 0
"""


class _RedisPlan:
    """A plan's keys and arguments, encoded once."""

    __slots__ = ("keys", "spec", "release", "charge", "uncount", "release_only")

    def __init__(self, plan: _Plan, prefixed: Any, window: int, lease: int) -> None:
        def encoded(lines: tuple[_Limit, ...]) -> tuple[bytes, ...]:
            return tuple(prefixed(line.key).encode() for line in lines)

        lines = plan.tpm + plan.rpm + plan.parallel
        self.keys = encoded(lines)
        self.spec = " ".join(str(n) for n in (
            len(plan.tpm), len(plan.rpm), len(plan.parallel), window, lease,
            *(line.limit for line in lines))).encode()
        self.release = encoded(plan.parallel)
        settle_spec = f"{len(plan.parallel)} {lease} {window}".encode()
        #: ``(keys, spec)`` of the settlement that charges tokens / undoes the rpm counts.
        self.charge = (self.release + encoded(plan.tpm), settle_spec)
        self.uncount = (self.release + encoded(plan.rpm), settle_spec)
        self.release_only = (self.release, settle_spec)


class RedisCounters(Counters):
    """Counters on limits' ``RedisStorage`` (also Sentinel; not Cluster, whose keys may sit on
    different nodes): each step is one Lua script, one round trip, atomic — on the keys
    limits itself would use (``storage.prefixed_key``)."""

    def __init__(self, strategy: FixedWindowRateLimiter, prefix: str) -> None:
        super().__init__(strategy, prefix)
        storage: Any = self.storage
        self._prefixed = storage.prefixed_key
        self._client = client = storage.get_connection()
        self._acquire_script = client.register_script(_ACQUIRE_LUA)
        self._settle_script = client.register_script(_SETTLE_LUA)
        # the client's own package (redis or valkey): limits' Sentinel storage has no
        # ``dependency`` attribute, its plain Redis storage has
        package = sys.modules.get(type(client).__module__.partition(".")[0])
        exceptions = getattr(package, "exceptions", None)
        self._no_script: type[BaseException] = getattr(exceptions, "NoScriptError",
                                                        _NeverRaised)

    @staticmethod
    def supports(storage: Storage) -> bool:
        return isinstance(storage, RedisStorage) and not isinstance(storage,
                                                                    RedisClusterStorage)

    def _run(self, script: Any, keys: tuple[bytes, ...], args: tuple[Any, ...]) -> Any:
        """EVALSHA without the script object's per-call work; it loads the script when the
        server does not know it (a restarted Redis)."""
        try:
            try:
                return self._client.execute_command("EVALSHA", script.sha, len(keys), *keys,
                                                    *args)
            except self._no_script:
                return script(keys, args)
        except Exception as exc:
            raise StorageDown(exc) from exc

    def _prepare(self, plan: _Plan, window: int, lease: int) -> _RedisPlan:
        prepared = plan.prepared
        if prepared is None:
            prepared = plan.prepared = _RedisPlan(plan, self._prefixed, window, lease)
        return prepared

    def acquire(self, plan: _Plan, need: int, window: int, lease: int,
                member: str) -> tuple[int, int, list[float]]:
        prepared = self._prepare(plan, window, lease)
        reply = self._run(self._acquire_script, prepared.keys,
                          (need, prepared.spec, member)).split()
        now = time.time()
        values: list[float] = [int(word) for word in reply[2:]]
        for i in range(1, len(values), 2):  # pttl (ms; < 0: no window yet) -> window end
            pttl = values[i]
            values[i] = now + (pttl / 1000 if pttl > 0 else window)
        return int(reply[0]), int(reply[1]), values

    def forget(self, plan: _Plan, window: int, lease: int, member: str) -> bool:
        """Remove ``member``'s slots (whether or not a call took or released them; doing it
        twice does nothing more): one script, the settlement's without a charge."""
        keys, spec = self._prepare(plan, window, lease).release_only
        if keys:
            self._run(self._settle_script, keys, (spec, 0, member))
        return True

    def settle(self, plan: _Plan, tokens: int, uncount: bool, window: int, lease: int,
               member: str) -> None:
        prepared = self._prepare(plan, window, lease)
        if uncount:
            keys, spec = prepared.uncount
            amount = -1
        elif tokens > 0:
            keys, spec = prepared.charge
            amount = tokens
        else:
            keys, spec = prepared.release_only
            amount = 0
        if keys:
            self._run(self._settle_script, keys, (spec, amount, member))


class _NeverRaised(Exception):
    """Stands in for a client's ``NoScriptError`` when it has none."""


class StorageHealth:
    """Remembers a storage outage so requests do not each wait on a dead Redis: after a
    failure the storage is retried once per ``retry_interval`` seconds."""

    def __init__(self, retry_interval: float, what: str) -> None:
        self.retry_interval = retry_interval
        self.what = what
        self.down_until = 0.0
        self.down_since: float | None = None
        self.skipped = 0

    def available(self) -> bool:
        if self.down_since is None:
            return True
        if time.time() >= self.down_until:
            return True  # probe
        self.skipped += 1
        return False

    def failed(self, exc: BaseException, mode: str) -> None:
        now = time.time()
        cause = exc.__cause__ or exc
        if self.down_since is None:
            self.down_since = now
            log.error("llmauth: %s storage is unreachable (%s: %s); %s until it answers "
                      "(retried every %ss)", self.what, type(cause).__name__,
                      str(cause)[:200], mode, self.retry_interval)
        else:
            log.error("llmauth: %s storage still unreachable after %.0fs (%s: %s); %s, %d "
                      "requests decided without it since the last probe", self.what,
                      now - self.down_since, type(cause).__name__, str(cause)[:200], mode,
                      self.skipped)
            self.skipped = 0
        self.down_until = now + self.retry_interval

    def known_down(self) -> bool:
        """Whether a call failed less than ``retry_interval`` seconds ago (no probe due)."""
        return self.down_since is not None and time.time() < self.down_until

    def succeeded(self) -> None:
        if self.down_since is not None:
            log.warning("llmauth: %s storage answers again after %.0fs", self.what,
                        time.time() - self.down_since)
            self.down_since = None
            self.skipped = 0


def quiet_memory_storage(storage: Storage, interval: float = 1.0) -> None:
    """limits' ``MemoryStorage`` starts a thread to purge expired keys whenever its last one
    has finished, 10 ms after it started: under load, a thread start every few requests.
    Purge at most once per ``interval`` seconds instead (an expired key is also dropped
    whenever it is read, so counts are unaffected)."""
    schedule = getattr(storage, "_MemoryStorage__schedule_expiry", None)
    if not isinstance(storage, MemoryStorage) or schedule is None:
        return
    lock = threading.Lock()
    due = [0.0]

    def throttled() -> None:
        now = time.monotonic()
        if now < due[0]:
            return
        with lock:
            if now < due[0]:
                return
            due[0] = now + interval
        schedule()

    storage._MemoryStorage__schedule_expiry = throttled  # type: ignore[attr-defined]


def counters_for(strategy: FixedWindowRateLimiter, prefix: str) -> Counters:
    """The fastest counters the strategy's storage supports."""
    storage = strategy.storage
    if MemoryCounters.supports(storage):
        return MemoryCounters(strategy, prefix)
    if RedisCounters.supports(storage):
        return RedisCounters(strategy, prefix)
    if RedisClusterCounters.supports(storage):
        return RedisClusterCounters(strategy, prefix)
    if MemcachedCounters.supports(storage):
        return MemcachedCounters(strategy, prefix)
    return Counters(strategy, prefix)


def _memory_counters(prefix: str) -> Counters:
    storage = MemoryStorage()
    quiet_memory_storage(storage)
    return counters_for(FixedWindowRateLimiter(storage), prefix)


# -- the guard -----------------------------------------------------------------------------------


_MODES = {
    "closed": "refusing rate-limited requests with 503",
    "open": "admitting requests without rate limits",
    "memory": "counting rate limits per process",
}


_NO_HEADERS: tuple[tuple[str, str], ...] = ()


class RateLimits:
    """The rate-limit guard (runs after the customer guard, before budgets)."""

    name = "rate_limits"
    #: The ``x-ratelimit-*`` headers are put in ``admission.header_pairs`` by :meth:`admit`.
    adds_headers = False

    def __init__(self, settings: Settings, limiter: Limiter, model_names: Any = None) -> None:
        self.settings = settings
        self.limiter = limiter
        self.window = settings.ratelimit_window
        self.lease = settings.ratelimit_parallel_lease
        self.mode = settings.ratelimit_storage_down
        self.headers_enabled = settings.ratelimit_headers_enabled
        self.tokens_counted = settings.ratelimit_token_type
        self.tpm_estimate = settings.ratelimit_tpm_estimate
        #: Prompt tokens an image, audio clip, video or file counts in a tpm estimate.
        self.media = settings.prompt_media_tokens
        strategy = limiter.limiter
        if not isinstance(strategy, FixedWindowRateLimiter):
            raise ConfigurationError(
                "LLMAUTH_RATELIMIT_STORAGE_URI: rate limits need the fixed-window strategy "
                f"(got {type(strategy).__name__})")
        self.counters = counters_for(strategy, settings.ratelimit_key_prefix)
        self.health = StorageHealth(settings.ratelimit_retry_interval, "rate-limit")
        self._fallback: Counters | None = None
        self._fallback_lock = threading.Lock()
        #: ``(principal, model) -> model names`` (aliases resolved), from authorization.
        self._model_names = model_names
        self._plans: dict[tuple[Any, ...], tuple[Any, Any, _Plan | None]] = {}
        #: Whether every LLM request must be seen: a global limit is set. (End users with
        #: limits of their own are found by ``wants_end_user``.)
        self.always = bool(settings.ratelimit_global_rpm or settings.ratelimit_global_tpm
                           or settings.ratelimit_global_max_parallel_requests)

    # -- Guard protocol ----------------------------------------------------------------------

    def wants(self, principal: Principal, route: RouteInfo, unsafe: bool) -> bool:
        if not unsafe or not route.is_llm or principal.is_master_key:
            return False
        return self.always or has_limits(principal)  # global limits, or the principal's

    def wants_end_user(self, principal: Principal, route: RouteInfo, customer: Any,
                       unsafe: bool) -> bool:
        """A request naming an end user whose row carries limits (see ``Guards.admit``)."""
        if customer is None or not unsafe or not route.is_llm or principal.is_master_key:
            return False
        return bool(limit_value(customer.rpm_limit) or limit_value(customer.tpm_limit)
                    or limit_value(customer.max_parallel_requests))

    def admit(self, admission: Admission) -> None:
        principal, customer = admission.principal, admission.customer
        hit = self._plans.get((id(principal), admission.model, admission.end_user_id,
                               id(customer)))
        if hit is not None and hit[0] is principal and hit[1] is customer:
            plan = hit[2]
        else:
            plan = self._plan(admission)
        if plan is None:
            return
        health = self.health
        counters = self.counters if health.down_since is None else self._backend()
        if counters is None:
            return  # storage down, fail open (logged)
        if self.tpm_estimate:
            need = self._estimate(admission, plan)
            if need > plan.tpm_ceiling:
                self._refuse_too_large(admission, plan, need)
        else:
            need = 1
        member = admission.request_id if plan.parallel else ""
        try:
            outcome, index, values = counters.acquire(plan, need, self.window, self.lease,
                                                      member)
        except StorageDown as exc:
            health.failed(exc, _MODES[self.mode])
            if member:
                self._forget_slots(counters, plan, member)
            counters = self._backend(after_failure=True)
            if counters is None:
                return
            outcome, index, values = counters.acquire(plan, need, self.window, self.lease,
                                                      member)
        if health.down_since is not None and counters is self.counters:
            health.succeeded()
        if outcome != ADMITTED:
            self._refuse_outcome(admission, plan, outcome, index, values)
        admission.scratch[_SCRATCH] = (counters, plan)
        if self.headers_enabled and plan.shown:
            admission.header_pairs = _success_headers(plan, values)

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None:
        scratch = admission.scratch
        taken: tuple[Counters, _Plan] | None = scratch.get(_SCRATCH)
        if taken is None:
            return
        counters, plan = taken
        uncount = bool(scratch.get("_refused"))  # a later guard refused it: not counted
        if not uncount and not plan.charges:
            return  # nothing to charge or release (every Counters.settle would do nothing)
        tokens = 0 if uncount or usage is None else (
            usage.prompt_tokens + usage.completion_tokens if self.tokens_counted == "total"
            else self._tokens(usage))
        member = admission.request_id if plan.parallel else ""
        try:
            counters.settle(plan, tokens, uncount, self.window, self.lease, member)
        except StorageDown as exc:
            self._settle_failed(counters, plan, exc, admission.request_id, member,
                                "its rpm undo" if uncount else f"its tpm charge ({tokens} tokens)")

    def headers(self, admission: Admission) -> Sequence[tuple[str, str]]:
        """None: :meth:`admit` puts them in ``admission.header_pairs``."""
        return _NO_HEADERS

    def settles(self, principal: Principal, route: RouteInfo, unsafe: bool,
                wanted: tuple[Any, ...]) -> bool:
        """Whether :meth:`settle` can do anything after the view for a request naming no end
        user (see :mod:`~flask_llmauth.guards`): charge a tpm window or release a parallel
        slot, for some model. An rpm count is undone only for a request a later guard
        refused, which is settled apart. The descriptors are those of every model named by
        the principal's per-model tpm tables (its tpm limit for any model, if it has one)."""
        names = [name for table in _model_tables(principal, "model_tpm_limit")
                 if isinstance(table, Mapping) for name in table]
        return any(d.tpm or d.parallel
                   for d in descriptors(principal, names, None, None, self.settings))

    # -- internals ---------------------------------------------------------------------------

    def _forget_slots(self, counters: Counters, plan: _Plan, member: str) -> None:
        """After a failed admission, remove the request's parallel slots at once, best
        effort: the call may have failed after the admission ran (a timeout on the answer),
        which would hold them until their leases end. Slots are named by the request id, so
        nothing else is removed; a removal that fails too is logged, never raised."""
        try:
            counters.forget(plan, self.window, self.lease, member)
        except Exception as exc:  # the slots' leases free them instead
            cause = exc.__cause__ or exc
            log.warning("llmauth: could not remove the parallel slots of request %s after a "
                        "failed admission (%s); they expire after %ss", member,
                        type(cause).__name__, self.lease)

    def _settle_failed(self, counters: Counters, plan: _Plan, exc: StorageDown,
                       request_id: str, member: str, counted: str) -> None:
        """After a failed settlement, remove the request's parallel slots with one more call
        by request id, best effort (the settlement may not have run: its slots would wait
        for their leases). Only the slots: the tpm charge (or the rpm undo) is not made
        again, since the first call may have made it — at most once. Skipped while the
        storage is known to be down (one timeout per settlement then, not two). Never
        raises; the log names the request id, never a key."""
        retry = bool(member) and (counters is not self.counters or not self.health.known_down())
        if counters is self.counters:
            self.health.failed(exc, _MODES[self.mode])
        cause = exc.__cause__ or exc
        slots = f"left to their leases ({self.lease}s)" if member else "none held"
        if retry:
            try:
                if counters.forget(plan, self.window, self.lease, member):
                    slots = "removed by request id"
            except Exception as again:  # the leases free them instead
                cause_again = again.__cause__ or again
                slots = (f"not removed ({type(cause_again).__name__}), left to their leases "
                         f"({self.lease}s)")
        log.error("llmauth: could not settle rate limits of request %s (%s); parallel slots "
                  "%s; %s may be missing and is not retried", request_id,
                  type(cause).__name__, slots, counted)

    def _backend(self, after_failure: bool = False) -> Counters | None:
        if not after_failure and (self.health.down_since is None or self.health.available()):
            return self.counters
        if self.mode == "closed":
            raise ServiceUnavailable(
                "Rate limiting is temporarily unavailable; try again shortly.",
                headers={"Retry-After": str(max(1, math.ceil(self.health.retry_interval)))},
                reason="ratelimit_storage_down")
        if self.mode == "memory":
            with self._fallback_lock:
                if self._fallback is None:
                    self._fallback = _memory_counters(self.settings.ratelimit_key_prefix)
            return self._fallback
        return None

    def _tokens(self, usage: Usage | None) -> int:
        if usage is None:
            return 0
        kind = self.tokens_counted
        if kind == "input":
            return usage.prompt_tokens
        if kind == "output":
            return usage.completion_tokens
        return usage.total_tokens

    def _estimate(self, admission: Admission, plan: _Plan) -> int:
        if not self.tpm_estimate:
            return 1
        kind = self.tokens_counted
        sizes = admission._sizes  # admission.sizes(self.media), inline
        if sizes is None:
            sizes = admission._sizes = body_sizes(admission.body, self.media)
        prompt, completion = sizes
        if completion < 0:  # a cap that is not a count: refused where tokens are reserved
            if plan.tpm and kind != "input":
                refuse_unreadable_cap(admission.body)
            completion = 0
        if kind == "output":
            prompt = 0
        elif kind == "input":
            completion = 0
        return max(1, prompt + completion)

    def _plan(self, admission: Admission) -> _Plan | None:
        """The limits of this request with their storage keys (``None``: none applies), kept
        per principal object, model and end user (``admit`` looks there first): a cached
        key's principal is reused until it changes."""
        principal, customer = admission.principal, admission.customer
        cache_key = (id(principal), admission.model, admission.end_user_id, id(customer))
        names: Sequence[str] = ()
        if admission.model and principal.key is not None:
            names = (self._model_names(principal, admission.model) if self._model_names
                     else (admission.model,))
        found = descriptors(principal, names, admission.end_user_id, customer, self.settings)
        counters, window, lease = self.counters, self.window, self.lease

        def limits(field: str, seconds: int, name: str) -> tuple[_Limit, ...]:
            return tuple(
                _Limit(d, counters.window_key(seconds, d.kind, d.ident, name), amount)
                for d in found if (amount := getattr(d, field)))

        # parallel slots are stored under "slots": a sorted set of leased request ids on
        # Redis (the "parallel" counters of earlier versions were strings)
        tpm, rpm, parallel = (limits("tpm", window, "tpm"), limits("rpm", window, "rpm"),
                              limits("parallel", lease, "slots"))
        plan = _Plan(tpm, rpm, parallel) if tpm or rpm or parallel else None
        if len(self._plans) >= 10_000:
            self._plans.clear()
        self._plans[cache_key] = (principal, customer, plan)
        return plan

    def _refuse_outcome(self, admission: Admission, plan: _Plan, outcome: int, index: int,
                        values: list[float]) -> NoReturn:
        """Raise the 429 of a refused ``Counters.acquire``."""
        if outcome == TPM_REFUSED:
            line, used, reset = plan.tpm[index], values[2 * index], values[2 * index + 1]
            self._refuse(admission, line.descriptor, "tokens", line.limit,
                         max(0, line.limit - int(used)), reset)
        if outcome == RPM_REFUSED:
            line = plan.rpm[index]
            reset = values[2 * (len(plan.tpm) + index) + 1]
            self._refuse(admission, line.descriptor, "requests", line.limit, 0, reset)
        line = plan.parallel[index]
        self._refuse(admission, line.descriptor, "max_parallel_requests", line.limit, 0, None)

    def _refuse_too_large(self, admission: Admission, plan: _Plan, need: int) -> NoReturn:
        """Raise the 429 of a request whose own estimate exceeds a tpm limit: no window can
        ever admit it, so it says so and tells clients not to retry (``x-should-retry:
        false``, no ``Retry-After``); nothing was counted."""
        line = next(line for line in plan.tpm if line.limit < need)
        d = line.descriptor
        _signal(admission, RateLimitBreach(d.kind, d.label, "tokens", line.limit, 0, None))
        raise TooManyRequests(
            f"Rate limit exceeded for {d.kind}: {d.label}. Limit type: tokens. Current limit: "
            f"{line.limit}. This request alone needs an estimated {need} tokens, more than "
            "the limit: no window can admit it, so retrying cannot succeed. Lower max_tokens "
            "or shorten the input.",
            headers={"x-should-retry": "false"},
            reason=f"rate_limited_{d.kind}_tokens_request_too_large")

    def _refuse(self, admission: Admission, d: Descriptor, limit_type: str, limit: int,
                remaining: int, reset: float | None) -> NoReturn:
        now = time.time()
        breach = RateLimitBreach(d.kind, d.label, limit_type, limit, remaining, reset)
        if reset is None:
            retry_after = 1
            when = "Retry when a request in flight completes."
        else:
            retry_after = max(1, math.ceil(reset - now))
            stamp = datetime.fromtimestamp(reset, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            when = f"Limit resets at: {stamp} UTC"
        headers = {"Retry-After": str(retry_after)}
        if reset is not None and limit_type in ("requests", "tokens"):
            headers.update(_window_headers(limit_type, limit, remaining, reset, now))
        _signal(admission, breach)
        raise TooManyRequests(
            f"Rate limit exceeded for {d.kind}: {d.label}. Limit type: {limit_type}. "
            f"Current limit: {limit}, Remaining: {remaining}. {when}",
            headers=headers, reason=f"rate_limited_{d.kind}_{limit_type}")


def _signal(admission: Admission, breach: RateLimitBreach) -> None:
    """Send ``rate_limited`` for a refused request (when anyone listens)."""
    if rate_limited.receivers:
        send_signal(rate_limited, current_app._get_current_object(),  # type: ignore[attr-defined]
                    principal=admission.principal, limit=breach)


def _success_headers(plan: _Plan, values: list[float]) -> HeaderPairs:
    """The ``x-ratelimit-*`` headers of an admitted request, as ``(name, value)`` pairs: for
    requests and for tokens, the window with the least left (the first of equals) among the
    non-global ones."""
    headers = _RateLimitHeaders()
    now = time.time()
    for names, shown in plan.shown:
        position, best = shown[0]
        least = best.limit - values[position]
        if len(shown) > 1:  # one window per kind is the common case: no slice made
            for at, line in shown[1:]:
                left = line.limit - values[at]
                if left < least:
                    position, best, least = at, line, left
        wait = values[position + 1] - now
        # openai_duration(wait), its memo of whole seconds read first
        text = _WHOLE_SECONDS.get(ceil(wait)) if wait >= 1 else None
        headers += ((names[0], best.text),
                    (names[1], (str(least) if type(least) is int else str(int(least)))
                     if least > 0 else "0"),
                    (names[2], text if text is not None else openai_duration(wait)))
    return headers


def _window_headers(kind: str, limit: int, remaining: int, reset: float,
                    now: float) -> dict[str, str]:
    names = _HEADER_NAMES[kind]
    return {
        names[0]: str(limit),
        names[1]: str(remaining) if remaining > 0 else "0",
        names[2]: openai_duration(reset - now),
    }


#: ``openai_duration`` of whole seconds, computed once each.
_WHOLE_SECONDS: dict[int, str] = {}


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers: ``20ms``, ``1s``, ``6m0s``, ``1h2m3s``
    (a negative duration is ``0ms``)."""
    if seconds < 1:
        return f"{int(seconds * 1000)}ms" if seconds > 0 else "0ms"
    whole = math.ceil(seconds)
    text = _WHOLE_SECONDS.get(whole)
    if text is None:
        hours, rest = divmod(whole, 3600)
        minutes, secs = divmod(rest, 60)
        if hours:
            text = f"{hours}h{minutes}m{secs}s"
        elif minutes:
            text = f"{minutes}m{secs}s"
        else:
            text = f"{secs}s"
        if len(_WHOLE_SECONDS) < 100_000:
            _WHOLE_SECONDS[whole] = text
    return text


# -- failed authentications per client IP ---------------------------------------------------------


@lru_cache(maxsize=4096)
def counted_address(ip: str | None, ipv6_prefix: int = 64) -> str:
    """What failed authentications from ``ip`` are counted under: an IPv4 address (also
    one mapped into IPv6) as itself, an IPv6 address by its ``/ipv6_prefix`` network (a
    client usually holds a whole /64 and could rotate addresses in it), anything
    unparsable as it is."""
    if not ip:
        return "unknown"
    address = parse_address(ip.partition("%")[0])  # an IPv6 zone (``%eth0``) is dropped
    if address is None:
        return ip[:100]
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class AuthFailureLimiter:
    """Counts failed authentications per client IP (``trusted_proxy_ranges`` decide which
    IP that is; an IPv6 client by its network, see :func:`counted_address`) and refuses an
    IP that used up its allowance with 429 *before* its credential is checked.

    The count is in the shared storage; the block is remembered in-process until the window
    resets, so the check costs no round trip. Another process learns of the block at that
    IP's next failure there: across P processes at most P-1 extra credentials are checked
    per window. While the storage is down the count is kept per process.
    """

    def __init__(self, settings: Settings, limiter: Limiter) -> None:
        self.items = tuple(parse_many(settings.auth_failure_limit))
        self.ipv6_prefix = settings.auth_failure_ipv6_prefix
        strategy = limiter.limiter
        assert isinstance(strategy, FixedWindowRateLimiter)
        self.counters = Counters(strategy, settings.ratelimit_key_prefix)
        self.health = StorageHealth(settings.ratelimit_retry_interval, "failed-auth limit")
        self._fallback: Counters | None = None
        self._blocked: dict[str, float] = {}
        self._lock = threading.Lock()
        #: Whether any address is blocked (else :meth:`check` has nothing to do): a plain
        #: attribute, read on every authenticated request.
        self.blocking = False

    def check(self, ip: str | None) -> None:
        """Raise 429 if ``ip`` is blocked (call before reading the credential)."""
        if not self._blocked:
            return
        address = counted_address(ip, self.ipv6_prefix)
        until = self._blocked.get(address)
        if until is None:
            return
        now = time.time()
        if until <= now:
            with self._lock:
                self._blocked.pop(address, None)
                self.blocking = bool(self._blocked)
            return
        raise TooManyRequests(
            "Too many failed authentication attempts from this address. Try again in "
            f"{math.ceil(until - now)} seconds.",
            headers={"Retry-After": str(max(1, math.ceil(until - now)))},
            reason="auth_failures_blocked")

    def record(self, ip: str | None) -> None:
        """Count one failed authentication from ``ip``; block it once a limit is reached."""
        address = counted_address(ip, self.ipv6_prefix)
        counters = self.counters if self.health.available() else self._memory()
        try:
            until = self._count(counters, address)
            if counters is self.counters:
                self.health.succeeded()
        except StorageDown as exc:
            self.health.failed(exc, "counting failed authentications per process")
            until = self._count(self._memory(), address)
        if until is None:
            return
        with self._lock:
            if len(self._blocked) > 100_000:
                now = time.time()
                self._blocked = {k: v for k, v in self._blocked.items() if v > now}
            self._blocked[address] = until
            self.blocking = True
        log.warning("llmauth: blocking %s for %.0fs after too many failed authentications",
                    address, until - time.time())
        if rate_limited.receivers:
            send_signal(rate_limited, current_app._get_current_object(), principal=None,  # type: ignore[attr-defined]
                        limit=RateLimitBreach("ip", address, "auth_failures",
                                              self.items[0].amount, 0, until))

    def _count(self, counters: Counters, address: str) -> float | None:
        until: float | None = None
        for item in self.items:
            seconds = item.get_expiry()
            key = counters.key(item, "auth_failures", _ident(address))
            if counters.incr(key, seconds, 1) >= item.amount:
                reset = counters.reset_at(key, seconds)
                until = reset if until is None else max(until, reset)
        return until

    def _memory(self) -> Counters:
        with self._lock:
            if self._fallback is None:
                self._fallback = _memory_counters(self.counters.prefix)
            return self._fallback


def install(state: Any, app: Flask) -> None:
    """Build the app's limiter, the rate-limit guard and the failed-authentication limiter
    (called by ``init_app``)."""
    settings: Settings = state.settings
    state.limiter = None
    state.ratelimits = None
    state.auth_failures = None
    if not settings.ratelimit_enabled:
        return
    uri = storage_uri(settings)
    check_storage_for_workers(settings, uri)
    limiter = create_limiter(app, settings)
    if not limiter.enabled:  # RATELIMIT_ENABLED=False in the app config
        return
    state.limiter = limiter
    state.host_limit_hooks = HostLimitHooks.take(app, limiter)
    state.ratelimits = RateLimits(settings, limiter, state.models.names_for)
    state.guards.add(state.ratelimits)
    if settings.auth_failure_limit:
        state.auth_failures = AuthFailureLimiter(settings, limiter)


