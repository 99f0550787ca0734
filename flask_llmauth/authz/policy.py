"""Authorization of one request: IPs, route restrictions, the role table and model access.

The role → route table follows LiteLLM's ``non_proxy_admin_allowed_routes_check``
(``reference/litellm_auth.md`` §2.4), evaluated top to bottom, first match deciding, with
these deliberate changes:

* every refusal is a 403 (LiteLLM answers some with 401);
* an ``org_admin`` is treated like an ``internal_user`` (this library has no organizations
  yet, so it cannot scope org rights);
* a ``proxy_admin_viewer`` may read (GET/HEAD/OPTIONS) every *classified* route, never an
  unclassified host route: deny by default holds for every non-admin role;
* a key's ``allowed_routes`` grant a non-admin routes its role would not reach (LiteLLM step
  12) only where the table would fall through to its final denial: never past
  ``admin_only_routes``, the viewer's ban on LLM calls and writes, or master-key-only routes;
* LiteLLM's step 10 (everything below ``/v1/mcp/`` and ``/mcp-rest/`` allowed, its own MCP
  endpoints checking the caller) is left out: a host's route there that is in no group is
  unclassified, proxy admins only; the MCP routes LiteLLM names are LLM routes anyway.

Order of the checks (the first failing one answers):

1. deployment gates, for every routed request, public ones included: the global
   ``allowed_ips`` and the deployment ``allowed_routes`` (:meth:`Policy.gate`);
2. the key's own ``allowed_ips``;
3. master-key-only routes;
4. the credential's ``allowed_routes`` (admins included);
5. for non-admins: ``admin_only_routes``, then the view's ``@require_role`` roles if it has
   any (they replace the table), else the role table;
6. model access on LLM routes (unsafe methods).

Decisions that depend only on (role, rule, method) are computed once and kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Request
from werkzeug.exceptions import HTTPException

from ..bodies import INVALID, form, get_json, unreadable_body
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


#: The table's final denial: the only one a key's ``allowed_routes`` may lift. On a host
#: route in no route group the log line and ``auth_failed`` say ``unclassified_route``
#: instead, so an operator sees that the view needs a group, a role or ``exempt``.
_GRANTABLE = "role_route_denied"
_UNCLASSIFIED = "unclassified_route"
_GRANTABLE_REASONS = frozenset({_GRANTABLE, _UNCLASSIFIED})


def _route_denied(route: str, role: Role, reason: str = _GRANTABLE) -> Forbidden:
    return Forbidden(
        "Only proxy admin can be used to generate, delete, update info for new "
        f"keys/users/teams. Route={route}. Your role={role.value}.",
        error_type="auth_error", reason=reason,
    )


class Policy:
    """The authorization decisions of one app."""

    def __init__(self, settings: Settings, models: ModelAccess) -> None:
        self.settings = settings
        self.models = models
        self.admin_only = RoutePatterns(settings.admin_only_routes)
        self.allowed_routes = RoutePatterns(settings.allowed_routes)
        self._key_routes: dict[tuple[tuple[str, ...], str, frozenset[str]], bool] = {}
        self._role_decisions: dict[tuple[Role, str, bool], Forbidden | None] = {}
        self._exposed: dict[str, bool] = {}
        #: Whether :meth:`gate` has anything to check (settings do not change after start).
        self.gated = settings.allowed_ips is not None or bool(self.allowed_routes)

    # -- entry point ----------------------------------------------------------------------------

    def gate(self, info: RouteInfo, request: Request) -> None:
        """Deployment-wide gates that bind every routed request, public routes included."""
        allowed_ips = self.settings.allowed_ips
        if allowed_ips is not None:
            ip = client_ip(request, self.settings.trusted_proxy_ranges)
            if not in_networks(ip, allowed_ips):
                raise Forbidden(f"Access forbidden: IP address {ip} not allowed.",
                                reason="ip_not_allowed")
        if self.allowed_routes:
            exposed = self._exposed.get(info.route)
            if exposed is None:
                exposed = self._exposed[info.route] = self.allowed_routes.matches(info.route)
            if not exposed:
                raise Forbidden(f"Access forbidden: Route {info.route} not allowed",
                                reason="route_not_in_allowed_routes")

    def route_denial(self, principal: Principal, info: RouteInfo, unsafe: bool) -> Any:
        """Checks 3–5 for a principal on a rule: ``None`` (allowed), the :class:`Forbidden`
        to raise, or a marker that :meth:`refuse` resolves from the request body. Depends
        only on its arguments (principals and route infos are immutable): callers keep it."""
        return self._route_denial(principal, info, not unsafe)

    def refuse(self, denial: Any, principal: Principal, info: RouteInfo,
               request: Request) -> None:
        """Raise a :meth:`route_denial` answer, or resolve the body-dependent one."""
        if denial is not _BODY_DEPENDENT:
            raise denial
        self._check_viewer_user_update(principal, info, request)

    def check_models(self, principal: Principal, request: Request, info: RouteInfo,
                     allowed: dict[str, bool]) -> tuple[str | None, Any]:
        """Check 6: every model the request names (see :func:`requested_models`, which
        also refuses a malformed body or ``model``). Return the first model, if any, and
        the parsed JSON body (``None`` when the body was read as a form; Flask keeps the
        parse). ``allowed`` holds models already allowed to this principal object (as
        keys) and receives the newly allowed ones (the caller keeps it with the principal).
        """
        if (not info.model_arg
                and request.environ.get("CONTENT_TYPE", "").startswith("application/")):
            # The common case, without the general reader's calls: a JSON object naming an
            # already allowed model by a plain name.
            try:
                parsed = request.get_json(silent=True, force=True)
            except RecursionError:
                parsed = None
            except HTTPException:
                raise
            except Exception:  # the server's body stream failed
                raise unreadable_body() from None
            if type(parsed) is dict:
                model = parsed.get("model")
                if type(model) is str and model in allowed or model is None:
                    return model, parsed
                if type(model) is str and 0 < len(model) <= MAX_MODEL_NAME:
                    # What models_and_body finds here (no URL model, a JSON object naming
                    # one plain name), without reading the request again: a new principal
                    # (a cold key) meets this on its first request.
                    self._allow_model(principal, model, allowed)
                    return model, parsed
        models, parsed = models_and_body(request, info)
        for model in models:
            if model not in allowed:
                self._allow_model(principal, model, allowed)
        return (models[0] if models else None), parsed

    def _allow_model(self, principal: Principal, model: str,
                     allowed: dict[str, bool]) -> None:
        """Raise the denial of ``model`` for ``principal``, else remember it in ``allowed``."""
        model_denial = self.models.denial(principal, model)
        if model_denial is not None:
            raise model_denial
        if len(allowed) < 1_000:
            allowed[model] = True

    def _route_denial(self, principal: Principal, info: RouteInfo, safe: bool,
                      ) -> Forbidden | None:
        """Checks 3–5 (see the module docstring): they depend only on the principal, the
        rule and whether the method is safe, so :meth:`authorize` keeps the answer per
        principal object. :data:`_BODY_DEPENDENT` defers to the request body."""
        if "master_key_only_routes" in info.groups and not principal.is_master_key:
            return Forbidden(f"Tried to access route={info.route}, which is only for MASTER KEY",
                             reason="master_key_only_route")
        if principal.allowed_routes and not self.key_route_allowed(principal, info.route,
                                                                   info.groups):
            return Forbidden(
                "Virtual key is not allowed to call this route. Only allowed to call routes: "
                f"{list(principal.allowed_routes)}. Tried to call route: {info.route}",
                reason="key_route_denied",
            )
        if info.required_scopes and not principal.is_master_key:
            missing = info.required_scopes - principal.scopes
            if missing:  # also checked by the view's wrapper; here it precedes limits
                return Forbidden(f"Missing required scope(s): {sorted(missing)}",
                                 error_type="insufficient_scope", reason="scope_missing")
        if principal.is_admin:
            return None
        if info.model_check_unapplied:  # its model check cannot run: fail closed
            return Forbidden(
                f"Route {info.route} cannot check which models you may use (its "
                "@require_model_access sits above the route decorator); only a proxy admin "
                "may call it until that is fixed.", reason="model_check_unapplied")
        if self.admin_only and self.admin_only.matches(info.route):
            return _admin_only(info.route)
        if info.required_roles is not None:
            if principal.role.value not in info.required_roles:
                return Forbidden(
                    f"This route needs one of the roles {sorted(info.required_roles)}; "
                    f"your role is {principal.role.value}.", reason="required_role_missing",
                )
            return None
        return self._role_table_denial(principal, info, safe)

    # -- parts ------------------------------------------------------------------------------------

    def check_key_ip(self, principal: Principal, request: Request) -> None:
        """Check 2: the key's own ``allowed_ips``."""
        ip = client_ip(request, self.settings.trusted_proxy_ranges)
        key_ips = principal.key.allowed_ips if principal.key else None
        if key_ips and not in_networks(ip, parse_networks(key_ips)):
            raise Forbidden(f"Access forbidden: IP address {ip} not allowed.",
                            reason="key_ip_not_allowed")

    def key_route_allowed(self, principal: Principal, route: str,
                          groups: frozenset[str] = frozenset()) -> bool:
        return self.routes_allow(principal.allowed_routes, route, groups)

    def routes_allow(self, entries: tuple[str, ...], route: str,
                     groups: frozenset[str] = frozenset()) -> bool:
        """Whether ``allowed_routes`` entries (paths, ``/prefix/*``, plain prefixes at a
        ``/`` boundary, ``{param}``, group names) cover ``route`` — by path, or by a group
        the route belongs to (also one a host view declares); cached."""
        cache_key = (entries, route, groups)
        allowed = self._key_routes.get(cache_key)
        if allowed is None:
            if len(self._key_routes) > 50_000:
                self._key_routes.clear()
            patterns = RoutePatterns(entries, prefix_match=True)
            allowed = self._key_routes[cache_key] = (
                patterns.matches(route) or bool(patterns.groups & groups))
        return allowed

    def _role_table_denial(self, principal: Principal, info: RouteInfo, safe: bool,
                           ) -> Forbidden | None:
        cache_key = (principal.role, info.route, safe)
        try:
            denial = self._role_decisions[cache_key]
        except KeyError:
            denial = self._role_decisions[cache_key] = self._role_table(principal.role, info, safe)
        if denial is None or denial is _BODY_DEPENDENT:
            return denial
        if (denial.reason in _GRANTABLE_REASONS and principal.allowed_routes
                and self.key_route_allowed(principal, info.route, info.groups)):
            return None  # a key's allowed_routes grant, as in LiteLLM
        return denial

    def _check_viewer_user_update(self, principal: Principal, info: RouteInfo,
                                  request: Request) -> None:
        """A proxy_admin_viewer's ``/user/update``: allowed for its own profile fields only."""
        body = get_json(request, force=True)
        if isinstance(body, Mapping) and set(body) <= _VIEWER_USER_UPDATE_FIELDS:
            return
        raise _route_denied(info.route, principal.role, "viewer_route_denied")

    def role_allows(self, role: Role, info: RouteInfo, safe: bool) -> bool:
        """Whether the role table lets ``role`` call this route (ignoring body and key)."""
        return role is Role.PROXY_ADMIN or self._role_table(role, info, safe) is None

    def _role_table(self, role: Role, info: RouteInfo, safe: bool) -> Forbidden | None:
        groups, route = info.groups, info.route
        if self.admin_only and self.admin_only.matches(route):
            return _admin_only(route)
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
            if safe:  # read everything the proxy classifies; never an unclassified route
                return None if groups else _route_denied(route, role, "viewer_route_denied")
            if route == "/user/update":
                return _BODY_DEPENDENT
            if _VIEWER_WRITES.matches(route):
                return Forbidden(
                    f"user not allowed to access this route, role= proxy_admin_viewer. "
                    f"Trying to access: {route}", reason="viewer_write",
                )
            if groups & {"admin_viewer_routes", "global_spend_tracking_routes"}:
                return None
            return _route_denied(route, role, "viewer_route_denied")
        if role in (Role.INTERNAL_USER, Role.ORG_ADMIN) and "internal_user_routes" in groups:
            return None
        if role is Role.INTERNAL_USER_VIEWER and "internal_user_view_only_routes" in groups:
            return None
        if "self_managed_routes" in groups:
            return None
        return _route_denied(route, role, _GRANTABLE if groups else _UNCLASSIFIED)


