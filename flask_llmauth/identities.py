"""Users, teams and memberships for principals that are not virtual keys (JWT, OAuth2,
proxy headers, custom auth): loaded once, cached, invalidated like keys.

Authenticators build their principal with :meth:`IdentityLoader.principal`, so every method
hands authorization the same records a virtual key would (team models, blocked flags,
budgets, limits). A principal naming a team that does not exist is refused there, for every
method (403, as LiteLLM's ``get_team_object``): it would carry none of the team's models,
budget or limits and its spend would go to no row. A method that creates teams on first
sight (JWT ``team_id_upsert``) does so before building the principal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .cache import TTLCache
from .errors import Forbidden, Unauthenticated
from .principal import Principal, Role
from .store.db import Store
from .store.records import MembershipRecord, TeamRecord, UserRecord, from_values
from .store.tables import Team, TeamMembership, User

Records = tuple[UserRecord | None, TeamRecord | None, MembershipRecord | None]


def _record(record_type: type, row: Any) -> Any:
    return None if row is None else from_values(record_type, row.__data__)


def team_not_found(team_id: str, reason: str) -> Forbidden:
    """The refusal of a caller whose team does not exist (LiteLLM's message)."""
    return Forbidden(f"Team doesn't exist in db. Team={team_id[:64]}. Create team via "
                     "`/team/new` call.", reason=reason)


class IdentityLoader:
    def __init__(self, store: Store, cache: TTLCache[Records], ttl: float) -> None:
        self.store = store
        self.cache = cache
        self.ttl = ttl

    def load(self, user_id: str | None, team_id: str | None) -> Records:
        """The user, team and membership rows for these ids (cached; ``None`` when absent)."""
        cache_key = ("identity", user_id, team_id)
        cached = self.cache.get(cache_key)
        if cached is not None:
            return cached
        generation = self.cache.generation
        with self.store.use():
            user = User.get_or_none(User.user_id == user_id) if user_id else None
            team = Team.get_or_none(Team.team_id == team_id) if team_id else None
            member = None
            if user_id and team_id:
                member = TeamMembership.get_or_none(
                    (TeamMembership.team_id == team_id) & (TeamMembership.user_id == user_id))
        records: Records = (_record(UserRecord, user), _record(TeamRecord, team),
                            _record(MembershipRecord, member))
        tags = [f"user:{user_id}"] if user_id else []
        tags += [f"team:{team_id}"] if team_id else []
        self.cache.set(cache_key, records, self.ttl, tags, generation=generation)
        return records

    def require_team(self, team_id: str, reason: str) -> TeamRecord:
        """The team's record; a team that does not exist is a 403 (never a principal
        without the team's models, budget and limits)."""
        team = self.load(None, team_id)[1]
        if team is None:
            raise team_not_found(team_id, reason)
        return team

    def principal(
        self,
        method: str,
        role: Role,
        *,
        user_id: str | None = None,
        team_id: str | None = None,
        user_email: str | None = None,
        org_id: str | None = None,
        end_user_id: str | None = None,
        scopes: frozenset[str] = frozenset(),
        allowed_routes: tuple[str, ...] = (),
        claims: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Principal:
        """A principal with its records loaded; refuses a team that does not exist (403) and
        a blocked user or team (401)."""
        user, team, member = self.load(user_id, team_id)
        if team_id and team is None:
            raise team_not_found(team_id, f"{method}_team_not_found")
        if team is not None and team.blocked:
            raise Unauthenticated(f"Authentication Error, Team={team_id} is blocked. Update via "
                                  "`/team/unblock` if you're an admin.", reason="team_blocked")
        if user is not None and user.blocked:
            raise Unauthenticated("Authentication Error, this user is blocked.",
                                  reason="user_blocked")
        return Principal(
            method=method, role=role, user_id=user_id, team_id=team_id,
            user_email=user_email or (user.user_email if user else None),
            org_id=org_id or (team.organization_id if team else None), end_user_id=end_user_id,
            scopes=scopes, allowed_routes=allowed_routes, team=team, user=user,
            membership=member, claims=claims, metadata=dict(metadata or {}),
        )
