"""Peewee models of the extension's tables (all named ``llmauth_*``).

Money columns hold integer nano-dollars (:mod:`flask_llmauth.money`); timestamps are naive
UTC. No column ever holds a raw key: ``digest`` is an HMAC-SHA256 of the key under a secret
derived from the server secret. Models use thread-safe metadata so each app binds its own
database (:class:`flask_llmauth.store.db.Store`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from peewee import (
    AutoField,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DateTimeField,
    IntegerField,
    Model,
    SmallIntegerField,
    TextField,
)
from playhouse.shortcuts import ThreadSafeDatabaseMetadata

from ..durations import utcnow


class JSONText(TextField):
    """JSON stored as text, so the same schema works on SQLite and Postgres."""

    def db_value(self, value: Any) -> str | None:
        return None if value is None else json.dumps(value, separators=(",", ":"), sort_keys=True)

    def python_value(self, value: Any) -> Any:
        return None if value is None else json.loads(value)


class Table(Model):
    if TYPE_CHECKING:
        #: The primary key Peewee adds to a table that declares none.
        id: AutoField[int]

    class Meta:
        model_metadata_class = ThreadSafeDatabaseMetadata
        legacy_table_names = False
        #: ``save()`` writes the fields that were set, never a stale copy of the counters
        #: (``spend``, ``reserved``) other transactions update in place.
        only_save_dirty = True


class Key(Table):
    key_id = CharField(max_length=64, unique=True)
    digest = CharField(max_length=64, unique=True)
    key_name = CharField(max_length=32)
    key_alias = CharField(max_length=255, null=True, unique=True)
    user_id = CharField(max_length=255, null=True, index=True)
    team_id = CharField(max_length=255, null=True, index=True)
    organization_id = CharField(max_length=255, null=True)
    models = JSONText(default=list)
    aliases = JSONText(default=dict)
    allowed_routes = JSONText(default=list)
    key_type = CharField(max_length=32, default="default")
    allowed_ips = JSONText(null=True)
    max_budget = BigIntegerField(null=True)
    soft_budget = BigIntegerField(null=True)
    budget_duration = CharField(max_length=16, null=True)
    budget_reset_at = DateTimeField(null=True)
    #: The day of the month a schedule of month windows ends on (NULL: budget_reset_at's).
    budget_reset_day = SmallIntegerField(null=True)
    spend = BigIntegerField(default=0)
    reserved = BigIntegerField(default=0)
    soft_alerted = BooleanField(default=False)
    tpm_limit = BigIntegerField(null=True)
    rpm_limit = BigIntegerField(null=True)
    max_parallel_requests = IntegerField(null=True)
    model_rpm_limit = JSONText(default=dict)
    model_tpm_limit = JSONText(default=dict)
    model_max_budget = JSONText(default=dict)
    metadata = JSONText(default=dict)
    expires = DateTimeField(null=True)
    blocked = BooleanField(default=False)
    created_by = CharField(max_length=255, null=True)
    #: What ``created_by`` names (``Principal.identity_kind``: ``user``, ``team``, ``key``,
    #: ``method``); ``None``: not known (a key made before this was recorded).
    created_by_kind = CharField(max_length=16, null=True)
    updated_by = CharField(max_length=255, null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)
    last_used_at = DateTimeField(null=True)
    rotation_count = IntegerField(default=0)
    last_rotation_at = DateTimeField(null=True)
    #: The most this key may act as, whatever its user's role becomes: the role of a
    #: non-admin who minted, regenerated or handed over its secret for another user
    #: (``None``: the user's role, uncapped). Never loosened.
    max_role = CharField(max_length=32, null=True)

    class Meta:
        table_name = "llmauth_key"


class KeyGrace(Table):
    """An old secret of a rotated key that keeps working until ``revoke_at``."""

    digest = CharField(max_length=64, unique=True)
    key_id = CharField(max_length=64, index=True)
    revoke_at = DateTimeField()

    class Meta:
        table_name = "llmauth_key_grace"


class DeletedKey(Table):
    """A deleted (revoked) key, kept for spend history and audit."""

    key_id = CharField(max_length=64, index=True)
    key_name = CharField(max_length=32)
    key_alias = CharField(max_length=255, null=True)
    user_id = CharField(max_length=255, null=True, index=True)
    team_id = CharField(max_length=255, null=True, index=True)
    spend = BigIntegerField(default=0)
    snapshot = JSONText(default=dict)
    created_at = DateTimeField(null=True)
    deleted_at = DateTimeField(default=utcnow)
    deleted_by = CharField(max_length=255, null=True)

    class Meta:
        table_name = "llmauth_deleted_key"


class User(Table):
    user_id = CharField(max_length=255, unique=True)
    user_email = CharField(max_length=320, null=True, index=True)
    user_alias = CharField(max_length=255, null=True)
    user_role = CharField(max_length=32, default="internal_user")
    models = JSONText(default=list)
    max_budget = BigIntegerField(null=True)
    soft_budget = BigIntegerField(null=True)
    spend = BigIntegerField(default=0)
    reserved = BigIntegerField(default=0)
    soft_alerted = BooleanField(default=False)
    budget_duration = CharField(max_length=16, null=True)
    budget_reset_at = DateTimeField(null=True)
    #: The day of the month a schedule of month windows ends on (NULL: budget_reset_at's).
    budget_reset_day = SmallIntegerField(null=True)
    tpm_limit = BigIntegerField(null=True)
    rpm_limit = BigIntegerField(null=True)
    max_parallel_requests = IntegerField(null=True)
    model_max_budget = JSONText(default=dict)
    metadata = JSONText(default=dict)
    blocked = BooleanField(default=False)
    sso_user_id = CharField(max_length=255, null=True, index=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "llmauth_user"


class Team(Table):
    team_id = CharField(max_length=255, unique=True)
    team_alias = CharField(max_length=255, null=True, index=True)
    organization_id = CharField(max_length=255, null=True)
    models = JSONText(default=list)
    model_aliases = JSONText(default=dict)
    max_budget = BigIntegerField(null=True)
    soft_budget = BigIntegerField(null=True)
    spend = BigIntegerField(default=0)
    reserved = BigIntegerField(default=0)
    soft_alerted = BooleanField(default=False)
    budget_duration = CharField(max_length=16, null=True)
    budget_reset_at = DateTimeField(null=True)
    #: The day of the month a schedule of month windows ends on (NULL: budget_reset_at's).
    budget_reset_day = SmallIntegerField(null=True)
    tpm_limit = BigIntegerField(null=True)
    rpm_limit = BigIntegerField(null=True)
    max_parallel_requests = IntegerField(null=True)
    model_rpm_limit = JSONText(default=dict)
    model_tpm_limit = JSONText(default=dict)
    team_member_permissions = JSONText(null=True)
    team_member_budget = BigIntegerField(null=True)
    team_member_budget_duration = CharField(max_length=16, null=True)
    team_member_rpm_limit = BigIntegerField(null=True)
    team_member_tpm_limit = BigIntegerField(null=True)
    metadata = JSONText(default=dict)
    blocked = BooleanField(default=False)
    created_by = CharField(max_length=255, null=True)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "llmauth_team"


class TeamMembership(Table):
    team_id = CharField(max_length=255, index=True)
    user_id = CharField(max_length=255, index=True)
    role = CharField(max_length=16, default="user")
    max_budget = BigIntegerField(null=True)
    spend = BigIntegerField(default=0)
    reserved = BigIntegerField(default=0)
    soft_alerted = BooleanField(default=False)
    budget_duration = CharField(max_length=16, null=True)
    budget_reset_at = DateTimeField(null=True)
    #: The day of the month a schedule of month windows ends on (NULL: budget_reset_at's).
    budget_reset_day = SmallIntegerField(null=True)
    tpm_limit = BigIntegerField(null=True)
    rpm_limit = BigIntegerField(null=True)
    allowed_models = JSONText(default=list)
    created_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "llmauth_team_membership"
        indexes = ((("team_id", "user_id"), True),)


class Customer(Table):
    """An end user (LiteLLM's customer): named by requests, never logs in."""

    user_id = CharField(max_length=255, unique=True)
    #: LiteLLM's name for the column; it hides ``Model.alias()``, which nothing here calls.
    alias = CharField(max_length=255, null=True)  # type: ignore[assignment]
    blocked = BooleanField(default=False)
    max_budget = BigIntegerField(null=True)
    soft_budget = BigIntegerField(null=True)
    spend = BigIntegerField(default=0)
    budget_duration = CharField(max_length=16, null=True)
    budget_reset_at = DateTimeField(null=True)
    #: The day of the month a schedule of month windows ends on (NULL: budget_reset_at's).
    budget_reset_day = SmallIntegerField(null=True)
    tpm_limit = BigIntegerField(null=True)
    rpm_limit = BigIntegerField(null=True)
    max_parallel_requests = IntegerField(null=True)
    allowed_model_region = CharField(max_length=8, null=True)
    default_model = CharField(max_length=255, null=True)
    metadata = JSONText(default=dict)
    created_at = DateTimeField(default=utcnow)
    updated_at = DateTimeField(default=utcnow)

    class Meta:
        table_name = "llmauth_customer"


class AuditLog(Table):
    id = BigAutoField()
    created_at = DateTimeField(default=utcnow, index=True)
    actor = CharField(max_length=255)
    actor_method = CharField(max_length=32)
    action = CharField(max_length=64)
    object_type = CharField(max_length=32)
    object_id = CharField(max_length=255, index=True)
    before = JSONText(null=True)
    after = JSONText(null=True)

    class Meta:
        table_name = "llmauth_audit_log"


class CacheEvent(Table):
    """Invalidation log: every process polls it and drops the cache entries it names."""

    id = BigAutoField()
    tag = CharField(max_length=320)
    created_at = DateTimeField(default=utcnow, index=True)

    class Meta:
        table_name = "llmauth_cache_event"


class SpendLog(Table):
    """One LLM request's usage and cost (written in batches by the spend ledger).

    ``request_id`` is unique, so a retried write never counts a request twice. ``spend`` is
    integer units; ``key_id`` names the key (never its secret).
    """

    id = BigAutoField()
    request_id = CharField(max_length=64, unique=True)
    created_at = DateTimeField(default=utcnow, index=True)
    started_at = DateTimeField()
    key_id = CharField(max_length=255, null=True, index=True)
    user_id = CharField(max_length=255, null=True, index=True)
    team_id = CharField(max_length=255, null=True, index=True)
    organization_id = CharField(max_length=255, null=True)
    end_user_id = CharField(max_length=255, null=True, index=True)
    model = CharField(max_length=255, null=True, index=True)
    route = CharField(max_length=255)
    auth_method = CharField(max_length=32)
    prompt_tokens = IntegerField(default=0)
    completion_tokens = IntegerField(default=0)
    spend = BigIntegerField(default=0)
    estimated = BooleanField(default=False)
    status = CharField(max_length=16)

    class Meta:
        table_name = "llmauth_spend_log"


class BudgetCounter(Table):
    """Window spend and in-flight reservations of a budget with no row of its own: the
    global budget (``scope="global"``), a key's per-model budget (``"key_model"``) and an
    end user's budget (``"end_user"``)."""

    scope = CharField(max_length=16)
    entity_id = CharField(max_length=255)
    model = CharField(max_length=255, default="")
    spend = BigIntegerField(default=0)
    reserved = BigIntegerField(default=0)
    budget_duration = CharField(max_length=16, null=True)
    budget_reset_at = DateTimeField(null=True)
    #: The day of the month a schedule of month windows ends on (NULL: budget_reset_at's).
    budget_reset_day = SmallIntegerField(null=True)
    soft_alerted = BooleanField(default=False)
    #: When a request last read or reserved on the row (the counter sweep deletes rows that
    #: hold nothing and were not touched for ``LLMAUTH_BUDGET_RESERVATION_TTL``).
    touched_at = DateTimeField(null=True)

    class Meta:
        table_name = "llmauth_budget_counter"
        indexes = ((("scope", "entity_id", "model"), True),)


class BudgetReservation(Table):
    """What one request in flight reserved (``parts``), released when its spend is written
    or, after a crash, when it expires."""

    id = BigAutoField()
    request_id = CharField(max_length=64, unique=True)
    parts = JSONText()
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)

    class Meta:
        table_name = "llmauth_budget_reservation"


ALL_TABLES: tuple[type[Table], ...] = (
    Key, KeyGrace, DeletedKey, User, Team, TeamMembership, AuditLog, CacheEvent, Customer,
    SpendLog, BudgetCounter, BudgetReservation,
)
