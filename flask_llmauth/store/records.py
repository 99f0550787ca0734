"""Immutable snapshots of rows, shared by the cache, the principal and authorization.

A record mirrors its table column for column, so nothing that reads a cached record can
change the row (or another request's view of it) by accident.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

R = TypeVar("R")


def from_values(record_type: type[R], values: Mapping[str, Any]) -> R:
    """Build a record from a column->value mapping, ignoring columns the record lacks."""
    names = _FIELD_NAMES.get(record_type)
    if names is None:
        names = _FIELD_NAMES[record_type] = tuple(f.name for f in dataclasses.fields(record_type))
    return record_type(**{name: values[name] for name in names if name in values})


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    key_id: str
    key_name: str
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    organization_id: str | None = None
    models: list[str] = dataclasses.field(default_factory=list)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    allowed_routes: list[str] = dataclasses.field(default_factory=list)
    key_type: str = "default"
    allowed_ips: list[str] | None = None
    max_budget: int | None = None
    soft_budget: int | None = None
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_rpm_limit: dict[str, int] = dataclasses.field(default_factory=dict)
    model_tpm_limit: dict[str, int] = dataclasses.field(default_factory=dict)
    model_max_budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    expires: datetime | None = None
    blocked: bool = False
    created_by: str | None = None
    updated_by: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    last_used_at: datetime | None = None
    rotation_count: int = 0
    last_rotation_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    user_id: str
    user_email: str | None = None
    user_alias: str | None = None
    user_role: str = "internal_user"
    models: list[str] = dataclasses.field(default_factory=list)
    max_budget: int | None = None
    soft_budget: int | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    blocked: bool = False
    sso_user_id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class TeamRecord:
    id: int
    team_id: str
    team_alias: str | None = None
    organization_id: str | None = None
    models: list[str] = dataclasses.field(default_factory=list)
    model_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    max_budget: int | None = None
    soft_budget: int | None = None
    spend: int = 0
    reserved: int = 0
    soft_alerted: bool = False
    budget_duration: str | None = None
    budget_reset_at: datetime | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_rpm_limit: dict[str, int] = dataclasses.field(default_factory=dict)
    model_tpm_limit: dict[str, int] = dataclasses.field(default_factory=dict)
    team_member_permissions: list[str] | None = None
    team_member_budget: int | None = None
    team_member_budget_duration: str | None = None
    team_member_rpm_limit: int | None = None
    team_member_tpm_limit: int | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    blocked: bool = False
    created_by: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class MembershipRecord:
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
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    allowed_models: list[str] = dataclasses.field(default_factory=list)
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CustomerRecord:
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
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    allowed_model_region: str | None = None
    default_model: str | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None
