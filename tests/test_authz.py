"""Authorization: the role → route table, policy coverage of every extension rule, the
decorators, public / admin-only / deployment / master-key-only routes, IP allow-lists and
per-key route restrictions. Everything goes through real requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Blueprint, Flask, jsonify

from flask_llmauth import (
    Role,
    current_principal,
    require_model_access,
    require_role,
    require_scope,
)
from flask_llmauth.api import API_ROUTES, BLUEPRINT_NAME
from flask_llmauth.authz.routes import ATTR_EXEMPT, rule_template
from flask_llmauth.extension import AUTHENTICATOR_FACTORIES
from tests.helpers import (
    ADMIN,
    MASTER_KEY,
    ROLES,
    assert_error,
    bearer,
    new_key,
    record_secret,
    role_keys,
)

# -- the role → route matrix -----------------------------------------------------------------------

#: One host route per route class, at a LiteLLM path of that class (or, for the last one,
#: a path no group knows). The management API is moved under /api so none of these can
#: collide with an endpoint the extension registers.
ROUTE_CLASSES = {
    "llm": "/v1/moderations",
    "info": "/model/info",
    "key_management": "/key/aliases",
    "management": "/user/daily/activity/aggregated",
    "spend": "/spend/tags",
    "global_spend": "/global/spend/tags",
    "admin_only": "/v1/audio/speech",  # an LLM route, made admin-only by configuration
    "master_key_only": "/memory-usage-in-mem-cache",
    "self_managed": "/prompt/list",
    "unclassified": "/matrix/unclassified",
}
BOTH, SAFE, NEVER = "both", "safe", "never"
_NON_ADMIN_BASE = {"admin_only": NEVER, "master_key_only": NEVER, "unclassified": NEVER,
                   "info": BOTH, "self_managed": BOTH}
#: Written out by hand from litellm_auth.md §2.4 (not computed from the policy code).
EXPECTED: dict[str, dict[str, str]] = {
    "master_key": dict.fromkeys(ROUTE_CLASSES, BOTH),
    "proxy_admin": {**dict.fromkeys(ROUTE_CLASSES, BOTH), "master_key_only": NEVER},
    "proxy_admin_viewer": {
        **_NON_ADMIN_BASE, "llm": NEVER, "key_management": SAFE, "management": SAFE,
        "spend": SAFE, "global_spend": BOTH, "self_managed": SAFE,
    },
    "org_admin": {**_NON_ADMIN_BASE, "llm": BOTH, "key_management": BOTH, "management": NEVER,
                  "spend": BOTH, "global_spend": BOTH},
    "internal_user": {**_NON_ADMIN_BASE, "llm": BOTH, "key_management": BOTH,
                      "management": NEVER, "spend": BOTH, "global_spend": BOTH},
    "internal_user_viewer": {**_NON_ADMIN_BASE, "llm": BOTH, "key_management": NEVER,
                             "management": NEVER, "spend": BOTH, "global_spend": BOTH},
    "team": {**_NON_ADMIN_BASE, "llm": BOTH, "key_management": NEVER, "management": NEVER,
             "spend": NEVER, "global_spend": NEVER},
    "customer": {**_NON_ADMIN_BASE, "llm": BOTH, "key_management": NEVER, "management": NEVER,
                 "spend": NEVER, "global_spend": NEVER},
}


def _echo_view(name: str) -> Callable[[], Any]:
    def view() -> Any:
        return jsonify(route_class=name, role=current_principal.role.value)

    view.__name__ = f"matrix_{name}"
    return view


def add_class_routes(app: Flask) -> None:
    for name, path in ROUTE_CLASSES.items():
        app.add_url_rule(path, f"matrix_{name}", _echo_view(name), methods=["GET", "POST"])


@pytest.fixture
def matrix(app_factory: Any) -> tuple[Any, dict[str, dict[str, str]]]:
    app = app_factory(config={"LLMAUTH_API_PREFIX": "/api",
                              "LLMAUTH_ADMIN_ONLY_ROUTES": [ROUTE_CLASSES["admin_only"]]})
    add_class_routes(app)
    client = app.test_client()
    headers = {role: bearer(key) for role, key in role_keys(client, app, "/api").items()}
    headers["master_key"] = ADMIN
    return client, headers


@pytest.mark.parametrize("root", ["", "/llm"], ids=["root", "script_name"])
@pytest.mark.parametrize("role", [*ROLES, "master_key"])
def test_role_route_matrix(matrix: Any, role: str, root: str) -> None:
    """7 roles + master key × 10 route classes × GET/HEAD/POST; also mounted under a
    SCRIPT_NAME, which must not change a single decision."""
    client, headers = matrix
    mismatches = []
    for name, path in ROUTE_CLASSES.items():
        for method in ("GET", "HEAD", "POST"):
            expected_allowed = EXPECTED[role][name] == BOTH or (
                EXPECTED[role][name] == SAFE and method != "POST")
            response = client.open(path, method=method, headers=headers[role],
                                   json={} if method == "POST" else None,
                                   base_url=f"http://localhost{root}")
            expected_status = 200 if expected_allowed else 403
            if response.status_code != expected_status:
                mismatches.append(f"{method} {name} ({path}): {response.status_code}, "
                                  f"expected {expected_status}")
            elif expected_allowed and method != "HEAD":
                expected_role = "proxy_admin" if role == "master_key" else role
                assert response.get_json() == {"route_class": name, "role": expected_role}
            elif not expected_allowed and method != "HEAD":
                assert_error(response, 403)
    assert not mismatches, "\n".join(mismatches)


def test_matrix_routes_need_a_credential(matrix: Any) -> None:
    client, _ = matrix
    for path in ROUTE_CLASSES.values():
        assert_error(client.get(path), 401, "auth_error")
        assert_error(client.post(path, json={}), 401, "auth_error")


# -- policy coverage: every rule of the extension has an explicit policy -----------------------


def _extension_rules(app: Flask) -> list[Any]:
    return [rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"]


@pytest.mark.parametrize("prefix", ["", "/api/v0"])
def test_every_extension_rule_has_an_explicit_policy(app_factory: Any, prefix: str) -> None:
    bare = Flask("bare")
    host_endpoints = {rule.endpoint for rule in bare.url_map.iter_rules()}
    app = app_factory(config={"LLMAUTH_API_PREFIX": prefix}, routes=False)
    state = app.extensions["llmauth"]
    rules = [r for r in _extension_rules(app) if r.endpoint not in host_endpoints]
    assert len(rules) >= 20, "the management API should be registered"
    problems = []
    for rule in rules:
        view = app.view_functions[rule.endpoint]
        info = state.routes.info(rule, view)
        if rule.endpoint in API_ROUTES:
            litellm_path = API_ROUTES[rule.endpoint]
            if rule_template(rule).replace("{key}", "{key_id}") != prefix + litellm_path:
                problems.append(f"{rule.rule}: declared LiteLLM path {litellm_path} differs")
            if not info.groups or info.public:
                problems.append(f"{rule.rule}: groups={sorted(info.groups)} public={info.public}")
            if not info.groups & {"management_routes", "info_routes", "self_managed_routes",
                                  "spend_tracking_routes", "global_spend_tracking_routes"}:
                problems.append(f"{rule.rule}: not a management, info, self-managed or "
                                "spend route")
        elif not (getattr(view, ATTR_EXEMPT, False) or rule.endpoint.endswith(".static")):
            problems.append(f"{rule.rule} ({rule.endpoint}): no explicit policy")
    assert not problems, "\n".join(problems)
    registered = {r.endpoint for r in rules}
    stale = sorted(e for e in API_ROUTES if e.startswith(BLUEPRINT_NAME) and e not in registered)
    assert not stale, f"API_ROUTES names endpoints that do not exist: {stale}"


def test_management_api_groups_are_the_litellm_ones(app_factory: Any) -> None:
    app = app_factory(routes=False)
    state = app.extensions["llmauth"]
    groups = {}
    for rule in _extension_rules(app):
        info = state.routes.info(rule, app.view_functions[rule.endpoint])
        groups[info.route] = info.groups
    assert {"key_management_routes", "management_routes"} <= groups["/key/generate"]
    assert "info_routes" in groups["/key/info"] and "info_routes" in groups["/team/list"]
    assert "management_routes" in groups["/user/new"]
    assert "key_management_routes" not in groups["/user/new"]
    assert "self_managed_routes" in groups["/team/member_add"]
    assert "key_management_routes" in groups["/key/{key_id}/regenerate"]
    assert all("llm_api_routes" not in g for g in groups.values())


@pytest.mark.parametrize("role", [r for r in ROLES if r != "proxy_admin"])
def test_unclassified_host_route_is_denied_by_default(app_factory: Any, role: str) -> None:
    app = app_factory()
    client = app.test_client()
    key = role_keys(client, app)[role]
    for method in ("GET", "HEAD"):
        assert client.open("/unclassified", method=method, headers=bearer(key)).status_code == 403
    error = assert_error(client.get("/unclassified", headers=bearer(key)), 403)
    assert "Route=/unclassified" in error["message"] and "Your role=" in error["message"]
    assert client.get("/unclassified", headers=ADMIN).status_code == 200


# -- viewer rules on the management API --------------------------------------------------------


def test_proxy_admin_viewer_reads_everything_and_writes_nothing(client: Any, app: Any) -> None:
    viewer = bearer(role_keys(client, app)["proxy_admin_viewer"])
    for path in ("/key/list", "/user/list", "/team/list", "/user/info?user_id=u-internal_user",
                 "/team/info?team_id=t-team"):
        assert client.get(path, headers=viewer).status_code == 200, path
        assert client.head(path, headers=viewer).status_code == 200, path
    writes = {
        "/key/generate": {}, "/key/update": {"key": "x"}, "/key/delete": {"keys": ["x"]},
        "/key/regenerate": {"key": "x"}, "/key/x/regenerate": {}, "/key/block": {"key": "x"},
        "/key/unblock": {"key": "x"}, "/user/new": {}, "/user/delete": {"user_ids": ["x"]},
        "/team/new": {}, "/team/update": {"team_id": "t-team"},
        "/team/delete": {"team_ids": ["t-team"]}, "/team/block": {"team_id": "t-team"},
        "/team/member_add": {"team_id": "t-team", "member": {"user_id": "x"}},
    }
    for path, body in writes.items():
        assert_error(client.post(path, json=body, headers=viewer), 403)
    assert_error(client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers=viewer),
                 403)


def test_proxy_admin_viewer_may_update_only_its_own_email(client: Any, app: Any) -> None:
    viewer = bearer(role_keys(client, app)["proxy_admin_viewer"])
    response = client.post("/user/update", json={"user_email": "viewer@example.com"},
                           headers=viewer)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["user_email"] == "viewer@example.com"
    response = client.post("/user/update", headers=viewer, json={
        "user_id": "u-proxy_admin_viewer", "user_email": "v2@example.com"})
    assert response.status_code == 200
    for body in ({"user_email": "x@example.com", "user_role": "proxy_admin"},
                 {"user_id": "u-proxy_admin_viewer", "max_budget": 10},
                 {"user_id": "u-proxy_admin_viewer", "user_alias": "v"}):
        assert_error(client.post("/user/update", json=body, headers=viewer), 403)
    assert_error(client.post("/user/update", headers=viewer, json={
        "user_id": "u-internal_user", "user_email": "stolen@example.com"}), 403)
    info = client.get("/user/info?user_id=u-proxy_admin_viewer", headers=ADMIN).get_json()
    assert info["user_info"]["user_role"] == "proxy_admin_viewer"
    assert info["user_info"]["user_email"] == "v2@example.com"
    assert info["user_info"]["max_budget"] is None
    other = client.get("/user/info?user_id=u-internal_user", headers=ADMIN).get_json()
    assert other["user_info"]["user_email"] is None


# -- decorators --------------------------------------------------------------------------------


def test_require_role_accepts_names_values_and_several_roles(client: Any, app: Any) -> None:
    keys = {role: bearer(key) for role, key in role_keys(client, app).items()}
    keys["master_key"] = ADMIN
    may_internal = {"proxy_admin", "master_key", "internal_user", "proxy_admin_viewer"}
    for role, headers in keys.items():
        admin_status = client.get("/custom/admin", headers=headers).status_code
        internal_status = client.get("/custom/internal", headers=headers).status_code
        assert admin_status == (200 if role in ("proxy_admin", "master_key") else 403), role
        assert internal_status == (200 if role in may_internal else 403), role
    error = assert_error(client.get("/custom/admin", headers=keys["internal_user"]), 403)
    assert "proxy_admin" in error["message"] and "internal_user" in error["message"]
    assert_error(client.get("/custom/admin"), 401)


def test_require_role_replaces_the_role_table(app_factory: Any) -> None:
    app = app_factory()

    @app.post("/reports/run")
    @require_role(Role.INTERNAL_USER_VIEWER, "TEAM")
    def run_report() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    keys = role_keys(client, app)
    # Unclassified for the table, but the decorator names who may call it, writes included.
    assert client.post("/reports/run", headers=bearer(keys["internal_user_viewer"])).status_code \
        == 200
    assert client.post("/reports/run", headers=bearer(keys["team"])).status_code == 200
    assert client.post("/reports/run", headers=bearer(keys["proxy_admin"])).status_code == 200
    for role in ("internal_user", "proxy_admin_viewer", "org_admin", "customer"):
        assert_error(client.post("/reports/run", headers=bearer(keys[role])), 403)


def test_require_role_refuses_bad_declarations() -> None:
    with pytest.raises(ValueError):
        require_role()
    with pytest.raises(ValueError, match="unknown role"):
        require_role("superuser")
    # a list, as other libraries take it: the message shows the call that works
    with pytest.raises(ValueError, match=r"not a list: @require_role\('PROXY_ADMIN', "):
        require_role(["PROXY_ADMIN", "internal_user"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"not a list: @require_scope\("):
        require_scope(("reports:read",))  # type: ignore[arg-type]


def test_admin_only_routes_win_over_require_role(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_ADMIN_ONLY_ROUTES": ["/custom/internal"]})
    client = app.test_client()
    keys = role_keys(client, app)
    assert_error(client.get("/custom/internal", headers=bearer(keys["internal_user"])), 403)
    assert client.get("/custom/internal", headers=bearer(keys["proxy_admin"])).status_code == 200


def test_route_entries_matching_no_route_are_warned_about_once(app_factory: Any,
                                                                caplog: Any) -> None:
    """A misspelt ``admin_only_routes`` entry would leave its route open to non-admins: at
    the first authenticated request every configured path or wildcard that matches no
    route of the app is logged (group names are checked when the setting is read; the
    default public health paths are not required to exist)."""
    import logging

    app = app_factory(config={
        "LLMAUTH_ADMIN_ONLY_ROUTES": ["/custom/internl", "/custom/internal", "info_routes"],
        "LLMAUTH_PUBLIC_ROUTES": ["/health/liveliness", "/custom/*", "/nowhere/*"],
        "LLMAUTH_ALLOWED_ROUTES": ["/v1/*", "/key/*", "/custom/*", "/v2/chat"]})
    client = app.test_client()
    caplog.set_level(logging.WARNING, logger="flask_llmauth")
    for _ in range(2):
        client.post("/key/generate", json={}, headers=bearer(MASTER_KEY))
    warned = [r.getMessage() for r in caplog.records if "matches no route" in r.getMessage()]
    assert sorted(warned) == sorted([
        "llmauth: LLMAUTH_ADMIN_ONLY_ROUTES: '/custom/internl' matches no route of this app "
        "(misspelt? a route registered after the first request is not checked)",
        "llmauth: LLMAUTH_ALLOWED_ROUTES: '/v2/chat' matches no route of this app "
        "(misspelt? a route registered after the first request is not checked)",
        "llmauth: LLMAUTH_PUBLIC_ROUTES: '/nowhere/*' matches no route of this app "
        "(misspelt? a route registered after the first request is not checked)",
    ])


class _ScopedAuthenticator:
    """A test authenticator plugged in as ``custom``: ``scoped:<scope>,<scope>`` tokens."""

    name = "custom"

    def __init__(self, state: Any) -> None:
        self.state = state

    def authenticate(self, ctx: Any) -> Any:
        token = ctx.credentials.token
        if token is None or not token.startswith("scoped:"):
            return None
        scopes = frozenset(s for s in token[len("scoped:"):].split(",") if s)
        return self.state.identities.principal("custom", Role.INTERNAL_USER,
                                               user_id="scoped-user", scopes=scopes)


def test_require_scope(app_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(AUTHENTICATOR_FACTORIES, "custom",
                        lambda state, ext: _ScopedAuthenticator(state))
    app = app_factory()

    @app.get("/reports")
    @app.llmauth.route_group("info_routes")
    @require_scope("reports:read")
    def reports() -> Any:
        return jsonify(scopes=sorted(current_principal.scopes))

    @app.get("/reports/all")
    @app.llmauth.route_group("info_routes")
    @require_scope("reports:read", "reports:all")
    def all_reports() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    assert client.get("/reports", headers=bearer("scoped:reports:read")).get_json() == {
        "scopes": ["reports:read"]}
    error = assert_error(client.get("/reports", headers=bearer("scoped:other")), 403,
                         "insufficient_scope")
    assert "reports:read" in error["message"]
    assert_error(client.get("/reports/all", headers=bearer("scoped:reports:read")), 403)
    assert client.get("/reports/all",
                      headers=bearer("scoped:reports:read,reports:all")).status_code == 200
    assert client.get("/reports", headers=ADMIN).status_code == 200
    key = role_keys(client, app)["proxy_admin"]
    assert_error(client.get("/reports", headers=bearer(key)), 403, "insufficient_scope")
    assert_error(client.get("/reports"), 401)


def test_decorators_written_above_the_route_are_still_enforced_and_warned_about(
        app_factory: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``@require_role`` above ``@app.get`` decorates a function Flask already registered
    undecorated: on an LLM route that would let every key through. The request hook
    enforces the roles and scopes anyway and the first request logs the mistake."""
    monkeypatch.setitem(AUTHENTICATOR_FACTORIES, "custom",
                        lambda state, ext: _ScopedAuthenticator(state))
    app = app_factory()

    @require_role("proxy_admin_viewer")
    @app.post("/v1/moderations")  # an LLM route: any key may call it for its models
    def moderations() -> Any:
        return jsonify(ok=True)

    @require_scope("reports:read")
    @app.get("/reports")
    @app.llmauth.route_group("info_routes")
    def reports() -> Any:
        return jsonify(ok=True)

    @app.get("/reports/right")
    @app.llmauth.route_group("info_routes")
    @require_role("internal_user")
    @require_scope("reports:read")
    def right_order() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    keys = role_keys(client, app)
    error = assert_error(client.post("/v1/moderations", json={"model": "m"},
                                     headers=bearer(keys["internal_user"])), 403)
    assert "needs one of the roles ['proxy_admin_viewer']" in error["message"]
    assert client.post("/v1/moderations", json={"model": "m"}, headers=ADMIN).status_code == 200
    assert_error(client.get("/reports", headers=bearer("scoped:other")), 403,
                 "insufficient_scope")
    assert client.get("/reports", headers=bearer("scoped:reports:read")).status_code == 200
    assert ("@require_role on view 'moderations' sit above its route decorator"
            in caplog.text)
    assert "@require_scope on view 'reports' sit above" in caplog.text
    assert client.get("/reports/right",
                      headers=bearer("scoped:reports:read")).status_code == 200
    assert "'right_order'" not in caplog.text  # written as documented: no warning


