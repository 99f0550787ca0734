"""The key service: the one place where virtual keys are created, changed and checked for
*who may do this to whom*. The management API and the CLI both call it.

Rules (LiteLLM's, with its escalation bugs closed):

* a proxy admin may do anything;
* a non-admin creates keys only for itself, never reassigns a key to another user, never
  mints a key for models or routes beyond its own, never sets ``spend`` or unblocks, and
  loosens a key's limits only with a credential that reaches every model of the key
  (:func:`_loosened_limit`);
* a team admin manages every key of its team; a plain member only what the team's
  ``team_member_permissions`` allow (default: ``/key/info``, ``/key/health``);
* a key carries its user's role, so a non-admin never mints, regenerates or hands over a
  key of a user whose role outranks its own;
* only a proxy admin chooses a key's ``organization_id`` (which the spend log and the
  reports attribute the key's spend to): anyone else's key belongs to its team's
  organization, a personal key to its creator's (:meth:`KeyService._settle_organization`);
* a team key (which the team's admins can mint and regenerate) acts for its user inside
  its team only (:func:`team_confinement`).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import peewee
from flask import current_app

from .audit import write_audit
from .authn.virtual_key import stored_role
from .authz.routes import RouteInfo, RoutePatterns, classify, expand, group_name
from .budgets import set_window
from .config import MIN_DISTINCT_CHARACTERS
from .crypto import KEY_PREFIX, MIN_CHOSEN_KEY_CHARACTERS, abbreviate, generate_key
from .durations import Duration, aware, isoformat, parse_duration, utcnow
from .errors import BadRequest, Forbidden, NotFound
from .money import to_usd
from .network import parse_networks
from .principal import Principal, Role, outranks, role_cap
from .ratelimits import limit_value
from .signals import key_created, key_revoked, key_rotated
from .signals import send as send_signal
from .store.tables import DeletedKey, Key, KeyGrace, Team, TeamMembership, User

if TYPE_CHECKING:
    from .extension import LLMAuthState

#: ``key_type`` → the ``allowed_routes`` it stands for (LiteLLM's shorthand).
KEY_TYPES: dict[str, tuple[str, ...]] = {
    "llm_api": ("llm_api_routes",),
    "management": ("management_routes",),
    "read_only": ("info_routes",),
    "default": (),
}
#: The longest caller-chosen secret accepted.
MAX_CHOSEN_KEY_LENGTH = 256
#: Read-only roles: a team-admin membership lets them read the team's keys, never change
#: the keys or the team's members.
VIEWER_ROLES = frozenset({Role.PROXY_ADMIN_VIEWER, Role.INTERNAL_USER_VIEWER})


def chosen_secret(actor: Principal, raw: Any, param: str) -> str | None:
    """A caller-chosen secret (``key`` on ``/key/generate``, ``new_key`` on regenerate), or
    ``None`` when none is given. Only a proxy admin may choose one (403 naming the field,
    before anything is looked up); it must look like a generated key: ``sk-`` and at least
    as many printable characters as a LiteLLM-generated key (128 bits), not a pattern
    (400). The messages never contain the value."""
    if raw is None:
        return None
    if not actor.is_admin:
        raise Forbidden(
            f"Only a proxy admin can choose a key's secret: leave out '{param}' and a "
            "generated key is returned.", param=param, reason="chosen_key_secret")
    text = raw[len(KEY_PREFIX):] if isinstance(raw, str) else ""
    if (not isinstance(raw, str) or not raw.startswith(KEY_PREFIX)
            or len(text) < MIN_CHOSEN_KEY_CHARACTERS or len(raw) > MAX_CHOSEN_KEY_LENGTH
            or not raw.isprintable() or " " in raw
            or len(set(text)) < MIN_DISTINCT_CHARACTERS):
        raise BadRequest(
            f"Invalid key format. A chosen key must be as unguessable as a generated one: "
            f"'sk-' followed by at least {MIN_CHOSEN_KEY_CHARACTERS} random printable characters "
            f"(no spaces, at least {MIN_DISTINCT_CHARACTERS} different ones; at most "
            f"{MAX_CHOSEN_KEY_LENGTH} in all), e.g. 'sk-' + secrets.token_urlsafe(32). Leave "
            f"'{param}' out to get a generated key.", param=param)
    return raw


def key_info(key: Any) -> dict[str, Any]:
    """A key as LiteLLM's ``/key/info`` shows it; ``token`` is the public ``key_id``."""
    return {
        "key_id": key.key_id,
        "token": key.key_id,
        "token_id": key.key_id,
        "key_name": key.key_name,
        "key_alias": key.key_alias,
        "user_id": key.user_id,
        "team_id": key.team_id,
        "organization_id": key.organization_id,
        "models": list(key.models or []),
        "aliases": dict(key.aliases or {}),
        "allowed_routes": list(key.allowed_routes or []),
        "key_type": key.key_type,
        "allowed_ips": key.allowed_ips,
        "spend": to_usd(key.spend),
        "max_budget": to_usd(key.max_budget),
        "soft_budget": to_usd(key.soft_budget),
        "budget_duration": key.budget_duration,
        "budget_reset_at": isoformat(key.budget_reset_at),
        "tpm_limit": key.tpm_limit,
        "rpm_limit": key.rpm_limit,
        "max_parallel_requests": key.max_parallel_requests,
        "model_rpm_limit": dict(key.model_rpm_limit or {}),
        "model_tpm_limit": dict(key.model_tpm_limit or {}),
        "model_max_budget": dict(key.model_max_budget or {}),
        "metadata": dict(key.metadata or {}),
        "expires": isoformat(key.expires),
        "blocked": bool(key.blocked),
        "created_by": key.created_by,
        "updated_by": key.updated_by,
        "created_at": isoformat(key.created_at),
        "updated_at": isoformat(key.updated_at),
        "last_used_at": isoformat(key.last_used_at),
        "last_active": isoformat(key.last_used_at),
        "rotation_count": key.rotation_count,
        "last_rotation_at": isoformat(key.last_rotation_at),
        "max_role": key.max_role,
        "config": {},
        "permissions": {},
        "litellm_budget_table": None,
    }


