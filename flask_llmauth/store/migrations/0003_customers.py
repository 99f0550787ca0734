"""Customers (end users): ``llmauth_customer``.

Only adds its own table, so it applies in any order with the other issue-4 migrations.
"""

from __future__ import annotations

import peewee as pw


def _models(db: pw.Database) -> list[type[pw.Model]]:
    class Customer(pw.Model):
        user_id = pw.CharField(max_length=255, unique=True)
        alias = pw.CharField(max_length=255, null=True)  # type: ignore[assignment]
        blocked = pw.BooleanField(default=False)
        max_budget = pw.BigIntegerField(null=True)
        soft_budget = pw.BigIntegerField(null=True)
        spend = pw.BigIntegerField(default=0)
        budget_duration = pw.CharField(max_length=16, null=True)
        budget_reset_at = pw.DateTimeField(null=True)
        tpm_limit = pw.BigIntegerField(null=True)
        rpm_limit = pw.BigIntegerField(null=True)
        max_parallel_requests = pw.IntegerField(null=True)
        allowed_model_region = pw.CharField(max_length=8, null=True)
        default_model = pw.CharField(max_length=255, null=True)
        metadata = pw.TextField(default="{}")
        created_at = pw.DateTimeField()
        updated_at = pw.DateTimeField()

        class Meta:
            database = db
            legacy_table_names = False
            table_name = "llmauth_customer"

    return [Customer]


def up(migrator: object, db: pw.Database) -> None:
    db.create_tables(_models(db))


def down(migrator: object, db: pw.Database) -> None:
    db.drop_tables(_models(db))