def test_a_model_check_written_above_the_route_fails_closed(
        app_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """``@require_model_access`` above ``@app.post`` is not part of the registered view, so
    the models a key may use are not checked there: only proxy admins pass until the
    decorator moves below the route (before, every key called it with any model)."""
    app = app_factory()

    @require_model_access()
    @app.post("/my/tune")
    @app.llmauth.route_group("info_routes")
    def tune() -> Any:
        return jsonify(ok=True)

    @app.post("/my/tune/right")
    @app.llmauth.route_group("info_routes")
    @require_model_access()
    def tune_right() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    key = new_key(client, models=["gpt-4o"])["key"]
    error = assert_error(client.post("/my/tune", json={"model": "gpt-4o"},
                                     headers=bearer(key)), 403)
    assert "@require_model_access sits above the route decorator" in error["message"]
    assert client.post("/my/tune", json={"model": "other"}, headers=ADMIN).status_code == 200
    assert "only proxy admins may call a view whose @require_model_access" in caplog.text
    # written as documented: the key's models are checked, and nothing is logged
    assert client.post("/my/tune/right", json={"model": "gpt-4o"},
                       headers=bearer(key)).status_code == 200
    assert_error(client.post("/my/tune/right", json={"model": "other"}, headers=bearer(key)),
                 403)
    assert "'tune_right'" not in caplog.text


def test_a_missing_scope_is_refused_before_rate_limits_count_the_request(
        app_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scopes of ``@require_scope`` are checked by the request hook with the roles,
    so a refused token does not use up the caller's rpm."""
    monkeypatch.setitem(AUTHENTICATOR_FACTORIES, "custom",
                        lambda state, ext: _ScopedAuthenticator(state))
    app = app_factory({"LLMAUTH_RATELIMIT_GLOBAL_RPM": 2})

    @app.post("/my/generate")
    @app.llmauth.route_group("llm_api_routes")
    @require_scope("generate")
    def generate() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    for _ in range(3):
        assert_error(client.post("/my/generate", json={"model": "m"},
                                 headers=bearer("scoped:other")), 403, "insufficient_scope")
    assert client.post("/my/generate", json={"model": "m"},
                       headers=bearer("scoped:generate")).status_code == 200


def test_exempt_view_and_blueprint_read_no_credential(app_factory: Any) -> None:
    app = app_factory()
    bp = Blueprint("status_pages", __name__)

    @bp.get("/status/a")
    def status_a() -> Any:
        return jsonify(principal=bool(current_principal))

    app.llmauth.exempt(bp)  # after init_app: still honoured
    app.register_blueprint(bp)
    client = app.test_client()
    for path in ("/public/ping", "/status/a"):
        assert client.get(path).status_code == 200, path
        # A garbage credential is not even read on a public route.
        assert client.get(path, headers={"Authorization": "Bearer junk"}).status_code == 200
    assert client.get("/status/a", headers=ADMIN).get_json() == {"principal": False}


def test_route_group_classifies_a_host_view(app_factory: Any) -> None:
    app = app_factory()

    @app.post("/my/generate")
    @app.llmauth.route_group("LiteLLMRoutes.openai_routes")
    def my_generate() -> Any:
        return jsonify(ok=True)

    @app.get("/my/usage")
    @app.llmauth.route_group("spend_tracking_routes")
    def my_usage() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    keys = role_keys(client, app)
    key = new_personal_key(client, "u-internal_user", models=["gpt-4o"])
    assert client.post("/my/generate", json={"model": "gpt-4o"},
                       headers=bearer(key)).status_code == 200
    assert_error(client.post("/my/generate", json={"model": "gpt-5"}, headers=bearer(key)), 403,
                 "key_model_access_denied")
    assert_error(client.post("/my/generate", json={}, headers=bearer(keys["proxy_admin_viewer"])),
                 403)
    assert client.get("/my/usage", headers=bearer(keys["internal_user_viewer"])).status_code == 200
    assert_error(client.get("/my/usage", headers=bearer(keys["team"])), 403)
    with pytest.raises(ValueError, match="unknown route group"):
        app.llmauth.route_group("no_such_routes")


def new_personal_key(client: Any, user_id: str, **fields: Any) -> str:
    response = client.post("/key/generate", json={"user_id": user_id, **fields}, headers=ADMIN)
    assert response.status_code == 200, response.get_json()
    return record_secret(response.get_json()["key"])


# -- configured route lists ------------------------------------------------------------------------


def test_public_routes_replace_the_default_health_paths(app_factory: Any) -> None:
    """configuration.md: a value replaces the default, so a list without the health paths
    makes the probes need a credential (LiteLLM would keep its own public routes)."""
    app = app_factory(config={"LLMAUTH_PUBLIC_ROUTES": ["/open/*"]})
    client = app.test_client()
    assert_error(client.get("/health/liveliness"), 401)
    assert client.get("/health/liveliness", headers=ADMIN).status_code == 200
    default = app_factory().test_client()
    assert default.get("/health/liveliness").status_code == 200


def test_public_routes_with_wildcards_and_group_names(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_PUBLIC_ROUTES": [
        "/open/*", "LiteLLMRoutes.public_routes", "/key/*", "management_routes"]})

    @app.get("/open/<path:rest>")
    def open_pages(rest: str) -> Any:
        return jsonify(rest=rest, principal=bool(current_principal))

    @app.get("/opener")
    def opener() -> Any:
        return jsonify(ok=True)

    @app.get("/routes")
    def routes() -> Any:
        return jsonify(ok=True)

    client = app.test_client()
    assert client.get("/open/a/b").get_json() == {"rest": "a/b", "principal": False}
    assert client.get("/routes").status_code == 200  # via LiteLLMRoutes.public_routes
    assert client.get("/health/liveliness").status_code == 200
    assert_error(client.get("/opener"), 401)  # "/open/*" needs the "/" boundary
    # The extension's own endpoints can never be made public by configuration.
    assert_error(client.get("/key/list"), 401)
    assert_error(client.post("/key/generate", json={}), 401)
    assert_error(client.post("/user/new", json={}), 401)


