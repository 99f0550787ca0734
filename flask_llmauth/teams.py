"""The team service: teams, their budgets and limits, and their members.

Only a proxy admin creates, updates, blocks or deletes a team. A team admin (membership
role ``admin``) manages the team's members; members see their own teams.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .audit import write_audit
from .budgets import set_window
from .durations import Duration, isoformat, parse_duration, utcnow
from .errors import BadRequest, Forbidden, NotFound
from .keys import VIEWER_ROLES, KeyService, acts_outside, key_info, team_confinement
from .money import to_usd
from .principal import Principal, Role
from .store.tables import Key, Team, TeamMembership, User

if TYPE_CHECKING:
    from .extension import LLMAuthState

MEMBER_ROLES = ("admin", "user")
_PLAIN_FIELDS = ("team_alias", "organization_id", "models", "model_aliases", "max_budget",
                 "soft_budget", "tpm_limit", "rpm_limit", "max_parallel_requests",
                 "model_rpm_limit", "model_tpm_limit", "team_member_permissions",
                 "team_member_budget", "team_member_rpm_limit", "team_member_tpm_limit",
                 "metadata", "blocked")

#: What ``/team/member_update`` changes; a non-admin never changes them on its own membership.
_MEMBER_FIELDS = ("role", "max_budget_in_team", "budget_duration", "tpm_limit", "rpm_limit",
                  "allowed_models")


def default_window(team: Any) -> Duration | None:
    """The team's ``team_member_budget_duration`` (``None``: the team has none)."""
    duration = team.team_member_budget_duration
    return None if not duration else parse_duration(duration)


def default_window_end(team: Any, now: datetime) -> datetime | None:
    """The end of the first window of a member that follows the team's
    ``team_member_budget_duration`` (``None``: the team has none), starting ``now``."""
    window = default_window(team)
    return None if window is None else window.after(now)


def membership_info(member: Any) -> dict[str, Any]:
    """A membership as stored: ``max_budget_in_team``, ``budget_duration``, ``tpm_limit``
    and ``rpm_limit`` are the member's own values; ``null`` means the member follows the
    team's current ``team_member_*`` default (``budget_reset_at`` is the member's own window
    end either way)."""
    return {
        "team_id": member.team_id,
        "user_id": member.user_id,
        "role": member.role,
        "max_budget_in_team": to_usd(member.max_budget),
        "spend": to_usd(member.spend),
        "budget_duration": member.budget_duration,
        "budget_reset_at": isoformat(member.budget_reset_at),
        "tpm_limit": member.tpm_limit,
        "rpm_limit": member.rpm_limit,
        "allowed_models": list(member.allowed_models or []),
    }


def team_info(team: Any, members: list[Any] | None = None) -> dict[str, Any]:
    info = {
        "team_id": team.team_id,
        "team_alias": team.team_alias,
        "organization_id": team.organization_id,
        "models": list(team.models or []),
        "model_aliases": dict(team.model_aliases or {}),
        "spend": to_usd(team.spend),
        "max_budget": to_usd(team.max_budget),
        "soft_budget": to_usd(team.soft_budget),
        "budget_duration": team.budget_duration,
        "budget_reset_at": isoformat(team.budget_reset_at),
        "tpm_limit": team.tpm_limit,
        "rpm_limit": team.rpm_limit,
        "max_parallel_requests": team.max_parallel_requests,
        "model_rpm_limit": dict(team.model_rpm_limit or {}),
        "model_tpm_limit": dict(team.model_tpm_limit or {}),
        "team_member_permissions": team.team_member_permissions,
        "team_member_budget": to_usd(team.team_member_budget),
        "team_member_budget_duration": team.team_member_budget_duration,
        "team_member_rpm_limit": team.team_member_rpm_limit,
        "team_member_tpm_limit": team.team_member_tpm_limit,
        "metadata": dict(team.metadata or {}),
        "blocked": bool(team.blocked),
        "created_by": team.created_by,
        "created_at": isoformat(team.created_at),
        "updated_at": isoformat(team.updated_at),
    }
    if members is not None:
        info["members_with_roles"] = [{"user_id": m.user_id, "role": m.role} for m in members]
    return info


