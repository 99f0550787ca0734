"""Budgets: in-flight reservations and the soft-budget mark on the budgeted rows, window
counters for budgets that have no row of their own (global, per model per key, end user),
and the reservations of requests in flight.

This file freezes the schema as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

from typing import Any

import peewee as pw

#: Tables that gain ``reserved`` (units in flight) and ``soft_alerted`` (soft budget crossed
#: in the current window).
BUDGETED = ("llmauth_key", "llmauth_user", "llmauth_team", "llmauth_team_membership")


def _models(db: pw.Database) -> list[type[pw.Model]]:
    class Base(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class BudgetCounter(Base):
        scope = pw.CharField(max_length=16)
        entity_id = pw.CharField(max_length=255)
        model = pw.CharField(max_length=255, default="")
        spend = pw.BigIntegerField(default=0)
        reserved = pw.BigIntegerField(default=0)
        budget_duration = pw.CharField(max_length=16, null=True)
        budget_reset_at = pw.DateTimeField(null=True)
        soft_alerted = pw.BooleanField(default=False)

        class Meta:
            table_name = "llmauth_budget_counter"
            indexes = ((("scope", "entity_id", "model"), True),)

    class BudgetReservation(Base):
        id = pw.BigAutoField()
        request_id = pw.CharField(max_length=64, unique=True)
        parts = pw.TextField()
        created_at = pw.DateTimeField()
        expires_at = pw.DateTimeField(index=True)

        class Meta:
            table_name = "llmauth_budget_reservation"

    return [BudgetCounter, BudgetReservation]


def up(migrator: Any, db: pw.Database) -> None:
    operations = []
    for table in BUDGETED:
        operations.append(migrator.add_column(table, "reserved", pw.BigIntegerField(default=0)))
        operations.append(migrator.add_column(table, "soft_alerted",
                                              pw.BooleanField(default=False)))
    migrator.migrate(*operations)
    db.create_tables(_models(db))


def down(migrator: Any, db: pw.Database) -> None:
    db.drop_tables(_models(db))
    operations = []
    for table in BUDGETED:
        operations.append(migrator.drop_column(table, "soft_alerted"))
        operations.append(migrator.drop_column(table, "reserved"))
    migrator.migrate(*operations)
