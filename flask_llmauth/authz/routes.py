"""Route groups (LiteLLM's ``LiteLLMRoutes``) and the classification of a request's route.

A route is classified from the URL rule Werkzeug matched (``request.url_rule``), never from
the raw path, ``RAW_URI`` or the Host header: the rule template (``/v1/engines/<model>/x``
becomes ``/v1/engines/{model}/x``) is matched against the group patterns once per rule and
the result is kept. Views of the extension declare their LiteLLM path explicitly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from werkzeug.routing import Rule

log = logging.getLogger("flask_llmauth")


def _both(*paths: str) -> tuple[str, ...]:
    """Each path with and without the ``/v1`` prefix."""
    out: list[str] = []
    for path in paths:
        out += [path, "/v1" + path]
    return tuple(out)


_OPENAI = _both(
    "/chat/completions", "/engines/{model}/chat/completions",
    "/openai/deployments/{model}/chat/completions", "/cursor/chat/completions",
    "/completions", "/engines/{model}/completions", "/openai/deployments/{model}/completions",
    "/embeddings", "/engines/{model}/embeddings", "/openai/deployments/{model}/embeddings",
    "/images/generations", "/images/edits", "/videos", "/videos/*",
    "/audio/transcriptions", "/audio/speech", "/moderations",
    "/batches", "/batches/*", "/files", "/files/*", "/fine_tuning/jobs",
    "/fine_tuning/jobs/*", "/assistants", "/assistants/*", "/threads", "/threads/*",
    "/models", "/models/{model_id}", "/utils/token_counter", "/utils/transform_request",
    "/rerank", "/realtime", "/responses", "/responses/*", "/vector_stores",
    "/vector_stores/*", "/vector_store/list", "/search", "/search/{tool}", "/ocr",
    "/containers", "/containers/*",
) + ("/v2/rerank",)
_ANTHROPIC = ("/v1/messages", "/v1/messages/count_tokens", "/v1/skills", "/v1/skills/{skill_id}")
_GOOGLE = (
    "/v1beta/models/{model_name:path}:generateContent",
    "/v1beta/models/{model_name:path}:streamGenerateContent",
    "/v1beta/models/{model_name:path}:countTokens",
    "/models/{model_name:path}:generateContent",
    "/models/{model_name:path}:streamGenerateContent",
    "/models/{model_name:path}:countTokens",
    "/interactions", "/interactions/*",
)
_PASS_THROUGH = tuple(
    p for name in ("bedrock", "vertex-ai", "vertex_ai", "cohere", "gemini", "anthropic",
                   "langfuse", "azure", "azure_ai", "openai_passthrough", "assemblyai",
                   "eu.assemblyai", "vllm", "mistral", "milvus")
    for p in (f"/{name}", f"/{name}/*")
)
_MCP = ("/mcp", "/mcp/", "/mcp/{subpath}", "/mcp/tools", "/mcp/tools/list", "/mcp/tools/call",
        "/mcp-rest/tools/list", "/mcp-rest/tools/call", "/v1/mcp/server",
        "/v1/mcp/server/{path:path}")
_AGENTS = ("/v1/agents", "/v1/agents/{agent_id}", "/agents", "/a2a/{agent_id}", "/a2a/{agent_id}/*")
_INFO = (
    "/key/info", "/key/health", "/v2/key/info", "/key/list", "/team/info", "/team/list",
    "/v2/team/list", "/team/available", "/organization/list", "/user/info", "/v2/user/info",
    "/user/filter/ui", "/model/info", "/v1/model/info", "/v2/model/info", "/model_group/info",
    "/health", "/health/services", "/models", "/v1/models", "/sso/get/ui_settings",
)
_KEY_MANAGEMENT = (
    "/key/generate", "/key/update", "/key/delete", "/key/info", "/key/regenerate",
    "/key/{key_id}/regenerate", "/key/service-account/generate", "/key/list", "/key/block",
    "/key/unblock", "/key/bulk_update", "/key/{key_id}/reset_spend", "/key/aliases",
    "/team/daily/activity", "/spend/logs",
)
_MANAGEMENT = (
    "/user/new", "/user/update", "/user/bulk_update", "/user/delete", "/user/info",
    "/user/list", "/user/daily/activity", "/user/daily/activity/aggregated",
    "/team/new", "/team/update", "/team/delete", "/team/list", "/team/info", "/team/block",
    "/team/unblock", "/team/available", "/team/permissions_list", "/team/permissions_update",
    "/team/daily/activity", "/v2/team/list", "/model/new", "/model/update", "/model/delete",
    "/model/info", "/customer/new", "/customer/info", "/customer/update", "/customer/delete",
    "/customer/block", "/customer/unblock", "/customer/list", "/end_user/new",
    "/budget/new", "/budget/update", "/budget/info", "/budget/delete", "/budget/list",
) + _KEY_MANAGEMENT
_SPEND = ("/spend/keys", "/spend/users", "/spend/teams", "/spend/tags", "/spend/calculate",
          "/spend/logs", "/spend/logs/ui", "/spend/logs/session/ui", "/cost/estimate")
_GLOBAL_SPEND = tuple(
    "/global/spend" + s for s in ("", "/logs", "/keys", "/teams", "/end_users", "/models",
                                  "/report", "/provider", "/tags", "/all_tag_names")
) + ("/global/predict/spend/logs",)
_PUBLIC = ("/", "/routes", "/health/liveliness", "/health/liveness", "/health/readiness",
           "/test", "/.well-known/litellm-ui-config", "/litellm/.well-known/litellm-ui-config",
           "/public/model_hub", "/public/agent_hub", "/public/mcp_hub",
           "/public/litellm_model_cost_map")
_MASTER_KEY_ONLY = ("/global/spend/reset", "/memory-usage-in-mem-cache",
                    "/memory-usage-in-mem-cache-items")
_SELF_MANAGED = (
    # /user/update is here (LiteLLM lists it as management only) so every user can change
    # its own profile: the endpoint lets a non-admin touch only itself and only harmless
    # fields (see flask_llmauth.users.SELF_SERVICE_FIELDS).
    "/user/update",
    "/team/member_add", "/team/member_delete", "/team/member_update",
    "/team/permissions_list", "/team/permissions_update", "/team/daily/activity",
    "/model/new", "/model/update", "/model/delete", "/model/{model_id}/update",
    "/user/daily/activity", "/user/available_roles", "/user/list", "/prompt/list",
    "/prompt/info", "/invitation/new", "/invitation/delete",
)
_ADMIN_VIEWER = ("/user/list", "/user/available_users", "/user/available_roles",
                 "/user/daily/activity", "/team/daily/activity", "/tag/daily/activity",
                 "/tag/list", "/audit", "/audit/{id}", "/global/activity", "/global/activity/*",
                 ) + _INFO
_INTERNAL_USER_EXTRA = ("/global/activity", "/global/activity/model",
                        "/global/activity/cache_hits", "/v1/models/{model_id}",
                        "/models/{model_id}", "/guardrails/list", "/v2/guardrails/list")

#: Every named route group. Lists may name other groups (resolved by :func:`expand`).
ROUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "openai_routes": _OPENAI,
    "anthropic_routes": _ANTHROPIC,
    "google_routes": _GOOGLE,
    "mapped_pass_through_routes": _PASS_THROUGH,
    "mcp_routes": _MCP,
    "agent_routes": _AGENTS,
    "litellm_native_routes": ("/rag/ingest", "/rag/query"),
    "apply_guardrail_routes": ("/guardrails/apply_guardrail",),
    "llm_api_routes": ("openai_routes", "anthropic_routes", "google_routes",
                       "mapped_pass_through_routes", "mcp_routes", "agent_routes",
                       "litellm_native_routes", "apply_guardrail_routes"),
    "info_routes": _INFO,
    "key_management_routes": _KEY_MANAGEMENT,
    "management_routes": _MANAGEMENT,
    "spend_tracking_routes": _SPEND,
    "global_spend_tracking_routes": _GLOBAL_SPEND,
    "public_routes": _PUBLIC,
    "master_key_only_routes": _MASTER_KEY_ONLY,
    "self_managed_routes": _SELF_MANAGED,
    "admin_viewer_routes": _ADMIN_VIEWER + ("global_spend_tracking_routes",),
    "internal_user_routes": _INTERNAL_USER_EXTRA + (
        "spend_tracking_routes", "global_spend_tracking_routes", "key_management_routes"),
    "internal_user_view_only_routes": ("spend_tracking_routes", "global_spend_tracking_routes"),
    "org_admin_only_routes": ("/organization/info", "/organization/delete",
                              "/organization/member_add", "/organization/member_update"),
    "org_admin_allowed_routes": ("org_admin_only_routes", "management_routes",
                                 "self_managed_routes", "admin_viewer_routes"),
}
_GROUP_PREFIX = "LiteLLMRoutes."
#: Routes on which the key may arrive as ``?key=`` (Gemini-style).
_QUERY_KEY_MARKERS = (":generateContent", ":streamGenerateContent", ":countTokens")


def group_name(entry: str) -> str | None:
    """The group an entry names (``openai_routes``, ``LiteLLMRoutes.openai_routes``) or None."""
    name = entry[len(_GROUP_PREFIX):] if entry.startswith(_GROUP_PREFIX) else entry
    return name if name in ROUTE_GROUPS else None


def expand(entries: Iterable[str]) -> tuple[str, ...]:
    """Replace group names by their paths, recursively; keep plain paths as they are."""
    out: list[str] = []
    seen: set[str] = set()

    def visit(entry: str) -> None:
        name = group_name(entry)
        if name is None:
            out.append(entry)
        elif name not in seen:
            seen.add(name)
            for child in ROUTE_GROUPS[name]:
                visit(child)

    for entry in entries:
        visit(entry)
    return tuple(dict.fromkeys(out))


_PARAM = re.compile(r"\{([^}:]+)(?::([^}]+))?\}")


def compile_route_pattern(pattern: str, *, prefix_match: bool = False) -> re.Pattern[str]:
    """Compile a LiteLLM route pattern.

    ``{param}`` is one path segment, ``{param:path}`` any text, a trailing ``*`` a prefix
    match. With ``prefix_match`` a plain path also matches its sub-paths at a ``/``
    boundary (``/foo`` matches ``/foo/bar``, never ``/foo600``), as key ``allowed_routes`` do.
    """
    if pattern.endswith("*"):
        body, tail = pattern[:-1], ".*"
    else:
        body, tail = pattern, ("(?:/.*)?" if prefix_match and pattern != "/" else "")
    regex, pos = "", 0
    for match in _PARAM.finditer(body):
        regex += re.escape(body[pos:match.start()])
        regex += ".+" if match.group(2) == "path" else "[^/]+"
        pos = match.end()
    regex += re.escape(body[pos:]).replace(r"\*", "[^/]*")
    return re.compile(f"^{regex}{tail}$")


class RoutePatterns:
    """A compiled list of route entries (paths, wildcards and group names)."""

    def __init__(self, entries: Iterable[str], *, prefix_match: bool = False) -> None:
        self.entries = tuple(entries)
        self.prefix_match = prefix_match
        names = [e for e in self.entries if group_name(e) is not None]
        # A group name covers exactly the group's routes, as classification matches them:
        # the sub-path rule of ``prefix_match`` is for plain paths only. Otherwise
        # ``llm_api_routes`` (``key_type: llm_api``), meant as a restriction, would grant a
        # key every unclassified host route below an LLM path (``/v1/chat/completions/x``).
        self._regexes = tuple(
            compile_route_pattern(p, prefix_match=prefix_match)
            for p in expand(e for e in self.entries if group_name(e) is None)
        ) + tuple(compile_route_pattern(p) for p in expand(names))
        self.groups = frozenset(g for g in map(group_name, self.entries) if g is not None)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def matches(self, route: str) -> bool:
        return any(regex.match(route) for regex in self._regexes)

    def unmatched(self, routes: Iterable[str]) -> tuple[str, ...]:
        """The entries that are paths or wildcards (group names are checked when the
        setting is read) and match none of ``routes``: most likely misspelt."""
        routes = tuple(routes)
        return tuple(
            entry for entry in self.entries
            if group_name(entry) is None and not any(
                map(compile_route_pattern(entry, prefix_match=self.prefix_match).match,
                    routes)))

    def allows(self, info: RouteInfo) -> bool:
        """Whether a classified route is listed: by path, or by a group it belongs to
        (including groups a host view declares with ``@llmauth.route_group``)."""
        return bool(self.groups & info.groups) or self.matches(info.route)


_GROUP_PATTERNS = {name: RoutePatterns((name,)) for name in ROUTE_GROUPS}


def rule_template(rule: Rule) -> str:
    """``/v1/engines/<string:model>/x`` -> ``/v1/engines/{model}/x`` (``path`` kept)."""
    def replace(match: re.Match[str]) -> str:
        converter, name = match.group(1), match.group(2)
        return f"{{{name}:path}}" if converter == "path" else f"{{{name}}}"

    return re.sub(r"<(?:([a-zA-Z_]+)(?:\([^)]*\))?:)?([a-zA-Z_][a-zA-Z0-9_]*)>", replace, rule.rule)


@dataclass(frozen=True, slots=True, eq=False)
class RouteInfo:
    """What the policy needs to know about one URL rule (computed once per rule). Equal
    only to itself, and hashed by identity: the per-request verdict table keys on it."""

    route: str
    endpoint: str
    groups: frozenset[str]
    public: bool = False
    #: Roles named by ``@require_role`` on the view (they replace the role table).
    required_roles: frozenset[str] | None = None
    #: Scopes named by ``@require_scope`` on the view (every one is needed).
    required_scopes: frozenset[str] = frozenset()
    #: The view argument that names the model (Gemini-style routes), if any.
    model_arg: str | None = None
    #: ``@require_model_access`` sat above the route decorator: its check is not part of
    #: the registered view, so only proxy admins may call the route.
    model_check_unapplied: bool = False

    #: Whether the rule is one of the extension's management API routes.
    is_api: bool = False
    #: Whether the rule answers only unsafe methods (``POST``...: no ``GET``/``HEAD``, no
    #: ``OPTIONS`` a view handles), so the request's method need not be read to know it.
    unsafe_only: bool = False
    #: Whether the route is an LLM API route (``llm_api_routes``); derived from ``groups``.
    is_llm: bool = field(init=False, compare=False)
    #: Whether ``?key=`` may carry the credential (Gemini-style routes); derived from ``route``.
    query_key_allowed: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Read on every request: plain attributes, computed once per rule.
        object.__setattr__(self, "is_llm", "llm_api_routes" in self.groups)
        object.__setattr__(self, "query_key_allowed", self.route.endswith(_QUERY_KEY_MARKERS))

    def in_group(self, name: str) -> bool:
        return name in self.groups


def classify(route: str, declared: Iterable[str] = ()) -> frozenset[str]:
    """Every group whose paths match ``route``, plus declared groups and their parents."""
    found = {name for name, patterns in _GROUP_PATTERNS.items() if patterns.matches(route)}
    pending = []
    for entry in declared:
        name = group_name(entry)
        if name is None:
            raise ValueError(f"unknown route group {entry!r}")
        pending.append(name)
    while pending:
        name = pending.pop()
        if name not in found:
            found.add(name)
            pending += [parent for parent, members in ROUTE_GROUPS.items() if name in members]
    return frozenset(found)


#: View-function attributes set by the decorators (read when a rule is first classified).
ATTR_EXEMPT = "_llmauth_exempt"
ATTR_ROLES = "_llmauth_roles"
ATTR_GROUPS = "_llmauth_groups"
ATTR_SCOPES = "_llmauth_scopes"
#: Set on the *undecorated* function by ``@require_role``/``@require_scope``/
#: ``@require_model_access``: found on a registered view, the decorator sat above the
#: route decorator, so Flask registered the function without its check.
ATTR_UNAPPLIED = "_llmauth_unapplied_decorators"
_MODEL_ARGS = ("model_name", "model", "deployment_id")


def unsafe_only(rule: Rule) -> bool:
    """Whether ``rule`` answers only unsafe methods (automatic ``OPTIONS`` never reaches the
    policy: the extension lets Flask answer it)."""
    methods: set[str] | frozenset[str] = rule.methods or frozenset()
    if methods & {"GET", "HEAD"}:
        return False
    return "OPTIONS" not in methods or bool(getattr(rule, "provide_automatic_options", False))


class RouteTable:
    """Classifies each URL rule once (by the rule object) and keeps the answer."""

    def __init__(self, public: RoutePatterns, explicit: Mapping[str, str],
                 exempt_blueprints: Collection[object] = (),
                 blueprints: Mapping[str, object] | None = None) -> None:
        self.public = public
        self.explicit = explicit
        #: The extension's live set of exempted ``Blueprint`` objects: a blueprint exempted
        #: after ``init_app`` still counts (rules are classified on their first request).
        self.exempt_blueprints = exempt_blueprints
        #: The app's live ``app.blueprints`` (registered name, dotted when nested -> the
        #: blueprint object): a blueprint registered after ``init_app`` is found too.
        self.blueprints: Mapping[str, object] = blueprints if blueprints is not None else {}
        #: ``id(rule) -> info`` of the rules classified so far; the per-request path reads it
        #: directly. An id found here is the live rule's own: the rule it was taken from is
        #: kept alive in :attr:`_rules`, so no other object can have that id meanwhile.
        self.info_by_rule_id: dict[int, RouteInfo] = {}
        self._rules: list[Rule] = []

    def info(self, rule: Rule, view: Any) -> RouteInfo:
        info = self.info_by_rule_id.get(id(rule))
        if info is None:
            info = self._classify(rule, view)
            self._rules.append(rule)
            self.info_by_rule_id[id(rule)] = info
        return info

    def _in_exempt_blueprint(self, endpoint: str) -> bool:
        """``parent.child.view``: exempt when the blueprint object registered as ``parent``
        (and so its nested blueprints) or as ``parent.child`` was exempted. Registered names
        are resolved to the blueprint objects, never compared as names: a blueprint
        registered again under another ``name=`` stays exempt, and another blueprint that
        only shares an exempted one's name (``admin.docs`` beside an exempted ``docs``)
        is not made public."""
        parts = endpoint.split(".")[:-1]
        if not parts or not self.exempt_blueprints:
            return False
        exempt = self.exempt_blueprints
        for i in range(1, len(parts) + 1):
            blueprint = self.blueprints.get(".".join(parts[:i]))
            if blueprint is not None and any(blueprint is e for e in exempt):
                return True
        return False

    def _classify(self, rule: Rule, view: Any) -> RouteInfo:
        endpoint = rule.endpoint
        route = self.explicit.get(endpoint) or rule_template(rule)
        groups = classify(route, getattr(view, ATTR_GROUPS, ()))
        public = (
            endpoint == "static" or endpoint.endswith(".static")
            or bool(getattr(view, ATTR_EXEMPT, False))
            or self._in_exempt_blueprint(endpoint)
            or (endpoint not in self.explicit and self.public.matches(route))
        )
        roles = getattr(view, ATTR_ROLES, None)
        unapplied = getattr(view, ATTR_UNAPPLIED, ())
        if unapplied:
            log.warning(
                "llmauth: %s on view %r sit above its route decorator, so Flask registered "
                "the view without them; put them below @app.route(...). Until then the "
                "request hook enforces the roles and scopes, and only proxy admins may call "
                "a view whose @require_model_access cannot run",
                " and ".join(f"@{d}" for d in unapplied), endpoint)
        model_arg = next((a for a in _MODEL_ARGS if a in rule.arguments), None)
        return RouteInfo(route=route, endpoint=endpoint, groups=groups, public=public,
                         required_roles=frozenset(roles) if roles is not None else None,
                         required_scopes=frozenset(getattr(view, ATTR_SCOPES, ())),
                         model_check_unapplied="require_model_access" in unapplied,
                         model_arg=model_arg if "llm_api_routes" in groups else None,
                         unsafe_only=unsafe_only(rule), is_api=endpoint in self.explicit)
