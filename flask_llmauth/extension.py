"""The :class:`LLMAuth` extension: ``init_app`` wiring and the callback decorators.

One ``before_request`` hook runs for every routed request: classify the rule → read the
credential → run the authenticator chain → authorize. The principal lands on ``g`` and
:data:`~flask_llmauth.current_principal` reads it. Per-app state lives in
``app.extensions["llmauth"]``; the extension object keeps no app.
"""

from __future__ import annotations

import logging
import os
import secrets
import weakref
from collections.abc import Callable
from functools import partial
from hmac import compare_digest
from types import SimpleNamespace
from typing import Any, NamedTuple, TypeVar, overload

import peewee
from flask import (
    Blueprint,
    Flask,
    after_this_request,
    current_app,
    g,
    got_request_exception,
    request,
)
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from .authn.base import Authenticator, Chain, new_context
from .authn.custom import custom_factory, with_key_validation
from .authn.jwt import jwt_factory
from .authn.master_key import MasterKeyAuthenticator
from .authn.oauth2 import oauth2_factory
from .authn.proxy_headers import proxy_headers_factory
from .authn.virtual_key import CachedKey, VirtualKeyAuthenticator
from .authz.models import ModelAccess
from .authz.policy import SAFE_METHODS, Policy
from .authz.routes import (
    ATTR_EXEMPT,
    ATTR_GROUPS,
    RouteInfo,
    RoutePatterns,
    RouteTable,
    group_name,
)
from .background import Background
from .bodies import (
    JSONBody,
    known_body,
    read_chunked_within_limit,
    refuse_declared_oversize,
)
from .budgets import install as install_budgets
from .cache import Invalidator, TTLCache
from .config import DEFAULT_PUBLIC_ROUTES, Settings, check_secrets, load_settings
from .credentials import Credentials, read_credentials
from .crypto import KEY_PREFIX, CacheKeyer, KeyDigester
from .customers import install as install_customers
from .customers import require_user_param
from .errors import (
    ConfigurationError,
    Forbidden,
    LLMAuthError,
    ServiceUnavailable,
    Unauthenticated,
    error_response,
    http_error,
)
from .guards import Guards, capture_json_responses, record_usage
from .identities import IdentityLoader, Records
from .keys import LastUsedRecorder
from .network import client_ip
from .principal import Principal, get_principal
from .ratelimits import install as install_ratelimits
from .ratelimits import storage_uri
from .signals import auth_failed, auth_succeeded
from .signals import send as send_signal
from .spend import install as install_spend
from .store.db import Store
from .sync import InvalidationLog

log = logging.getLogger("flask_llmauth")

try:  # what ``request`` and ``g`` proxy to, read without the proxies on the hot path
    from flask.globals import _cv_app, _cv_request

    _app_context: Callable[[], Any] = _cv_app.get
    _request_context: Callable[[], Any] = _cv_request.get
except ImportError:  # pragma: no cover - a Flask without them: the public proxies are used
    def _app_context() -> Any:
        return SimpleNamespace(g=g._get_current_object())

    def _request_context() -> Any:
        return SimpleNamespace(request=request._get_current_object())  # type: ignore[attr-defined]
F = TypeVar("F", bound=Callable[..., Any])
B = TypeVar("B", bound=Blueprint)
#: ``callback(error) -> response``: anything a Flask view may return (``None`` is not).
ErrorCallback = Callable[[LLMAuthError], ResponseReturnValue]


def state() -> LLMAuthState:
    """The current app's extension state."""
    return current_app.extensions["llmauth"]


def require_principal() -> Principal:
    """The current principal; 401 when there is none (a public route, say)."""
    principal = get_principal()
    if principal is None:
        raise Unauthenticated("Authentication Error, No api key passed in.",
                              reason="no_principal")
    return principal


def _check_auth_order(settings: Settings) -> None:
    unknown = [n for n in settings.auth_order if n not in AUTHENTICATOR_FACTORIES]
    if unknown:
        raise ConfigurationError(
            f"LLMAUTH_AUTH_ORDER (from {settings.source('auth_order')}): unknown "
            f"authenticator(s) {', '.join(unknown)}; known: "
            f"{', '.join(AUTHENTICATOR_FACTORIES)}")