def _user_summary(user: Any, personal: bool) -> dict[str, Any]:
    """The user fields ``/team/member_add`` reports (LiteLLM's ``updated_users``); the
    user's personal account (``models``, ``max_budget``, ``spend``) only when ``personal``
    (a proxy admin is asking): a team admin can add any existing user."""
    summary = {"user_id": user.user_id, "user_email": user.user_email,
               "user_alias": user.user_alias, "user_role": user.user_role}
    if personal:
        summary.update(models=list(user.models or []), max_budget=to_usd(user.max_budget),
                       spend=to_usd(user.spend))
    return summary


#: Teams whose memberships ``/team/list`` reads in one query.
_MEMBERS_PER_QUERY = 500


class TeamService:
    def __init__(self, state: LLMAuthState) -> None:
        self.state = state

    def _get(self, team_id: str) -> Team:
        team = Team.get_or_none(Team.team_id == team_id)
        if team is None:
            raise NotFound(f"Team not found: team_id={team_id}", param="team_id")
        return team

    def _members(self, team_id: str) -> list[TeamMembership]:
        return list(TeamMembership.select().where(TeamMembership.team_id == team_id)
                    .order_by(TeamMembership.id))

    def _membership(self, team_id: str, user_id: str | None) -> TeamMembership | None:
        if user_id is None:
            return None
        return TeamMembership.get_or_none(
            (TeamMembership.team_id == team_id) & (TeamMembership.user_id == user_id))

    def _require_team_admin(self, actor: Principal, team_id: str) -> None:
        if actor.is_admin:
            return
        member = self._membership(team_id, actor.user_id)
        # A viewer role is read-only, also as a team's admin (it reads the team's keys).
        if (member is None or member.role != "admin" or actor.role in VIEWER_ROLES
                or acts_outside(actor, team_id)):
            raise Forbidden(f"Only a proxy admin or an admin of team={team_id} can do this.",
                            reason="team_admin_required")

    @staticmethod
    def _require_admin(actor: Principal, what: str) -> None:
        if not actor.is_admin:
            raise Forbidden(f"Only a proxy admin can {what}.", reason="admin_required")

    def _apply(self, team: Team, params: Mapping[str, Any]) -> None:
        now = utcnow()
        for name, value in params.items():
            if name == "budget_duration":
                set_window(team, value, now)
            elif name == "team_member_budget_duration":
                team.team_member_budget_duration = None if value is None else value.text
            elif name in _PLAIN_FIELDS:
                setattr(team, name, value)
        team.updated_at = now

    def _resolve_member(self, member: Mapping[str, Any], may_create: bool = True) -> str:
        """A member's ``user_id``. Unknown users get a row (role ``internal_user``) when
        ``may_create`` (a proxy admin is acting); otherwise they are a 404."""
        user_id, email = member.get("user_id"), member.get("user_email")
        if not may_create:
            user = (User.get_or_none(User.user_id == user_id) if user_id is not None
                    else User.get_or_none(User.user_email == email))
            if user is None:
                raise NotFound("User not found: only a proxy admin can add a user who does "
                               "not exist yet.", param="member")
            return str(user.user_id)
        if user_id is not None:
            if User.get_or_none(User.user_id == user_id) is None:
                User.create(user_id=user_id, user_email=email, user_role=Role.INTERNAL_USER.value,
                            created_at=utcnow(), updated_at=utcnow())
            return user_id
        user = User.get_or_none(User.user_email == email)
        if user is None:
            user = User.create(user_id=str(uuid.uuid4()), user_email=email,
                               user_role=Role.INTERNAL_USER.value, created_at=utcnow(),
                               updated_at=utcnow())
        return user.user_id

    def _add_member(self, team: Team, member: Mapping[str, Any],
                    max_budget: int | None, may_create: bool = True) -> TeamMembership:
        user_id = self._resolve_member(member, may_create)
        if self._membership(team.team_id, user_id) is not None:
            raise BadRequest(f"User={user_id} is already a member of team={team.team_id}",
                             param="member")
        # Only an explicit max_budget_in_team is the member's own: the budget, window and
        # limits it is not given follow the team's team_member_* defaults as they are at
        # request time (NULL columns), so /team/update changes them for every such member.
        now = utcnow()
        return TeamMembership.create(
            team_id=team.team_id, user_id=user_id, role=member.get("role") or "user",
            max_budget=max_budget, budget_reset_at=default_window_end(team, now),
            budget_reset_day=None if (window := default_window(team)) is None else window.day(now),
            created_at=now,
        )

    # -- team lifecycle ---------------------------------------------------------------------------

    def create(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(actor, "create teams")
        state = self.state
        params = dict(params)
        members = params.pop("members_with_roles", None) or []
        with state.store.use() as db, db.atomic():
            team_id = params.pop("team_id", None) or str(uuid.uuid4())
            if Team.get_or_none(Team.team_id == team_id) is not None:
                raise BadRequest(f"Team already exists: team_id={team_id}", param="team_id")
            now = utcnow()
            team = Team(team_id=team_id, created_by=actor.identity, created_at=now)
            self._apply(team, params)
            team.save(force_insert=True)
            added = [self._add_member(team, member, None) for member in members]
            info = team_info(team, self._members(team_id))
            write_audit(state.settings.store_audit_logs, actor, "created", "team", team_id,
                        after=info)
        state.invalidate(f"team:{team_id}", *(f"user:{m.user_id}" for m in added))
        return info

    def provision(self, team_id: str, *, source: str) -> Team:
        """Create a team on first sight (JWT ``team_id_upsert``); return the existing one
        otherwise. A new team has no model restriction, budget or limits."""
        with self.state.store.use() as db, db.atomic():
            team = Team.get_or_none(Team.team_id == team_id)
            if team is not None:
                return team
            now = utcnow()
            team = Team.create(team_id=team_id, created_by=source, created_at=now,
                               updated_at=now)
        self.state.invalidate(f"team:{team_id}")
        return team

    def info(self, actor: Principal, team_id: str) -> dict[str, Any]:
        with self.state.store.use():
            member = self._membership(team_id, actor.user_id)
            # Outsiders are refused before the lookup: no oracle for which teams exist.
            if acts_outside(actor, team_id) and actor.role is not Role.PROXY_ADMIN_VIEWER:
                member = None
            if not (actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER or member
                    or actor.team_id == team_id):
                raise Forbidden(f"You are not a member of team={team_id}.",
                                reason="other_team_info")
            team = self._get(team_id)
            members = self._members(team_id)
            keys = Key.select().where(Key.team_id == team_id).order_by(Key.created_at.desc())
            if not (actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER
                    or (member is not None and member.role == "admin")):
                keys = keys.where(Key.user_id.is_null() | (Key.user_id == actor.user_id))
            return {
                "team_id": team_id,
                "team_info": team_info(team, members),
                "keys": [key_info(k) for k in keys],
                "team_memberships": [membership_info(m) for m in members],
            }

    def update(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(actor, "update teams")
        state = self.state
        params = dict(params)
        team_id = params.pop("team_id")
        with state.store.use() as db, db.atomic():
            team = self._get(team_id)
            before = team_info(team)
            self._apply(team, params)
            team.save()
            if team.team_member_budget_duration != before["team_member_budget_duration"]:
                # a changed default window starts a new schedule for the members that follow
                # it (their spend stays), as setting a member's own budget_duration does —
                # and as it does, first resets those whose window is already over
                now, window = utcnow(), default_window(team)
                followers = ((TeamMembership.team_id == team_id)
                             & TeamMembership.budget_duration.is_null())
                TeamMembership.update(spend=0, soft_alerted=False).where(
                    followers & (TeamMembership.budget_reset_at <= now)).execute()
                TeamMembership.update(
                    budget_reset_at=None if window is None else window.after(now),
                    budget_reset_day=None if window is None else window.day(now)).where(
                    followers).execute()
            info = team_info(team, self._members(team_id))
            write_audit(state.settings.store_audit_logs, actor, "updated", "team", team_id,
                        before=before, after=info)
        state.invalidate(f"team:{team_id}")
        return info

    def set_blocked(self, actor: Principal, team_id: str, blocked: bool) -> dict[str, Any]:
        self._require_admin(actor, "block or unblock teams")
        state = self.state
        with state.store.use() as db, db.atomic():
            team = self._get(team_id)
            team.blocked, team.updated_at = blocked, utcnow()
            team.save()
            info = team_info(team, self._members(team_id))
            write_audit(state.settings.store_audit_logs, actor,
                        "blocked" if blocked else "unblocked", "team", team_id, after=info)
        state.invalidate(f"team:{team_id}")
        return info

    def delete(self, actor: Principal, team_ids: list[str]) -> dict[str, Any]:
        """Delete teams (all or none) with their memberships and every key of the team."""
        self._require_admin(actor, "delete teams")
        if not team_ids:
            raise BadRequest("Pass at least one team id in `team_ids`.", param="team_ids")
        state = self.state
        with state.store.use() as db, db.atomic():
            teams = []
            for team_id in dict.fromkeys(team_ids):
                team = Team.get_or_none(Team.team_id == team_id)
                if team is None:
                    raise NotFound(f"Team not found: team_id={team_id}", param="team_ids")
                teams.append(team)
            deleted_keys: list[str] = []
            for team in teams:
                deleted_keys += KeyService(state).delete_where(actor, Key.team_id == team.team_id)
                TeamMembership.delete().where(TeamMembership.team_id == team.team_id).execute()
                write_audit(state.settings.store_audit_logs, actor, "deleted", "team",
                            team.team_id, before=team_info(team))
                team.delete_instance()
        state.invalidate(*(f"team:{t.team_id}" for t in teams))
        KeyService(state).announce_revoked(actor, deleted_keys)
        return {"deleted_teams": [t.team_id for t in teams], "deleted_keys": deleted_keys}

    def list(self, actor: Principal, query: Mapping[str, Any]) -> list[dict[str, Any]]:
        privileged = actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER
        if not privileged and query.get("user_id") not in (None, actor.user_id):
            raise Forbidden("You can only list your own teams.", param="user_id",
                            reason="other_users_teams")
        with self.state.store.use():
            select = Team.select().order_by(Team.created_at.desc(), Team.id.desc())
            if not (actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER):
                mine = TeamMembership.select(TeamMembership.team_id).where(
                    TeamMembership.user_id == (actor.user_id or ""))
                select = select.where(Team.team_id.in_(mine) | (Team.team_id == actor.team_id))
                confined = team_confinement(actor)
                if confined is not None:
                    select = select.where(Team.team_id == confined)
            if query.get("user_id") is not None:
                of_user = TeamMembership.select(TeamMembership.team_id).where(
                    TeamMembership.user_id == query["user_id"])
                select = select.where(Team.team_id.in_(of_user))
            teams = list(select)
            members: dict[str, list[TeamMembership]] = {t.team_id: [] for t in teams}
            step = _MEMBERS_PER_QUERY  # one query per that many teams, not one per team
            for chunk in range(0, len(teams), step):
                ids = [t.team_id for t in teams[chunk:chunk + step]]
                for m in TeamMembership.select().where(TeamMembership.team_id.in_(ids)
                                                       ).order_by(TeamMembership.id):
                    members[m.team_id].append(m)
            return [team_info(t, members[t.team_id]) for t in teams]

    # -- members ----------------------------------------------------------------------------------

    def member_add(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        team_id = params["team_id"]
        members = params["member"] if isinstance(params["member"], list) else [params["member"]]
        with state.store.use() as db, db.atomic():
            self._require_team_admin(actor, team_id)  # first: no oracle for team ids
            team = self._get(team_id)
            added = [self._add_member(team, m, params.get("max_budget_in_team"),
                                      may_create=actor.is_admin) for m in members]
            for member in added:
                write_audit(state.settings.store_audit_logs, actor, "member_added", "team",
                            team_id, after=membership_info(member))
            info = team_info(team, self._members(team_id))
            users = {u.user_id: u for u in User.select().where(
                User.user_id.in_([m.user_id for m in added]))}
            updated_users = [_user_summary(users[m.user_id], actor.is_admin) for m in added]
        state.invalidate(f"team:{team_id}", *(f"user:{m.user_id}" for m in added))
        return {**info, "updated_users": updated_users,
                "updated_team_memberships": [membership_info(m) for m in added]}

    def _member_for(self, team_id: str, params: Mapping[str, Any]) -> TeamMembership:
        user_id = params.get("user_id")
        if user_id is None:
            user = User.get_or_none(User.user_email == params.get("user_email"))
            user_id = user.user_id if user else None
        member = self._membership(team_id, user_id)
        if member is None:
            raise NotFound(f"User is not a member of team={team_id}", param="user_id")
        return member

    def member_delete(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Remove a member, and revoke the user's keys of the team (into the deleted-keys
        table, ``key_revoked`` sent): they acted for a member the user no longer is."""
        state = self.state
        team_id = params["team_id"]
        with state.store.use() as db, db.atomic():
            self._require_team_admin(actor, team_id)  # first: no oracle for team ids
            team = self._get(team_id)
            member = self._member_for(team_id, params)
            write_audit(state.settings.store_audit_logs, actor, "member_deleted", "team",
                        team_id, before=membership_info(member))
            member.delete_instance()
            # The user's keys of this team go with the membership: such a key would keep
            # calling with the team's models and budget, free of the member's own limits
            # (allowed_models, max_budget_in_team), which left with the membership.
            deleted_keys = KeyService(state).delete_where(
                actor, (Key.team_id == team_id) & (Key.user_id == member.user_id))
            info = team_info(team, self._members(team_id))
        state.invalidate(f"team:{team_id}", f"user:{member.user_id}")
        KeyService(state).announce_revoked(actor, deleted_keys)
        return info

    @staticmethod
    def _refuse_own_membership_change(actor: Principal, member: TeamMembership,
                                      params: Mapping[str, Any]) -> None:
        """A team admin changes other members' role, budget, limits and models, never its
        own (a proxy admin may): it would raise its own budget or limits at will."""
        if actor.is_admin or member.user_id != actor.user_id:
            return
        fields = [name for name in _MEMBER_FIELDS if name in params]
        if fields:
            raise Forbidden(f"A team admin cannot change its own membership ({', '.join(fields)})"
                            f" in team={member.team_id}: ask a proxy admin.",
                            param=fields[0], reason="own_membership_update")

    def member_update(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        team_id = params["team_id"]
        with state.store.use() as db, db.atomic():
            self._require_team_admin(actor, team_id)  # first: no oracle for team ids
            team = self._get(team_id)
            member = self._member_for(team_id, params)
            self._refuse_own_membership_change(actor, member, params)
            before = membership_info(member)
            if "role" in params:
                member.role = params["role"]
            if "max_budget_in_team" in params:
                member.max_budget = params["max_budget_in_team"]
            for name in ("tpm_limit", "rpm_limit", "allowed_models"):
                if name in params:
                    setattr(member, name, params[name])
            if "budget_duration" in params:
                # null: the member follows the team's default window (a new schedule)
                set_window(member, params["budget_duration"], utcnow(), default_window(team))
            member.save()
            info = membership_info(member)
            write_audit(state.settings.store_audit_logs, actor, "member_updated", "team",
                        team_id, before=before, after=info)
            user = User.get_or_none(User.user_id == member.user_id)
        state.invalidate(f"team:{team_id}", f"user:{member.user_id}")
        return {"team_id": team_id, "user_id": member.user_id,
                "user_email": user.user_email if user is not None else None, **info}
