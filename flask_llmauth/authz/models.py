"""Model access: may this principal call this model?

A ``models`` list (on a key, team, team membership or user) allows everything when empty;
``*`` and ``all-proxy-models`` allow everything; ``openai/*`` style entries are wildcards;
an access-group name allows every model of the group. Aliases (global, key, team) resolve
to their target: access is granted when the alias or its target is allowed. The checks run
credential (``Principal.models``, for methods without a key row) → key → team → team
member → user (the user's list only for personal keys, as in LiteLLM).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import Forbidden
from ..principal import Principal

ALL_MODELS = frozenset({"*", "all-proxy-models"})
ALL_TEAM_MODELS = "all-team-models"
NO_DEFAULT_MODELS = "no-default-models"


class _Matcher:
    __slots__ = ("everything", "exact", "patterns", "wildcards")

    def __init__(self, entries: Sequence[str], groups: Mapping[str, Sequence[str]]) -> None:
        expanded: list[str] = []
        for entry in entries:
            expanded += list(groups.get(entry, (entry,)))
        self.everything = not expanded or any(e in ALL_MODELS for e in expanded)
        self.exact = frozenset(e for e in expanded if "*" not in e)
        self.wildcards = frozenset(e for e in expanded if "*" in e and e not in ALL_MODELS)
        self.patterns = tuple(
            re.compile("^" + ".*".join(re.escape(p) for p in e.split("*")) + "$")
            for e in sorted(self.wildcards)
        )

    def allows(self, names: Iterable[str]) -> bool:
        if self.everything:
            return True
        for name in names:
            if name in self.exact or any(p.match(name) for p in self.patterns):
                return True
        return False


class ModelAccess:
    """Model checks for one app (access groups and global aliases come from settings)."""

    def __init__(self, access_groups: Mapping[str, Sequence[str]], aliases: Mapping[str, str],
                 model_list: Iterable[Mapping[str, Any]] = ()) -> None:
        groups: dict[str, list[str]] = {k: list(v) for k, v in access_groups.items()}
        for entry in model_list:
            name = entry.get("model_name")
            info = entry.get("model_info") or {}
            for group in info.get("access_groups") or ():
                if name:
                    groups.setdefault(group, []).append(name)
        self.groups = {k: tuple(v) for k, v in groups.items()}
        self.aliases = dict(aliases)
        self._matchers: dict[tuple[str, ...], _Matcher] = {}

    def _matcher(self, entries: Sequence[str]) -> _Matcher:
        key = tuple(entries)
        matcher = self._matchers.get(key)
        if matcher is None:
            if len(self._matchers) > 10_000:
                self._matchers.clear()
            matcher = self._matchers[key] = _Matcher(key, self.groups)
        return matcher

    def names_for(self, principal: Principal, model: str) -> tuple[str, ...]:
        """The requested name plus every alias target it resolves to."""
        names = [model]
        for table in (
            principal.key.aliases if principal.key else None,
            principal.team.model_aliases if principal.team else None,
            self.aliases,
        ):
            if table and model in table and isinstance(table[model], str):
                names.append(table[model])
        return tuple(names)

    def denial(self, principal: Principal, model: str) -> Forbidden | None:
        """The error to raise if ``principal`` may not call ``model``, else ``None``."""
        names = self.names_for(principal, model)
        key, team, user = principal.key, principal.team, principal.user
        member = principal.membership
        if principal.models and not self._matcher(principal.models).allows(names):
            return _denied("credential", model, principal.models)
        if key is not None and ALL_TEAM_MODELS not in key.models:
            if not self._matcher(key.models).allows(names):
                return _denied("key", model, key.models)
        if team is not None and not self._matcher(team.models).allows(names):
            return _denied("team", model, team.models, f"Team={team.team_id}")
        if member is not None and member.allowed_models:
            if not self._matcher(member.allowed_models).allows(names):
                return _denied("team_member", model, member.allowed_models)
        if user is not None and team is None:
            if NO_DEFAULT_MODELS in user.models:
                return _denied("user", model, [])
            if not self._matcher(user.models).allows(names):
                return _denied("user", model, user.models)
        return None

    def allowed_models(self, principal: Principal, candidates: Iterable[str]) -> list[str]:
        """The subset of ``candidates`` the principal may call (for ``/v1/models``)."""
        return [m for m in candidates if self.denial(principal, m) is None]

    def within(self, requested: Sequence[str], allowance: Sequence[str]) -> bool:
        """Whether a new ``models`` list stays inside ``allowance`` (the escalation guard).

        An empty ``requested`` list means "all models", so it fits only an unrestricted
        allowance; a wildcard fits only if the allowance has the same wildcard (or all).
        ``all-team-models`` fits: the team's own list is enforced on every request.
        """
        outer = self._matcher(allowance)
        if outer.everything:
            return True
        inner_entries = [r for r in requested if r != ALL_TEAM_MODELS]
        if requested and not inner_entries:
            return True
        inner = self._matcher(inner_entries)
        if inner.everything:
            return False
        return inner.wildcards <= outer.wildcards and all(
            outer.allows((name,)) for name in inner.exact
        )


def _denied(level: str, model: str, allowed: Sequence[str], who: str = "") -> Forbidden:
    subject = {"credential": "This credential", "key": "This key", "team": "This team",
               "team_member": "This team member", "user": "This user"}[level]
    detail = f" {who}." if who else ""
    return Forbidden(
        f"{level.replace('_', ' ')} not allowed to access model.{detail} {subject} can only "
        f"access models={list(allowed)}. Tried to access {model[:200]}",
        error_type=f"{level}_model_access_denied",
        param="model",
        reason=f"{level}_model_access_denied",
    )
