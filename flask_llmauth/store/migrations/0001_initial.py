"""Initial schema: keys, grace secrets, deleted keys, users, teams, memberships, audit, cache log.

This file freezes the schema as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

from typing import Any

import peewee as pw


def _models(db: pw.Database) -> list[type[pw.Model]]:
    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    def money(**kw: Any) -> pw.BigIntegerField:
        return pw.BigIntegerField(**kw)

    class Key(Base):
        key_id = pw.CharField(max_length=64, unique=True)
        digest = pw.CharField(max_length=64, unique=True)
        key_name = pw.CharField(max_length=32)
        key_alias = pw.CharField(max_length=255, null=True, unique=True)
        user_id = pw.CharField(max_length=255, null=True, index=True)
        team_id = pw.CharField(max_length=255, null=True, index=True)
        organization_id = pw.CharField(max_length=255, null=True)
        models = pw.TextField(default="[]")
        aliases = pw.TextField(default="{}")
        allowed_routes = pw.TextField(default="[]")
        key_type = pw.CharField(max_length=32, default="default")
        allowed_ips = pw.TextField(null=True)
        max_budget = money(null=True)
        soft_budget = money(null=True)
        budget_duration = pw.CharField(max_length=16, null=True)
        budget_reset_at = pw.DateTimeField(null=True)
        spend = money(default=0)
        tpm_limit = pw.BigIntegerField(null=True)
        rpm_limit = pw.BigIntegerField(null=True)
        max_parallel_requests = pw.IntegerField(null=True)
        model_rpm_limit = pw.TextField(default="{}")
        model_tpm_limit = pw.TextField(default="{}")
        model_max_budget = pw.TextField(default="{}")
        metadata = pw.TextField(default="{}")
        expires = pw.DateTimeField(null=True)
        blocked = pw.BooleanField(default=False)
        created_by = pw.CharField(max_length=255, null=True)
        updated_by = pw.CharField(max_length=255, null=True)
        created_at = pw.DateTimeField()
        updated_at = pw.DateTimeField()
        last_used_at = pw.DateTimeField(null=True)
        rotation_count = pw.IntegerField(default=0)
        last_rotation_at = pw.DateTimeField(null=True)

        class Meta:
            table_name = "llmauth_key"

    class KeyGrace(Base):
        digest = pw.CharField(max_length=64, unique=True)
        key_id = pw.CharField(max_length=64, index=True)
        revoke_at = pw.DateTimeField()

        class Meta:
            table_name = "llmauth_key_grace"

    class DeletedKey(Base):
        key_id = pw.CharField(max_length=64, index=True)
        key_name = pw.CharField(max_length=32)
        key_alias = pw.CharField(max_length=255, null=True)
        user_id = pw.CharField(max_length=255, null=True, index=True)
        team_id = pw.CharField(max_length=255, null=True, index=True)
        spend = money(default=0)
        snapshot = pw.TextField(default="{}")
        created_at = pw.DateTimeField(null=True)
        deleted_at = pw.DateTimeField()
        deleted_by = pw.CharField(max_length=255, null=True)

        class Meta:
            table_name = "llmauth_deleted_key"

    class User(Base):
        user_id = pw.CharField(max_length=255, unique=True)
        user_email = pw.CharField(max_length=320, null=True, index=True)
        user_alias = pw.CharField(max_length=255, null=True)
        user_role = pw.CharField(max_length=32, default="internal_user")
        models = pw.TextField(default="[]")
        max_budget = money(null=True)
        soft_budget = money(null=True)
        spend = money(default=0)
        budget_duration = pw.CharField(max_length=16, null=True)
        budget_reset_at = pw.DateTimeField(null=True)
        tpm_limit = pw.BigIntegerField(null=True)
        rpm_limit = pw.BigIntegerField(null=True)
        max_parallel_requests = pw.IntegerField(null=True)
        model_max_budget = pw.TextField(default="{}")
        metadata = pw.TextField(default="{}")
        blocked = pw.BooleanField(default=False)
        sso_user_id = pw.CharField(max_length=255, null=True, index=True)
        created_at = pw.DateTimeField()
        updated_at = pw.DateTimeField()

        class Meta:
            table_name = "llmauth_user"

    class Team(Base):
        team_id = pw.CharField(max_length=255, unique=True)
        team_alias = pw.CharField(max_length=255, null=True, index=True)
        organization_id = pw.CharField(max_length=255, null=True)
        models = pw.TextField(default="[]")
        model_aliases = pw.TextField(default="{}")
        max_budget = money(null=True)
        soft_budget = money(null=True)
        spend = money(default=0)
        budget_duration = pw.CharField(max_length=16, null=True)
        budget_reset_at = pw.DateTimeField(null=True)
        tpm_limit = pw.BigIntegerField(null=True)
        rpm_limit = pw.BigIntegerField(null=True)
        max_parallel_requests = pw.IntegerField(null=True)
        model_rpm_limit = pw.TextField(default="{}")
        model_tpm_limit = pw.TextField(default="{}")
        team_member_permissions = pw.TextField(null=True)
        team_member_budget = money(null=True)
        team_member_budget_duration = pw.CharField(max_length=16, null=True)
        team_member_rpm_limit = pw.BigIntegerField(null=True)
        team_member_tpm_limit = pw.BigIntegerField(null=True)
        metadata = pw.TextField(default="{}")
        blocked = pw.BooleanField(default=False)
        created_by = pw.CharField(max_length=255, null=True)
        created_at = pw.DateTimeField()
        updated_at = pw.DateTimeField()

        class Meta:
            table_name = "llmauth_team"

    class TeamMembership(Base):
        team_id = pw.CharField(max_length=255, index=True)
        user_id = pw.CharField(max_length=255, index=True)
        role = pw.CharField(max_length=16, default="user")
        max_budget = money(null=True)
        spend = money(default=0)
        budget_duration = pw.CharField(max_length=16, null=True)
        budget_reset_at = pw.DateTimeField(null=True)
        tpm_limit = pw.BigIntegerField(null=True)
        rpm_limit = pw.BigIntegerField(null=True)
        allowed_models = pw.TextField(default="[]")
        created_at = pw.DateTimeField()

        class Meta:
            table_name = "llmauth_team_membership"
            indexes = ((("team_id", "user_id"), True),)

    class AuditLog(Base):
        id = pw.BigAutoField()
        created_at = pw.DateTimeField(index=True)
        actor = pw.CharField(max_length=255)
        actor_method = pw.CharField(max_length=32)
        action = pw.CharField(max_length=64)
        object_type = pw.CharField(max_length=32)
        object_id = pw.CharField(max_length=255, index=True)
        before = pw.TextField(null=True)
        after = pw.TextField(null=True)

        class Meta:
            table_name = "llmauth_audit_log"

    class CacheEvent(Base):
        id = pw.BigAutoField()
        tag = pw.CharField(max_length=320)
        created_at = pw.DateTimeField(index=True)

        class Meta:
            table_name = "llmauth_cache_event"

    return [Key, KeyGrace, DeletedKey, User, Team, TeamMembership, AuditLog, CacheEvent]


def up(migrator: object, db: pw.Database) -> None:
    db.create_tables(_models(db))


def down(migrator: object, db: pw.Database) -> None:
    db.drop_tables(_models(db))