_BODY_DEPENDENT: Any = Forbidden("body dependent")


def _admin_only(route: str) -> Forbidden:
    return Forbidden(
        f"user not allowed to access this route. Route={route} is an admin only route",
        reason="admin_only_route",
    )


MAX_MODEL_NAME = 512


def requested_models(request: Request, info: RouteInfo,
                     body_reader: Any = None) -> tuple[str, ...]:
    """Every model a request names: the URL's (Gemini/Azure style) and the body's ``model``.

    Both are checked when both are present, so a view cannot be steered by the one the
    policy did not look at. Multipart and form bodies give their ``model`` fields; any
    other body is read as JSON whatever its ``Content-Type`` says (as LiteLLM does), so a
    view that parses it with ``force=True`` never sees a model this check did not. The body
    is parsed at most once (Flask caches it); a JSON-typed body that does not parse, and
    any body that parses as JSON but is not an object, is a 400 once the caller is
    authenticated.
    """
    return models_and_body(request, info, body_reader)[0]


def models_and_body(request: Request, info: RouteInfo, body_reader: Any = None,
                    ) -> tuple[tuple[str, ...], Any]:
    """:func:`requested_models` and the parsed JSON body it read (``None`` for a form or
    multipart body, :data:`~flask_llmauth.bodies.INVALID` for one that does not parse)."""
    environ = request.environ
    models: list[str] = []
    if info.model_arg and request.view_args and info.model_arg in request.view_args:
        models.append(_model_name(request.view_args[info.model_arg]))
    # The media type is parsed only when it may be multipart ("application/..." cannot be).
    if (not environ.get("CONTENT_TYPE", "").startswith("application/")
            and request.mimetype.startswith("multipart/")):
        models += [_model_name(m) for m in form(request).getlist("model")]
        return tuple(models), None
    body = get_json(request, force=True) if body_reader is None else body_reader.parsed()
    if body is INVALID:
        if request.is_json:
            raise BadRequest("Invalid JSON in request body.", reason="invalid_json")
        if request.mimetype == "application/x-www-form-urlencoded":
            models += [_model_name(m) for m in form(request).getlist("model")]
    elif type(body) is dict or isinstance(body, Mapping):
        model = body.get("model")
        if model is not None:
            models.append(model if type(model) is str and 0 < len(model) <= MAX_MODEL_NAME
                          else _model_name(model))
    elif body is not None:
        # Read as JSON whatever its Content-Type, a value that is not an object is refused
        # as it is when sent as application/json (Flask would hand the cached parse to a
        # view asking ``get_json(silent=True)``: a list where it expects a dict or None).
        raise BadRequest("Request body must be a JSON object.", reason="body_not_object")
    return tuple(models), body


def _model_name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_MODEL_NAME:
        raise BadRequest("`model` must be a non-empty string.", param="model",
                         reason="invalid_model_field")
    return value

