"""Principal fields that come from outside a key row: validation and the principal builder.

Custom auth hooks, proxy headers and OAuth2 responses all name a caller with the same
fields. Values are checked strictly here (one place), and :func:`build_principal` turns
them into a :class:`~flask_llmauth.principal.Principal` through the identity loader, so the
caller's user, team and membership records (blocked flags, models, budgets) apply exactly as
they do for a virtual key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..durations import parse_duration
from ..identities import IdentityLoader
from ..money import to_units
from ..principal import Principal, Role
from ..store.records import UserRecord

#: Fields that say who the caller is.
IDENTITY_FIELDS = ("user_id", "user_email", "team_id", "team_alias", "org_id", "end_user_id")
#: Fields that raise or lower what the caller may spend or send.
LIMIT_FIELDS = ("max_budget", "soft_budget", "budget_duration", "tpm_limit", "rpm_limit",
                "max_parallel_requests")
MONEY_FIELDS = frozenset({"max_budget", "soft_budget"})
MAX_IDENTITY_LENGTH = 255
MAX_LIST_ITEMS = 256

_DECIMAL = re.compile(r"^[0-9]{1,12}(?:\.[0-9]{1,9})?$")
_INTEGER = re.compile(r"^[0-9]{1,15}$")


def identity_value(value: object) -> str:
    """A user/team/org id or email: a non-empty printable string without commas (a comma
    is how a server merges two copies of one header), at most 255 characters."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    text = value.strip()
    if not text or len(text) > MAX_IDENTITY_LENGTH:
        raise ValueError(f"must be 1 to {MAX_IDENTITY_LENGTH} characters")
    if not text.isprintable() or "," in text:
        raise ValueError("contains a control character or a comma")
    return text


def string_list(value: object, *, split: bool) -> tuple[str, ...]:
    """A list of names (models, routes, scopes). With ``split``, a string is a comma list."""
    if isinstance(value, str) and split:
        items = [part.strip() for part in value.split(",")]
        if any(not item for item in items):
            raise ValueError("has an empty entry")
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError("must be a list of strings")
    if len(items) > MAX_LIST_ITEMS:
        raise ValueError("has too many entries")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > 512 or not item.isprintable():
            raise ValueError("must hold non-empty printable strings")
    return tuple(items)


def limit_value(name: str, value: object, *, from_text: bool) -> Any:
    """A budget or limit. ``from_text`` (headers): only plain decimal digits are accepted,
    no sign, exponent, ``nan`` or ``inf``. Money becomes integer units."""
    if name == "budget_duration":
        return parse_duration(value).text
    if from_text:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        text = value.strip()
        pattern = _DECIMAL if name in MONEY_FIELDS else _INTEGER
        if not pattern.match(text):
            raise ValueError("must be a non-negative number")
        value = text
    if name in MONEY_FIELDS:
        return to_units(value)
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, str):
        if not _INTEGER.match(value):
            raise ValueError("must be a non-negative integer")
        value = int(value)
    if not isinstance(value, int) or value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def default_role(user: UserRecord | None, user_id: str | None, team_id: str | None) -> Role:
    """The role of a caller whose credential names none, derived as for a virtual key: the
    stored user's role, else ``internal_user`` for a user, ``team`` for a team alone."""
    if user is not None:
        try:
            return Role.parse(user.user_role)
        except ValueError:
            return Role.INTERNAL_USER
    if user_id:
        return Role.INTERNAL_USER
    if team_id:
        return Role.TEAM
    return Role.INTERNAL_USER_VIEWER


def build_principal(
    identities: IdentityLoader,
    method: str,
    *,
    role: Role | None = None,
    user_id: str | None = None,
    user_email: str | None = None,
    team_id: str | None = None,
    org_id: str | None = None,
    end_user_id: str | None = None,
    models: Iterable[str] = (),
    allowed_routes: Iterable[str] = (),
    scopes: Iterable[str] = (),
    limits: Mapping[str, Any] | None = None,
    claims: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Principal:
    """A principal with its records (a blocked user or team is a 401, raised by the loader)."""
    if role is None:
        user = identities.load(user_id, team_id)[0]
        role = default_role(user, user_id, team_id)
    principal = identities.principal(
        method, role, user_id=user_id, team_id=team_id, user_email=user_email, org_id=org_id,
        end_user_id=end_user_id, scopes=frozenset(scopes), allowed_routes=tuple(allowed_routes),
        claims=claims, metadata=metadata,
    )
    models = tuple(models)
    if models or limits:
        principal = principal.replace(models=models, limits=dict(limits or {}))
    return principal
