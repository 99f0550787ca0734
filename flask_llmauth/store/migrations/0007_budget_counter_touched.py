"""Budget counters: ``touched_at``, when a request last read or reserved on the row (a lease
transaction, a soft budget's read, the row's creation). The counter sweep of
``flask llmauth reset-budgets`` and the reset scheduler deletes rows that hold nothing and
were not touched for ``LLMAUTH_BUDGET_RESERVATION_TTL``. NULL (rows written before this
migration): not touched since.

This file freezes the schema as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

from typing import Any

import peewee as pw

TABLE = "llmauth_budget_counter"


def up(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(migrator.add_column(TABLE, "touched_at", pw.DateTimeField(null=True)))


def down(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(migrator.drop_column(TABLE, "touched_at"))