class LastUsedRecorder:
    """Remembers when keys were used and writes ``last_used_at`` in batches.

    The request path stores ``pending[key_id] = epoch seconds`` (one dict store: the virtual
    key authenticator holds this very dict); ``flush`` runs in the background thread (and at
    exit), one UPDATE per key used since the last flush. It takes the entries out one
    ``dict.pop`` at a time, each atomic, so a use recorded meanwhile is never lost: it stays
    for the next flush.
    """

    def __init__(self) -> None:
        #: ``key_id -> last use`` (epoch seconds) since the last flush.
        self.pending: dict[str, float] = {}

    def touch(self, key_id: str) -> None:
        self.pending[key_id] = time.time()

    def flush(self, state: LLMAuthState) -> int:
        source = self.pending
        if not source:
            return 0
        pending: dict[str, float] = {}
        for key_id in list(source):
            when = source.pop(key_id, None)
            if when is not None:
                pending[key_id] = when
        with state.store.use() as db, db.atomic():
            for key_id in sorted(pending):
                used_at = datetime.fromtimestamp(pending[key_id], timezone.utc).replace(tzinfo=None)
                Key.update(last_used_at=used_at).where(Key.key_id == key_id).execute()
        return len(pending)


class KeyService:
    def __init__(self, state: LLMAuthState) -> None:
        self.state = state

    # -- lookups ----------------------------------------------------------------------------------

    def _get(self, identifier: str) -> Key:
        """A key by raw secret (``sk-...``) or by ``key_id``; 404 otherwise."""
        if not isinstance(identifier, str) or not identifier:
            raise BadRequest("No key passed in.", param="key")
        if identifier.startswith(KEY_PREFIX):
            key = Key.get_or_none(Key.digest == self.state.digester.digest(identifier))
        else:
            key = Key.get_or_none(Key.key_id == identifier[:64])
        if key is None:
            raise NotFound("Key not found.", param="key")
        return key

    def _membership(self, team_id: str | None, user_id: str | None) -> TeamMembership | None:
        if not team_id or not user_id:
            return None
        return TeamMembership.get_or_none(
            (TeamMembership.team_id == team_id) & (TeamMembership.user_id == user_id)
        )

    def _team(self, team_id: str) -> Team:
        team = Team.get_or_none(Team.team_id == team_id)
        if team is None:
            raise BadRequest(f"Team not found: team_id={team_id}", param="team_id")
        return team

    # -- who may do this to whom ---------------------------------------------------------------

    def _is_team_admin(self, actor: Principal, team_id: str | None) -> bool:
        if acts_outside(actor, team_id):
            return False
        member = self._membership(team_id, actor.user_id)
        return member is not None and member.role == "admin"

    def _member_may(self, actor: Principal, key: Key, route: str) -> bool:
        if acts_outside(actor, key.team_id):
            return False
        team = Team.get_or_none(Team.team_id == key.team_id)
        if team is None or self._membership(key.team_id, actor.user_id) is None:
            return False
        permissions = team.team_member_permissions
        if permissions is None:
            permissions = self.state.settings.default_team_member_permissions
        return route in permissions

    def can_view(self, actor: Principal, key: Key) -> bool:
        if actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER or actor.key_id == key.key_id:
            return True
        if actor.user_id is None or acts_outside(actor, key.team_id):
            return False
        if key.user_id == actor.user_id:
            return True
        if key.team_id and self._membership(key.team_id, actor.user_id) is not None:
            return key.user_id is None or self._is_team_admin(actor, key.team_id)
        return False

    def can_modify(self, actor: Principal, key: Key, route: str) -> bool:
        """Admin; team admin of a team key; the owner of a personal key; the owner of a team
        key when the team lets members call ``route``."""
        if actor.is_admin:
            return True
        if actor.role in VIEWER_ROLES or not actor.user_id:
            return False
        if acts_outside(actor, key.team_id):
            return False
        if key.team_id:
            if self._is_team_admin(actor, key.team_id):
                return True
            return key.user_id == actor.user_id and self._member_may(actor, key, route)
        return key.user_id == actor.user_id

    def _check_subject(self, actor: Principal, user_id: str | None) -> None:
        """A key of user ``user_id`` carries that user's role. A non-admin never creates,
        takes over (regenerates, or hands to another user and then regenerates) or is given
        the power to hand out such a key when that role outranks its own: a team admin could
        otherwise mint a proxy admin's key."""
        if actor.is_admin or not user_id or user_id == actor.user_id:
            return
        user = User.get_or_none(User.user_id == user_id)
        if user is not None and outranks(stored_role(user.user_role), actor.role):
            raise Forbidden(
                f"User={user_id} has a role above yours: only a proxy admin can create or "
                "hand over that user's keys.", param="user_id", reason="privileged_user_key")

    def _require_modify(self, actor: Principal, key: Key, route: str, verb: str) -> None:
        if not self.can_modify(actor, key, route):
            raise Forbidden(f"You are not authorized to {verb} this key", reason="key_not_yours")

    # -- escalation guards ----------------------------------------------------------------------

    def _check_grants(self, actor: Principal, params: dict[str, Any], team: Team | None,
                      key: Key | None = None) -> None:
        """A non-admin never grants a key more than the credential it acts with.

        Checked against the actor's own credential (``creator limits``): models (and alias
        names and targets), routes (``allowed_routes``/``key_type``), ``allowed_ips``,
        expiry, ``max_budget``, ``tpm_limit``, ``rpm_limit``, ``max_parallel_requests``,
        and, where the actor's key has them, ``budget_duration`` and the per-model limits.
        ``spend`` is admin-only; ``blocked`` needs a proxy or team admin. On ``/key/update``
        (``key`` given) a value that only narrows what the key already has always passes,
        so an owner can tighten a key an admin made generous.
        """
        if actor.is_admin:
            return
        if "spend" in params:
            raise Forbidden("Only a proxy admin can set a key's spend.", param="spend",
                            reason="spend_escalation")
        team_admin = team is not None and self._is_team_admin(actor, team.team_id)
        if "blocked" in params and not team_admin:
            raise Forbidden("Only a proxy or team admin can block or unblock a key.",
                            param="blocked", reason="block_escalation")
        access = self.state.models
        membership = self._membership(team.team_id, actor.user_id) if team is not None else None
        child_user = params["user_id"] if "user_id" in params else (
            key.user_id if key is not None else None)
        limits = access.creator_limits(actor, team, child_user, membership)
        current_models = access.key_models(key.models, team) if key is not None else None
        if key is None and "models" not in params and limits:
            # A new key inherits its creator's models: the first of its lists that keeps it
            # inside all of them (normally there is just one).
            fitting = [m for m in limits if all(access.within(m, o, team) for o in limits)]
            if not fitting:
                raise Forbidden("Your credential is limited by several model lists: name the "
                                "key's `models` explicitly.", param="models",
                                reason="models_escalation")
            params["models"] = list(fitting[0])
        if "models" in params:
            requested = params["models"]
            narrowing = current_models is not None and access.within(requested, current_models,
                                                                     team)
            for allowance in limits:
                if not narrowing and not access.within(requested, allowance, team):
                    raise Forbidden(
                        "You cannot create or change a key for models beyond your own. "
                        f"Your models={list(allowance)}, requested={list(requested)}",
                        param="models", reason="models_escalation",
                    )
        if params.get("aliases"):
            old = dict(key.aliases or {}) if key is not None else {}
            for alias, target in params["aliases"].items():
                if old.get(alias) == target:
                    continue
                for allowance in limits:
                    for name in (alias, target):
                        if not access.name_within(name, allowance):
                            raise Forbidden(
                                f"You cannot alias {alias!r} to {target!r}: {name!r} is beyond "
                                f"your own models={list(allowance)}.", param="aliases",
                                reason="alias_escalation",
                            )
        if "allowed_routes" in params or "key_type" in params:
            routes = list(params.get("allowed_routes") or [])
            routes += KEY_TYPES.get(params.get("key_type") or "default", ())
            self._check_routes_reachable(actor, routes, key,
                                         self._subject_role(actor, child_user, team))
        self._check_limits(actor, params, key)
        if key is not None and (loosened := _loosened_limit(params, key)) is not None:
            # Loosening a limit re-grants the key: what it reaches must be the actor's to
            # grant. Otherwise an owner whose own credential is unbudgeted (but limited to
            # cheap models) lifts the budget an admin put on a key for dear ones.
            reaches = params["models"] if "models" in params else key.models
            for allowance in limits:
                if not access.within(reaches, allowance, team):
                    raise Forbidden(
                        f"You cannot loosen this key's {loosened}: the key reaches models "
                        f"beyond your own (your models={list(allowance)}, the key's="
                        f"{list(reaches)}). Only a proxy admin, or a credential that reaches "
                        "all of its models, loosens its limits; narrowing them is always "
                        "allowed.", param=loosened, reason="limit_escalation")

    @staticmethod
    def _settle_organization(actor: Principal, params: dict[str, Any], team: Team | None,
                             key: Key | None = None) -> None:
        """Only a proxy admin chooses a key's ``organization_id``: the spend log and the
        reports attribute the key's spend to it. Anyone else's new key belongs to its team's
        organization (a personal key to the organization of the credential creating it);
        an existing key keeps its own, and takes its new team's when it moves to another
        team. Naming that same value is accepted; any other value is a 403."""
        if actor.is_admin:
            return
        moved = key is not None and "team_id" in params and params["team_id"] != key.team_id
        if key is None or moved:
            expected = team.organization_id if team is not None else (
                actor.org_id if key is None and actor.team_id is None else None)
        else:
            expected = key.organization_id
        requested = params.get("organization_id", expected)
        if requested is None and key is None:
            requested = expected  # null on /key/generate means "not given": inherited
        if requested != expected:
            where = f"team={team.team_id}" if team is not None else "a personal key"
            raise Forbidden(
                "Only a proxy admin can set or change a key's organization_id: the key of "
                f"{where} belongs to organization_id={expected!r}, requested "
                f"organization_id={requested!r}.", param="organization_id",
                reason="organization_escalation")
        if key is None or moved:
            params["organization_id"] = expected
        else:
            params.pop("organization_id", None)

    def _check_limits(self, actor: Principal, params: dict[str, Any], key: Key | None) -> None:
        """Budget, rate limits, IPs and expiry: never looser than the actor's own key."""
        own = actor.key
        for name in _CAPPED_LIMITS:
            cap = getattr(own, name) if own is not None else actor.limits.get(name)
            if cap is None or name not in params:
                continue
            value, current = params[name], getattr(key, name) if key is not None else None
            narrowing = key is not None and (current is None or (
                value is not None and value <= current))
            if (value is None or value > cap) and not narrowing:
                shown = to_usd(cap) if name == "max_budget" else cap
                raise Forbidden(f"You cannot set {name} above your own key's {name}={shown}.",
                                param=name, reason="limit_escalation")
        if own is None:
            return
        if own.max_budget is not None and "budget_duration" in params:
            value = params["budget_duration"]
            text = value.text if value is not None else None
            if text != own.budget_duration and not (key is not None
                                                    and text == key.budget_duration):
                raise Forbidden("Your key has a budget: a key you create or change keeps its "
                                f"budget_duration={own.budget_duration}.",
                                param="budget_duration", reason="limit_escalation")
        for name in ("model_max_budget", "model_rpm_limit", "model_tpm_limit"):
            mine = _own_model_limits(own, name)
            # The per-model rate limits may also sit in the metadata (see _own_model_limits).
            sources = (name,) if name == "model_max_budget" else (name, "metadata")
            if not mine or not any(source in params for source in sources):
                continue
            after = _own_model_limits(SimpleNamespace(**{
                source: params[source] if source in params
                else getattr(key, source, None) for source in sources}), name)
            if after != mine and not (key is not None
                                      and after == _own_model_limits(key, name)):
                raise Forbidden(f"Your key has {name}={mine}: a key you create or change "
                                "keeps it.", param=name, reason="limit_escalation")
        if own.allowed_ips and "allowed_ips" in params:
            requested = params["allowed_ips"] or []
            current = (key.allowed_ips or []) if key is not None else None
            narrowing = current is not None and (not current or (
                requested and _networks_within(requested, current)))
            if not narrowing and not (requested and _networks_within(requested,
                                                                     own.allowed_ips)):
                raise Forbidden(f"A key you create or change must stay inside your own "
                                f"allowed_ips={list(own.allowed_ips)}.", param="allowed_ips",
                                reason="ips_escalation")
        if own.expires is not None and "duration" in params:
            duration = params["duration"]
            expires = None if duration is None else duration.after(utcnow())
            current_expiry = key.expires if key is not None else None
            narrowing = key is not None and (current_expiry is None or (
                expires is not None and expires <= current_expiry))
            if (expires is None or expires > own.expires) and not narrowing:
                raise Forbidden("A key you create or change cannot outlive your own key "
                                f"(expires {isoformat(own.expires)}).", param="duration",
                                reason="expiry_escalation")

    def _inherit(self, actor: Principal, params: dict[str, Any]) -> None:
        """A non-admin's new key starts with its creator's restrictions unless it asks for
        narrower ones (which :meth:`_check_grants` then verifies)."""
        own = actor.key
        if "allowed_routes" not in params and "key_type" not in params:
            params["allowed_routes"] = list(actor.allowed_routes)
        for name in _CAPPED_LIMITS:
            cap = getattr(own, name) if own is not None else actor.limits.get(name)
            if cap is not None:
                params.setdefault(name, cap)
        if own is None:
            return
        if own.allowed_ips:
            params.setdefault("allowed_ips", list(own.allowed_ips))
        if own.max_budget is not None and own.budget_duration and "budget_duration" not in params:
            params["budget_duration"] = parse_duration(own.budget_duration)
        for name in ("model_max_budget", "model_rpm_limit", "model_tpm_limit"):
            mine = _own_model_limits(own, name)
            if mine:
                params.setdefault(name, mine)

    @staticmethod
    def _subject_role(actor: Principal, user_id: str | None, team: Team | None) -> Role:
        """The role a key of ``user_id`` in ``team`` acts as (before any cap)."""
        if user_id is None:
            return Role.TEAM if team is not None else Role.INTERNAL_USER_VIEWER
        if user_id == actor.user_id:
            return actor.role
        user = User.get_or_none(User.user_id == user_id)
        return stored_role(user.user_role) if user is not None else Role.INTERNAL_USER

    def _check_routes_reachable(self, actor: Principal, routes: Iterable[str],
                                key: Key | None = None, subject: Role | None = None) -> None:
        """Every route granted must be one the actor's role reaches, inside its own
        ``allowed_routes``, and one the key's own role (``subject``) reaches: a key's
        ``allowed_routes`` lift its role's denials, which only a proxy admin may do. A plain
        path also grants the app's routes below it (``/v1/models`` covers
        ``/v1/models/{model_id}/purge``): each of those is held to the same rules."""
        routes = list(routes)
        policy = self.state.policy
        current = tuple(key.allowed_routes or ()) if key is not None else None
        if not routes:
            if actor.allowed_routes and current != ():
                raise Forbidden("Your key is limited to some routes; a key you create must be "
                                "too.", param="allowed_routes", reason="routes_escalation")
            return
        for entry in dict.fromkeys(routes):
            for info in self._granted_routes(entry):
                path = info.route
                if current and policy.routes_allow(current, path, info.groups):
                    continue  # the key could already call it: narrowing
                reachable = any(policy.role_allows(actor.role, info, safe)
                                for safe in (True, False))
                inside = not actor.allowed_routes or policy.key_route_allowed(
                    actor, path, info.groups)
                if not reachable or not inside:
                    raise Forbidden(
                        f"You cannot grant a key the route {path}: your own role or key "
                        "cannot call it.", param="allowed_routes", reason="routes_escalation",
                    )
                if subject is not None and not any(
                        policy.role_allows(subject, info, safe) for safe in (True, False)):
                    raise Forbidden(
                        f"You cannot grant a key the route {path}: the key's role "
                        f"({subject.value}) cannot call it, and only a proxy admin grants a "
                        "key routes beyond its role.", param="allowed_routes",
                        reason="routes_escalation",
                    )

    def _granted_routes(self, entry: str) -> list[RouteInfo]:
        """What an ``allowed_routes`` entry lets a key call: a group name its group's
        routes; a path or pattern itself and every route of the app it covers with its
        sub-paths (public routes and ``@require_role`` views aside: a key's routes never
        lift those)."""
        if group_name(entry) is not None:
            return [RouteInfo(route=p, endpoint="", groups=classify(p))
                    for p in expand((entry,))]
        granted = [RouteInfo(route=entry, endpoint="", groups=classify(entry))]
        pattern = RoutePatterns((entry,), prefix_match=True)
        app = current_app
        for rule in app.url_map.iter_rules():
            info = self.state.routes.info(rule, app.view_functions.get(rule.endpoint))
            if not info.public and info.required_roles is None and pattern.matches(info.route):
                granted.append(info)
        return granted

    # -- writes -----------------------------------------------------------------------------------

    def _apply(self, key: Key, params: Mapping[str, Any], now: datetime) -> None:
        """Copy validated fields onto a key row (``duration`` and ``budget_duration`` too)."""
        for name, value in params.items():
            if name == "duration":
                key.expires = None if value is None else value.after(now)
            elif name == "budget_duration":
                set_window(key, value, now)
            elif name == "key_type":
                key.key_type = value or "default"
            elif name == "tags":
                key.metadata = {**(key.metadata or {}), "tags": value}
            elif name in _PLAIN_FIELDS:
                setattr(key, name, value)
        if "key_type" in params and "allowed_routes" not in params:
            key.allowed_routes = list(KEY_TYPES[key.key_type])
        elif "allowed_routes" in params and params.get("key_type") not in (None, "default"):
            key.allowed_routes = list(dict.fromkeys(
                list(params["allowed_routes"] or []) + list(KEY_TYPES[key.key_type])
            ))

    def _ensure_user(self, user_id: str, actor: Principal) -> None:
        if User.get_or_none(User.user_id == user_id) is None:
            role = Role.INTERNAL_USER if actor.is_admin else actor.role
            User.create(user_id=user_id, user_role=role.value)

    def _check_alias_free(self, alias: str | None, key_id: str | None = None) -> None:
        if alias is None:
            return
        query = Key.select(Key.id).where(Key.key_alias == alias)
        if key_id is not None:
            query = query.where(Key.key_id != key_id)
        if query.exists():
            raise BadRequest(f"Key with alias '{alias}' already exists.", param="key_alias")

    def _key_free(self, raw: str, param: str) -> str:
        """``raw`` when no key has it (a proxy admin is told it is in use)."""
        if Key.select(Key.id).where(Key.digest == self.state.digester.digest(raw)).exists():
            raise BadRequest("This key value is already in use.", param=param)
        return raw

    def generate(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        """Create a key; the plaintext is in the result's ``key`` and nowhere else, ever."""
        state = self.state
        params = dict(params)
        custom = chosen_secret(actor, params.pop("key", None), "key")
        with state.store.use() as db, db.atomic():
            team_id = params.get("team_id")
            team = Team.get_or_none(Team.team_id == team_id) if team_id else None
            if team_id and team is None and actor.is_admin:
                raise BadRequest(f"Team not found: team_id={team_id}", param="team_id")
            if not actor.is_admin:
                self._check_generate_rights(actor, params, team)
                self._inherit(actor, params)
            self._settle_organization(actor, params, team)
            self._check_grants(actor, params, team)
            if team is not None and params.get("user_id"):
                if self._membership(team.team_id, params["user_id"]) is None:
                    raise BadRequest(
                        f"User={params['user_id']} not assigned to team={team.team_id}",
                        param="user_id",
                    )
            self._check_alias_free(params.get("key_alias"))
            raw = self._key_free(custom, "key") if custom is not None else generate_key(
                state.settings.key_entropy_bytes)
            if params.get("user_id"):
                self._ensure_user(params["user_id"], actor)
            now = utcnow()
            key = Key(
                key_id=str(uuid.uuid4()), digest=state.digester.digest(raw),
                key_name=abbreviate(raw), created_by=actor.identity,
                created_by_kind=actor.identity_kind, updated_by=actor.identity,
                created_at=now, updated_at=now,
            )
            if team is not None and team.organization_id and not params.get("organization_id"):
                key.organization_id = team.organization_id
            self._apply(key, params, now)
            own = actor.key
            if not actor.is_admin and own is not None and own.expires is not None and (
                    key.expires is None or key.expires > own.expires):
                key.expires = own.expires  # inherited: never outlives its creator's key
            _cap_role(actor, key)
            key.save(force_insert=True)
            info = key_info(key)
            write_audit(state.settings.store_audit_logs, actor, "created", "key", key.key_id,
                        after=info)
        state.invalidate("negative")
        send_signal(key_created, current_app._get_current_object(), key_id=key.key_id,  # type: ignore[attr-defined]
                    key_name=key.key_name, actor=actor.identity)
        return {**info, "key": raw}

    def _check_generate_rights(self, actor: Principal, params: dict[str, Any],
                               team: Team | None) -> None:
        if actor.role in VIEWER_ROLES:
            raise Forbidden("Your role cannot create keys.", reason="viewer_cannot_generate")
        if not actor.user_id:
            raise Forbidden("No 'user_id' is associated with your credential; only keys of a "
                            "user can create keys.", reason="no_user_id")
        requested, team_id = params.get("user_id"), params.get("team_id")
        confined = team_confinement(actor)
        if confined is not None and team_id != confined:
            raise Forbidden(f"A key of team={confined} creates keys of that team only.",
                            param="team_id", reason="team_key_outside_team")
        if team_id:
            # An unknown team is refused as one the actor is not in: no oracle for team ids.
            member = self._membership(team_id, actor.user_id) if team is not None else None
            if team is None or member is None:
                raise Forbidden(f"User={actor.user_id} not assigned to team={team_id}",
                                reason="not_team_member")
            permissions = team.team_member_permissions
            if permissions is None:
                permissions = self.state.settings.default_team_member_permissions
            if member.role != "admin" and "/key/generate" not in permissions:
                raise Forbidden(
                    "Team member does not have permissions for endpoint: /key/generate. You "
                    f"only have access to the following endpoints: {list(permissions)} for "
                    f"team {team.team_id}.", error_type="team_member_permission_error",
                )
            if member.role == "admin":
                # A team admin may create keys for team members and service accounts; an
                # outsider is refused before its role is looked at (no oracle for roles).
                if requested is not None and self._membership(team_id, requested) is None:
                    raise BadRequest(f"User={requested} not assigned to team={team_id}",
                                     param="user_id")
                self._check_subject(actor, requested)
                return
        if requested is not None and requested != actor.user_id:
            raise Forbidden(
                f"User can only create keys for themselves. Got user_id={requested}, "
                f"Your ID={actor.user_id}", param="user_id", reason="key_for_other_user",
            )
        params["user_id"] = actor.user_id

    def update(self, actor: Principal, identifier: str, params: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        with state.store.use() as db, db.atomic():
            key = self._get(identifier)
            self._require_modify(actor, key, "/key/update", "update")
            before = key_info(key)
            team = self._check_owner_change(actor, key, params)
            self._settle_organization(actor, params, team, key)
            self._check_grants(actor, params, team, key)
            if "key_alias" in params:
                self._check_alias_free(params["key_alias"], key.key_id)
            if params.get("user_id"):
                self._ensure_user(params["user_id"], actor)
            now = utcnow()
            handed_over = "user_id" in params and params["user_id"] != key.user_id
            self._apply(key, params, now)
            if handed_over:  # the actor may hold the secret it hands to the new user
                _cap_role(actor, key)
            key.updated_at, key.updated_by = now, actor.identity
            key.save()
            info = key_info(key)
            write_audit(state.settings.store_audit_logs, actor, "updated", "key", key.key_id,
                        before=before, after=info)
        state.invalidate(f"key:{key.key_id}")
        return {**info, "key": key.key_id}

    def _check_owner_change(self, actor: Principal, key: Key, params: dict[str, Any]
                            ) -> Team | None:
        """Check a change of the key's ``team_id`` or ``user_id`` (``/key/update`` and
        ``/key/regenerate`` alike); return the team the key will belong to."""
        new_team = None
        if "team_id" in params and params["team_id"] != key.team_id:
            new_team = self._check_team_move(actor, key, params)
        team = new_team or (Team.get_or_none(Team.team_id == key.team_id)
                            if key.team_id else None)
        if "user_id" in params and params["user_id"] != key.user_id and not actor.is_admin:
            if not (team is not None and self._is_team_admin(actor, team.team_id)) or (
                params["user_id"] is not None
                and self._membership(team.team_id, params["user_id"]) is None
            ):
                raise Forbidden(
                    f"User={actor.user_id} is not allowed to update key={key.key_id} to "
                    f"belong to user={params['user_id']}", param="user_id",
                    reason="key_reassign",
                )
            # Only a member's role is looked at: no oracle for other users' roles.
            self._check_subject(actor, params["user_id"])
            # Nor is a privileged user's key handed to anyone else (the actor included, or
            # nobody: a service account): the actor could then regenerate it and hold it.
            self._check_subject(actor, key.user_id)
        elif ("user_id" in params and params["user_id"] is not None and team is not None
              and params["user_id"] != key.user_id
              and self._membership(team.team_id, params["user_id"]) is None):
            # A proxy admin too: a team key acts for a member of its team (as on
            # /key/generate); removing the member revokes it (/team/member_delete).
            raise BadRequest(f"User={params['user_id']} not assigned to team={team.team_id}",
                             param="user_id")
        return team

    def _check_team_move(self, actor: Principal, key: Key, params: dict[str, Any]) -> Team | None:
        team_id = params["team_id"]
        if team_id is None:
            if not actor.is_admin:
                raise Forbidden("Only a proxy admin can take a key out of its team.",
                                param="team_id")
            return None
        if not actor.is_admin and not self._is_team_admin(actor, team_id):
            # Also for a team that does not exist: no oracle for team ids.
            raise Forbidden(f"You are not an admin of team={team_id}.", param="team_id",
                            reason="team_move")
        team = self._team(team_id)
        user_id = params.get("user_id", key.user_id)
        if user_id and self._membership(team_id, user_id) is None:
            raise Forbidden(f"User={user_id} is not a member of team={team_id}.",
                            param="team_id", reason="team_move")
        models = params.get("models", key.models)
        if not self.state.models.within(models, team.models, team):
            raise Forbidden(f"Team={team_id} does not allow the key's models.", param="team_id",
                            reason="team_move")
        for limit in ("tpm_limit", "rpm_limit"):
            value, team_value = params.get(limit, getattr(key, limit)), getattr(team, limit)
            if value is not None and team_value is not None and value > team_value:
                raise Forbidden(f"Key {limit}={value} is greater than team {limit}={team_value}",
                                param=limit, reason="team_move")
        return team

    def regenerate(self, actor: Principal, identifier: str, params: dict[str, Any]
                   ) -> dict[str, Any]:
        """Rotate a key's secret in place (same ``key_id``); the old secret keeps working
        until ``grace_period`` ends (default ``LLMAUTH_KEY_ROTATION_GRACE_PERIOD``)."""
        state = self.state
        params = dict(params)
        new_raw = chosen_secret(actor, params.pop("new_key", None), "new_key")
        grace: Duration | None = params.pop("grace_period",
                                            state.settings.key_rotation_grace_period)
        with state.store.use() as db, db.atomic():
            key = self._get(identifier)
            if not self.can_modify(actor, key, "/key/regenerate"):
                raise Forbidden("You are not authorized to regenerate this key",
                                reason="key_not_yours")
            self._check_subject(actor, key.user_id)  # the new secret goes to the actor
            team = self._check_owner_change(actor, key, params)
            self._settle_organization(actor, params, team, key)
            self._check_grants(actor, params, team, key)
            if "key_alias" in params:
                self._check_alias_free(params["key_alias"], key.key_id)
            if params.get("user_id"):
                self._ensure_user(params["user_id"], actor)
            raw = (self._key_free(new_raw, "new_key") if new_raw is not None
                   else generate_key(state.settings.key_entropy_bytes))
            now = utcnow()
            grace_until = grace.after(now) if grace is not None else None
            if grace_until is not None:
                KeyGrace.delete().where(KeyGrace.digest == key.digest).execute()
                KeyGrace.create(digest=key.digest, key_id=key.key_id, revoke_at=grace_until)
            before = key_info(key)
            self._apply(key, params, now)
            key.digest, key.key_name = state.digester.digest(raw), abbreviate(raw)
            _cap_role(actor, key)  # the new secret goes to the actor
            key.rotation_count += 1
            key.last_rotation_at = key.updated_at = now
            key.updated_by = actor.identity
            key.save()
            info = key_info(key)
            write_audit(state.settings.store_audit_logs, actor, "rotated", "key", key.key_id,
                        before=before, after={**info, "grace_until": isoformat(grace_until)})
        state.invalidate(f"key:{key.key_id}", "negative")
        send_signal(key_rotated, current_app._get_current_object(), key_id=key.key_id,  # type: ignore[attr-defined]
                    key_name=key.key_name, actor=actor.identity, grace_until=aware(grace_until))
        return {**info, "key": raw, "grace_period_ends_at": isoformat(grace_until)}

    def delete(self, actor: Principal, identifiers: Sequence[str] = (),
               aliases: Sequence[str] = ()) -> list[str]:
        """Delete keys (all or none); rows are copied to the deleted-keys table first."""
        state = self.state
        with state.store.use() as db, db.atomic():
            keys: list[Key] = []
            for identifier in identifiers:
                keys.append(self._get(identifier))
            for alias in aliases:
                key = Key.get_or_none(Key.key_alias == alias)
                if key is None:
                    raise NotFound(f"No key with alias '{alias}'.", param="key_aliases")
                keys.append(key)
            if not keys:
                raise NotFound("No keys found.", param="keys")
            for key in keys:
                if not self.can_modify(actor, key, "/key/delete"):
                    raise Forbidden("You are not authorized to delete this key",
                                    reason="key_not_yours")
            deleted = self._delete_rows(actor, keys)
        self.announce_revoked(actor, deleted)
        return deleted

    def announce_revoked(self, actor: Principal, key_ids: Iterable[str]) -> None:
        """After the deleting transaction committed: drop the keys from every cache and send
        ``key_revoked`` (also for keys deleted with their user or team)."""
        for key_id in key_ids:
            self.state.invalidate(f"key:{key_id}")
            send_signal(key_revoked, current_app._get_current_object(), key_id=key_id,  # type: ignore[attr-defined]
                        actor=actor.identity)

    def _delete_rows(self, actor: Principal, keys: Iterable[Key]) -> list[str]:
        """Move keys to the deleted-keys table (caller holds the transaction)."""
        deleted: list[str] = []
        for key in {k.key_id: k for k in keys}.values():
            info = key_info(key)
            DeletedKey.create(
                key_id=key.key_id, key_name=key.key_name, key_alias=key.key_alias,
                user_id=key.user_id, team_id=key.team_id, spend=key.spend, snapshot=info,
                created_at=key.created_at, deleted_by=actor.identity,
            )
            KeyGrace.delete().where(KeyGrace.key_id == key.key_id).execute()
            key.delete_instance()
            write_audit(self.state.settings.store_audit_logs, actor, "deleted", "key",
                        key.key_id, before=info)
            deleted.append(key.key_id)
        return deleted

    def delete_where(self, actor: Principal, condition: peewee.Expression) -> list[str]:
        """Delete every key matching ``condition`` (user or team deletion cascades here)."""
        return self._delete_rows(actor, list(Key.select().where(condition)))

    def set_blocked(self, actor: Principal, identifier: str, blocked: bool) -> dict[str, Any]:
        state = self.state
        with state.store.use() as db, db.atomic():
            key = self._get(identifier)
            if not (actor.is_admin or (key.team_id and actor.role not in VIEWER_ROLES
                                       and self._is_team_admin(actor, key.team_id))):
                raise Forbidden("Only a proxy admin or the key's team admin can block or "
                                "unblock a key.", reason="block_not_allowed")
            key.blocked, key.updated_at, key.updated_by = blocked, utcnow(), actor.identity
            key.save()
            info = key_info(key)
            write_audit(state.settings.store_audit_logs, actor,
                        "blocked" if blocked else "unblocked", "key", key.key_id, after=info)
        state.invalidate(f"key:{key.key_id}")
        return info

    # -- reads ------------------------------------------------------------------------------------

    def info(self, actor: Principal, identifier: str | None) -> dict[str, Any]:
        with self.state.store.use():
            if identifier is None:
                if actor.key_id is None:
                    raise BadRequest("No key passed in: pass ?key=<key or key_id>.", param="key")
                identifier = actor.key_id
            key = self._get(identifier)
            if not self.can_view(actor, key):
                raise Forbidden("You are not allowed to view this key.", reason="key_not_yours")
            return {"key": key.key_id, "info": key_info(key)}

    def info_many(self, actor: Principal, identifiers: Sequence[str]) -> dict[str, Any]:
        """``/v2/key/info``: :meth:`info` of several keys (404 or 403 for any one)."""
        with self.state.store.use():
            keys = [self._get(identifier) for identifier in identifiers]
            if not all(self.can_view(actor, key) for key in keys):
                raise Forbidden("You are not allowed to view this key.", reason="key_not_yours")
            return {"key": [key.key_id for key in keys], "info": [key_info(key) for key in keys]}

    def list(self, actor: Principal, query: Mapping[str, Any]) -> dict[str, Any]:
        page, size = query["page"], query["size"]
        deleted = query.get("status") == "deleted"
        table: Any = DeletedKey if deleted else Key
        with self.state.store.use():
            condition = self._list_scope(actor, query, table)
            for name in ("user_id", "team_id", "key_alias"):
                if query.get(name) is not None:
                    condition &= getattr(table, name) == query[name]
            if query.get("organization_id") is not None and not deleted:
                condition &= Key.organization_id == query["organization_id"]
            if query.get("key_hash") is not None:
                condition &= table.key_id == query["key_hash"]
            select = table.select().where(condition)
            total = select.count()
            sort_by = {"token": "key_id"}.get(query["sort_by"], query["sort_by"])
            if deleted and sort_by not in ("spend", "created_at", "key_alias", "key_id"):
                sort_by = "created_at"
            column = getattr(table, sort_by)
            order = column.desc() if query["sort_order"] == "desc" else column.asc()
            rows = list(select.order_by(order, table.id.desc()).paginate(page, size))
        if query.get("return_full_object"):
            keys: list[Any] = [
                {**row.snapshot, "deleted_at": isoformat(row.deleted_at),
                 "deleted_by": row.deleted_by} if deleted else key_info(row)
                for row in rows
            ]
        else:
            keys = [row.key_id for row in rows]
        return {"keys": keys, "total_count": total, "current_page": page,
                "total_pages": math.ceil(total / size) if total else 0}

    def _list_scope(self, actor: Principal, query: Mapping[str, Any], table: Any
                    ) -> peewee.Expression:
        everything = table.id.is_null(False)
        if actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER:
            return everything
        if not actor.user_id:
            if actor.key_id is not None:
                return table.key_id == actor.key_id
            raise Forbidden("No 'user_id' is associated with your credential.",
                            reason="no_user_id")
        if query.get("user_id") not in (None, actor.user_id):
            raise Forbidden("You are not authorized to check another user's keys",
                            param="user_id", reason="other_users_keys")
        confined = team_confinement(actor)
        memberships = [m for m in TeamMembership.select().where(
            TeamMembership.user_id == actor.user_id) if confined in (None, m.team_id)]
        team_id = query.get("team_id")
        if team_id is not None and team_id not in {m.team_id for m in memberships}:
            raise Forbidden(f"You are not a member of team={team_id}", param="team_id",
                            reason="other_teams_keys")
        scope = table.user_id == actor.user_id
        if query.get("include_team_keys") or team_id is not None:
            admin_of = [m.team_id for m in memberships if m.role == "admin"]
            member_of = [m.team_id for m in memberships if m.role != "admin"]
            if admin_of:
                scope |= table.team_id.in_(admin_of)
            if member_of:
                scope |= table.team_id.in_(member_of) & table.user_id.is_null()
        if (query.get("include_created_by_keys") and table is Key
                and actor.user_id != self.state.settings.proxy_admin_name):
            # keys the caller made (for others, as a team admin), while it is in their team;
            # made by a user: a team-only credential records its team id, which may be a
            # user's id too, and the master key the admin name, which a non-admin user of
            # that id did not create
            scope |= ((Key.created_by == actor.user_id) & (Key.created_by_kind == "user")
                      & Key.team_id.in_([m.team_id for m in memberships]))
        if confined is not None:
            scope &= table.team_id == confined
        return scope


def team_confinement(actor: Principal) -> str | None:
    """The team a non-admin's *team key* acts in (``None``: not confined).

    The admins of a team can mint and regenerate keys of the team for any member, and a
    team admin can add any existing user to the team; so a team key speaks for its user
    inside that team only: it never manages the user's personal keys, keys of other teams,
    other teams, or the user itself. A personal key, a JWT or a session is not confined.
    """
    key = actor.key
    if key is None or actor.is_admin:
        return None
    return key.team_id or None


def read_confinement(actor: Principal) -> str | None:
    """The team whose data a team key reads (``None``: not confined): as
    :func:`team_confinement`, except that a proxy admin viewer reads everything whatever
    key it calls with."""
    if actor.role is Role.PROXY_ADMIN_VIEWER:
        return None
    return team_confinement(actor)


def _cap_role(actor: Principal, key: Key) -> None:
    """Record on ``key`` (about to be saved with a secret the actor holds) the most it may
    act as: a non-admin who mints, regenerates or hands over another user's key caps it at
    its own role, and a capped key passes its cap on to the keys it mints for its user. So
    a key a team admin made for a member never gains proxy-admin power when that member is
    promoted later. A cap only narrows; a proxy admin adds none."""
    if actor.is_admin or not key.user_id:
        return
    own_cap = actor.key.max_role if actor.key is not None else None
    if key.user_id == actor.user_id and own_cap is None:
        return  # the user's own, uncapped credential: the key follows the user's role
    cap = role_cap(actor.role)
    if cap is None:
        return
    if key.max_role is None or outranks(stored_role(key.max_role), cap):
        key.max_role = cap.value


def acts_outside(actor: Principal, team_id: str | None) -> bool:
    """Whether ``team_id`` (``None``: personal scope) lies outside the actor's confinement."""
    confined = team_confinement(actor)
    return confined is not None and team_id != confined


#: Numeric limits a non-admin's key can never exceed (compared with the actor's own key).
_CAPPED_LIMITS = ("max_budget", "tpm_limit", "rpm_limit", "max_parallel_requests")


def _own_model_limits(key: Any, name: str) -> dict[str, Any]:
    """A key's per-model map ``name`` as the rate limiter reads it: for ``model_rpm_limit``
    and ``model_tpm_limit`` the field, over the same map in the key's ``metadata`` (where
    LiteLLM keeps it: the limiter reads it there too, its positive numbers only)."""
    mine = dict(getattr(key, name) or {})
    if name == "model_max_budget":
        return mine
    listed = (key.metadata or {}).get(name)
    if isinstance(listed, Mapping):
        for model, limit in listed.items():
            value = limit_value(limit)
            if isinstance(model, str) and model not in mine and value is not None:
                mine[model] = value
    return mine


def _loosened_limit(params: Mapping[str, Any], key: Any) -> str | None:
    """The first limit of ``key`` that ``params`` loosen, or ``None``: a budget, rate limit
    or parallel limit raised or removed, a shorter budget window (or one added: the budget
    then resets), a per-model budget or rate limit raised, removed or given another period,
    a later expiry (or none), wider ``allowed_ips`` (or none). Setting a limit the key does
    not have narrows it."""
    for name in _CAPPED_LIMITS:
        if name in params:
            value, current = params[name], getattr(key, name)
            if current is not None and (value is None or value > current):
                return name
    now = utcnow()
    window = params.get("budget_duration")
    if window is not None and (key.budget_duration is None or window.after(now)
                               < parse_duration(key.budget_duration).after(now)):
        return "budget_duration"
    for name in ("model_max_budget", "model_rpm_limit", "model_tpm_limit"):
        sources = (name,) if name == "model_max_budget" else (name, "metadata")
        before = _own_model_limits(key, name)
        if not before or not any(source in params for source in sources):
            continue
        after = _own_model_limits(SimpleNamespace(**{
            source: params[source] if source in params else getattr(key, source, None)
            for source in sources}), name)
        for model, limit in before.items():
            if not _model_limit_within(after.get(model), limit):
                return name
    if "duration" in params and key.expires is not None:
        duration = params["duration"]
        if duration is None or duration.after(now) > key.expires:
            return "duration"
    if "allowed_ips" in params and key.allowed_ips:
        requested = params["allowed_ips"] or []
        if not requested or not _networks_within(requested, key.allowed_ips):
            return "allowed_ips"
    return None


def _model_limit_within(new: Any, old: Any) -> bool:
    """Whether a per-model limit ``new`` is no looser than ``old``: a rate limit no higher;
    a model budget (``{"budget_limit", "time_period", "rpm_limit", "tpm_limit"}``) with each
    of ``old``'s amounts no higher and the same period."""
    if new == old:
        return True
    if not isinstance(old, Mapping):
        return _amount(new) is not None and _amount(old) is not None and \
            _amount(new) <= _amount(old)  # type: ignore[operator]
    if not isinstance(new, Mapping):
        return False
    for name, value in old.items():
        if name in ("time_period", "budget_duration"):
            if new.get(name) != value:
                return False
        else:
            mine, cap = _amount(new.get(name)), _amount(value)
            if cap is not None and (mine is None or mine > cap):
                return False
    return not any(name in new and name not in old for name in ("time_period",
                                                                  "budget_duration"))


def _amount(value: Any) -> Decimal | None:
    """A limit's amount (a number or a decimal string), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        amount = Decimal(str(value))
    except ArithmeticError:
        return None
    return amount if amount.is_finite() else None


def _networks_within(inner: Sequence[str], outer: Sequence[str]) -> bool:
    """Whether every network of ``inner`` lies inside one of ``outer``."""
    outer_nets = parse_networks(outer)
    return all(
        any(net.version == o.version and net.subnet_of(o) for o in outer_nets)
        for net in parse_networks(inner)
    )


_PLAIN_FIELDS = frozenset({
    "key_alias", "user_id", "team_id", "organization_id", "models", "aliases",
    "allowed_routes", "allowed_ips", "max_budget", "soft_budget", "spend", "tpm_limit",
    "rpm_limit", "max_parallel_requests", "model_rpm_limit", "model_tpm_limit",
    "model_max_budget", "metadata", "blocked",
})
