"""Who is calling: :class:`Role` and the immutable :class:`Principal` every method produces."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any, NamedTuple

from flask import g
from werkzeug.local import LocalProxy

from .store.records import KeyRecord, MembershipRecord, TeamRecord, UserRecord


class Role(str, Enum):
    """LiteLLM's global roles. Enum names are the upper-case forms of the values."""

    PROXY_ADMIN = "proxy_admin"
    PROXY_ADMIN_VIEWER = "proxy_admin_viewer"
    ORG_ADMIN = "org_admin"
    INTERNAL_USER = "internal_user"
    INTERNAL_USER_VIEWER = "internal_user_viewer"
    TEAM = "team"
    CUSTOMER = "customer"

    @classmethod
    def parse(cls, value: object) -> Role:
        """Accept a :class:`Role`, its value (``proxy_admin``) or its name (``PROXY_ADMIN``)."""
        if isinstance(value, Role):
            return value
        if isinstance(value, str):
            text = value.strip().lower()
            for role in cls:
                if role.value == text:
                    return role
        raise ValueError(
            f"unknown role {str(value)[:40]!r}; expected one of "
            + ", ".join(r.value for r in cls)
        )

    def __str__(self) -> str:
        return self.value


#: ``Role.PROXY_ADMIN`` as a module global: reading an enum member off its class goes
#: through the enum metaclass (~0.2 µs), a global is a dict lookup.
_PROXY_ADMIN = Role.PROXY_ADMIN

#: Roles a user row may hold (``/user/new``); ``team`` and ``customer`` are never stored.
USER_ROLES = (
    Role.PROXY_ADMIN, Role.PROXY_ADMIN_VIEWER, Role.ORG_ADMIN,
    Role.INTERNAL_USER, Role.INTERNAL_USER_VIEWER,
)

#: How much a role may do, for "does this role outrank that one" (a key of a user carries
#: that user's role, capped by the key's ``max_role``).
ROLE_RANK = {Role.PROXY_ADMIN: 4, Role.PROXY_ADMIN_VIEWER: 3, Role.ORG_ADMIN: 2,
             Role.INTERNAL_USER: 1, Role.INTERNAL_USER_VIEWER: 0, Role.TEAM: 0,
             Role.CUSTOMER: 0}


def outranks(role: Role, other: Role) -> bool:
    """Whether ``role`` may do more than ``other``."""
    return ROLE_RANK[role] > ROLE_RANK[other]


def role_cap(role: Role) -> Role | None:
    """The most a key minted by a non-owner of ``role`` may ever act as (``None``: no cap,
    the minter is a proxy admin); a role no user row holds caps at ``internal_user_viewer``."""
    if role is Role.PROXY_ADMIN:
        return None
    return role if role in USER_ROLES else Role.INTERNAL_USER_VIEWER


#: The default of a principal's mapping fields: empty and read-only.
_EMPTY: Mapping[str, Any] = MappingProxyType({})

#: What ``repr(principal)`` shows besides the method and role, when set: who it is, never
#: the records, claims, metadata or e-mail address (a host may log it in any line).
_REPR_FIELDS = ("user_id", "team_id", "org_id", "end_user_id", "key_id", "key_name",
                "key_alias")


class Principal(NamedTuple):
    """The authenticated caller of one request.

    Every authenticator returns this type, so authorization, limits and budgets never
    depend on how the caller authenticated. The records are snapshots of the caller's key,
    team, user and team membership (``None`` when the caller has none).

    Immutable; build one by keyword and derive another with :meth:`replace`. A named tuple
    rather than a frozen dataclass because a cold key lookup builds one per request and a
    named tuple is built several times faster.
    """

    method: str
    role: Role
    user_id: str | None = None
    user_email: str | None = None
    team_id: str | None = None
    org_id: str | None = None
    end_user_id: str | None = None
    key_id: str | None = None
    #: Printable key name (``sk-...abcd``, or the master-key alias); never the secret.
    key_name: str | None = None
    key_alias: str | None = None
    scopes: frozenset[str] = frozenset()
    #: Routes this credential is limited to (route paths, wildcards or group names).
    allowed_routes: tuple[str, ...] = ()
    #: Models this credential is limited to, for methods without a key row (proxy headers,
    #: custom auth): same syntax as a key's ``models``; empty means no extra restriction.
    models: tuple[str, ...] = ()
    key: KeyRecord | None = None
    team: TeamRecord | None = None
    user: UserRecord | None = None
    membership: MembershipRecord | None = None
    claims: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] = _EMPTY
    #: Budget and rate-limit values asserted by the authenticating method itself (a custom
    #: auth hook, or proxy headers with the privilege opt-in): ``max_budget``/``soft_budget``
    #: (integer units, see :mod:`flask_llmauth.money`), ``tpm_limit``, ``rpm_limit``,
    #: ``max_parallel_requests`` (ints) and ``budget_duration`` (text). Empty for keys.
    limits: Mapping[str, Any] = _EMPTY

    @property
    def is_admin(self) -> bool:
        return self.role is _PROXY_ADMIN

    @property
    def is_master_key(self) -> bool:
        return self.method == "master_key"

    @property
    def identity(self) -> str:
        """A non-secret label for logs, audit rows and spend rows."""
        return self.user_id or self.team_id or self.key_name or self.method

    @property
    def identity_kind(self) -> str:
        """What :attr:`identity` names: ``user``, ``team``, ``key`` or ``method`` (a user id
        and a team id may be the same string; this tells them apart)."""
        if self.user_id:
            return "user"
        if self.team_id:
            return "team"
        return "key" if self.key_name else "method"

    def __repr__(self) -> str:
        """``Principal(method=..., role=..., user_id=..., ...)``: the identity fields that
        are set (a signal receiver's log line should not carry whole records or claims)."""
        fields = [f"method={self.method!r}", f"role={str(self.role)!r}"]
        fields += [f"{name}={value!r}" for name in _REPR_FIELDS
                   if (value := getattr(self, name)) is not None]
        return f"Principal({', '.join(fields)})"

    def replace(self, **changes: Any) -> Principal:
        """A copy with ``changes`` applied (what ``dataclasses.replace`` does)."""
        return self._replace(**changes)

    def with_end_user(self, end_user_id: str | None) -> Principal:
        return self._replace(end_user_id=end_user_id)


def get_principal() -> Principal | None:
    """The principal of the current request, or ``None`` (public route, no request, no
    app context at all: a thread of your own)."""
    try:
        return g.get("_llmauth_principal")
    except RuntimeError:  # outside an app context: Flask's "working outside" error
        return None


#: Proxy to :func:`get_principal` (falsy on public routes and outside requests).
current_principal: Principal = LocalProxy(get_principal)  # type: ignore[assignment]

