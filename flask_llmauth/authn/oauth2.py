"""OAuth2 token validation: RFC 7662 introspection or a token-info endpoint.

Applies, as in LiteLLM, to **LLM and info routes only** and to opaque bearer tokens: a
JWT-shaped token (JWT auth's), a virtual key (``sk-...``) or the master key is never sent to
the identity provider — those are "not mine".

* **Introspection** (``LLMAUTH_OAUTH2_MODE=introspection``, or ``auto`` when the URL contains
  ``introspect`` and a client id and secret are set): ``POST`` form ``token=<t>`` with HTTP
  Basic client authentication. ``active`` must be ``true``; ``false`` is a 401; a response
  without a boolean ``active`` is a broken provider (503).
* **Token-info** (``token_info``, or ``auto`` otherwise): ``GET`` with
  ``Authorization: Bearer <t>``. 200 is a valid token; 400/401/403 an invalid one (401).

The user id, role and team id come from the configured response fields (dot paths allowed;
defaults ``sub``, ``role``, ``team_id``). A role that is not a LiteLLM role is a 401 unless
``LLMAUTH_OAUTH2_UNKNOWN_ROLE_DEFAULT`` names one; no role field means the role is derived as
for a key (stored user's role, else ``internal_user``/``team``). ``exp`` in the past is a 401,
and so is an ``aud`` naming none of ``LLMAUTH_OAUTH2_AUDIENCE`` (when set).
A team id naming no team is a 403 (refused by the identity loader, never created).

Results are cached by ``sha256(full token)`` (never a prefix) until ``min(exp, ttl)``, so a
cached token costs no network round-trip (the built principal is kept too, and dropped when
its user or team changes, like a key's); an inactive or refused token is remembered for
``LLMAUTH_NEGATIVE_CACHE_TTL``. A revoked token therefore keeps working until its cache
entry ends (``LLMAUTH_OAUTH2_CACHE_TTL``; 0 turns the cache off).

The provider being unreachable, slow (``LLMAUTH_OAUTH2_TIMEOUT``, for the whole exchange),
redirecting, answering 5xx or malformed JSON is a **503** ``auth_provider_unavailable`` —
never a pass, never cached.
The URL comes from configuration only, must be https (plain http only to loopback unless
``LLMAUTH_OAUTH2_ALLOW_INSECURE_HTTP``), redirects are not followed, and proxy/netrc
settings from the environment are ignored. Neither the token nor the client secret is ever
logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from hmac import compare_digest
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import requests

from ..cache import TTLCache
from ..crypto import KEY_PREFIX, secret_bytes
from ..errors import ConfigurationError, Unauthenticated
from ..identities import IdentityLoader
from ..principal import Principal, Role
from .base import AuthContext, has_identity
from .deadline import exchange_timeout, read_body
from .fields import build_principal, identity_value
from .jwks import check_fetch_url, provider_unavailable

if TYPE_CHECKING:
    from ..config import Settings
    from ..extension import LLMAuth, LLMAuthState

log = logging.getLogger("flask_llmauth")

#: Largest response body read from the provider.
MAX_RESPONSE_BYTES = 256 * 1024
#: Token-info statuses that mean "this token is not valid" (anything else non-200 is an outage).
_INVALID_TOKEN_STATUSES = frozenset({400, 401, 403})
#: Response members never copied into ``Principal.claims``.
_SECRET_MEMBERS = frozenset({"access_token", "refresh_token", "id_token", "token"})


def dig(data: Mapping[str, Any], path: str) -> Any:
    """A response member by name, or by dot path into nested objects."""
    if path in data:
        return data[path]
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            return float(value) if math.isfinite(value) else None
        except OverflowError:  # an integer beyond a float's range
            return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 16:
        return float(value)
    return None


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What one token stands for (or why it is refused), as cached."""

    refusal: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    user_email: str | None = None
    role: Role | None = None
    scopes: frozenset[str] = frozenset()
    exp: float = math.inf
    claims: Mapping[str, Any] | None = None


