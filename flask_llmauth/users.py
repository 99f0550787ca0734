"""The user service: internal users, their roles, models, budgets and limits.

Only a proxy admin creates, deletes or re-roles users. Anyone else may read itself and
change only its own harmless profile fields (``user_email``, ``user_alias``): never its
role, models, budgets, spend or limits (LiteLLM CVE-2026-47102, mass assignment).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import current_app

from .audit import write_audit
from .budgets import set_window
from .durations import isoformat, utcnow
from .errors import BadRequest, Forbidden, NotFound
from .keys import KeyService, key_info, read_confinement, team_confinement
from .money import to_usd
from .principal import USER_ROLES, Principal, Role
from .signals import send as send_signal
from .signals import user_provisioned
from .store.tables import Key, Team, TeamMembership, User
from .teams import default_window, team_info

if TYPE_CHECKING:
    from .extension import LLMAuthState

#: Fields a non-admin may change on its own user row.
SELF_SERVICE_FIELDS = frozenset({"user_email", "user_alias"})
_PLAIN_FIELDS = ("user_email", "user_alias", "models", "max_budget", "soft_budget",
                 "tpm_limit", "rpm_limit", "max_parallel_requests", "model_max_budget",
                 "metadata", "blocked", "spend")


#: The user's personal account (its models, budget, limits, spend over every team and its
#: personal keys, metadata): what a team key, which acts inside its team only, is not shown.
PERSONAL_FIELDS = ("models", "spend", "max_budget", "soft_budget", "budget_duration",
                   "budget_reset_at", "tpm_limit", "rpm_limit", "max_parallel_requests",
                   "model_max_budget", "metadata")


def user_info(user: Any) -> dict[str, Any]:
    return {
        "user_id": user.user_id,
        "user_email": user.user_email,
        "user_alias": user.user_alias,
        "user_role": user.user_role,
        "models": list(user.models or []),
        "spend": to_usd(user.spend),
        "max_budget": to_usd(user.max_budget),
        "soft_budget": to_usd(user.soft_budget),
        "budget_duration": user.budget_duration,
        "budget_reset_at": isoformat(user.budget_reset_at),
        "tpm_limit": user.tpm_limit,
        "rpm_limit": user.rpm_limit,
        "max_parallel_requests": user.max_parallel_requests,
        "model_max_budget": dict(user.model_max_budget or {}),
        "metadata": dict(user.metadata or {}),
        "blocked": bool(user.blocked),
        "sso_user_id": user.sso_user_id,
        "created_at": isoformat(user.created_at),
        "updated_at": isoformat(user.updated_at),
    }


class UserService:
    def __init__(self, state: LLMAuthState) -> None:
        self.state = state

    def _get(self, user_id: str | None = None, user_email: str | None = None) -> User:
        user = None
        if user_id is not None:
            user = User.get_or_none(User.user_id == user_id)
        elif user_email is not None:
            user = User.get_or_none(User.user_email == user_email)
        else:
            raise BadRequest("Pass user_id or user_email.", param="user_id")
        if user is None:
            raise NotFound("User not found.", param="user_id" if user_id else "user_email")
        return user

    def _teams_of(self, user_id: str) -> list[str]:
        return [m.team_id for m in TeamMembership.select(TeamMembership.team_id)
                .where(TeamMembership.user_id == user_id)]

    @staticmethod
    def _require_admin(actor: Principal, what: str) -> None:
        if not actor.is_admin:
            raise Forbidden(f"Only a proxy admin can {what}.", reason="admin_required")

    def _apply(self, user: User, params: Mapping[str, Any]) -> None:
        now = utcnow()
        for name, value in params.items():
            if name == "user_role":
                role = Role.parse(value)
                if role not in USER_ROLES:  # team and customer are never a user's role
                    raise BadRequest(f"A user cannot have the role {role.value!r}.",
                                     param="user_role")
                user.user_role = role.value
            elif name == "budget_duration":
                set_window(user, value, now)
            elif name in _PLAIN_FIELDS:
                setattr(user, name, value)
        user.updated_at = now

    def create(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(actor, "create users")
        state = self.state
        params = dict(params)
        teams = list(dict.fromkeys(params.pop("teams", None) or []))  # a repeat joins once
        auto_create_key = params.pop("auto_create_key", True)
        key_params: dict[str, Any] = {k: params.pop(k) for k in ("key_alias", "duration")
                                      if k in params}
        with state.store.use() as db, db.atomic():
            user_id = params.pop("user_id", None) or str(uuid.uuid4())
            if User.get_or_none(User.user_id == user_id) is not None:
                raise BadRequest(f"User already exists: user_id={user_id}", param="user_id")
            self._check_email_free(params.get("user_email"))
            user = User(user_id=user_id, created_at=utcnow())
            params.setdefault("user_role", Role.INTERNAL_USER)
            self._apply(user, params)
            user.save(force_insert=True)
            for team_id in teams:
                team = Team.get_or_none(Team.team_id == team_id)
                if team is None:
                    raise BadRequest(f"Team not found: team_id={team_id}", param="teams")
                now = utcnow()  # the member follows the team's team_member_* defaults
                window = default_window(team)
                TeamMembership.create(team_id=team_id, user_id=user_id, role="user",
                                      budget_reset_at=None if window is None
                                      else window.after(now),
                                      budget_reset_day=None if window is None
                                      else window.day(now),
                                      created_at=now)
            info = user_info(user)
            write_audit(state.settings.store_audit_logs, actor, "created", "user", user_id,
                        after=info)
            result = {**info, "teams": teams}
            if auto_create_key:
                key_params.update(user_id=user_id, models=list(user.models or []))
                result.update(KeyService(state).generate(actor, key_params))
                result.update(info)
        # The user's tag too: a caller seen before the row existed (JWT, OAuth2, headers)
        # has "no user" cached, which must not outlive the new row's role and limits.
        state.invalidate(f"user:{user_id}", *(f"team:{t}" for t in teams))
        return result

    def provision(self, user_id: str, *, user_email: str | None = None,
                  role: Role = Role.INTERNAL_USER_VIEWER, source: str) -> User:
        """Create a user on first sight (JWT upsert, SSO login); return the existing one
        otherwise. Emits ``user_provisioned`` for new rows."""
        with self.state.store.use() as db, db.atomic():
            user = User.get_or_none(User.user_id == user_id)
            if user is not None:
                return user
            now = utcnow()
            user = User.create(user_id=user_id, user_email=user_email, user_role=role.value,
                               created_at=now, updated_at=now)
        send_signal(user_provisioned, current_app._get_current_object(), user_id=user_id,  # type: ignore[attr-defined]
                    source=source)
        return user

    def info(self, actor: Principal, user_id: str | None) -> dict[str, Any]:
        user_id = user_id or actor.user_id
        if user_id is None:
            raise BadRequest("Pass ?user_id=...", param="user_id")
        if not (actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER
                or user_id == actor.user_id):
            raise Forbidden(
                f"key not allowed to access this user's info. user_id={user_id}, key's "
                f"user_id={actor.user_id}", reason="other_user_info",
            )
        confined = read_confinement(actor)
        with self.state.store.use():
            user = self._get(user_id)
            keys = Key.select().where(Key.user_id == user_id)
            teams = self._teams_of(user_id)
            if confined is not None:  # a team key: what belongs to its team only
                keys = keys.where(Key.team_id == confined)
                teams = [t for t in teams if t == confined]
            key_rows = [key_info(k) for k in keys.order_by(Key.created_at.desc())]
            team_rows = [team_info(t) for t in Team.select().where(Team.team_id.in_(teams))
                         .order_by(Team.created_at, Team.id)] if teams else []
        info = user_info(user)
        if confined is not None:
            for name in PERSONAL_FIELDS:
                del info[name]
        return {"user_id": user_id, "user_info": {**info, "teams": teams},
                "keys": key_rows, "teams": team_rows}

    def update(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Change a user. An admin names the user by ``user_id`` (or, without one, by
        ``user_email`` as LiteLLM does); anyone else always updates itself, and only its
        :data:`SELF_SERVICE_FIELDS`."""
        state = self.state
        params = dict(params)
        user_id = params.pop("user_id", None)
        with state.store.use() as db, db.atomic():
            if actor.is_admin:
                user = self._get(user_id, params.get("user_email") if user_id is None else None)
            else:
                if actor.user_id is None or user_id not in (None, actor.user_id):
                    raise Forbidden("You can only update your own user.", param="user_id",
                                    reason="other_user_update")
                if team_confinement(actor) is not None:
                    raise Forbidden("A team key cannot change its user: use a personal key.",
                                    reason="team_key_user_update")
                refused = sorted(set(params) - SELF_SERVICE_FIELDS)
                if refused:
                    raise Forbidden(
                        f"You cannot change these fields of your own user: {refused}. Ask a "
                        "proxy admin.", param=refused[0], reason="user_self_escalation",
                    )
                user = self._get(actor.user_id)
            self._check_email_free(params.get("user_email"), user.user_id)
            before = user_info(user)
            self._apply(user, params)
            user.save()
            info = user_info(user)
            write_audit(state.settings.store_audit_logs, actor, "updated", "user",
                        user.user_id, before=before, after=info)
        state.invalidate(f"user:{user.user_id}")
        return info

    @staticmethod
    def _check_email_free(email: str | None, user_id: str | None = None) -> None:
        """An e-mail address names one user at most (SSO and ``/user/update`` look users
        up by it), so nobody can take over another user's address."""
        if email is None:
            return
        query = User.select(User.id).where(User.user_email == email)
        if user_id is not None:
            query = query.where(User.user_id != user_id)
        if query.exists():
            raise BadRequest("This user_email is already used by another user.",
                             param="user_email", reason="email_in_use")

    def delete(self, actor: Principal, user_ids: list[str]) -> dict[str, Any]:
        """Delete users (all or none) with their memberships and every key they own."""
        self._require_admin(actor, "delete users")
        if not user_ids:
            raise BadRequest("Pass at least one user id in `user_ids`.", param="user_ids")
        state = self.state
        with state.store.use() as db, db.atomic():
            users = []
            for user_id in dict.fromkeys(user_ids):
                user = User.get_or_none(User.user_id == user_id)
                if user is None:
                    raise NotFound(f"User not found: user_id={user_id}", param="user_ids")
                users.append(user)
            deleted_keys: list[str] = []
            for user in users:
                deleted_keys += KeyService(state).delete_where(actor, Key.user_id == user.user_id)
                TeamMembership.delete().where(TeamMembership.user_id == user.user_id).execute()
                write_audit(state.settings.store_audit_logs, actor, "deleted", "user",
                            user.user_id, before=user_info(user))
                user.delete_instance()
        for user in users:
            state.invalidate(f"user:{user.user_id}")
        KeyService(state).announce_revoked(actor, deleted_keys)
        return {"deleted_users": [u.user_id for u in users], "deleted_keys": deleted_keys}

    def list(self, actor: Principal, query: Mapping[str, Any]) -> dict[str, Any]:
        if not (actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER):
            raise Forbidden("Only proxy admins can list users.", reason="admin_required")
        page, size = query["page"], query["page_size"]
        with self.state.store.use():
            select = User.select()
            if query.get("role") is not None:
                select = select.where(User.user_role == query["role"].value)
            if query.get("user_ids"):
                select = select.where(User.user_id.in_(query["user_ids"]))
            total = select.count()
            users = [user_info(u) for u in
                     select.order_by(User.created_at.desc(), User.id.desc()).paginate(page, size)]
        return {"users": users, "total": total, "page": page, "page_size": size,
                "total_pages": math.ceil(total / size) if total else 0}
