"""Virtual keys (``sk-...``): keyed MAC → in-process cache → one prebuilt SQL lookup.

On a cache hit the cost is one keyed BLAKE2s (the cache key, see
:class:`~flask_llmauth.crypto.CacheKeyer`), one dict lookup and one clock read: no
database, no network; the stored HMAC-SHA256 digest is computed on a miss only. Unknown,
deleted, rotated-out and expired keys all get the same 401 body; the reason goes to the
log only. A rotated key's old secret keeps working until its grace
period ends, as the same key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, MutableMapping
from datetime import datetime, timezone
from typing import NamedTuple

from ..cache import TTLCache
from ..crypto import KEY_PREFIX, CacheKeyer, KeyDigester
from ..durations import utcnow
from ..errors import Unauthenticated
from ..principal import Principal, Role, outranks
from ..store.db import KeyRow, Store
from .base import AuthContext


class CachedKey(NamedTuple):
    """What the key cache holds per digest (a named tuple: built once per cold lookup)."""

    principal: Principal
    #: Epoch seconds from which this secret no longer works (expiry or grace end).
    deadline: float
    #: ``(message, reason)`` when the key, its team or its user is blocked.
    denial: tuple[str, str] | None


def epoch(value: datetime | None) -> float:
    return math.inf if value is None else value.replace(tzinfo=timezone.utc).timestamp()


def key_tags(principal: Principal) -> tuple[str, ...]:
    key_id, team_id, user_id = principal.key_id, principal.team_id, principal.user_id
    if team_id:
        if user_id:
            return (f"key:{key_id}", f"team:{team_id}", f"user:{user_id}")
        return (f"key:{key_id}", f"team:{team_id}")
    if user_id:
        return (f"key:{key_id}", f"user:{user_id}")
    return (f"key:{key_id}",)


_ROLE_OF_VALUE: dict[object, Role] = {role.value: role for role in Role}
#: Roles :func:`key_principal` assigns, as globals (an enum member read off its class costs
#: a metaclass attribute lookup, ~0.2 µs, per cold lookup).
_INTERNAL_USER, _TEAM = Role.INTERNAL_USER, Role.TEAM
_INTERNAL_USER_VIEWER = Role.INTERNAL_USER_VIEWER


def stored_role(value: str | None) -> Role:
    """A role string from the database; unknown strings count as ``internal_user``."""
    role = _ROLE_OF_VALUE.get(value)  # the stored form, without Role.parse's loop
    if role is not None:
        return role
    try:
        return Role.parse(value)
    except ValueError:
        return Role.INTERNAL_USER


#: Principal's fields in the order :func:`key_principal` fills them (it builds the tuple
#: positionally, one C call instead of a keyword ``__new__`` per cold lookup).
_PRINCIPAL_ORDER = ("method", "role", "user_id", "user_email", "team_id", "org_id",
                    "end_user_id", "key_id", "key_name", "key_alias", "scopes",
                    "allowed_routes", "models", "key", "team", "user", "membership", "claims",
                    "metadata", "limits")
if Principal._fields != _PRINCIPAL_ORDER:  # pragma: no cover - guards an edit of Principal
    raise ImportError("Principal's fields changed: update key_principal")
_SCOPES = Principal._field_defaults["scopes"]
_MODELS = Principal._field_defaults["models"]
_LIMITS = Principal._field_defaults["limits"]
_new = tuple.__new__


def key_principal(row: KeyRow) -> Principal:
    """The principal a key stands for, built once per cache fill: its user's role, never
    above the key's ``max_role`` (see :func:`~flask_llmauth.principal.role_cap`)."""
    key, team, user, membership = row
    if user is not None:
        role = stored_role(user.user_role)
    elif key.user_id:
        role = _INTERNAL_USER
    elif key.team_id:
        role = _TEAM
    else:
        role = _INTERNAL_USER_VIEWER
    if key.max_role is not None and outranks(role, cap := stored_role(key.max_role)):
        role = cap
    routes = key.allowed_routes
    metadata = key.metadata  # the record's own dict, even empty (no second empty dict)
    return _new(Principal, (
        "virtual_key", role, key.user_id, None if user is None else user.user_email,
        key.team_id, key.organization_id or (None if team is None else team.organization_id),
        None, key.key_id, key.key_name, key.key_alias, _SCOPES,
        tuple(routes) if routes else (), _MODELS, key, team, user, membership, None,
        metadata if metadata or type(metadata) is dict else {}, _LIMITS))