def test_default_public_routes(client: Any) -> None:
    assert client.get("/health/liveliness").status_code == 200
    assert_error(client.get("/unclassified"), 401)


def test_admin_only_routes_with_group_names(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_ADMIN_ONLY_ROUTES": ["spend_tracking_routes",
                                                            "/v1/embeddings"]})
    add_class_routes(app)
    client = app.test_client()
    keys = role_keys(client, app)
    for role in ("internal_user", "proxy_admin_viewer", "internal_user_viewer"):
        error = assert_error(client.get("/spend/tags", headers=bearer(keys[role])), 403)
        assert "admin only route" in error["message"]
    assert_error(client.post("/v1/embeddings", json={"model": "m"},
                             headers=bearer(keys["internal_user"])), 403)
    assert client.get("/spend/tags", headers=bearer(keys["proxy_admin"])).status_code == 200
    assert client.post("/v1/embeddings", json={"model": "m"}, headers=ADMIN).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": "m"},
                       headers=bearer(keys["internal_user"])).status_code == 200


def test_deployment_allowed_routes_bind_everyone(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_ALLOWED_ROUTES": [
        "/v1/chat/completions", "/key/*", "LiteLLMRoutes.public_routes"]})
    client = app.test_client()
    key = new_personal_key(client, "alice")
    assert client.post("/v1/chat/completions", json={"model": "m"},
                       headers=bearer(key)).status_code == 200
    assert client.get("/key/list", headers=ADMIN).status_code == 200
    for headers in (bearer(key), ADMIN):
        error = assert_error(client.post("/v1/embeddings", json={"model": "m"}, headers=headers),
                             403)
        assert "/v1/embeddings" in error["message"]
        assert_error(client.get("/team/list", headers=headers), 403)
    assert client.get("/health/liveliness").status_code == 200  # listed through the group
    assert_error(client.get("/public/ping"), 403)  # exempt, but not exposed by the deployment