def _open_store(app: Flask, settings: Settings) -> Store:
    """Open (and migrate) the database; a failure is a start-up error naming the setting.

    The message carries the error's type only: driver messages can repeat the URL, which
    may hold a password. A Postgres URL without its driver installed names the extra to
    install (checked here, before any connection: without auto-migration the first
    connection would come later).
    """
    url = settings.database_url
    source = settings.source("database_url")
    if url is None:
        os.makedirs(app.instance_path, mode=0o700, exist_ok=True)  # owner-only when created
        path = os.path.join(app.instance_path, "llmauth.db")
        # Owner-only from the start (key digests, users, spend); SQLite gives its journal
        # files the database file's mode. An existing file keeps the mode it has.
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT, 0o600))
        url = "sqlite:///" + path
    no_driver = ConfigurationError(
        f"LLMAUTH_DATABASE_URL (from {source}): the Postgres driver (psycopg) is not "
        "installed: pip install 'flask-llmauth[postgres]'")
    try:
        store = Store(url)
    except peewee.ImproperlyConfigured:
        raise no_driver from None
    except Exception as exc:
        raise ConfigurationError(
            f"LLMAUTH_DATABASE_URL (from {source}): cannot open the database "
            f"({type(exc).__name__}; is its driver installed?)") from None
    check_driver = getattr(getattr(store.db, "_adapter", None), "check_driver", None)
    try:
        if check_driver is not None:  # Postgres: psycopg (3) or psycopg2 importable
            check_driver()
        if settings.auto_migrate:
            store.migrate()
    except peewee.ImproperlyConfigured:
        store.close()
        raise no_driver from None
    except ServiceUnavailable:
        store.close()
        raise ConfigurationError(
            f"LLMAUTH_DATABASE_URL (from {source}): the database is unreachable, so "
            "its migrations cannot be checked. Start it first, or set "
            "LLMAUTH_AUTO_MIGRATE=False and run `flask llmauth init-db` later.") from None
    return store


#: Rate-limit storage URI schemes (by prefix) -> (kind, the client package, our extra).
_STORAGE_CLIENTS = {"redis": ("Redis", "redis", "redis"),
                    "valkey": ("Valkey", "valkey", "valkey"),
                    "memcached": ("memcached", "pymemcache", "memcached"),
                    "mongodb": ("MongoDB", "pymongo", "mongodb")}


def _check_rate_limit_storage(settings: Settings) -> None:
    """A Redis, Valkey, memcached or MongoDB rate-limit storage needs its client package:
    without it, a start-up error naming the setting and the extra to install (not the
    ``limits`` traceback)."""
    scheme = storage_uri(settings).partition("://")[0].lower()
    for prefix, (kind, package, extra) in _STORAGE_CLIENTS.items():
        if not scheme.startswith(prefix):
            continue
        try:
            __import__(package)
        except ImportError:
            name = "ratelimit_storage_uri" if settings.ratelimit_storage_uri else "redis_url"
            raise ConfigurationError(
                f"LLMAUTH_{name.upper()} (from {settings.source(name)}): a {kind} storage "
                f"needs the {package} package: pip install 'flask-llmauth[{extra}]'") from None


