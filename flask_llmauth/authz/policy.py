"""Authorization of one request: IPs, route restrictions, the role table and model access.

The role → route table follows LiteLLM's ``non_proxy_admin_allowed_routes_check``
(``reference/litellm_auth.md`` §2.4), evaluated top to bottom, first match deciding, with
two deliberate changes: every refusal is a 403, and an ``org_admin`` is treated like an
``internal_user`` (this library has no organizations yet, so it cannot scope org rights).
Proxy admins skip the table; every caller, admins included, is bound by its credential's
``allowed_routes`` and ``allowed_ips``. Decisions that depend only on (role, rule, method)
are computed once and kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Request

from ..bodies import INVALID, get_json
from ..config import Settings
from ..errors import BadRequest, Forbidden
from ..network import client_ip, in_networks, parse_networks
from ..principal import Principal, Role
from .models import ModelAccess
from .routes import RouteInfo, RoutePatterns

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Writes a proxy_admin_viewer may never make, even where a group would let it through.
_VIEWER_WRITES = RoutePatterns((
    "/user/new", "/user/delete", "/user/bulk_update", "/team/new", "/team/update",
    "/team/delete", "/model/new", "/model/update", "/model/delete", "/key/generate",
    "/key/delete", "/key/update", "/key/regenerate", "/key/service-account/generate",
    "/key/block", "/key/unblock", "/key/{key_id}/regenerate",
))
_VIEWER_USER_UPDATE_FIELDS = frozenset({"user_id", "user_email", "password"})
_SELF_ROUTED = RoutePatterns(("/v1/mcp/*", "/mcp-rest/*"))


def _route_denied(route: str, role: Role) -> Forbidden:
    return Forbidden(
        "Only proxy admin can be used to generate, delete, update info for new "
        f"keys/users/teams. Route={route}. Your role={role.value}.",
        error_type="auth_error", reason="role_route_denied",
    )


class Policy:
    """The authorization decisions of one app."""

    def __init__(self, settings: Settings, models: ModelAccess) -> None:
        self.settings = settings
        self.models = models
        self.admin_only = RoutePatterns(settings.admin_only_routes)
        self.allowed_routes = RoutePatterns(settings.allowed_routes)
        self._key_routes: dict[tuple[tuple[str, ...], str], bool] = {}
        self._role_decisions: dict[tuple[Role, str, bool], Forbidden | None] = {}

    # -- entry point ----------------------------------------------------------------------------

    def authorize(self, principal: Principal, info: RouteInfo, request: Request) -> str | None:
        """Raise :class:`Forbidden` (or :class:`BadRequest`) unless the request may proceed;
        return the model the request asks for (LLM routes), if any."""
        settings = self.settings
        if settings.allowed_ips is not None or (principal.key and principal.key.allowed_ips):
            self._check_ip(principal, request)
        if self.allowed_routes and not self.allowed_routes.matches(info.route):
            raise Forbidden(f"Access forbidden: Route {info.route} not allowed",
                            reason="route_not_in_allowed_routes")
        if "master_key_only_routes" in info.groups and not principal.is_master_key:
            raise Forbidden(f"Tried to access route={info.route}, which is only for MASTER KEY",
                            reason="master_key_only_route")
        if principal.allowed_routes and not self.key_route_allowed(principal, info.route):
            raise Forbidden(
                "Virtual key is not allowed to call this route. Only allowed to call routes: "
                f"{list(principal.allowed_routes)}. Tried to call route: {info.route}",
                reason="key_route_denied",
            )
        if info.required_roles is not None:
            if not principal.is_admin and principal.role.value not in info.required_roles:
                raise Forbidden(
                    f"This route needs one of the roles {sorted(info.required_roles)}; "
                    f"your role is {principal.role.value}.", reason="required_role_missing",
                )
        elif not principal.is_admin:
            self._check_role_table(principal, info, request)
        if info.is_llm and request.method not in SAFE_METHODS:
            model = requested_model(request, info)
            if model is not None:
                denial = self.models.denial(principal, model)
                if denial is not None:
                    raise denial
            return model
        return None

    # -- parts ------------------------------------------------------------------------------------

    def _check_ip(self, principal: Principal, request: Request) -> None:
        ip = client_ip(request, self.settings.trusted_proxy_ranges)
        allowed = self.settings.allowed_ips
        if allowed is not None and not in_networks(ip, allowed):
            raise Forbidden(f"Access forbidden: IP address {ip} not allowed.",
                            reason="ip_not_allowed")
        key_ips = principal.key.allowed_ips if principal.key else None
        if key_ips and not in_networks(ip, parse_networks(key_ips)):
            raise Forbidden(f"Access forbidden: IP address {ip} not allowed.",
                            reason="key_ip_not_allowed")

    def key_route_allowed(self, principal: Principal, route: str) -> bool:
        cache_key = (principal.allowed_routes, route)
        allowed = self._key_routes.get(cache_key)
        if allowed is None:
            if len(self._key_routes) > 50_000:
                self._key_routes.clear()
            patterns = RoutePatterns(principal.allowed_routes, prefix_match=True)
            allowed = self._key_routes[cache_key] = patterns.matches(route)
        return allowed

    def _check_role_table(self, principal: Principal, info: RouteInfo, request: Request) -> None:
        safe = request.method in SAFE_METHODS
        cache_key = (principal.role, info.route, safe)
        try:
            denial = self._role_decisions[cache_key]
        except KeyError:
            denial = self._role_decisions[cache_key] = self._role_table(principal.role, info, safe)
        if denial is _BODY_DEPENDENT:
            body = get_json(request, force=True)
            if isinstance(body, Mapping) and set(body) <= _VIEWER_USER_UPDATE_FIELDS:
                return
            denial = _route_denied(info.route, principal.role)
        if denial is not None and not (  # a key's allowed_routes grant, as in LiteLLM
            principal.allowed_routes and self.key_route_allowed(principal, info.route)
        ):
            raise denial

    def role_allows(self, role: Role, info: RouteInfo, safe: bool) -> bool:
        """Whether the role table lets ``role`` call this route (ignoring body and key)."""
        return role is Role.PROXY_ADMIN or self._role_table(role, info, safe) is None

    def _role_table(self, role: Role, info: RouteInfo, safe: bool) -> Forbidden | None:
        groups, route = info.groups, info.route
        if self.admin_only.matches(route):
            return Forbidden(
                f"user not allowed to access this route. Route={route} is an admin only route",
                reason="admin_only_route",
            )
        if info.is_llm:
            if role is Role.PROXY_ADMIN_VIEWER:
                return Forbidden(
                    "user not allowed to access this OpenAI routes, role= proxy_admin_viewer",
                    reason="viewer_llm_route",
                )
            return None
        if "info_routes" in groups:
            return None
        if role is Role.PROXY_ADMIN_VIEWER:
            if safe:
                return None
            if route == "/user/update":
                return _BODY_DEPENDENT
            if _VIEWER_WRITES.matches(route):
                return Forbidden(
                    f"user not allowed to access this route, role= proxy_admin_viewer. "
                    f"Trying to access: {route}", reason="viewer_write",
                )
            if groups & {"admin_viewer_routes", "global_spend_tracking_routes"}:
                return None
            return _route_denied(route, role)
        if role in (Role.INTERNAL_USER, Role.ORG_ADMIN) and "internal_user_routes" in groups:
            return None
        if role is Role.INTERNAL_USER_VIEWER and "internal_user_view_only_routes" in groups:
            return None
        if "self_managed_routes" in groups or _SELF_ROUTED.matches(route):
            return None
        return _route_denied(route, role)


_BODY_DEPENDENT: Any = Forbidden("body dependent")


def requested_model(request: Request, info: RouteInfo) -> str | None:
    """The model a request asks for: from the URL (Gemini style) or the body's ``model``.

    The JSON body is parsed at most once (Flask caches it). A body that is not valid JSON
    is a 400 once the caller is authenticated.
    """
    if info.model_arg and request.view_args and info.model_arg in request.view_args:
        return str(request.view_args[info.model_arg])
    if request.mimetype.startswith("multipart/"):
        model = request.form.get("model")
    else:
        # Any other body is read as JSON whatever its Content-Type says (as LiteLLM does), so
        # a view that parses it with ``force=True`` never sees a model this check did not.
        body = get_json(request, force=True)
        if body is INVALID:
            if request.is_json:
                raise BadRequest("Invalid JSON in request body.", reason="invalid_json")
            form = request.mimetype == "application/x-www-form-urlencoded"
            model = request.form.get("model") if form else None
        elif not isinstance(body, Mapping):
            return None if body is None or not request.is_json else _not_object()
        else:
            model = body.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model or len(model) > 512:
        raise BadRequest("`model` must be a non-empty string.", param="model",
                         reason="invalid_model_field")
    return model


def _not_object() -> None:
    raise BadRequest("Request body must be a JSON object.", reason="body_not_object")