def test_master_key_only_routes(app_factory: Any) -> None:
    app = app_factory()
    add_class_routes(app)
    client = app.test_client()
    keys = role_keys(client, app)
    assert client.get("/memory-usage-in-mem-cache", headers=ADMIN).status_code == 200
    error = assert_error(client.get("/memory-usage-in-mem-cache",
                                    headers=bearer(keys["proxy_admin"])), 403)
    assert "MASTER KEY" in error["message"]


# -- IP allow-lists --------------------------------------------------------------------------------


def _from(ip: str, forwarded: str | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"environ_base": {"REMOTE_ADDR": ip}}
    if forwarded is not None:
        kwargs["headers"] = {"X-Forwarded-For": forwarded}
    return kwargs


def test_global_allowed_ips_without_trusted_proxies(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_ALLOWED_IPS": ["10.0.0.0/8", "2001:db8::/32"]})
    client = app.test_client()

    def get(path: str, ip: str, forwarded: str | None = None, auth: bool = True) -> Any:
        kwargs = _from(ip, forwarded)
        if auth:
            kwargs.setdefault("headers", {}).update(ADMIN)
        return client.get(path, **kwargs)

    assert get("/key/list", "10.1.2.3").status_code == 200
    assert get("/key/list", "2001:db8::5").status_code == 200
    error = assert_error(get("/key/list", "192.0.2.7"), 403)
    assert "192.0.2.7" in error["message"]
    # X-Forwarded-For from an untrusted peer is ignored.
    assert_error(get("/key/list", "192.0.2.7", forwarded="10.1.2.3"), 403)
    # The allow-list covers public routes too: it is a deployment-wide gate.
    assert get("/health/liveliness", "10.9.9.9", auth=False).status_code == 200
    assert_error(get("/health/liveliness", "192.0.2.7", auth=False), 403)


def test_global_allowed_ips_behind_trusted_proxies(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_ALLOWED_IPS": ["10.0.0.0/8"],
                              "LLMAUTH_TRUSTED_PROXY_RANGES": ["127.0.0.1/32", "172.16.0.0/12"]})
    client = app.test_client()

    def status(forwarded: str | None, ip: str = "127.0.0.1") -> int:
        kwargs = _from(ip, forwarded)
        kwargs["headers"] = {**kwargs.get("headers", {}), **ADMIN}
        return int(client.get("/key/list", **kwargs).status_code)

    assert status("10.1.2.3") == 200
    assert status("10.1.2.3, 172.16.0.9") == 200  # walked over a second trusted hop
    assert status("192.0.2.1") == 403
    # The client may prepend anything; the right-most untrusted hop is the client.
    assert status("10.1.2.3, 192.0.2.1") == 403
    assert status(None) == 403  # the proxy itself is not in the allow-list
    assert status("10.1.2.3", ip="192.0.2.50") == 403  # untrusted peer: header ignored


