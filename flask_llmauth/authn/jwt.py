"""JWT authentication (``enable_jwt_auth``) and the OIDC userinfo fallback for opaque tokens.

A token with three dot-separated parts (not a virtual key ``sk-...`` nor the master key,
which may hold two dots) is this authenticator's, decisively: it is either
verified and turned into a principal, or refused (401; 503 when no signing keys can be
had). Verification follows the recipe of ``docs/jwt.md``: size cap, compact form only,
base64url and JSON parsed strictly (duplicate members refused), the algorithm allowed by the
key the ``kid`` names (asymmetric only; ``jku``/``x5u``/``jwk``/``x5c`` never followed and
refused), ``exp`` required and numeric, ``nbf``/``iat`` numeric, ``aud``/``iss`` verified
when configured, leeway, maximum lifetime, optional ``typ: at+jwt``. Every refusal of a
token has the same body; the reason goes to the log, never the token.

Verified claims are kept under ``sha256(full token)`` until ``min(exp, jwt_cache_ttl)``, so
a repeated token is never parsed or verified again. The principal is resolved from the
claims (LiteLLM's ``litellm_jwtauth`` rules: admin scope, teams, users, roles, scopes) with
the user, team and membership records of the identity cache, and kept under
``(sha256(token), route, x-litellm-team-id)`` for the same time (at most ``cache_ttl``);
like a key's, it is dropped when its user or team changes. Only a successful resolution is
kept, and never one whose team was picked by probing the requested model
(``team_ids_jwt_field``): that one is resolved per request. A repeated token therefore costs
a hash and a dict lookup.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, overload

import jwt as pyjwt
import requests

from ..authz.policy import SAFE_METHODS, requested_models
from ..authz.routes import RouteInfo, RoutePatterns
from ..cache import TTLCache
from ..config import Settings, _str_list
from ..credentials import Credentials
from ..crypto import KEY_PREFIX
from ..errors import ConfigurationError, Forbidden, LLMAuthError, Unauthenticated
from ..principal import Principal, Role
from .base import AuthContext
from .custom import call_hook, resolve_hook
from .deadline import exchange_timeout, read_body
from .jwks import (
    MAX_DOCUMENT_BYTES,
    JwksCache,
    check_fetch_url,
    provider_unavailable,
)

if TYPE_CHECKING:
    from ..extension import LLMAuth, LLMAuthState

log = logging.getLogger("flask_llmauth")

METHOD = "jwt"
TEAM_HEADER = "x-litellm-team-id"
TEAM_ENVIRON = "HTTP_X_LITELLM_TEAM_ID"  # the same header, read from the WSGI environ
#: Claims a token may never set: LiteLLM's internal claims and ours.
INTERNAL_CLAIM_PREFIXES = ("_litellm", "_llmauth")
#: Header members that carry or point at key material: refused, never followed.
FORBIDDEN_HEADER_MEMBERS = ("jku", "x5u", "jwk", "x5c", "crit")
AT_JWT_TYPES = frozenset({"at+jwt", "application/at+jwt"})
MAX_KID_LENGTH = 256
MAX_CLAIM_STRING = 255
_B64URL = re.compile(r"^[A-Za-z0-9_-]+$")
_TIME_CLAIMS = ("exp", "nbf", "iat")
_MAPPED_ROLES = {"proxy_admin": Role.PROXY_ADMIN, "team": Role.TEAM,
                 "internal_user": Role.INTERNAL_USER}
_NEGATIVE_TTL = 10.0


class _Invalid(Exception):
    """A token check failed; ``reason`` is logged (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def invalid_token(reason: str) -> Unauthenticated:
    """The one answer every refused token gets (the body never says which check failed)."""
    return Unauthenticated(reason=f"jwt_{reason}")


# -- strict parsing of the compact form --------------------------------------------------------


def _b64decode(segment: str) -> bytes:
    if not _B64URL.match(segment) or len(segment) % 4 == 1:
        raise _Invalid("bad_base64")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise _Invalid("bad_base64") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _Invalid("duplicate_member")
        out[name] = value
    return out


def _reject_constant(name: str) -> Any:
    raise _Invalid("non_finite_number")


def parse_segment(segment: str) -> dict[str, Any]:
    """Decode one base64url JSON segment: an object, no duplicate members, no NaN."""
    raw = _b64decode(segment)
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_reject_constant)
    except _Invalid:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Invalid("bad_json") from None
    if not isinstance(value, dict):
        raise _Invalid("not_an_object")
    return value


