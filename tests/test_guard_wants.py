"""Whether the rate-limit and budget guards want a principal (``has_limits``,
``has_budget``): every field that can carry a limit or a budget makes the answer yes, on
its own, whether or not the common case's one-expression test (no team, nothing set) or
the full walk answers."""

from __future__ import annotations

from typing import Any

import pytest

from flask_llmauth.budgets import has_budget
from flask_llmauth.principal import Principal, Role
from flask_llmauth.ratelimits import has_limits
from flask_llmauth.store.records import KeyRecord, MembershipRecord, TeamRecord, UserRecord


def _principal(key: dict[str, Any] | None = None, user: dict[str, Any] | None = None,
               team: dict[str, Any] | None = None, member: dict[str, Any] | None = None,
               limits: dict[str, Any] | None = None, with_key: bool = True) -> Principal:
    return Principal(
        method="virtual_key" if with_key else "jwt", role=Role.INTERNAL_USER,
        key=KeyRecord(id=1, key_id="k", key_name="sk-...k", **(key or {})) if with_key
        else None,
        user=None if user is None else UserRecord(id=2, user_id="u", **user),
        team=None if team is None else TeamRecord(id=3, team_id="t", **team),
        membership=None if member is None else MembershipRecord(id=4, team_id="t",
                                                                user_id="u", **member),
        limits=limits or {},
    )


LIMITED = [
    {"key": {"rpm_limit": 1}}, {"key": {"tpm_limit": 1}}, {"key": {"max_parallel_requests": 1}},
    {"key": {"model_rpm_limit": {"m": 1}}}, {"key": {"model_tpm_limit": {"m": 1}}},
    {"key": {"metadata": {"model_rpm_limit": {"m": 1}}}},
    {"key": {"metadata": {"model_tpm_limit": {"m": 1}}}},
    {"key": {"model_max_budget": {"m": {"rpm_limit": 1}}}},
    {"user": {"rpm_limit": 1}}, {"user": {"tpm_limit": 1}},
    {"user": {"max_parallel_requests": 1}},
    {"team": {"rpm_limit": 1}}, {"team": {"tpm_limit": 1}},
    {"team": {"max_parallel_requests": 1}}, {"team": {"team_member_rpm_limit": 1}},
    {"team": {"team_member_tpm_limit": 1}}, {"team": {"model_rpm_limit": {"m": 1}}},
    {"team": {"model_tpm_limit": {"m": 1}}},
    {"team": {}, "member": {"rpm_limit": 1}}, {"team": {}, "member": {"tpm_limit": 1}},
    {"limits": {"rpm_limit": 1}, "with_key": False},
    {"limits": {"max_parallel_requests": 1}},
]
UNLIMITED = [
    {}, {"user": {}}, {"team": {}}, {"team": {}, "member": {}, "user": {}},
    {"key": {"metadata": {"tier": "gold"}}},  # metadata, but no limit in it
    {"key": {"model_max_budget": {"m": {"budget_limit": 1}}}},  # a budget, not a limit
    {"key": {"rpm_limit": 0, "tpm_limit": -1}},  # not positive: no limit
    {"user": {"max_budget": 5}}, {"limits": {"max_budget": 5}, "with_key": False},
]


@pytest.mark.parametrize("fields", LIMITED)
def test_every_limit_field_makes_the_rate_limits_want_the_principal(fields: Any) -> None:
    assert has_limits(_principal(**fields)) is True


@pytest.mark.parametrize("fields", UNLIMITED)
def test_a_principal_without_limits_is_not_wanted_by_the_rate_limits(fields: Any) -> None:
    assert has_limits(_principal(**fields)) is False


BUDGETED = [
    {"key": {"max_budget": 5}}, {"key": {"soft_budget": 5}}, {"key": {"max_budget": 0}},
    {"key": {"model_max_budget": {"m": {"budget_limit": 1}}}},
    {"user": {"max_budget": 5}}, {"user": {"soft_budget": 5}},
    {"team": {"max_budget": 5}}, {"team": {"soft_budget": 5}},
    {"team": {}, "member": {"max_budget": 5}},
    {"team": {"team_member_budget": 5}, "member": {}},
    {"limits": {"max_budget": 5}, "with_key": False},
    {"limits": {"soft_budget": 5}, "with_key": False},
]
UNBUDGETED = [
    {}, {"user": {}}, {"team": {}}, {"team": {}, "member": {}, "user": {}},
    {"team": {}, "user": {"max_budget": 5}},  # a team key: bound by its team, not its user
    {"team": {"team_member_budget": 5}},  # no membership: no member budget
    {"key": {"max_budget": -1}},  # not a budget
    {"key": {"model_max_budget": {"m": 5}}},  # not a budget spec
    {"key": {"rpm_limit": 5}, "limits": {"max_budget": 5}},  # asserted limits need no key
]


@pytest.mark.parametrize("fields", BUDGETED)
def test_every_budget_field_makes_the_budgets_want_the_principal(fields: Any) -> None:
    assert has_budget(_principal(**fields)) is True


@pytest.mark.parametrize("fields", UNBUDGETED)
def test_a_principal_without_budgets_is_not_wanted_by_the_budgets(fields: Any) -> None:
    assert has_budget(_principal(**fields)) is False