class LLMAuthState:
    """Everything one app's extension needs at request time."""

    def __init__(self, ext: LLMAuth, app: Flask, settings: Settings) -> None:
        self.ext = ext
        self.settings = settings
        _check_auth_order(settings)
        _check_rate_limit_storage(settings)
        self.store = _open_store(app, settings)
        server_secret = settings.salt_key or settings.master_key
        if server_secret is None:
            log.warning("llmauth: no master key and no salt key: virtual keys will not "
                        "survive a restart (dev mode)")
            server_secret = secrets.token_urlsafe(32)
        self.digester = KeyDigester(server_secret)
        self.cache_keyer = CacheKeyer(server_secret)
        self.key_cache: TTLCache[CachedKey] = TTLCache(settings.cache_max_size)
        self.negative_cache: TTLCache[bool] = TTLCache(10_000)
        self.identity_cache: TTLCache[Records] = TTLCache(settings.cache_max_size)
        #: End users' rows (and their absence), tagged ``customer:<id>``.
        self.customer_cache: TTLCache[Any] = TTLCache(settings.cache_max_size)
        self.identities = IdentityLoader(self.store, self.identity_cache, settings.cache_ttl)
        self.invalidate = Invalidator([self.key_cache, self.negative_cache, self.identity_cache,
                                       self.customer_cache])
        self.invalidation_log = InvalidationLog(self.store, self.invalidate)
        self.invalidate.add_publisher(self.invalidation_log.publish)
        self.invalidation_log.start()
        self.models = ModelAccess(settings.model_access_groups, settings.model_alias_map,
                                  settings.model_list)
        self.policy = Policy(settings, self.models)
        #: ``(id(principal), route info, unsafe) -> _Verdict`` (see :meth:`_verdict`).
        self._verdicts: dict[tuple[int, RouteInfo, bool], _Verdict] = {}
        self._max_credential_length = settings.max_credential_length
        #: ``LLMAUTH_MAX_REQUEST_SIZE_MB`` in bytes (``None``: off).
        self._max_request_body = settings.max_request_body_bytes
        self._key_header_name = settings.key_header_name
        self._enforce_user_param = settings.enforce_user_param
        self.last_used = LastUsedRecorder()
        #: Budgets and rate limits register here (see :mod:`flask_llmauth.guards`).
        self.guards = Guards(media=settings.prompt_media_tokens)
        #: Set by :func:`flask_llmauth.ratelimits.install` in ``init_app``.
        self.limiter: Any = None
        #: Flask-Limiter's request hooks, run from this state's hooks (see ratelimits).
        self.host_limit_hooks: Any = None
        self.ratelimits: Any = None
        #: Set by :func:`flask_llmauth.customers.install` in ``init_app``.
        self.customers: Any = None
        self.auth_failures: Any = None
        #: Set by :func:`flask_llmauth.spend.install` (``None`` when spend tracking is off).
        self.spend_ledger: Any = None
        #: Set by :func:`flask_llmauth.budgets.install` in ``init_app``.
        self.budgets: Any = None
        self.background = Background()
        self.background.every(settings.cache_sync_interval, "cache-sync",
                              self.invalidation_log.poll, at_stop=False)
        self.background.every(settings.last_used_flush_interval, "last-used",
                              lambda: self.last_used.flush(self))
        from .api import API_ROUTES

        public = RoutePatterns(settings.public_routes)
        self.routes = RouteTable(public, API_ROUTES, ext._exempt_blueprints, app.blueprints)
        self._rule_infos = self.routes.info_by_rule_id  # read per request without a hop
        #: Whether :meth:`_check_route_settings` ran (at the first authenticated request).
        self.route_settings_checked = False
        self.api_endpoints = API_ROUTES  # filled when the blueprint is created
        self.authenticators = self._build_authenticators(ext)
        self.chain = Chain([self.authenticators[name] for name in settings.auth_order
                            if name in self.authenticators])
        ext.callbacks.on_change(self.chain.refresh)
        #: ``(header value, authenticator, credentials, principal, id(principal))``: the
        #: master key's ``Authorization`` header, and what the chain answers for it.
        self._master_header: tuple[str, Authenticator, Credentials, Principal, int] | None = None
        self._prepare_master_authorization()

    def _prepare_master_authorization(self) -> None:
        """``Authorization: Bearer <master key>`` is compared whole (constant time) before
        the credential is parsed when nothing else could claim that header: no custom key
        header, no ``x-litellm-api-key`` (checked per request) and the master key first in
        the chain (checked per request: a callback registered later may put a method
        ahead of it). The answer is the chain's own for that header. Off for a master key
        the plain reader would not take as it is."""
        master = self.authenticators.get("master_key")
        key = self.settings.master_key
        if (isinstance(master, MasterKeyAuthenticator) and not self._key_header_name
                and key and key.isascii() and key.isprintable() and " " not in key
                and len(key) <= self._max_credential_length):
            self._master_header = ("Bearer " + key, master, Credentials(key, "Authorization"),
                                   master.principal, id(master.principal))

    def _build_authenticators(self, ext: LLMAuth) -> dict[str, Authenticator]:
        built: dict[str, Authenticator] = {}
        for name, factory in AUTHENTICATOR_FACTORIES.items():
            authenticator = factory(self, ext)
            if authenticator is not None:
                built[name] = authenticator
        return built

    def virtual_key_authenticator(self) -> VirtualKeyAuthenticator:
        return self.authenticators["virtual_key"]  # type: ignore[return-value]

    def close(self) -> None:
        """Stop background work, flush batched writes and close the database."""
        self.background.stop()
        self.store.close()

    # -- the request hook -----------------------------------------------------------------------

    def before_request(self) -> ResponseReturnValue | None:
        """The app's one hook: classify → credential → chain → authorize → guards."""
        # The request is fetched once, from its context variable: every attribute read
        # through Flask's context proxies costs a lookup first, and the hot path does dozens.
        req = _request_context().request
        rule = req.url_rule
        if rule is None:  # 404/405/redirect: nothing is granted, the routing error stands
            return self._api_method_not_allowed(req)
        info = self._rule_infos.get(id(rule))
        if info is None:
            info = self.routes.info(rule, current_app.view_functions.get(rule.endpoint))
        if self.policy.gated:
            try:
                self.policy.gate(info, req)
            except LLMAuthError as error:
                self._log_failure(error, info.route, None)
                return self.ext.error_response(error)
        method = req.method
        # One function from here on: a call per request costs more than the checks it holds.
        if not (info.public or (method == "OPTIONS"
                                and getattr(rule, "provide_automatic_options", False))):
            if not self.background.started:
                self._first_request()
            if info.is_api:
                limit = req.max_content_length
                if limit is None or limit > self.settings.max_api_body_size:
                    req.max_content_length = self.settings.max_api_body_size
            credentials = None
            g_ = _app_context().g
            try:
                body_limit = self._max_request_body
                if body_limit is not None:
                    limit = req.max_content_length
                    if limit is None or limit > body_limit:
                        req.max_content_length = body_limit
                    refuse_declared_oversize(req)
                if self.auth_failures is not None and self.auth_failures.blocking:
                    # Before the credential is read.
                    self.auth_failures.check(client_ip(req, self.settings.trusted_proxy_ranges))
                environ = req.environ
                value = environ.get("HTTP_AUTHORIZATION", "")
                master = self._master_header
                if (master is not None and value.isascii()
                        and compare_digest(value, master[0]) and self.chain.first is master[1]
                        and "HTTP_X_LITELLM_API_KEY" not in environ):
                    _, _, credentials, principal, principal_id = master
                else:
                    credentials = read_credentials(req, self._max_credential_length,
                                                   self._key_header_name, info.query_key_allowed)
                    principal = self.chain.authenticate(new_context((req, credentials, info)))
                    principal_id = id(principal)
                if (body_limit is not None and req.content_length is None
                        and "HTTP_TRANSFER_ENCODING" in environ):
                    read_chunked_within_limit(req)
                unsafe = info.unsafe_only or method not in SAFE_METHODS
                # An entry keeps its principal alive, so a live principal's id finds only
                # its own verdicts (no identity check needed).
                verdict = self._verdicts.get((principal_id, info, unsafe))
                if verdict is None:
                    verdict = self._verdict(principal, info, unsafe)
                # Unpacked at once: cheaper than reading the named fields one by one.
                _, _, denial, key_ips, check_models, models, plan, only_for_end_user = verdict
                if key_ips:
                    self.policy.check_key_ip(principal, req)
                if denial is not None:
                    self.policy.refuse(denial, principal, info, req)
                if check_models:
                    model, parsed = self.policy.check_models(principal, req, info, models)
                    if self._enforce_user_param and method == "POST":
                        require_user_param(req, info, parsed)
                    g_.__dict__["_llmauth_principal"] = principal  # what ``g.x = ...`` does
                    if plan is not None and only_for_end_user:
                        # The plan matters only for an end user: dropped when the request
                        # names none (no end-user header present, and no end-user field in
                        # a JSON object body: customers.body_may_name_end_user, inline).
                        for key in self.customers.header_environ_keys:
                            if key in environ:
                                break
                        else:
                            if type(parsed) is not dict or not (
                                    "user" in parsed or "safety_identifier" in parsed
                                    or "metadata" in parsed or "litellm_metadata" in parsed):
                                plan = None
                    if plan is not None:  # self._admit(...), inline
                        admission = self.guards.admit_planned(
                            plan, model, known_body(parsed) if type(parsed) is dict
                            else JSONBody(req, parsed, read=True), environ)
                        if admission is not None:
                            g_.__dict__["_llmauth_admission"] = admission
                            after_this_request(self.guards.finisher(admission))
                else:
                    g_.__dict__["_llmauth_principal"] = principal
                    if plan is not None:
                        self._admit(g_, plan, None, JSONBody(req), req)
            except LLMAuthError as error:
                self._log_failure(error, info.route, credentials)
                return self.ext.error_response(error)
            except HTTPException:
                raise  # e.g. 413 while the policy reads the body: Flask answers it
            except Exception as exc:  # a bug must deny, never grant and never answer 500
                log.error("llmauth: authorization failed unexpectedly on %s: %s", info.route,
                          type(exc).__name__)
                g_.pop("_llmauth_principal", None)
                denial = Forbidden(reason="policy_error")
                self._log_failure(denial, info.route, credentials)
                return self.ext.error_response(denial)
            if auth_succeeded.receivers:
                send_signal(auth_succeeded, current_app._get_current_object(),  # type: ignore[attr-defined]
                            principal=principal)
        hooks = self.host_limit_hooks  # Flask-Limiter's, which ran after this hook
        if hooks is not None and hooks.active:
            after_this_request(hooks.after)  # also adds the headers of a 429 it raises
            hooks.before()
        return None

    def _first_request(self) -> None:
        """Start the background work (in this process; again after :meth:`close`) and,
        once, check the configured route entries against the app's routes."""
        self.background.ensure_started()
        if not self.route_settings_checked:
            self._check_route_settings()

    def _check_route_settings(self) -> None:
        """Warn once about configured route entries that match no route of the app (run
        at the first authenticated request, when the host's routes are registered): a
        misspelt ``admin_only_routes`` entry would leave its route open to non-admins."""
        self.route_settings_checked = True
        app = current_app
        routes = [self.routes.info(rule, app.view_functions.get(rule.endpoint)).route
                  for rule in app.url_map.iter_rules()]
        settings = self.settings
        configured_public = [entry for entry in settings.public_routes
                             if entry not in DEFAULT_PUBLIC_ROUTES]
        for name, entries in (("LLMAUTH_ADMIN_ONLY_ROUTES", settings.admin_only_routes),
                              ("LLMAUTH_ALLOWED_ROUTES", settings.allowed_routes),
                              ("LLMAUTH_PUBLIC_ROUTES", configured_public)):
            for entry in RoutePatterns(entries).unmatched(routes):
                log.warning("llmauth: %s: %r matches no route of this app (misspelt? a "
                            "route registered after the first request is not checked)",
                            name, entry)

    def _api_method_not_allowed(self, req: Any) -> ResponseReturnValue | None:
        """A method a management-API path does not take (``GET /key/generate``): the JSON
        envelope with ``Allow`` instead of Flask's HTML page. The host's routing errors
        stand as they are."""
        exc = req.routing_exception
        if not isinstance(exc, MethodNotAllowed) or not exc.valid_methods:
            return None
        try:
            endpoint, _ = current_app.url_map.bind_to_environ(req.environ).match(
                method=next(iter(exc.valid_methods)))
        except HTTPException:
            return None
        if endpoint not in self.api_endpoints:
            return None
        return self.ext.error_response(http_error(exc))

    def _admit(self, g_: Any, plan: Any, model: str | None, body: JSONBody, req: Any) -> None:
        admission = self.guards.admit_planned(plan, model, body, req.environ)
        if admission is not None:
            g_.__dict__["_llmauth_admission"] = admission
            after_this_request(self.guards.finisher(admission))

    def _verdict(self, principal: Principal, info: RouteInfo, unsafe: bool) -> _Verdict:
        """Everything about a request that depends only on its principal (an immutable
        snapshot: a changed key, user or team gets a new object), its rule and whether its
        method is safe; kept per principal object so a request looks it up once."""
        verdicts = self._verdicts
        if len(verdicts) >= 10_000:
            verdicts.clear()
        plan = self._guard_plan(principal, info, unsafe)
        # Built positionally (``_new_verdict``): a cold key meets this once per request.
        verdict = _new_verdict((
            principal, info,
            self.policy.route_denial(principal, info, unsafe),  # denial
            bool(principal.key is not None and principal.key.allowed_ips),  # key_ips
            info.is_llm and unsafe,  # check_models
            {},  # models
            plan,
            bool(plan is not None and not plan.wanted and principal.end_user_id is None
                 and self.guards.end_users is self.customers is not None),  # only_for_end_user
        ))
        # The principal is kept (in the verdict), so its id is not reused.
        verdicts[(id(principal), info, unsafe)] = verdict
        return verdict

    def _guard_plan(self, principal: Principal, info: RouteInfo, unsafe: bool) -> Any:
        """The guards' plan, or ``None`` when nothing could run: no guard wants the request,
        none may want it for its end user, and no end user is resolved (LLM routes only)."""
        guards = self.guards
        if not guards.guards:
            return None
        plan = guards.plan(principal, info, unsafe)
        if plan.wanted or plan.by_end_user or (guards.end_users is not None and info.is_llm):
            return plan
        return None

    def request_failed(self, sender: Flask, exception: BaseException, **_: Any) -> None:
        """A view (or hook) raised: settle the request's guards as failed now. Flask answers
        500 (its after-request functions see a settled admission) or, when it propagates
        exceptions, runs none of them."""
        admission = g.get("_llmauth_admission")
        if admission is not None:
            self.guards.teardown(admission)

    def handle_error(self, error: LLMAuthError) -> ResponseReturnValue:
        """Error handler for auth errors raised inside views (decorators, services)."""
        route = self._logged_route()
        if error.status >= 500:
            log.error("llmauth: %s on %s: %s", error.status, route, error.reason)
        elif error.status in (401, 403):
            self._log_failure(error, route, None)
        return self.ext.error_response(error)

    def _logged_route(self) -> str:
        """The route as its rule spells it (``/key/{key_id}/regenerate``), never the raw
        path: LiteLLM's paths may carry a raw key."""
        rule = request.url_rule
        if rule is None:
            return "<unrouted>"
        return self.routes.info(rule, current_app.view_functions.get(rule.endpoint)).route

    def _log_failure(self, error: LLMAuthError, route: str, credentials: Any) -> None:
        hint = ""
        token = getattr(credentials, "token", None)
        if token:
            hint = f" via {credentials.source}"
            if token.startswith(KEY_PREFIX):
                hint += f" key_digest={self.digester.digest(token)[:12]}"
        ip = client_ip(request, self.settings.trusted_proxy_ranges)
        log.warning("llmauth: %s %s %s %s from %s%s", error.status, error.reason,
                    request.method, route, ip, hint)
        if error.status == 401 and token and self.auth_failures is not None:
            self.auth_failures.record(ip)
        if auth_failed.receivers:
            send_signal(auth_failed, current_app._get_current_object(), status=error.status,  # type: ignore[attr-defined]
                        reason=error.reason, route=route, ip=ip)


