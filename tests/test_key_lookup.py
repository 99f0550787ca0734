"""The cold key lookup (one prebuilt statement, its values turned into records without Peewee)
returns exactly what Peewee's own conversion of the same rows gives, on SQLite (packed into
JSON arrays, and unpacked) and on Postgres."""

from __future__ import annotations

import gc
import sqlite3
from contextlib import closing
from datetime import datetime
from typing import Any

import pytest

from flask_llmauth.authn.virtual_key import key_principal, key_tags
from flask_llmauth.principal import Principal, Role
from flask_llmauth.store import db as db_module
from flask_llmauth.store.db import SQLITE_MMAP_SIZE, KeyRow, Store
from flask_llmauth.store.records import (
    KeyRecord,
    MembershipRecord,
    TeamRecord,
    UserRecord,
    from_values,
)
from flask_llmauth.store.tables import Key, Team, TeamMembership, User

#: Text that JSON and SQL quoting must carry through unchanged.
ODD_TEXT = 'quote " backslash \\ newline \n tab \t unicode é 漢字 emoji \U0001f600 nul-free'
WHEN = datetime(2031, 5, 17, 8, 9, 10, 123456)
WHOLE_SECOND = datetime(2030, 1, 2, 3, 4, 5)


def _expected(digest: str) -> KeyRow:
    key = Key.get(Key.digest == digest)
    team = Team.get_or_none(Team.team_id == key.team_id) if key.team_id else None
    user = User.get_or_none(User.user_id == key.user_id) if key.user_id else None
    member = (TeamMembership.get_or_none((TeamMembership.team_id == key.team_id)
                                         & (TeamMembership.user_id == key.user_id))
              if key.team_id and key.user_id else None)
    return KeyRow(from_values(KeyRecord, key.__data__),
                  None if team is None else from_values(TeamRecord, team.__data__),
                  None if user is None else from_values(UserRecord, user.__data__),
                  None if member is None else from_values(MembershipRecord, member.__data__))


def _fill(store: Store) -> dict[str, str]:
    """Keys with every kind of value, and with and without their team, user, membership."""
    with store.use():
        Team.create(team_id="t-full", team_alias=ODD_TEXT, organization_id="org-1",
                    models=["gpt-4o", ODD_TEXT], model_aliases={"fast": "gpt-4o-mini"},
                    max_budget=2**62, soft_budget=0, spend=123, reserved=-5, soft_alerted=True,
                    budget_duration="30d", budget_reset_at=WHEN, tpm_limit=1000, rpm_limit=10,
                    max_parallel_requests=3, model_rpm_limit={"gpt-4o": 5},
                    model_tpm_limit={}, team_member_permissions=["/key/generate"],
                    team_member_budget=7, team_member_budget_duration="1d",
                    team_member_rpm_limit=2, team_member_tpm_limit=20,
                    metadata={"nested": {"list": [1, 2.5, None, True]}, "text": ODD_TEXT},
                    blocked=False, created_by="admin", created_at=WHOLE_SECOND)
        User.create(user_id="u-full", user_email="u@example.com", user_alias=ODD_TEXT,
                    user_role="internal_user", models=[], max_budget=9, soft_budget=None,
                    spend=0, soft_alerted=False, budget_reset_at=None,
                    model_max_budget={"gpt-4o": {"max_budget": 3}}, metadata={},
                    blocked=True, sso_user_id="sso|1")
        TeamMembership.create(team_id="t-full", user_id="u-full", role="admin",
                              max_budget=4, spend=1, budget_duration="7d",
                              budget_reset_at=WHEN, tpm_limit=None, rpm_limit=6,
                              allowed_models=["gpt-4o"])
        Key.create(key_id="k-full", digest="d-full", key_name="sk-...full", key_alias=ODD_TEXT,
                   user_id="u-full", team_id="t-full", organization_id=None,
                   models=["gpt-4o", "gpt-4o-mini"], aliases={"a": ODD_TEXT},
                   allowed_routes=["llm_api_routes"], key_type="llm_api",
                   allowed_ips=["10.0.0.0/8"], max_budget=-1, soft_budget=2**40,
                   budget_duration="1h", budget_reset_at=WHOLE_SECOND, spend=2**53 + 1,
                   reserved=0, soft_alerted=True, tpm_limit=0, rpm_limit=None,
                   max_parallel_requests=1, model_rpm_limit={"m": 1},
                   model_tpm_limit={"m": 2}, model_max_budget={"m": {"budget_limit": 1}},
                   metadata={"tags": [ODD_TEXT], "n": -0.5}, expires=WHEN, blocked=True,
                   created_by="admin", updated_by=ODD_TEXT, last_used_at=WHEN,
                   rotation_count=2, last_rotation_at=WHOLE_SECOND, max_role="org_admin")
        # The user and team named by these keys have no rows; the last key names neither.
        Key.create(key_id="k-dangling", digest="d-dangling", key_name="sk-...dang",
                   user_id="u-none", team_id="t-none")
        Key.create(key_id="k-team-only", digest="d-team-only", key_name="sk-...team",
                   team_id="t-full")
        Key.create(key_id="k-bare", digest="d-bare", key_name="sk-...bare")
    return {"k-full": "d-full", "k-dangling": "d-dangling", "k-team-only": "d-team-only",
            "k-bare": "d-bare"}


