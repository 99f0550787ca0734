"""Spend ledger: one row per LLM request, keyed by a unique request id.

This file freezes the table as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

import peewee as pw


def _models(db: pw.Database) -> list[type[pw.Model]]:
    class SpendLog(pw.Model):
        id = pw.BigAutoField()
        request_id = pw.CharField(max_length=64, unique=True)
        created_at = pw.DateTimeField(index=True)
        started_at = pw.DateTimeField()
        key_id = pw.CharField(max_length=255, null=True, index=True)
        user_id = pw.CharField(max_length=255, null=True, index=True)
        team_id = pw.CharField(max_length=255, null=True, index=True)
        organization_id = pw.CharField(max_length=255, null=True)
        end_user_id = pw.CharField(max_length=255, null=True, index=True)
        model = pw.CharField(max_length=255, null=True, index=True)
        route = pw.CharField(max_length=255)
        auth_method = pw.CharField(max_length=32)
        prompt_tokens = pw.IntegerField(default=0)
        completion_tokens = pw.IntegerField(default=0)
        spend = pw.BigIntegerField(default=0)
        estimated = pw.BooleanField(default=False)
        status = pw.CharField(max_length=16)

        class Meta:
            database = db
            table_name = "llmauth_spend_log"

    return [SpendLog]


def up(migrator: object, db: pw.Database) -> None:
    db.create_tables(_models(db))


def down(migrator: object, db: pw.Database) -> None:
    db.drop_tables(_models(db))