class OAuth2Authenticator:
    name = "oauth2"
    #: Its principals are checked for an identity once, when they are built (see
    #: :class:`~.base.Chain`).
    yields_identity = True

    def __init__(
        self,
        identities: IdentityLoader,
        settings: Settings,
        *,
        endpoint: str,
        introspection: bool,
        cache: TTLCache[TokenInfo],
        principals: TTLCache[tuple[Principal, float]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identities = identities
        self.endpoint = endpoint
        self.introspection = introspection
        self.client_id = settings.oauth2_client_id
        self.client_secret = settings.oauth2_client_secret
        self._master_key = secret_bytes(settings.master_key) if settings.master_key else None
        self.id_field = settings.oauth2_user_id_field_name
        self.role_field = settings.oauth2_user_role_field_name
        self.team_field = settings.oauth2_user_team_id_field_name
        default = settings.oauth2_unknown_role_default
        self.unknown_role_default = Role.parse(default) if default else None
        self.audience = frozenset(settings.oauth2_audience)
        self.ttl = settings.oauth2_cache_ttl
        self.negative_ttl = settings.negative_cache_ttl
        self.timeout = settings.oauth2_timeout
        self.cache = cache
        #: Built principals (records included), dropped with their user/team tags like keys.
        self.principals = principals
        self.clock = clock
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or netrc from the environment

    # -- the hot path ---------------------------------------------------------------------------

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        route = ctx.route
        if not (route.is_llm or "info_routes" in route.groups):
            return None
        token = ctx.credentials.token
        if token is None or token.count(".") == 2 or token.startswith(KEY_PREFIX):
            return None  # no credential, a JWT, or a virtual key
        encoded = token.encode("utf-8", "surrogatepass")
        if self._master_key is not None and compare_digest(encoded, self._master_key):
            return None
        digest = hashlib.sha256(encoded).hexdigest()
        now = self.clock()
        cached = self.principals.get(digest)
        if cached is not None:
            principal, exp = cached
            if exp > now:
                return principal
        generation = self.principals.generation
        info = self.cache.get(digest)
        if info is None:
            info = self.lookup(token, digest, now)
        if info.refusal is not None:
            raise Unauthenticated(reason=info.refusal)
        if info.exp <= now:
            self.cache.discard(digest)
            self.principals.discard(digest)
            raise Unauthenticated(reason="oauth2_token_expired")
        principal = build_principal(
            self.identities, self.name, role=info.role, user_id=info.user_id,
            team_id=info.team_id, user_email=info.user_email, scopes=info.scopes,
            claims=info.claims,
        )
        if not has_identity(principal):  # checked once here, not per request by the chain
            raise Unauthenticated(reason=f"{self.name}_empty_identity")
        tags = [f"user:{info.user_id}"] if info.user_id else []
        tags += [f"team:{info.team_id}"] if info.team_id else []
        self.principals.set(digest, (principal, info.exp), min(self.ttl, info.exp - now), tags,
                            generation=generation)
        return principal

    # -- the cold path --------------------------------------------------------------------------

    def lookup(self, token: str, digest: str, now: float) -> TokenInfo:
        """Ask the provider; cache the answer (refusals briefly, outages never)."""
        generation = self.cache.generation
        data = self._call(token, digest)
        info = self.interpret(data, now) if data is not None else TokenInfo("oauth2_rejected")
        if info.refusal is not None:
            log.info("llmauth: OAuth2 token %s refused: %s", digest[:12], info.refusal)
            ttl = self.negative_ttl
        else:
            ttl = min(self.ttl, info.exp - now)
        self.cache.set(digest, info, ttl, generation=generation)
        return info

    def _call(self, token: str, digest: str) -> dict[str, Any] | None:
        """The provider's JSON object, or ``None`` when token-info refuses the token."""
        headers = {"Accept": "application/json"}
        deadline = time.monotonic() + self.timeout
        timeout = exchange_timeout(self.timeout)
        try:
            if self.introspection:
                response = self.session.post(
                    self.endpoint, data={"token": token, "token_type_hint": "access_token"},
                    auth=(self.client_id or "", self.client_secret or ""), headers=headers,
                    timeout=timeout, allow_redirects=False, stream=True)
            else:
                response = self.session.get(
                    self.endpoint, auth=_BearerAuth(token), headers=headers,
                    timeout=timeout, allow_redirects=False, stream=True)
            with response:
                status = response.status_code
                if not self.introspection and status in _INVALID_TOKEN_STATUSES:
                    return None
                if status != 200:
                    log.error("llmauth: OAuth2 %s endpoint answered HTTP %s", self._kind, status)
                    raise provider_unavailable()
                body = read_body(response, MAX_RESPONSE_BYTES, deadline)
        except requests.RequestException as exc:
            log.error("llmauth: OAuth2 %s endpoint unreachable (%s)", self._kind,
                      type(exc).__name__)
            raise provider_unavailable() from None
        if len(body) > MAX_RESPONSE_BYTES:
            log.error("llmauth: OAuth2 %s response too large", self._kind)
            raise provider_unavailable()
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            log.error("llmauth: OAuth2 %s endpoint answered something other than a JSON object",
                      self._kind)
            raise provider_unavailable()
        return data

    @property
    def _kind(self) -> str:
        return "introspection" if self.introspection else "token-info"

    def interpret(self, data: Mapping[str, Any], now: float) -> TokenInfo:
        """Turn the provider's answer into a :class:`TokenInfo` (a refusal or an identity)."""
        active = data.get("active")
        if self.introspection and not isinstance(active, bool):
            log.error("llmauth: OAuth2 introspection response has no boolean `active`")
            raise provider_unavailable()
        if "active" in data and active is not True:
            return TokenInfo("oauth2_token_inactive")
        exp = math.inf
        if data.get("exp") is not None:
            parsed = _number(data["exp"])
            if parsed is None:
                return TokenInfo("oauth2_bad_exp")
            exp = parsed
            if exp <= now:
                return TokenInfo("oauth2_token_expired")
        if self.audience and not self._audience_matches(data.get("aud")):
            return TokenInfo("oauth2_wrong_audience")
        role = None
        raw_role = dig(data, self.role_field)
        if raw_role is not None:
            try:
                role = Role.parse(raw_role)
            except ValueError:
                if self.unknown_role_default is None:
                    return TokenInfo("oauth2_unknown_role")
                role = self.unknown_role_default
        verified = data.get("email_verified")
        unverified = verified is False or (isinstance(verified, str)
                                           and verified.lower() == "false")
        if unverified and self.id_field == "email":
            # as for JWTs: an address the provider says is not verified names no one
            return TokenInfo("oauth2_email_unverified")
        try:
            user_id = self._identity(dig(data, self.id_field))
            team_id = self._identity(dig(data, self.team_field))
        except ValueError:
            return TokenInfo("oauth2_bad_identity")
        if user_id is None and team_id is None:
            return TokenInfo("oauth2_no_identity")
        email = None if unverified else data.get("email")
        try:
            email = identity_value(email) if isinstance(email, str) else None
        except ValueError:
            email = None
        scope = data.get("scope")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        # read-only: the principal built from it is cached and shared between requests
        claims = MappingProxyType({k: v for k, v in data.items() if k not in _SECRET_MEMBERS})
        return TokenInfo(None, user_id=user_id, team_id=team_id, user_email=email, role=role,
                         scopes=scopes, exp=exp, claims=claims)

    def _audience_matches(self, aud: Any) -> bool:
        """Whether the answer's ``aud`` (a string or a list of strings) names an accepted
        audience; a missing or malformed ``aud`` does not."""
        values = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        return any(isinstance(value, str) and value in self.audience for value in values)

    @staticmethod
    def _identity(value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return identity_value(value)


def oauth2_factory(state: LLMAuthState, ext: LLMAuth) -> OAuth2Authenticator | None:
    settings = state.settings
    if not settings.enable_oauth2_auth:
        return None
    url = settings.oauth2_token_info_endpoint
    if not url:
        raise ConfigurationError(
            "LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT: required when OAuth2 auth is enabled "
            "(env OAUTH_TOKEN_INFO_ENDPOINT or general_settings.oauth_token_info_endpoint)")
    check_fetch_url(url, allow_http=settings.oauth2_allow_insecure_http,
                    setting="LLMAUTH_OAUTH2_TOKEN_INFO_ENDPOINT",
                    opt_in="LLMAUTH_OAUTH2_ALLOW_INSECURE_HTTP")
    has_client = bool(settings.oauth2_client_id and settings.oauth2_client_secret)
    mode = settings.oauth2_mode
    if mode == "auto":
        looks_like_introspection = "introspect" in url.lower()
        if looks_like_introspection and not has_client:
            raise ConfigurationError(
                "LLMAUTH_OAUTH2_CLIENT_ID: the endpoint looks like an introspection endpoint "
                "but the client id and secret are not both set; set them, or set "
                "LLMAUTH_OAUTH2_MODE=token_info")
        mode = "introspection" if looks_like_introspection else "token_info"
    if mode == "introspection" and not has_client:
        raise ConfigurationError(
            "LLMAUTH_OAUTH2_CLIENT_ID: introspection needs LLMAUTH_OAUTH2_CLIENT_ID and "
            "LLMAUTH_OAUTH2_CLIENT_SECRET (HTTP Basic client authentication)")
    if not settings.oauth2_audience:
        log.warning(
            "llmauth: OAuth2 auth does not verify the token's audience (set "
            "LLMAUTH_OAUTH2_AUDIENCE): a token the provider issued for any other client or "
            "API is accepted")
    principals: TTLCache[tuple[Principal, float]] = TTLCache(settings.cache_max_size)
    state.invalidate.caches.append(principals)  # user/team changes drop cached principals
    return OAuth2Authenticator(
        state.identities, settings, endpoint=url, introspection=mode == "introspection",
        cache=TTLCache(settings.cache_max_size), principals=principals,
    )