def _is_number(value: Any) -> bool:
    """A finite JSON number that is not a bool (an integer beyond a float's range is not:
    it cannot be compared with a clock)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# -- claims -------------------------------------------------------------------------------------


def claim(claims: Mapping[str, Any], path: str | None) -> Any:
    """The value at a dot path (``realm_access.roles``); ``None`` when absent."""
    if not path:
        return None
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def claim_string(claims: Mapping[str, Any], path: str | None) -> str | None:
    """A single id from a claim: a string (a list gives its first item; a number its text).
    Anything else, empty or longer than 255 characters, counts as absent."""
    value = claim(claims, path)
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > MAX_CLAIM_STRING or not value.isprintable():
        return None
    return value


def _unverified_email(claims: Mapping[str, Any], issuer: IssuerConfig) -> bool:
    """Whether the token says its standard ``email`` claim is not verified (OIDC's
    ``email_verified`` is false); a claim other than ``email`` is not what it speaks of."""
    if issuer.user_email_field not in (None, "email"):
        return False
    verified = claims.get("email_verified")
    return verified is False or (isinstance(verified, str) and verified.lower() == "false")


def claim_strings(claims: Mapping[str, Any], path: str | None) -> list[str]:
    """A list of ids from a claim (a string is a one-item list; a space-separated string
    is not split)."""
    value = claim(claims, path)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    out = []
    for item in value[:256]:
        if isinstance(item, str) and item.strip() and len(item) <= MAX_CLAIM_STRING:
            out.append(item.strip())
    return out


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """``scope`` (space-separated string or list) and ``scp`` (Entra), merged."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(v for v in value if isinstance(v, str))
    return frozenset(scopes)


def strip_internal(claims: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if not k.startswith(INTERNAL_CLAIM_PREFIXES)}


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuerConfig:
    """How tokens of one issuer are verified and mapped."""

    issuer: str | None
    audience: tuple[str, ...]
    keys: JwksCache | None
    user_id_field: str | None
    user_email_field: str | None
    team_id_field: str | None
    team_ids_field: str | None
    org_id_field: str | None
    end_user_id_field: str | None
    #: Prepended to user ids from this issuer's tokens, so two issuers that assert the same
    #: ``sub`` or email never name the same user (multi-issuer entries only).
    user_id_prefix: str = ""


@dataclass(frozen=True)
class _ScopeMapping:
    scope: str
    models: tuple[str, ...]
    routes: tuple[str, ...]


@dataclass(frozen=True)
class Verified:
    """A verified token's claims (internal claims stripped) and its issuer."""

    claims: Mapping[str, Any]
    issuer: IssuerConfig


# -- OIDC userinfo ------------------------------------------------------------------------------


class UserinfoClient:
    """Claims of opaque tokens from the OIDC userinfo endpoint, cached by sha256(token)."""

    def __init__(self, endpoint: str, *, ttl: float, timeout: float, session: requests.Session,
                 max_size: int) -> None:
        self.endpoint = endpoint
        self.ttl = ttl
        self.timeout = timeout
        self.session = session
        self.cache: TTLCache[Mapping[str, Any] | bool] = TTLCache(max_size)

    def claims(self, token: str) -> Mapping[str, Any]:
        key = hashlib.sha256(token.encode()).digest()
        cached = self.cache.get(key)
        if cached is False:
            raise invalid_token("userinfo_refused_cached")
        if isinstance(cached, Mapping):
            return cached
        deadline = time.monotonic() + self.timeout
        try:
            with self.session.get(self.endpoint, timeout=exchange_timeout(self.timeout),
                                  allow_redirects=False, stream=True,
                                  headers={"Authorization": f"Bearer {token}",
                                           "Accept": "application/json"}) as r:
                status = r.status_code
                body = read_body(r, MAX_DOCUMENT_BYTES, deadline)
        except (requests.RequestException, OSError):
            log.warning("llmauth: the userinfo endpoint cannot be reached")
            raise provider_unavailable() from None
        if status in (400, 401, 403):
            self.cache.set(key, False, min(self.ttl, _NEGATIVE_TTL))
            raise invalid_token("userinfo_refused")
        if status != 200 or len(body) > MAX_DOCUMENT_BYTES:
            log.warning("llmauth: the userinfo endpoint answered HTTP %s", status)
            raise provider_unavailable()
        try:
            claims = json.loads(body, object_pairs_hook=_no_duplicates)
        except (ValueError, _Invalid, RecursionError):
            claims = None
        if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
            log.warning("llmauth: the userinfo endpoint answered without a subject")
            raise provider_unavailable()
        result = MappingProxyType(strip_internal(claims))
        self.cache.set(key, result, self.ttl)
        return result