def test_per_key_allowed_ips(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_TRUSTED_PROXY_RANGES": ["127.0.0.1/32"]})
    client = app.test_client()
    key = new_personal_key(client, "alice", allowed_ips=["192.0.2.0/24"])
    other = new_personal_key(client, "bob")

    def chat(headers: dict[str, str], ip: str, forwarded: str | None = None) -> int:
        kwargs = _from(ip, forwarded)
        kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
        return int(client.post("/v1/chat/completions", json={"model": "m"}, **kwargs)
                   .status_code)

    assert chat(bearer(key), "192.0.2.10") == 200
    assert chat(bearer(key), "198.51.100.1") == 403
    assert chat(bearer(key), "127.0.0.1", forwarded="192.0.2.10") == 200
    assert chat(bearer(key), "127.0.0.1", forwarded="192.0.2.10, 198.51.100.1") == 403
    assert chat(bearer(key), "198.51.100.2", forwarded="192.0.2.10") == 403
    assert chat(bearer(other), "198.51.100.1") == 200


# -- per-key allowed_routes and key_type ---------------------------------------------------------


@pytest.fixture
def route_app(app_factory: Any) -> Any:
    app = app_factory()

    @app.post("/v1/chatbot")
    def chatbot() -> Any:
        return jsonify(ok=True)

    return app


def _admin_key(client: Any, **fields: Any) -> str:
    """A key of a proxy_admin user: the role table is skipped, only key limits apply."""
    client.post("/user/new", json={"user_id": "root", "user_role": "proxy_admin",
                                   "auto_create_key": False}, headers=ADMIN)
    return new_personal_key(client, "root", **fields)


def _calls(client: Any, key: str) -> dict[str, int]:
    h = bearer(key)
    return {
        "chat": client.post("/v1/chat/completions", json={"model": "m"}, headers=h).status_code,
        "v1chat_bare": client.post("/chat/completions", json={"model": "m"},
                                   headers=h).status_code,
        "chatbot": client.post("/v1/chatbot", json={}, headers=h).status_code,
        "gemini": client.post("/v1beta/models/gemini-pro:generateContent", json={},
                              headers=h).status_code,
        "key_list": client.get("/key/list", headers=h).status_code,
        "key_info": client.get("/key/info", headers=h).status_code,
        "key_generate": client.post("/key/generate", json={}, headers=h).status_code,
        "user_list": client.get("/user/list", headers=h).status_code,
    }


@pytest.mark.parametrize("routes,allowed", [
    (["/v1/chat/completions"], {"chat"}),
    (["/v1/chat"], {"chat"}),  # a plain path also covers sub-paths, at a "/" boundary
    (["/v1/*"], {"chat", "chatbot"}),
    (["/v1beta/models/{model_name:path}:generateContent", "/key/info"], {"gemini", "key_info"}),
    (["openai_routes"], {"chat", "v1chat_bare"}),
    (["LiteLLMRoutes.info_routes"], {"key_list", "key_info"}),
    (["llm_api_routes", "/user/list"], {"chat", "v1chat_bare", "gemini", "user_list"}),
])
def test_key_allowed_routes_bind_admin_keys_too(route_app: Any, routes: list[str],
                                                allowed: set[str]) -> None:
    client = route_app.test_client()
    key = _admin_key(client, allowed_routes=routes)
    calls = _calls(client, key)
    assert {name for name, status in calls.items() if status == 200} == allowed, calls
    assert {status for name, status in calls.items() if name not in allowed} == {403}, calls
    error = assert_error(client.get("/team/list", headers=bearer(key)), 403) \
        if "LiteLLMRoutes.info_routes" not in routes else None
    if error is not None:
        assert "Virtual key is not allowed to call this route" in error["message"]


@pytest.mark.parametrize("key_type,allowed", [
    ("llm_api", {"chat", "v1chat_bare", "gemini"}),
    ("read_only", {"key_list", "key_info"}),
    ("management", {"key_list", "key_info", "key_generate", "user_list"}),
    ("default", {"chat", "v1chat_bare", "chatbot", "gemini", "key_list", "key_info",
                 "key_generate", "user_list"}),
])
def test_key_type_shorthands(route_app: Any, key_type: str, allowed: set[str]) -> None:
    client = route_app.test_client()
    key = _admin_key(client, key_type=key_type)
    body = client.get("/key/info", headers=ADMIN, query_string={"key": key}).get_json()
    assert body["info"]["key_type"] == key_type
    calls = _calls(client, key)
    assert {name for name, status in calls.items() if status == 200} == allowed, calls
    assert all(status in (200, 403) for status in calls.values()), calls


def test_key_allowed_routes_grant_routes_but_never_past_the_hard_rules(app_factory: Any) -> None:
    app = app_factory(config={"LLMAUTH_ADMIN_ONLY_ROUTES": ["/v1/embeddings"]})
    add_class_routes(app)
    client = app.test_client()
    role_keys(client, app)
    # An admin grants an internal user's key an otherwise denied route (LiteLLM step 12).
    granted = new_personal_key(client, "u-internal_user",
                               allowed_routes=["/matrix/unclassified", "/user/daily/activity/*",
                                               "/v1/embeddings", "llm_api_routes"])
    assert client.get("/matrix/unclassified", headers=bearer(granted)).status_code == 200
    # ... but never an admin-only route, and it limits the key at the same time.
    assert_error(client.post("/v1/embeddings", json={"model": "m"}, headers=bearer(granted)), 403)
    assert_error(client.get("/spend/tags", headers=bearer(granted)), 403)
    # A viewer's key never reaches LLM routes or writes through allowed_routes.
    viewer = new_personal_key(client, "u-proxy_admin_viewer",
                              allowed_routes=["llm_api_routes", "/key/generate", "/prompt/list"])
    assert_error(client.post("/v1/chat/completions", json={"model": "m"},
                             headers=bearer(viewer)), 403)
    assert_error(client.post("/key/generate", json={}, headers=bearer(viewer)), 403)
    assert_error(client.post("/prompt/list", json={}, headers=bearer(viewer)), 403)
    assert client.get("/prompt/list", headers=bearer(viewer)).status_code == 200


def test_an_unclassified_route_is_named_as_such_in_the_log_and_signal(
        app_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A host view in no route group (an OpenAI path under a blueprint prefix, say) is
    refused to non-admins as ``unclassified_route``, so the operator knows the view needs
    a group, a role or ``exempt``; a classified route the role may not call stays
    ``role_route_denied``."""
    from flask_llmauth import signals

    app = app_factory()
    gateway = Blueprint("gateway", __name__, url_prefix="/gateway")
    gateway.add_url_rule("/v1/chat/completions", "chat", lambda: {"ok": True},
                         methods=["POST"])
    app.register_blueprint(gateway)
    client = app.test_client()
    key = new_personal_key(client, "alice")
    reasons: list[str] = []

    def failed(sender: Any, **data: Any) -> None:
        reasons.append(data["reason"])

    with signals.auth_failed.connected_to(failed, app):
        assert_error(client.post("/gateway/v1/chat/completions", json={"model": "m"},
                                 headers=bearer(key)), 403)
        assert_error(client.post("/team/new", json={}, headers=bearer(key)), 403)
    assert reasons == ["unclassified_route", "role_route_denied"]
    assert "403 unclassified_route POST /gateway/v1/chat/completions" in caplog.text
    assert client.post("/gateway/v1/chat/completions", json={"model": "m"},
                       headers=ADMIN).status_code == 200


def test_automatic_options_needs_no_credential(client: Any) -> None:
    response = client.options("/key/generate")
    assert response.status_code == 200
    assert "POST" in response.headers["Allow"]


def test_master_key_is_never_echoed(client: Any) -> None:
    response = client.get("/key/list", headers=bearer(MASTER_KEY + "x"))
    assert_error(response, 401)
    assert MASTER_KEY not in response.get_data(as_text=True)


def test_exempt_blueprint_is_matched_by_object_not_by_name(app_factory: Any) -> None:
    """Exempting a blueprint makes its own views public wherever it is registered (under
    another ``name=``, nested) and never another blueprint that shares its name."""
    app = app_factory()
    docs = Blueprint("docs", __name__)

    @docs.get("/page")
    def docs_page() -> Any:
        return jsonify(public=True)

    # A different blueprint with the same short name, nested under an admin blueprint
    # (e.g. from another package): its views must stay protected.
    admin = Blueprint("admin", __name__, url_prefix="/admin")
    admin_docs = Blueprint("docs", __name__, url_prefix="/docs")

    @admin_docs.get("/runbook")
    def runbook() -> Any:
        return jsonify(internal=True)

    admin.register_blueprint(admin_docs)
    # An exempted parent makes its nested blueprints public; an exempted child is public
    # wherever it is nested.
    parent = Blueprint("parent", __name__, url_prefix="/parent")
    child = Blueprint("child", __name__, url_prefix="/child")

    @child.get("/x")
    def child_x() -> Any:
        return jsonify(public=True)

    parent.register_blueprint(child)
    outer = Blueprint("outer", __name__, url_prefix="/outer")
    inner = Blueprint("inner", __name__, url_prefix="/inner")

    @inner.get("/y")
    def inner_y() -> Any:
        return jsonify(public=True)

    outer.register_blueprint(inner)
    app.llmauth.exempt(docs)
    app.llmauth.exempt(parent)
    app.llmauth.exempt(inner)
    app.register_blueprint(docs, url_prefix="/docs")
    app.register_blueprint(docs, name="docs_v2", url_prefix="/v2/docs")
    app.register_blueprint(admin)
    app.register_blueprint(parent)
    app.register_blueprint(outer)
    client = app.test_client()
    for path in ("/docs/page", "/v2/docs/page", "/parent/child/x", "/outer/inner/y"):
        assert client.get(path).status_code == 200, path
    assert_error(client.get("/admin/docs/runbook"), 401)
    assert client.get("/admin/docs/runbook", headers=ADMIN).get_json() == {"internal": True}