def _denial(row: KeyRow) -> tuple[str, str] | None:
    if row.key.blocked:
        return ("Authentication Error, this key is blocked. Update via `/key/unblock` if "
                "you're an admin.", "key_blocked")
    if row.team is not None and row.team.blocked:
        return (f"Authentication Error, Team={row.team.team_id} is blocked. Update via "
                "`/team/unblock` if you're an admin.", "team_blocked")
    if row.user is not None and row.user.blocked:
        return "Authentication Error, this key's user is blocked.", "user_blocked"
    return None


class VirtualKeyAuthenticator:
    name = "virtual_key"
    #: Its principals always name their key (see :class:`~.base.Chain`).
    yields_identity = True

    def __init__(
        self,
        store: Store,
        digester: KeyDigester,
        cache: TTLCache[CachedKey],
        negative_cache: TTLCache[bool],
        *,
        ttl: float,
        negative_ttl: float,
        last_used: MutableMapping[str, float],
        clock: Callable[[], float] = time.time,
        cache_keyer: CacheKeyer | None = None,
    ) -> None:
        self.store = store
        self.digester = digester
        #: The in-process cache's key of a raw key (the stored digest when not given).
        self.cache_key: Callable[[str], bytes | str] = cache_keyer or digester.digest
        self.cache = cache
        self.negative_cache = negative_cache
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        #: ``key_id -> epoch seconds`` of its last use (written in batches, see
        #: :class:`~flask_llmauth.keys.LastUsedRecorder`).
        self.last_used = last_used
        self.clock = clock

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        token = ctx.credentials.token
        if token is None:
            return None
        if not token.startswith(KEY_PREFIX):
            raise Unauthenticated(reason="not_a_virtual_key")
        cache_key = self.cache_key(token)
        entry = self.cache.get(cache_key)
        if entry is None:
            entry = self.load(self.digester.digest(token), cache_key)
        now = self.clock()
        if entry.deadline <= now:
            raise Unauthenticated(reason="expired_or_rotated_key")
        if entry.denial is not None:
            raise Unauthenticated(entry.denial[0], reason=entry.denial[1])
        principal = entry.principal
        self.last_used[principal.key_id] = now  # type: ignore[index]
        return principal

    def load(self, digest: str, cache_key: bytes | str | None = None) -> CachedKey:
        """The cold path: look the digest up (also among rotated-out secrets) and cache the
        answer under ``cache_key`` (the digest itself when not given)."""
        if cache_key is None:
            cache_key = digest
        if self.negative_cache.get(cache_key):
            raise Unauthenticated(reason="unknown_key")
        generation = self.cache.generation
        negative_generation = self.negative_cache.generation
        row = self.store.key_by_digest(digest)
        deadline = math.inf
        if row is None:
            grace = self.store.grace_by_digest(digest)
            if grace is not None and grace[1] > utcnow():
                row = self.store.key_by_id(grace[0])
                deadline = epoch(grace[1])
        if row is None:
            # Tagged so that creating a key (which may have this very value) drops it.
            self.negative_cache.set(cache_key, True, self.negative_ttl, ("negative",),
                                    generation=negative_generation)
            raise Unauthenticated(reason="unknown_key")
        principal = key_principal(row)
        expires = row.key.expires
        if expires is not None:
            deadline = min(deadline, epoch(expires))
        entry = _new(CachedKey, (principal, deadline, _denial(row)))
        self.cache.set(cache_key, entry, self.ttl, key_tags(principal), generation=generation)
        return entry