@pytest.fixture(params=["packed", "columns"])
def store(request: pytest.FixtureRequest, db_url: str) -> Any:
    store = Store(db_url)
    store.migrate()
    if request.param == "columns":
        if not store._packed:
            pytest.skip("this database is always read column by column")
        store._packed = False
        store._prepare_key_lookup()
    elif db_url.startswith("sqlite") and not store._packed:
        pytest.fail("SQLite has the JSON functions (3.38+) but the lookup does not pack")
    yield store
    store.close()


def test_the_lookup_returns_what_peewee_reads(store: Store) -> None:
    keys = _fill(store)
    for key_id, digest in keys.items():
        with store.use():
            expected = _expected(digest)
        by_digest = store.key_by_digest(digest)
        assert by_digest == expected, key_id
        assert store.key_by_id(key_id) == expected, key_id
    full = store.key_by_digest("d-full")
    assert full is not None and full.team is not None and full.user is not None
    assert full.membership is not None and full.membership.role == "admin"
    assert full.key.key_alias == ODD_TEXT and full.key.aliases == {"a": ODD_TEXT}
    assert full.key.spend == 2**53 + 1 and full.team.max_budget == 2**62
    assert full.key.blocked is True and full.team.soft_alerted is True
    assert full.key.expires == WHEN and full.team.created_at == WHOLE_SECOND
    assert full.team.metadata == {"nested": {"list": [1, 2.5, None, True]}, "text": ODD_TEXT}
    dangling = store.key_by_digest("d-dangling")
    assert dangling is not None
    assert (dangling.team, dangling.user, dangling.membership) == (None, None, None)
    team_only = store.key_by_digest("d-team-only")
    assert team_only is not None and team_only.team is not None and team_only.user is None
    assert store.key_by_digest("d-missing") is None
    assert store.key_by_id("k-missing") is None


def test_a_value_the_fast_conversion_refuses_gets_peewees_conversion(store: Store) -> None:
    if not store.url.startswith("sqlite"):
        pytest.skip("only SQLite stores a timestamp column as free text")
    _fill(store)
    with store.use() as db:
        db.execute_sql('UPDATE "llmauth_key" SET "created_at" = ?, "blocked" = ? '
                       'WHERE "key_id" = ?', ("not a timestamp", 1, "k-bare"))
        expected = _expected("d-bare")
    # datetime.fromisoformat refuses the text; Peewee's own conversion keeps it as text.
    assert expected.key.created_at == "not a timestamp" and expected.key.blocked is True
    assert store.key_by_digest("d-bare") == expected
    assert store.key_by_id("k-bare") == expected


def test_records_of_two_lookups_share_no_mutable_value(store: Store) -> None:
    _fill(store)
    first, second = store.key_by_digest("d-full"), store.key_by_digest("d-full")
    assert first is not None and second is not None and first == second
    for a, b in ((first.key, second.key), (first.team, second.team),
                 (first.user, second.user)):
        assert type(a.models) is tuple and type(b.models) is tuple  # immutable
        assert a.metadata is not b.metadata
    assert type(first.membership.allowed_models) is tuple


def test_an_array_of_strings_is_one_tuple_for_every_record_and_nothing_else_is_shared(
        store: Store) -> None:
    """A JSON array of strings (a model list) read once is the same tuple in every later
    record (immutable all the way down); an array holding a container is parsed anew for
    each record, and a bounded memo forgets instead of growing."""
    _fill(store)
    with store.use():
        Key.update(models=["gpt-4o", {"not": "a string"}]).where(
            Key.key_id == "k-bare").execute()
    first, second = store.key_by_digest("d-full"), store.key_by_digest("d-full")
    assert first is not None and second is not None
    assert first.key.models == ("gpt-4o", "gpt-4o-mini") and first.key.models is second.key.models
    assert first.key.allowed_routes is second.key.allowed_routes
    a, b = store.key_by_digest("d-bare"), store.key_by_digest("d-bare")
    assert a is not None and b is not None
    assert a.key.models == ("gpt-4o", {"not": "a string"}) and a.key.models is not b.key.models
    assert a.key.models[1] is not b.key.models[1]
    db_module._ARRAYS.clear()
    for number in range(db_module._ARRAYS_MAX + 10):
        db_module._json_value(f'["m{number}"]')
    assert 0 < len(db_module._ARRAYS) <= db_module._ARRAYS_MAX
    long_list = "[" + ",".join(['"' + "x" * 100 + '"'] * 20) + "]"
    assert db_module._json_value(long_list) == ("x" * 100,) * 20
    assert long_list not in db_module._ARRAYS  # longer than _ARRAY_TEXT_MAX: not kept


