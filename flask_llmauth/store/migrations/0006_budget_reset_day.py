"""Budget windows: ``budget_reset_day``, the day of the month a schedule of month windows
(``1mo``) ends on. ``budget_reset_at`` alone loses it when a shorter month clamps a reset
(a window set on a 31st ends on Feb 28): the schedule then moved to the 28th for good.
NULL (rows written before this migration, and windows not counted in months): the day of
``budget_reset_at``.

This file freezes the schema as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

from typing import Any

import peewee as pw

TABLES = ("llmauth_key", "llmauth_user", "llmauth_team", "llmauth_team_membership",
          "llmauth_customer", "llmauth_budget_counter")


def up(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(*[migrator.add_column(table, "budget_reset_day",
                                           pw.SmallIntegerField(null=True))
                       for table in TABLES])


def down(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(*[migrator.drop_column(table, "budget_reset_day") for table in TABLES])