def _master_key_factory(state: LLMAuthState, ext: LLMAuth) -> Authenticator | None:
    settings = state.settings
    if not settings.master_key:
        return None
    return MasterKeyAuthenticator(settings.master_key, settings.proxy_admin_name,
                                  settings.master_key_alias)


def _virtual_key_factory(state: LLMAuthState, ext: LLMAuth) -> Authenticator:
    settings = state.settings
    authenticator = VirtualKeyAuthenticator(
        state.store, state.digester, state.key_cache, state.negative_cache,
        ttl=settings.cache_ttl, negative_ttl=settings.negative_cache_ttl,
        last_used=state.last_used.pending, cache_keyer=state.cache_keyer,
    )
    return with_key_validation(authenticator, state, ext)  # custom_key_validate


#: name → factory(state, extension) returning the authenticator, or None when disabled.
AUTHENTICATOR_FACTORIES: dict[str, Callable[[LLMAuthState, LLMAuth], Authenticator | None]] = {
    "custom": custom_factory,
    "oauth2_proxy": proxy_headers_factory,
    "jwt": jwt_factory,
    "oauth2": oauth2_factory,
    "master_key": _master_key_factory,
    "virtual_key": _virtual_key_factory,
}


#: Per-request guards, in the order they run: cheap refusals before money is reserved.
#: Each entry is ``(name, install(state, app))``; ``install`` adds its guard(s) to
#: ``state.guards`` (or nothing, when the feature is off). See :mod:`flask_llmauth.guards`.
GUARD_INSTALLERS: tuple[tuple[str, Callable[[LLMAuthState, Flask], None]], ...] = (
    ("customers", install_customers),  # end user: resolved first, blocked → 403
    ("rate_limits", install_ratelimits),  # rpm/tpm/parallel limits → 429
    ("budgets", install_budgets),  # budget reservation → 429 budget_exceeded
    ("spend", install_spend),  # prices the request, queues its spend event (never refuses)
)