def test_looked_up_records_hold_arrays_as_tuples_the_collector_leaves(store: Store) -> None:
    """A record's arrays are tuples and its dicts of atomic values plain dicts: after a
    collection none of its values is tracked by the cyclic garbage collector (a list always
    is), so a big key cache gives it fewer objects to traverse."""
    _fill(store)
    with store.use():
        Key.update(allowed_routes=["/v1/chat/completions"], allowed_ips=["10.0.0.0/8"],
                   aliases={"a": "gpt-4o"}).where(Key.key_id == "k-dangling").execute()
    row = store.key_by_digest("d-dangling")
    assert row is not None and row.team is row.user is row.membership is None
    key = row.key
    assert key.allowed_routes == ("/v1/chat/completions",) and key.models == ()
    assert key.allowed_ips == ("10.0.0.0/8",) and key.aliases == {"a": "gpt-4o"}
    member = from_values(MembershipRecord, {"id": 3, "team_id": "t", "user_id": "u",
                                            "allowed_models": ["gpt-4o"]})
    gc.collect()
    for record in (key, member):
        assert [name for name, value in zip(record._fields, record, strict=True)
                if gc.is_tracked(value)] == []
    # A nested array (in metadata) is kept as JSON reads it.
    full = store.key_by_digest("d-full")
    assert full is not None and full.key.metadata["tags"] == [ODD_TEXT]


def test_records_are_immutable_and_built_by_keyword_with_fresh_defaults() -> None:
    first = KeyRecord(id=1, key_id="k", key_name="sk-...k")
    second = KeyRecord(1, "k", "sk-...k")
    assert first == second and first.models == () and first.metadata == {}
    assert first.metadata is not second.metadata
    assert first.budget_reset_at is None and first.key_type == "default"
    given = ("gpt-4o",)
    assert KeyRecord(id=1, key_id="k", key_name="n", models=given).models is given
    with pytest.raises(AttributeError):
        first.spend = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        KeyRecord(id=1, key_id="k")  # type: ignore[call-arg]
    member = from_values(MembershipRecord, {"id": 3, "team_id": "t", "user_id": "u",
                                            "not_a_field": 1})
    assert (member.role, member.allowed_models) == ("user", ())
    team = from_values(TeamRecord, {"id": 4, "team_id": "t", "models": ["gpt-4o"],
                                    "metadata": {"tier": "gold"}})
    assert team.models == ("gpt-4o",) and team.metadata == {"tier": "gold"}


def test_sqlite_reads_through_a_memory_map_and_writes_through_the_wal(tmp_path: Any) -> None:
    store = Store(f"sqlite:///{tmp_path / 'mapped.db'}")
    try:
        store.migrate()
        with store.use() as db:
            assert db.execute_sql("PRAGMA mmap_size").fetchone()[0] == SQLITE_MMAP_SIZE
            assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        store.close()


def test_the_principal_of_a_looked_up_key(store: Store) -> None:
    """key_principal builds the tuple positionally: it must equal the keyword-built one."""
    _fill(store)
    full = store.key_by_digest("d-full")
    assert full is not None and full.user is not None and full.team is not None
    assert key_principal(full) == Principal(
        method="virtual_key", role=Role.INTERNAL_USER, user_id="u-full",
        user_email="u@example.com", team_id="t-full", org_id="org-1", key_id="k-full",
        key_name="sk-...full", key_alias=ODD_TEXT, allowed_routes=("llm_api_routes",),
        key=full.key, team=full.team, user=full.user, membership=full.membership,
        metadata={"tags": [ODD_TEXT], "n": -0.5})
    assert key_tags(key_principal(full)) == ("key:k-full", "team:t-full", "user:u-full")
    bare = store.key_by_digest("d-bare")
    assert bare is not None
    principal = key_principal(bare)
    assert principal == Principal(method="virtual_key", role=Role.INTERNAL_USER_VIEWER,
                                  key_id="k-bare", key_name="sk-...bare", key=bare.key)
    assert principal.metadata == {} and principal.limits == {} and principal.scopes == set()
    assert key_tags(principal) == ("key:k-bare",)
    team_only = store.key_by_digest("d-team-only")
    assert team_only is not None
    assert key_principal(team_only).role is Role.TEAM
    assert key_tags(key_principal(team_only)) == ("key:k-team-only", "team:t-full")
    dangling = store.key_by_digest("d-dangling")
    assert dangling is not None
    assert key_principal(dangling).role is Role.INTERNAL_USER
    assert key_tags(key_principal(dangling)) == ("key:k-dangling", "team:t-none", "user:u-none")


def test_the_kept_lookup_cursor_holds_no_read_transaction(tmp_path: Any) -> None:
    """Between lookups the thread's cursor pins no WAL snapshot: another connection's write
    is seen at once and a checkpoint can truncate the WAL."""
    path = tmp_path / "kept.db"
    store = Store(f"sqlite:///{path}")
    try:
        store.migrate()
        with store.use():
            Key.create(key_id="k-1", digest="d-1", key_name="sk-...k1")
        found = store.key_by_digest("d-1")
        assert found is not None and found.key.spend == 0
        assert store.key_by_digest("d-missing") is None
        with closing(sqlite3.connect(path)) as other:
            other.execute('UPDATE "llmauth_key" SET "spend" = 5')
            other.commit()
            assert other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        again = store.key_by_digest("d-1")
        assert again is not None and again.key.spend == 5
    finally:
        store.close()
