"""Virtual keys (``sk-...``): keyed digest → in-process cache → one prebuilt SQL lookup.

On a cache hit the cost is one HMAC, one dict lookup and one clock read: no database, no
network. Unknown, deleted, rotated-out and expired keys all get the same 401 body; the
reason goes to the log only. A rotated key's old secret keeps working until its grace
period ends, as the same key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import NamedTuple

from ..cache import TTLCache
from ..crypto import KEY_PREFIX, KeyDigester
from ..durations import utcnow
from ..errors import Unauthenticated
from ..principal import Principal, Role
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
    tags = [f"key:{principal.key_id}"]
    if principal.team_id:
        tags.append(f"team:{principal.team_id}")
    if principal.user_id:
        tags.append(f"user:{principal.user_id}")
    return tuple(tags)


_ROLE_OF_VALUE: dict[object, Role] = {role.value: role for role in Role}


def stored_role(value: str | None) -> Role:
    """A role string from the database; unknown strings count as ``internal_user``."""
    role = _ROLE_OF_VALUE.get(value)  # the stored form, without Role.parse's loop
    if role is not None:
        return role
    try:
        return Role.parse(value)
    except ValueError:
        return Role.INTERNAL_USER


def key_principal(row: KeyRow) -> Principal:
    """The principal a key stands for, built once per cache fill."""
    key, user, team = row.key, row.user, row.team
    if user is not None:
        role = stored_role(user.user_role)
    elif key.user_id:
        role = Role.INTERNAL_USER
    elif key.team_id:
        role = Role.TEAM
    else:
        role = Role.INTERNAL_USER_VIEWER
    return Principal(
        method="virtual_key",
        role=role,
        user_id=key.user_id,
        user_email=user.user_email if user else None,
        team_id=key.team_id,
        org_id=key.organization_id or (team.organization_id if team else None),
        key_id=key.key_id,
        key_name=key.key_name,
        key_alias=key.key_alias,
        allowed_routes=tuple(key.allowed_routes or ()),
        key=key,
        team=team,
        user=user,
        membership=row.membership,
        metadata=key.metadata or {},
    )


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

    def __init__(
        self,
        store: Store,
        digester: KeyDigester,
        cache: TTLCache[CachedKey],
        negative_cache: TTLCache[bool],
        *,
        ttl: float,
        negative_ttl: float,
        touch: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.digester = digester
        self.cache = cache
        self.negative_cache = negative_cache
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.touch = touch
        self.clock = clock

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        token = ctx.credentials.token
        if token is None:
            return None
        if not token.startswith(KEY_PREFIX):
            raise Unauthenticated(reason="not_a_virtual_key")
        digest = self.digester.digest(token)
        entry = self.cache.get(digest)
        if entry is None:
            entry = self.load(digest)
        if entry.deadline <= self.clock():
            raise Unauthenticated(reason="expired_or_rotated_key")
        if entry.denial is not None:
            raise Unauthenticated(entry.denial[0], reason=entry.denial[1])
        self.touch(entry.principal.key_id)  # type: ignore[arg-type]
        return entry.principal

    def load(self, digest: str) -> CachedKey:
        """The cold path: look the digest up (also among rotated-out secrets) and cache it."""
        if self.negative_cache.get(digest):
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
            self.negative_cache.set(digest, True, self.negative_ttl, ("negative",),
                                    generation=negative_generation)
            raise Unauthenticated(reason="unknown_key")
        principal = key_principal(row)
        entry = CachedKey(principal, min(deadline, epoch(row.key.expires)), _denial(row))
        self.cache.set(digest, entry, self.ttl, key_tags(principal), generation=generation)
        return entry