# -- the authenticator --------------------------------------------------------------------------


class JWTAuthenticator:
    """``enable_jwt_auth``: JWTs verified against the identity provider's keys, and opaque
    tokens through OIDC userinfo when enabled."""

    name = METHOD

    def __init__(self, state: LLMAuthState, ext: LLMAuth) -> None:
        self.state = state
        self.ext = ext
        s: Settings = state.settings
        self.settings = s
        self._check_settings(s)
        self.session = requests.Session()
        self.session.trust_env = False
        self.algorithms = frozenset(s.jwt_algorithms)
        self.leeway = s.jwt_leeway
        self.required = tuple(dict.fromkeys(("exp",) + tuple(s.jwt_required_claims)))
        self.master_key = (s.master_key or "").encode()
        self.global_issuer = self._global_issuer(s)
        self.issuers = self._issuer_entries(s)
        #: The user-id namespaces of the issuer entries (see :meth:`_namespaced`).
        self.user_id_prefixes = tuple(sorted(
            {e.user_id_prefix for e in self.issuers.values() if e.user_id_prefix}))
        self.verified: TTLCache[Verified] = TTLCache(s.cache_max_size)
        #: Resolved principals (records included) by (token digest, route, team header),
        #: dropped with their user/team tags like a key's.
        self.principals: TTLCache[Principal] = TTLCache(s.cache_max_size)
        state.invalidate.caches.append(self.principals)
        self.admin_routes = RoutePatterns(s.jwt_admin_allowed_routes)
        self.team_routes = RoutePatterns(s.jwt_team_allowed_routes)
        self.role_mappings = tuple(
            (str(m["role"]), _MAPPED_ROLES[str(m["internal_role"])]) for m in s.jwt_role_mappings)
        self.scope_mappings = tuple(
            _ScopeMapping(m["scope"], _str_list(m.get("models")), _str_list(m.get("routes")))
            for m in s.jwt_scope_mappings)
        self._scope_routes: dict[tuple[str, ...], RoutePatterns] = {}
        self.custom_validate = resolve_hook(s.jwt_custom_validate, s.config_file,
                                            "LLMAUTH_JWT_CUSTOM_VALIDATE")
        self.userinfo: UserinfoClient | None = None
        if s.jwt_oidc_userinfo_enabled:
            endpoint = s.jwt_oidc_userinfo_endpoint
            if not endpoint:
                raise ConfigurationError(
                    "LLMAUTH_JWT_OIDC_USERINFO_ENDPOINT: required when "
                    "oidc_userinfo_enabled is set")
            check_fetch_url(endpoint, allow_http=s.jwt_allow_insecure_http,
                            setting="LLMAUTH_JWT_OIDC_USERINFO_ENDPOINT")
            self.userinfo = UserinfoClient(endpoint, ttl=s.jwt_oidc_userinfo_cache_ttl,
                                           timeout=s.jwt_http_timeout, session=self.session,
                                           max_size=s.cache_max_size)
        self._upsert_lock = threading.Lock()

    # -- configuration checks (init_app) ----------------------------------------------------------

    @staticmethod
    def _check_settings(s: Settings) -> None:
        """Rules between settings (each setting's own value is checked by its parser)."""
        if bool(s.jwt_user_roles_field) != bool(s.jwt_user_allowed_roles):
            raise ConfigurationError(
                "LLMAUTH_JWT_USER_ROLES_FIELD and LLMAUTH_JWT_USER_ALLOWED_ROLES "
                "(user_roles_jwt_field, user_allowed_roles) must be set together")
        if s.jwt_enforce_scope_based_access != bool(s.jwt_scope_mappings):
            raise ConfigurationError(
                "LLMAUTH_JWT_SCOPE_MAPPINGS and LLMAUTH_JWT_ENFORCE_SCOPE_BASED_ACCESS "
                "(scope_mappings, enforce_scope_based_access) must be set together")
        if s.jwt_role_mappings and not s.jwt_roles_field:
            raise ConfigurationError(
                "LLMAUTH_JWT_ROLES_FIELD (roles_jwt_field): required with role_mappings")
        if s.jwt_object_id_field and not s.jwt_role_mappings:
            raise ConfigurationError(
                "LLMAUTH_JWT_OBJECT_ID_FIELD (object_id_jwt_field): needs role_mappings")

    def _keys(self, urls: Sequence[str]) -> JwksCache:
        s = self.settings
        return JwksCache(urls, algorithms=s.jwt_algorithms, ttl=s.jwt_public_key_ttl,
                         stale_ttl=s.jwt_public_key_stale_ttl,
                         refetch_cooldown=s.jwt_kid_refetch_cooldown,
                         failure_backoff=s.jwt_fetch_failure_backoff,
                         timeout=s.jwt_http_timeout, allow_http=s.jwt_allow_insecure_http,
                         session=self.session)

    def _global_issuer(self, s: Settings) -> IssuerConfig | None:
        if not s.jwt_public_key_url:
            if not s.jwt_issuers:
                raise ConfigurationError(
                    "LLMAUTH_JWT_PUBLIC_KEY_URL (JWT_PUBLIC_KEY_URL): required when JWT auth "
                    "is enabled (or configure litellm_jwtauth.issuers)")
            return None
        if not s.jwt_audience and not s.jwt_issuer:
            log.warning(
                "llmauth: JWT auth verifies neither `aud` nor `iss` (set JWT_AUDIENCE and/or "
                "JWT_ISSUER): tokens minted by any application that shares the same IdP "
                "signing keys will be accepted")
        return IssuerConfig(
            issuer=s.jwt_issuer or None, audience=tuple(s.jwt_audience),
            keys=self._keys(s.jwt_public_key_url),
            user_id_field=s.jwt_user_id_field, user_email_field=s.jwt_user_email_field,
            team_id_field=s.jwt_team_id_field, team_ids_field=s.jwt_team_ids_field,
            org_id_field=s.jwt_org_id_field, end_user_id_field=s.jwt_end_user_id_field,
        )

    def _issuer_entries(self, s: Settings) -> dict[str, IssuerConfig]:
        """``litellm_jwtauth.issuers`` (validated by the setting's parser); claim fields an
        entry leaves out fall back to the global ones."""
        entries: dict[str, IssuerConfig] = {}
        for entry in s.jwt_issuers:
            issuer = entry["issuer"]
            audience = () if entry.get("disable_audience_validation") else tuple(
                _str_list(entry["audience"]))
            jwks_url = entry.get("jwks_url") or (
                issuer.rstrip("/") + "/.well-known/openid-configuration")
            fields = {f"{name}_field": entry.get(f"{name}_jwt_field")
                      or getattr(s, f"jwt_{name}_field")
                      for name in ("user_id", "user_email", "team_id", "team_ids", "org_id",
                                   "end_user_id")}
            entries[issuer] = IssuerConfig(
                issuer=issuer, audience=audience, keys=self._keys(_str_list(jwks_url)),
                user_id_prefix=entry.get("user_id_prefix", f"{issuer}#"), **fields)
        return entries

    # -- the chain entry point --------------------------------------------------------------------

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        credentials: Credentials = ctx.credentials
        token = credentials.token
        if token is None:
            return None
        if self._is_key(token):  # a virtual key or the master key, whatever its shape
            return None
        if not credentials.looks_like_jwt:
            if self.userinfo is None:
                return None
            claims = self.userinfo.claims(token)
            checked = self._validated(claims, self.global_issuer or self._userinfo_issuer())
            return self.principal(checked, ctx)
        key = hashlib.sha256(token.encode()).digest()
        # The same token, route and team header resolve to the same principal, until the
        # token's cache entry ends or its user or team changes (tag invalidation).
        route = ctx.route  # (rule template, endpoint) determines the RouteInfo
        reuse_key = (key, route.route, route.endpoint, ctx.request.environ.get(TEAM_ENVIRON))
        principal = self.principals.get(reuse_key)
        if principal is not None:
            return principal
        generation = self.principals.generation
        verified = self.verified.get(key)
        if verified is None:
            verified = self.verify(token)
            verified = self._validated(verified.claims, verified.issuer)
            self.verified.set(key, verified, self._cache_ttl(verified))
        principal, reusable = self._resolve(verified, ctx)
        if reusable:
            tags = [f"user:{principal.user_id}"] if principal.user_id else []
            tags += [f"team:{principal.team_id}"] if principal.team_id else []
            ttl = min(self._cache_ttl(verified), self.settings.cache_ttl)  # records' age
            self.principals.set(reuse_key, principal, ttl, tags, generation=generation)
        return principal

    def _cache_ttl(self, verified: Verified) -> float:
        """How long a verified token (and what it resolves to) is kept: until its ``exp``,
        at most ``jwt_cache_ttl``."""
        return min(self.settings.jwt_cache_ttl, verified.claims["exp"] - time.time())

    def _is_key(self, token: str) -> bool:
        """A virtual key (``sk-...``) or the master key: never a JWT (no JWS starts ``sk-``;
        either may hold two dots) and never sent to the identity provider."""
        if token.startswith(KEY_PREFIX):
            return True
        return bool(self.master_key) and hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self.master_key)

    def _userinfo_issuer(self) -> IssuerConfig:
        s = self.settings
        return IssuerConfig(
            issuer=None, audience=(), keys=None, user_id_field=s.jwt_user_id_field,
            user_email_field=s.jwt_user_email_field, team_id_field=s.jwt_team_id_field,
            team_ids_field=s.jwt_team_ids_field, org_id_field=s.jwt_org_id_field,
            end_user_id_field=s.jwt_end_user_id_field)

    def _validated(self, claims: Mapping[str, Any], issuer: IssuerConfig) -> Verified:
        """Run ``custom_validate`` on the (stripped) claims; any answer but ``True`` is a 403
        (a truthy result object or string is not a verdict: it never lets a token through)."""
        hook = self.ext.callbacks.get("jwt_claims_validator") or self.custom_validate
        if hook is not None:
            try:
                ok = call_hook(hook, dict(claims))
            except LLMAuthError:
                raise
            except Exception as exc:
                log.error("llmauth: JWT custom_validate raised %s", type(exc).__name__)
                raise invalid_token("custom_validate_error") from None
            if ok is not True:
                raise Forbidden("Invalid JWT token", error_type="auth_error",
                                reason="jwt_custom_validate_refused")
        return Verified(claims, issuer)

    # -- verification -----------------------------------------------------------------------------

    def verify(self, token: str) -> Verified:
        """Verify a compact JWS; raise the generic 401 (or a 503 without keys)."""
        try:
            return self._verify(token)
        except _Invalid as exc:
            raise invalid_token(exc.reason) from None
        except pyjwt.PyJWTError as exc:
            raise invalid_token(type(exc).__name__) from None

    def _verify(self, token: str) -> Verified:
        if len(token) > self.settings.jwt_max_token_length:
            raise _Invalid("too_long")
        parts = token.split(".")
        if len(parts) != 3:
            raise _Invalid("not_compact")
        header, payload = parse_segment(parts[0]), parse_segment(parts[1])
        _b64decode(parts[2])  # an empty or malformed signature
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _Invalid("alg_not_allowed")
        if any(name in header for name in FORBIDDEN_HEADER_MEMBERS):
            raise _Invalid("key_reference_in_header")
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise _Invalid("bad_typ")
        if self.settings.jwt_require_at_jwt_typ and (typ or "").lower() not in AT_JWT_TYPES:
            raise _Invalid("typ_not_at_jwt")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid
                                or len(kid) > MAX_KID_LENGTH):
            raise _Invalid("bad_kid")
        for name in _TIME_CLAIMS:
            if name in payload and not _is_number(payload[name]):
                raise _Invalid(f"{name}_not_numeric")
        if "exp" not in payload:
            raise _Invalid("exp_missing")
        issuer = self._issuer_for(payload.get("iss"))
        assert issuer.keys is not None
        key = issuer.keys.key_for(kid)
        if alg not in key.algorithms:
            raise _Invalid("alg_not_allowed_for_key")
        required = list(self.required)
        if issuer.issuer:
            required.append("iss")
        if issuer.audience:
            required.append("aud")
        claims = pyjwt.decode(
            token, key.key, algorithms=[alg], audience=list(issuer.audience) or None,
            issuer=issuer.issuer, leeway=self.leeway,
            options={"require": required, "verify_aud": bool(issuer.audience),
                     "verify_iss": bool(issuer.issuer), "verify_signature": True},
        )
        self._check_lifetime(claims)
        return Verified(MappingProxyType(strip_internal(claims)), issuer)

    def _issuer_for(self, iss: Any) -> IssuerConfig:
        if iss is not None and not isinstance(iss, str):
            raise _Invalid("iss_not_a_string")
        if iss is not None and iss in self.issuers:
            return self.issuers[iss]
        if self.global_issuer is None:
            raise _Invalid("unknown_issuer")
        return self.global_issuer

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        limit = self.settings.jwt_max_lifetime
        if not limit:
            return
        start = claims.get("iat", time.time())
        if claims["exp"] - start > limit + self.leeway:
            raise _Invalid("lifetime_too_long")

    # -- claims → principal (per request) ---------------------------------------------------------

    def principal(self, verified: Verified, ctx: AuthContext) -> Principal:
        """The principal of a verified token for this request (LiteLLM's rules)."""
        return self._resolve(verified, ctx)[0]

    def _resolve(self, verified: Verified, ctx: AuthContext) -> tuple[Principal, bool]:
        """The principal, and whether it may be reused for the same token, route and team
        header (``False`` when the team was picked by probing the requested models)."""
        s = self.settings
        claims, issuer = verified.claims, verified.issuer
        info: RouteInfo = ctx.route
        scopes = token_scopes(claims)
        models = self._scope_restriction(scopes, info) if self.scope_mappings else ()
        email = claim_string(claims, issuer.user_email_field or "email")
        if email is not None and s.jwt_require_verified_email and _unverified_email(
                claims, issuer):
            if not issuer.user_id_field or s.jwt_user_allowed_email_domain:
                raise Forbidden(
                    "The token's email is not verified (email_verified is false): it cannot "
                    "identify the user.", reason="jwt_email_unverified")
            email = None  # another claim names the user: the address is not trusted
        user_id = claim_string(claims, issuer.user_id_field) if issuer.user_id_field else email
        if user_id is not None:
            user_id = self._namespaced(issuer, user_id)
        org_id = claim_string(claims, issuer.org_id_field)
        end_user_id = claim_string(claims, issuer.end_user_id_field)
        common = {"user_email": email, "org_id": org_id, "end_user_id": end_user_id,
                  "scopes": scopes, "claims": claims,
                  "metadata": {"jwt_issuer": claims.get("iss")}}

        if s.jwt_admin_scope and s.jwt_admin_scope in scopes:
            return self._admin(claims, issuer, ctx, user_id, models, common), True

        team_id, probed = self._team(claims, issuer, ctx, models)
        if team_id is not None:
            self._check_email_domain(email, required=False)
            if not self.team_routes.allows(info):
                raise Forbidden(
                    f"Team not allowed to access this route. Route={info.route}, Allowed "
                    f"Routes={list(s.jwt_team_allowed_routes)}", reason="jwt_team_route")
            user_id = self._upsert_user(user_id, email)
            return self._build(Role.TEAM, user_id=user_id, team_id=team_id, models=models,
                               allowed_routes=s.jwt_team_allowed_routes, **common), not probed

        if s.jwt_enforce_team_based_model_access:
            raise Forbidden("No teams found in token. `enforce_team_based_model_access` is set "
                            "to True. Token must belong to a team.", reason="jwt_no_team")

        user_roles = claim_strings(claims, s.jwt_user_roles_field)
        allowed_role = bool(set(user_roles) & set(s.jwt_user_allowed_roles))
        if user_id is not None or allowed_role:
            if s.jwt_user_roles_field and not allowed_role:
                raise Forbidden(
                    f"User roles {user_roles[:10]} are not in user_allowed_roles "
                    f"{list(s.jwt_user_allowed_roles)}.", reason="jwt_user_role_not_allowed")
            self._check_email_domain(email, required=True)
            user_id = self._upsert_user(user_id or self._subject(claims, issuer), email)
            return self._user_principal(user_id, claims, issuer, ctx, models, common), True

        mapped = self._mapped_role(claims)
        if mapped is not None:
            object_id = claim_string(claims, s.jwt_object_id_field)
            if mapped is Role.PROXY_ADMIN:
                return self._admin(claims, issuer, ctx, None, models, common), True
            if mapped is Role.TEAM:
                team = object_id or self._subject(claims, issuer)
                return self._build(Role.TEAM, team_id=team, models=models,
                                   allowed_routes=s.jwt_team_allowed_routes, **common), True
            self._check_email_domain(email, required=True)
            user = self._namespaced(issuer, object_id) if object_id else self._subject(
                claims, issuer)
            return self._user_principal(self._upsert_user(user, email), claims, issuer, ctx,
                                        models, common), True

        if s.jwt_enforce_rbac:
            raise Forbidden("Unmatched token passed in. enforce_rbac is set to True. Token must "
                            "belong to a proxy admin, team, or user.", reason="jwt_unmatched")
        self._check_email_domain(email, required=True)
        return self._user_principal(self._subject(claims, issuer), claims, issuer, ctx,
                                    models, common), True

    def _subject(self, claims: Mapping[str, Any], issuer: IssuerConfig) -> str:
        sub = claim_string(claims, "sub")
        if sub is None:
            raise invalid_token("no_subject")
        return self._namespaced(issuer, sub)

    def _namespaced(self, issuer: IssuerConfig, user_id: str) -> str:
        """``user_id`` in the issuer's namespace (its ``user_id_prefix`` prepended). An id
        that lands in another issuer's namespace is refused: the global issuer (no prefix)
        asserting ``<issuer A>#alice`` would otherwise be A's alice, with her stored role."""
        own = issuer.user_id_prefix
        user_id = own + user_id
        for prefix in self.user_id_prefixes:
            if user_id.startswith(prefix) and not own.startswith(prefix):
                raise invalid_token("user_id_in_another_issuers_namespace")
        return user_id

    def _build(self, role: Role, *, models: tuple[str, ...] = (), **fields: Any) -> Principal:
        principal = self.state.identities.principal(METHOD, role, **fields)
        return principal.replace(models=models) if models else principal

    def _admin(self, claims: Mapping[str, Any], issuer: IssuerConfig, ctx: AuthContext,
               user_id: str | None, models: tuple[str, ...],
               common: dict[str, Any]) -> Principal:
        s, info = self.settings, ctx.route
        if not self.admin_routes.allows(info):
            raise Forbidden(
                f"Admin not allowed to access this route. Route={info.route}, Allowed "
                f"Routes={list(s.jwt_admin_allowed_routes)}", reason="jwt_admin_route")
        team_id = None
        header = ctx.request.headers.get(TEAM_HEADER)
        if header and info.is_llm:  # attach that team's context and limits (never upserted)
            _, team, _ = self.state.identities.load(None, header.strip())
            if team is None:
                raise Forbidden(f"{TEAM_HEADER} '{header[:64]}' does not name a team.",
                                reason="jwt_admin_team_header_unknown")
            team_id = team.team_id
        return self._build(Role.PROXY_ADMIN, user_id=user_id or self._subject(claims, issuer),
                           team_id=team_id, models=models,
                           allowed_routes=s.jwt_admin_allowed_routes, **common)

    def _user_principal(self, user_id: str, claims: Mapping[str, Any], issuer: IssuerConfig,
                        ctx: AuthContext, models: tuple[str, ...],
                        common: dict[str, Any]) -> Principal:
        """An internal user; a stored user row's role wins (a stored proxy_admin is an admin,
        bound by ``admin_allowed_routes``)."""
        user, _, _ = self.state.identities.load(user_id, None)
        role = Role.INTERNAL_USER
        if user is not None and user.user_role:
            try:
                role = Role.parse(user.user_role)
            except ValueError:
                role = Role.INTERNAL_USER
        if role is Role.PROXY_ADMIN:
            return self._admin(claims, issuer, ctx, user_id, models, common)
        return self._build(role, user_id=user_id, models=models, **common)

    def _mapped_role(self, claims: Mapping[str, Any]) -> Role | None:
        if not self.role_mappings:
            return None
        roles = set(claim_strings(claims, self.settings.jwt_roles_field))
        for idp_role, role in self.role_mappings:
            if idp_role in roles:
                return role
        return None

    def _scope_restriction(self, scopes: frozenset[str], info: RouteInfo) -> tuple[str, ...]:
        mapped = [m for m in self.scope_mappings if m.scope in scopes]
        if not mapped:
            raise Forbidden("None of the token's scopes is mapped to models or routes "
                            "(enforce_scope_based_access).", reason="jwt_no_mapped_scope")
        routes = tuple(dict.fromkeys(r for m in mapped for r in m.routes))
        if routes:
            patterns = self._scope_routes.get(routes)
            if patterns is None:
                patterns = self._scope_routes[routes] = RoutePatterns(routes)
            if not patterns.allows(info):
                raise Forbidden(f"The token's scopes do not allow route={info.route}.",
                                reason="jwt_scope_route")
        models = tuple(dict.fromkeys(m for sm in mapped for m in sm.models))
        if not models:
            raise Forbidden("The token's scopes allow no model.", reason="jwt_scope_no_models")
        return models

    def _check_email_domain(self, email: str | None, *, required: bool) -> None:
        domain = self.settings.jwt_user_allowed_email_domain
        if not domain or (email is None and not required):
            return
        if email is None or email.rpartition("@")[2].lower() != domain.lower().lstrip("@"):
            raise Forbidden(f"Email domain not allowed. User email: {email}. Allowed domain: "
                            f"{domain}", reason="jwt_email_domain")

    def _team(self, claims: Mapping[str, Any], issuer: IssuerConfig, ctx: AuthContext,
              models: tuple[str, ...]) -> tuple[str | None, bool]:
        """The team of a non-admin token: the header's (if the token lists it), the team
        claim (or the default), else the first listed team that may serve this request;
        and whether it was picked by probing this request's models."""
        s = self.settings
        specific = claim_string(claims, issuer.team_id_field)
        listed = claim_strings(claims, issuer.team_ids_field)
        token_teams = ([specific] if specific else []) + listed
        header = ctx.request.headers.get(TEAM_HEADER)
        if header:
            header = header.strip()
            if header not in token_teams:
                raise Forbidden(
                    f"{TEAM_HEADER} '{header[:64]}' does not resolve to a team id in your JWT's "
                    f"allowed teams: {token_teams[:20]}.", reason="jwt_team_header_not_in_token")
            self._require_team(header)
            return header, False
        if issuer.team_id_field:
            team_id = specific or s.jwt_team_id_default
            if team_id is not None:
                if specific and s.jwt_team_id_upsert:
                    self._upsert_team(team_id)
                else:
                    self._require_team(team_id)
                return team_id, False
            if not listed:
                raise Unauthenticated(
                    f"Authentication Error, No team found in token. Checked team_id field "
                    f"'{issuer.team_id_field}'.", reason="jwt_no_team_claim")
        if listed:
            return self._first_serving_team(listed, ctx, models), True
        return s.jwt_team_id_default, False

    def _require_team(self, team_id: str) -> None:
        """A team the token (or ``team_id_default``) names must exist, as in LiteLLM's
        get_team_object: without its row the caller would carry none of the team's models,
        budget or limits. Checked here, before the route check and user upsert, so such a
        token provisions nothing; :meth:`IdentityLoader.principal` checks every other team
        (e.g. one from ``role_mappings``) when the principal is built."""
        self.state.identities.require_team(team_id, "jwt_team_not_found")

    def _first_serving_team(self, team_ids: list[str], ctx: AuthContext,
                            models: tuple[str, ...]) -> str:
        """The first listed team that exists, is not blocked and may serve this request's
        models; else a 403 naming why none could (a route without a model never names one)."""
        info, request = ctx.route, ctx.request
        wanted: tuple[str, ...] = ()
        if info.is_llm and request.method not in SAFE_METHODS:
            wanted = requested_models(request, info)
        checked = team_ids[:20]
        if not self.team_routes.allows(info):
            raise Forbidden(
                f"Team not allowed to access this route. Route={info.route}, Allowed "
                f"Routes={list(self.settings.jwt_team_allowed_routes)}",
                reason="jwt_team_route")
        existing = usable = 0
        for team_id in team_ids:
            _, team, _ = self.state.identities.load(None, team_id)
            if team is None:
                continue
            existing += 1
            if team.blocked:
                continue
            usable += 1
            probe = Principal(method=METHOD, role=Role.TEAM, team_id=team_id, team=team,
                              models=models)
            if all(self.state.models.denial(probe, m) is None for m in wanted):
                return team_id
        if not usable:
            why = ("Every team listed in the token that exists is blocked" if existing
                   else "None of the teams listed in the token exists")
            raise Forbidden(f"{why}. Checked teams={checked}.", reason="jwt_no_usable_team")
        raise Forbidden(
            f"No team has access to the requested model: {wanted[0][:200]}. Checked "
            f"teams={checked}. Check `/models` to see all available models.",
            reason="jwt_no_team_with_access")

    # -- provisioning ---------------------------------------------------------------------------

    @overload
    def _upsert_user(self, user_id: str, email: str | None) -> str: ...
    @overload
    def _upsert_user(self, user_id: None, email: str | None) -> None: ...
    @overload
    def _upsert_user(self, user_id: str | None, email: str | None) -> str | None: ...

    def _upsert_user(self, user_id: str | None, email: str | None) -> str | None:
        """Provision ``user_id`` on first sight when ``jwt_user_id_upsert`` is on; the id
        as given."""
        if user_id is None or not self.settings.jwt_user_id_upsert:
            return user_id
        user, _, _ = self.state.identities.load(user_id, None)
        if user is None:
            from ..users import UserService

            with self._upsert_lock:
                UserService(self.state).provision(user_id, user_email=email,
                                                  role=Role.INTERNAL_USER, source=METHOD)
            self.state.invalidate(f"user:{user_id}")
        return user_id

    def _upsert_team(self, team_id: str) -> None:
        _, team, _ = self.state.identities.load(None, team_id)
        if team is None:
            from ..teams import TeamService

            with self._upsert_lock:
                TeamService(self.state).provision(team_id, source=METHOD)


def jwt_factory(state: LLMAuthState, ext: LLMAuth) -> JWTAuthenticator | None:
    """``enable_jwt_auth`` → the authenticator; ``None`` when JWT auth is off."""
    s = state.settings
    if not s.enable_jwt_auth:
        if s.jwt_oidc_userinfo_enabled:
            raise ConfigurationError(
                "LLMAUTH_JWT_OIDC_USERINFO_ENABLED: needs LLMAUTH_ENABLE_JWT_AUTH")
        return None
    return JWTAuthenticator(state, ext)

