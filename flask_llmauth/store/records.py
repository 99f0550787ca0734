"""Immutable snapshots of rows, shared by the cache, the principal and authorization.

A record mirrors its table column for column, so nothing that reads a cached record can
change the row (or another request's view of it) by accident. Records are named tuples:
the cold key lookup builds one from a row's values in a single C call
(``tuple.__new__(KeyRecord, values)``), where a frozen dataclass's ``__init__`` makes one
``object.__setattr__`` call per field (~50,000 instructions for a key's 35 fields).

A JSON array column (``models``, ``allowed_routes``, ...) is held as a tuple, not a list:
immutable like the record, and not one more object for the cyclic garbage collector to
traverse in every collection it lives through (a list is always tracked; a tuple of
strings is untracked at its first collection, and so is a dict of atomic values). The
record itself, an instance of a tuple subclass, stays tracked. Built by keyword, each
record gets its own empty dict defaults, as with a dataclass's ``default_factory``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

R = TypeVar("R")
T = TypeVar("T", bound="type[NamedTuple]")


class _Factory(tuple[type, ...]):
    """Marks a field default that each record gets a fresh copy of (an empty dict)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<new {self[0].__name__}>"


_NEW_DICT: Any = _Factory((dict,))


def _record(cls: T) -> T:
    """Give a record class's keyword construction fresh list/dict defaults."""
    factories = tuple((index, name, value[0])
                      for index, (name, value) in enumerate(
                          (n, cls._field_defaults.get(n)) for n in cls._fields)
                      if isinstance(value, _Factory))
    build: Callable[..., Any] = cls.__new__

    def __new__(_cls: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807 - the constructor
        for index, name, factory in factories:
            if index >= len(args) and name not in kwargs:
                kwargs[name] = factory()
        return build(_cls, *args, **kwargs)

    __new__.__doc__ = build.__doc__
    cls.__new__ = staticmethod(__new__)  # type: ignore[method-assign]
    return cls


def from_values(record_type: type[R], values: Mapping[str, Any]) -> R:
    """Build a record from a column->value mapping, ignoring columns the record lacks (a
    list value, a JSON array column, is held as a tuple)."""
    names: tuple[str, ...] = record_type._fields  # type: ignore[attr-defined]
    return record_type(**{name: tuple(value) if type(value) is list else value
                          for name in names if name in values
                          for value in (values[name],)})


@_record
class KeyRecord(NamedTuple):
    id: int
    key_id: str
    key_name: str
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    organization_id: str | None = None
    models: tuple[str, ...] = ()
    aliases: dict[str, str] = _NEW_DICT
    allowed_routes: tuple[str, ...] = ()
    key_type: str = "default"
    allowed_ips: tuple[str, ...] | None = None
    max_budget: int | None = None
    soft_budget: int | None = None
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    budget_reset_day: int | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_rpm_limit: dict[str, int] = _NEW_DICT
    model_tpm_limit: dict[str, int] = _NEW_DICT
    model_max_budget: dict[str, Any] = _NEW_DICT
    metadata: dict[str, Any] = _NEW_DICT
    expires: datetime | None = None
    blocked: bool = False
    created_by: str | None = None
    updated_by: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_used_at: datetime | None = None
    rotation_count: int = 0
    last_rotation_at: datetime | None = None
    max_role: str | None = None


@_record
class UserRecord(NamedTuple):
    id: int
    user_id: str
    user_email: str | None = None
    user_alias: str | None = None
    user_role: str = "internal_user"
    models: tuple[str, ...] = ()
    max_budget: int | None = None
    soft_budget: int | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    budget_reset_day: int | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, Any] = _NEW_DICT
    metadata: dict[str, Any] = _NEW_DICT
    blocked: bool = False
    sso_user_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@_record
class TeamRecord(NamedTuple):
    id: int
    team_id: str
    team_alias: str | None = None
    organization_id: str | None = None
    models: tuple[str, ...] = ()
    model_aliases: dict[str, str] = _NEW_DICT
    max_budget: int | None = None
    soft_budget: int | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    budget_reset_day: int | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_rpm_limit: dict[str, int] = _NEW_DICT
    model_tpm_limit: dict[str, int] = _NEW_DICT
    team_member_permissions: tuple[str, ...] | None = None
    team_member_budget: int | None = None
    team_member_budget_duration: str | None = None
    team_member_rpm_limit: int | None = None
    team_member_tpm_limit: int | None = None
    metadata: dict[str, Any] = _NEW_DICT
    blocked: bool = False
    created_by: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@_record
class MembershipRecord(NamedTuple):
    id: int
    team_id: str
    user_id: str
    role: str = "user"
    max_budget: int | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    budget_reset_day: int | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    allowed_models: tuple[str, ...] = ()
    created_at: datetime | None = None


@_record
class CustomerRecord(NamedTuple):
    """An end user's row (``llmauth_customer``), as the guards see it."""

    id: int
    user_id: str
    alias: str | None = None
    blocked: bool = False
    max_budget: int | None = None
    soft_budget: int | None = None
    spend: int = 0
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    budget_reset_day: int | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    allowed_model_region: str | None = None
    default_model: str | None = None
    metadata: dict[str, Any] = _NEW_DICT
    created_at: datetime | None = None
    updated_at: datetime | None = None
