"""Model access: may this principal call this model?

A ``models`` list (on a key, team, team membership or user) allows everything when empty;
``*`` and ``all-proxy-models`` allow everything; ``openai/*`` style entries are wildcards;
an access-group name allows every model of the group. Aliases (global, key, team) resolve
to their target: access is granted when the alias or its target is allowed. A LiteLLM
``model_list`` entry also names its deployment (``litellm_params.model``), so ``openai/*``
allows a ``gpt-4o`` whose deployment is ``openai/gpt-4o``. The checks run credential
(``Principal.models``, for methods without a key row) → key → team → team member → user
(the user's list only for personal keys, as in LiteLLM).

Special names: ``all-team-models`` on a key stands for its team's list (on a key without a
team it allows nothing beyond the key's other entries: fail closed); ``no-default-models``
on a user gives that user's personal keys no model at all.

The same lists bound what a non-admin may grant when it creates or changes a key
(:meth:`ModelAccess.creator_limits` and :meth:`ModelAccess.within`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter
from typing import Any

from ..errors import Forbidden
from ..principal import Principal

ALL_MODELS = frozenset({"*", "all-proxy-models"})
ALL_TEAM_MODELS = "all-team-models"
NO_DEFAULT_MODELS = "no-default-models"
#: A model list that allows nothing (a model name can never hold a NUL character).
NOTHING: tuple[str, ...] = ("\x00",)
Limit = tuple[str, Sequence[str], Sequence[str]]
#: The principal's fields :meth:`ModelAccess.limits` reads, in one C call (a named tuple's
#: field is a descriptor the interpreter does not specialise: five reads cost more).
_LIMIT_FIELDS = attrgetter("models", "key", "team", "user", "membership")


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
        exact, patterns = self.exact, self.patterns
        for name in names:
            if name in exact:
                return True
            if patterns:  # no generator for the common list without wildcards
                for pattern in patterns:
                    if pattern.match(name):
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
        deployments: dict[str, list[str]] = {}
        for entry in model_list:
            params = entry.get("litellm_params")
            target = params.get("model") if isinstance(params, Mapping) else None
            name = entry.get("model_name")
            if isinstance(name, str) and isinstance(target, str) and target != name:
                deployments.setdefault(name, []).append(target)
        #: model_name → the deployments (``litellm_params.model``) it routes to.
        self.deployments = {k: tuple(v) for k, v in deployments.items()}
        self._matchers: dict[tuple[str, ...], _Matcher] = {}

    def _matcher(self, entries: Sequence[str]) -> _Matcher:
        key = entries if type(entries) is tuple else tuple(entries)
        matcher = self._matchers.get(key)
        if matcher is None:
            if len(self._matchers) > 10_000:
                self._matchers.clear()
            matcher = self._matchers[key] = _Matcher(key, self.groups)
        return matcher

    def names_for(self, principal: Principal, model: str) -> tuple[str, ...]:
        """The requested name plus every alias target and deployment it resolves to."""
        key, team = principal.key, principal.team
        key_aliases = key.aliases if key else None
        team_aliases = team.model_aliases if team else None
        if (model not in self.deployments and model not in self.aliases
                and not (key_aliases and model in key_aliases)
                and not (team_aliases and model in team_aliases)):
            return (model,)  # what _names answers when nothing resolves the name further
        return self._names(model, (key_aliases, team_aliases))

    def _names(self, model: str, tables: Iterable[Mapping[str, str] | None] = ()
               ) -> tuple[str, ...]:
        names = [model]
        for table in (*tables, self.aliases):
            if table and model in table and isinstance(table[model], str):
                names.append(table[model])
        for name in list(names):
            names += self.deployments.get(name, ())
        return tuple(dict.fromkeys(names))

    @staticmethod
    def key_models(models: Sequence[str], team: Any) -> Sequence[str]:
        """What a key's ``models`` mean: ``all-team-models`` stands for its team's list; on a
        key without a team it allows only the key's other entries, or nothing."""
        if ALL_TEAM_MODELS not in models:
            return models
        if team is not None:
            return tuple(team.models)
        others = tuple(m for m in models if m != ALL_TEAM_MODELS)
        return others or NOTHING

    def limits(self, principal: Principal) -> list[Limit]:
        """``(level, effective list, list as stored)`` for every list that bounds what the
        principal may call; a model must pass all of them."""
        credential_models, key, team, user, member = _LIMIT_FIELDS(principal)
        out: list[Limit] = []
        if credential_models:
            out.append(("credential", credential_models, credential_models))
        if key is not None:
            models = key.models
            if ALL_TEAM_MODELS not in models:
                out.append(("key", models, models))
            elif team is None:
                out.append(("key", self.key_models(models, team), models))
        if team is not None:
            out.append(("team", team.models, team.models))
        if member is not None and member.allowed_models:
            out.append(("team_member", member.allowed_models, member.allowed_models))
        if user is not None and team is None:
            entries = NOTHING if NO_DEFAULT_MODELS in user.models else user.models
            out.append(("user", entries, user.models))
        return out

    def denial(self, principal: Principal, model: str) -> Forbidden | None:
        """The error to raise if ``principal`` may not call ``model``, else ``None``."""
        names = self.names_for(principal, model)
        for level, entries, shown in self.limits(principal):
            if not self._matcher(entries).allows(names):
                who = f"Team={principal.team.team_id}" if level == "team" and principal.team \
                    else ""
                return _denied(level, model, shown, who)
        return None

    def allowed_models(self, principal: Principal, candidates: Iterable[str]) -> list[str]:
        """The subset of ``candidates`` the principal may call (for ``/v1/models``)."""
        return [m for m in candidates if self.denial(principal, m) is None]

    # -- the escalation guard -------------------------------------------------------------------

    def creator_limits(self, actor: Principal, team: Any = None, child_user_id: str | None = None,
                       membership: Any = None) -> list[Sequence[str]]:
        """The model lists a key that ``actor`` creates or changes must stay inside.

        Every list that bounds the actor's credential now (:meth:`limits`), except those
        that will bound the new key at request time anyway: the user's own list (it bounds
        every personal key of that user) and the team's list when the key is a key of the
        actor's own team. ``team`` is the new key's team, ``child_user_id`` its user and
        ``membership`` the actor's membership in ``team``.
        """
        lists: list[Sequence[str]] = []
        if actor.models:
            lists.append(actor.models)
        key, own_team = actor.key, actor.team
        if key is not None and not (ALL_TEAM_MODELS in key.models and own_team is not None):
            lists.append(self.key_models(key.models, own_team))
        same_team = team is not None and own_team is not None and own_team.team_id == team.team_id
        same_member = child_user_id is not None and child_user_id == actor.user_id
        if own_team is not None and not same_team:
            lists.append(own_team.models)
        if actor.membership is not None and actor.membership.allowed_models and not (
                same_team and same_member):
            lists.append(actor.membership.allowed_models)
        if team is not None and not same_team and not same_member and membership is not None \
                and membership.allowed_models:
            lists.append(membership.allowed_models)
        return [entries for entries in lists if not self._matcher(entries).everything]

    def within(self, requested: Sequence[str], allowance: Sequence[str], team: Any = None
               ) -> bool:
        """Whether a key ``models`` list (of a key of ``team``) allows nothing beyond
        ``allowance``.

        An empty ``requested`` list means "all models", so it fits only an unrestricted
        allowance; a wildcard fits only if the allowance has the same wildcard (or all);
        ``all-team-models`` is replaced by what it stands for (:meth:`key_models`).
        """
        outer = self._matcher(allowance)
        if outer.everything:
            return True
        inner = self._matcher(self.key_models(requested, team))
        if inner.everything:
            return False
        return inner.wildcards <= outer.wildcards and all(
            outer.allows(self._names(name)) for name in inner.exact if name not in NOTHING
        )

    def name_within(self, name: str, allowance: Sequence[str]) -> bool:
        """Whether a single model name (an alias or its target) is inside ``allowance``."""
        outer = self._matcher(allowance)
        if outer.everything:
            return True
        if "*" in name:
            return name in outer.wildcards
        return outer.allows(self._names(name))


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