class _Verdict(NamedTuple):
    """What :meth:`LLMAuthState._verdict` keeps per (principal, rule, safe method)."""

    principal: Principal
    info: RouteInfo
    #: Checks 3–5 (see :meth:`~flask_llmauth.authz.policy.Policy.route_denial`).
    denial: Any
    #: Whether the key's own ``allowed_ips`` must be checked.
    key_ips: bool
    #: Whether the models the request names must be checked (LLM routes, unsafe methods).
    check_models: bool
    #: Models already allowed to this principal on this rule, as keys (grows; bounded). A
    #: dict, not a set: a dict of strings is not tracked by the cyclic garbage collector
    #: (a set always is), and a cold key leaves one per verdict.
    models: dict[str, bool]
    #: The guards' plan (:meth:`~flask_llmauth.guards.Guards.plan`), ``None`` if none runs.
    plan: Any
    #: Whether the plan matters only if the request names an end user (no guard wants it
    #: otherwise and the principal names none): a request that names none (no end-user
    #: header, no end-user field in its body) skips it.
    only_for_end_user: bool


#: ``_new_verdict(values)``: a :class:`_Verdict` without the named tuple's Python ``__new__``.
_new_verdict = partial(tuple.__new__, _Verdict)


class Callbacks(dict[str, Callable[..., Any]]):
    """The registered hooks by name; each change is announced to the apps' authenticator
    chains, which skip a custom-auth step whose hook is absent (see :class:`Chain`)."""

    def __init__(self) -> None:
        super().__init__()
        #: Weak: an extension made at import time outlives the apps of a factory (one per
        #: test), and must not keep them (and their background threads) alive.
        self._listeners: list[weakref.WeakMethod[Callable[[], None]]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners = [ref for ref in self._listeners if ref() is not None]
        self._listeners.append(weakref.WeakMethod(listener))

    def _changed(self) -> None:
        for ref in self._listeners:
            listener = ref()
            if listener is not None:
                listener()

    def __setitem__(self, name: str, hook: Callable[..., Any]) -> None:
        super().__setitem__(name, hook)
        self._changed()

    def __delitem__(self, name: str) -> None:
        super().__delitem__(name)
        self._changed()

    def pop(self, name: str, *default: Any) -> Any:
        value = super().pop(name, *default)
        self._changed()
        return value


class LLMAuth:
    """LiteLLM-style authentication and authorization for a Flask app.

    ``LLMAuth(app, **options)`` or ``LLMAuth(**options)`` + ``init_app(app)``. Options are
    the settings of :class:`~flask_llmauth.config.Settings` by field name (``master_key=``,
    ``database_url=``...) and win over the app's ``LLMAUTH_*`` config.
    """

    def __init__(self, app: Flask | None = None, *,
                 secret_loader: Callable[[str], str | None] | None = None,
                 **options: Any) -> None:
        self._options = options
        self._secret_loader = secret_loader
        self._error_callback: ErrorCallback = error_response
        #: Exempted ``Blueprint`` objects (by identity; see ``RouteTable``).
        self._exempt_blueprints: list[Blueprint] = []
        self.callbacks = Callbacks()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        if "llmauth" in app.extensions:
            raise ConfigurationError(
                f"LLMAuth is already initialised on app {app.name!r}: call LLMAuth(app) or "
                "init_app(app) once per app")
        settings = load_settings(app.config, self._options, secret_loader=self._secret_loader)
        check_secrets(settings)
        app_state = LLMAuthState(self, app, settings)
        app.extensions["llmauth"] = app_state
        # One app-wide hook: what must run after the response is added per request (Flask's
        # ``after_this_request``), so requests that need none pay for no idle hook. A plain
        # callable, not a bound method: Flask asks each hook per request whether it is a
        # coroutine function, and a bound method takes that walk one step further.
        app.before_request(partial(LLMAuthState.before_request, app_state))
        # Weak (blinker's default): the global signal must not keep a dropped app alive.
        got_request_exception.connect(app_state.request_failed, app)
        app.register_error_handler(LLMAuthError, app_state.handle_error)
        for _, install in GUARD_INSTALLERS:
            install(app_state, app)
        if app_state.guards.guards:
            app_state.guards.arm_json_watch = capture_json_responses(app)
        if settings.api_enabled:
            from .api import create_blueprint

            app.register_blueprint(create_blueprint(), url_prefix=settings.api_prefix or None)
        from .cli import llmauth_cli

        app.cli.add_command(llmauth_cli, name=settings.cli_name)

    # -- decorators and callbacks ------------------------------------------------------------------

    @overload
    def exempt(self, view: B) -> B: ...

    @overload
    def exempt(self, view: F) -> F: ...

    def exempt(self, view: F | B) -> F | B:
        """Make a view (or every view of a blueprint) public: no credential is read."""
        if isinstance(view, Blueprint):
            if not any(view is b for b in self._exempt_blueprints):
                self._exempt_blueprints.append(view)
        else:
            setattr(view, ATTR_EXEMPT, True)
        return view

    def route_group(self, *groups: str) -> Callable[[F], F]:
        """Classify a host view into route groups (e.g. ``"llm_api_routes"``)."""
        for name in groups:
            if group_name(name) is None:
                raise ValueError(f"unknown route group {name!r}")

        def decorator(view: F) -> F:
            setattr(view, ATTR_GROUPS, tuple(getattr(view, ATTR_GROUPS, ())) + groups)
            return view

        return decorator

    def custom_auth(self, hook: F) -> F:
        """Register the custom auth hook ``hook(request, api_key)``; it replaces
        ``LLMAUTH_CUSTOM_AUTH``. What it may return is described in docs/oauth2.md."""
        self.callbacks["custom_auth"] = hook
        return hook

    def custom_key_validate(self, hook: F) -> F:
        """Register ``hook(request, principal) -> bool``, run after every successful
        virtual-key authentication; anything but ``True`` refuses the request with 403."""
        self.callbacks["custom_key_validate"] = hook
        return hook

    def jwt_claims_validator(self, hook: F) -> F:
        """Register ``hook(claims) -> bool``, run once per verified JWT (while its claims are
        cached) and on every request of an opaque token answered by OIDC userinfo; anything
        but ``True`` refuses with 403. It replaces
        ``LLMAUTH_JWT_CUSTOM_VALIDATE`` (LiteLLM's ``litellm_jwtauth.custom_validate``)."""
        self.callbacks["jwt_claims_validator"] = hook
        return hook

    def error_handler(self, callback: ErrorCallback) -> ErrorCallback:
        """Replace the default error response (the JSON envelope) for every auth error.

        ``callback(error)`` returns what a view may return; its status should be
        ``error.status`` and its headers include ``error.headers`` (``Retry-After``,
        ``WWW-Authenticate``...). A callback that returns ``None`` or raises (anything but
        an ``HTTPException``) is logged and the default envelope answers: a refusal never
        falls through to the view. A success status (below 300, e.g. a bare dict) is
        logged and replaced by ``error.status``: a refusal is never a 200.
        """
        self._error_callback = callback
        return callback

    def error_response(self, error: LLMAuthError) -> ResponseReturnValue:
        """The answer to ``error``: the :meth:`error_handler` callback's, else the default
        JSON envelope."""
        callback = self._error_callback
        if callback is error_response:
            return error_response(error)
        try:
            response = callback(error)
        except HTTPException:
            raise  # e.g. ``abort(error.status)``: Flask answers it, the request stops
        except Exception as exc:
            log.error("llmauth: the error_handler callback failed (%s); the default error "
                      "response answers", type(exc).__name__)
            return error_response(error)
        if response is None:
            log.error("llmauth: the error_handler callback returned None; the default error "
                      "response answers")
            return error_response(error)
        answer = current_app.make_response(response)
        if answer.status_code < 300:  # ``return {"error": ...}`` is a 200 in Flask
            log.error("llmauth: the error_handler callback answered a %s refusal with %s; "
                      "sent as %s (return error.status with the body)", error.status,
                      answer.status_code, error.status)
            answer.status_code = error.status
        return answer

    @staticmethod
    def database_ready() -> bool:
        """Whether the current app's database answers and has llmauth's tables (one round
        trip; for a readiness probe — keys already cached keep working while it is down)."""
        try:
            state().store.ping()
        except ServiceUnavailable:
            return False
        return True

    @staticmethod
    def record_usage(prompt_tokens: int = 0, completion_tokens: int = 0, *,
                     model: str | None = None) -> None:
        """Report the tokens the current view used (see :func:`flask_llmauth.record_usage`)."""
        record_usage(prompt_tokens, completion_tokens, model=model)

    def secret_loader(self, loader: Callable[[str], str | None]) -> Callable[[str], str | None]:
        """Register a callable ``(setting_key) -> str | None`` that supplies secrets (e.g. from
        a secret manager); consulted for secret settings not set in config or YAML."""
        self._secret_loader = loader
        return loader
