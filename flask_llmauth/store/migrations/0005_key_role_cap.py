"""Keys: ``max_role``, the most a key may act as whatever its user's role becomes (the role
of a non-admin who minted, regenerated or handed over the key's secret for another user).

Existing keys whose creator is another user with a row get that user's current role as
their cap unless it is ``proxy_admin`` (the role at mint time was not recorded before; a
creator without a user row, such as the master key, leaves the key uncapped).

This file freezes the schema as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

from typing import Any

import peewee as pw


def up(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(migrator.add_column("llmauth_key", "max_role",
                                         pw.CharField(max_length=32, null=True)))
    creator = 'FROM "llmauth_user" AS u WHERE u."user_id" = "llmauth_key"."created_by"'
    db.execute_sql(
        f'UPDATE "llmauth_key" SET "max_role" = (SELECT u."user_role" {creator}) '  # noqa: S608
        'WHERE "user_id" IS NOT NULL AND "created_by" IS NOT NULL '
        'AND "created_by" <> "user_id" '
        f"AND EXISTS (SELECT 1 {creator} AND u.\"user_role\" <> 'proxy_admin')")


def down(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(migrator.drop_column("llmauth_key", "max_role"))
