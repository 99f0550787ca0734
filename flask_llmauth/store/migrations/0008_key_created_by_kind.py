"""Keys: ``created_by_kind``, what ``created_by`` names (``user``, ``team``, ``key`` or
``method``): a credential with a team but no user records its team id as ``created_by``,
and a team id may also be a user's id. ``/key/list?include_created_by_keys=true`` matches
keys a *user* created only.

Existing keys whose ``created_by`` is a user's id and no team's get ``user``; the others stay
NULL (not known), so a key whose creator cannot be told apart is not matched.

This file freezes the schema as of this migration; later changes go in new migrations.
"""

from __future__ import annotations

from typing import Any

import peewee as pw


def up(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(migrator.add_column("llmauth_key", "created_by_kind",
                                         pw.CharField(max_length=16, null=True)))
    db.execute_sql(
        "UPDATE \"llmauth_key\" SET \"created_by_kind\" = 'user' "
        'WHERE "created_by" IS NOT NULL '
        'AND EXISTS (SELECT 1 FROM "llmauth_user" AS u '
        'WHERE u."user_id" = "llmauth_key"."created_by") '
        'AND NOT EXISTS (SELECT 1 FROM "llmauth_team" AS t '
        'WHERE t."team_id" = "llmauth_key"."created_by")')


def down(migrator: Any, db: pw.Database) -> None:
    migrator.migrate(migrator.drop_column("llmauth_key", "created_by_kind"))
