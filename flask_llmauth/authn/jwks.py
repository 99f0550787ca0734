"""Signing keys of identity providers: a per-URL JWKS cache for the JWT authenticator.

Each configured URL is a JWKS document or an OIDC discovery document (its ``jwks_uri`` is
followed; the discovery answer is cached with the keys). Keys are fetched with ``requests``
(one timeout for a whole fetch, no redirects, a size cap), parsed once into key objects and kept for
``ttl`` seconds. One thread refreshes a URL at a time while the others wait for its answer
(single flight). A token whose ``kid`` is in no cached set triggers one refetch per URL, at
most once per ``refetch_cooldown`` seconds, so random kids cannot turn the server into a
fetch amplifier. When the provider cannot be reached, the last copy keeps being served
until ``ttl + stale_ttl`` after it was fetched; with no usable copy the request gets a 503
``auth_provider_unavailable``. A failed fetch is not retried for ``failure_backoff``
seconds.

Only asymmetric signing keys are kept (RSA, EC, OKP); a key's algorithms come from its own
``alg`` or from its type and curve, intersected with the configured allow-list.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from ..errors import ConfigurationError, ServiceUnavailable, Unauthenticated
from .deadline import exchange_timeout, read_body

log = logging.getLogger("flask_llmauth")

ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512", "EdDSA")
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
#: Largest JWKS or discovery document accepted.
MAX_DOCUMENT_BYTES = 512 * 1024
DISCOVERY_MARKERS = ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server")


def provider_unavailable(retry_after: float | None = None) -> ServiceUnavailable:
    headers = {"Retry-After": str(max(1, int(retry_after)))} if retry_after else None
    return ServiceUnavailable(
        "Authentication provider unavailable, try again later.",
        error_type="auth_provider_unavailable", headers=headers,
        reason="auth_provider_unavailable",
    )


def check_fetch_url(url: str, *, allow_http: bool, setting: str,
                    opt_in: str = "LLMAUTH_JWT_ALLOW_INSECURE_HTTP") -> str:
    """Refuse URLs the server must not fetch: only https, or http to a loopback address
    (or any http host when ``allow_http``, the setting named ``opt_in``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{setting}: {url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ConfigurationError(f"{setting}: credentials in the URL are not allowed")
    if parts.scheme == "http" and not allow_http and not is_loopback(parts.hostname):
        raise ConfigurationError(
            f"{setting}: {url!r} must use https (plain http is allowed only to loopback "
            f"addresses, or with {opt_in})")
    return url


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One parsed public key and the algorithms it may verify."""

    kid: str | None
    key: Any
    algorithms: frozenset[str]
    source: str


def parse_jwk(jwk: Any, allowed: frozenset[str], source: str) -> SigningKey | None:
    """A :class:`SigningKey`, or ``None`` for keys that must not verify tokens."""
    if not isinstance(jwk, dict):
        return None
    kty, use = jwk.get("kty"), jwk.get("use")
    if use not in (None, "sig") or kty not in ("RSA", "EC", "OKP"):
        return None  # encryption keys, symmetric ("oct") keys and unknown types
    if any(name in jwk for name in ("d", "p", "q", "k")):
        return None  # a private or secret key published by mistake is never used
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if kty == "RSA":
        algs = set(_RSA_ALGS)
    elif kty == "EC":
        alg = _EC_ALGS.get(jwk.get("crv", ""))
        algs = {alg} if alg else set()
    else:
        algs = {"EdDSA"} if jwk.get("crv") in _OKP_CURVES else set()
    declared = jwk.get("alg")
    if declared is not None:
        algs &= {declared} if declared != "Ed25519" else {"EdDSA"}
    algs &= allowed
    if not algs:
        return None
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        parsed = PyJWK(jwk, algorithm=sorted(algs)[0])
    except (PyJWKError, ValueError, TypeError, KeyError):
        return None
    return SigningKey(kid=kid, key=parsed.key, algorithms=frozenset(algs), source=source)


@dataclass
class _Entry:
    """The state of one configured URL."""

    url: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: dict[str | None, SigningKey] | None = None
    count: int = 0
    fetched_at: float = float("-inf")
    last_attempt: float = float("-inf")
    failed_at: float = float("-inf")
    jwks_uri: str | None = None
    discovery: dict[str, Any] | None = None


class JwksCache:
    """The signing keys behind one or more JWKS / discovery URLs."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        algorithms: Iterable[str] = ASYMMETRIC_ALGORITHMS,
        ttl: float = 600.0,
        stale_ttl: float = 3600.0,
        refetch_cooldown: float = 30.0,
        failure_backoff: float = 30.0,
        timeout: float = 5.0,
        allow_http: bool = False,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ConfigurationError("LLMAUTH_JWT_PUBLIC_KEY_URL: no JWKS URL configured")
        self.urls = tuple(check_fetch_url(u, allow_http=allow_http,
                                          setting="LLMAUTH_JWT_PUBLIC_KEY_URL") for u in urls)
        self.algorithms = frozenset(algorithms)
        self.ttl = ttl
        self.stale_ttl = stale_ttl
        self.refetch_cooldown = refetch_cooldown
        self.failure_backoff = failure_backoff
        self.timeout = timeout
        self.allow_http = allow_http
        self.session = session or requests.Session()
        self.session.trust_env = False  # no proxy or netrc from the environment
        self._clock = clock
        self._entries = {url: _Entry(url) for url in self.urls}

    # -- lookup ---------------------------------------------------------------------------------

    def key_for(self, kid: str | None) -> SigningKey:
        """The key a token's ``kid`` names.

        Raises :class:`Unauthenticated` for an unknown ``kid`` (after at most one refetch
        per URL) and a 503 when no URL has a usable copy of its keys.
        """
        usable = False
        for entry in self._entries.values():
            keys = self._keys(entry)
            if keys is None:
                continue
            usable = True
            found = self._match(entry, keys, kid)
            if found is not None:
                return found
        for entry in self._entries.values():  # unknown kid: one refetch, within the cooldown
            now = self._clock()
            if now - entry.last_attempt < self.refetch_cooldown:
                continue
            keys = self._refresh(entry, force=True)
            if keys is None:
                continue
            usable = True
            found = self._match(entry, keys, kid)
            if found is not None:
                return found
        if not usable:
            raise provider_unavailable(self.failure_backoff)
        raise Unauthenticated(reason="jwt_unknown_kid")

    @staticmethod
    def _match(entry: _Entry, keys: dict[str | None, SigningKey],
               kid: str | None) -> SigningKey | None:
        if kid is not None:
            return keys.get(kid)
        if entry.count == 1:  # a token without kid: only a single-key set may verify it
            return next(iter(keys.values()))
        return None

    def _keys(self, entry: _Entry) -> dict[str | None, SigningKey] | None:
        """The entry's keys: fresh, refreshed, or stale within bounds; ``None`` if none."""
        now = self._clock()
        if entry.keys is not None and now < entry.fetched_at + self.ttl:
            return entry.keys
        return self._refresh(entry, force=False)

    def _refresh(self, entry: _Entry, *, force: bool) -> dict[str | None, SigningKey] | None:
        started = self._clock()
        with entry.lock:  # single flight: the waiters use what the first thread fetched
            now = self._clock()
            if entry.last_attempt >= started:
                return self._usable(entry, now)
            if not force and entry.keys is not None and now < entry.fetched_at + self.ttl:
                return entry.keys
            if now - entry.failed_at < self.failure_backoff:
                return self._usable(entry, now)
            entry.last_attempt = now
            try:
                keys = self._fetch(entry)
            except _FetchError as exc:
                entry.failed_at = self._clock()
                stale = self._usable(entry, entry.failed_at)
                log.warning("llmauth: could not fetch signing keys from %s (%s); %s", entry.url,
                            exc, "serving the cached copy" if stale else "no usable copy")
                return stale
            entry.keys, entry.count = keys, len(keys)
            entry.fetched_at = self._clock()
            entry.failed_at = float("-inf")
            return keys

    def _usable(self, entry: _Entry, now: float) -> dict[str | None, SigningKey] | None:
        if entry.keys is not None and now < entry.fetched_at + self.ttl + self.stale_ttl:
            return entry.keys
        return None

    # -- fetching -------------------------------------------------------------------------------

    def _fetch(self, entry: _Entry) -> dict[str | None, SigningKey]:
        url = entry.url
        if any(marker in url for marker in DISCOVERY_MARKERS):
            doc = self._get_json(url)
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise _FetchError("discovery document has no jwks_uri")
            try:
                check_fetch_url(jwks_uri, allow_http=self.allow_http, setting="jwks_uri")
            except ConfigurationError as exc:
                raise _FetchError(str(exc)) from None
            entry.discovery, entry.jwks_uri = doc, jwks_uri
            url = jwks_uri
        doc = self._get_json(url)
        raw_keys = doc.get("keys")
        if not isinstance(raw_keys, list):
            raise _FetchError("not a JWKS document")
        keys: dict[str | None, SigningKey] = {}
        for jwk in raw_keys:
            key = parse_jwk(jwk, self.algorithms, entry.url)
            if key is not None and key.kid not in keys:
                keys[key.kid] = key
        if not keys:
            raise _FetchError("the JWKS holds no usable signing key")
        return keys

    def _get_json(self, url: str) -> dict[str, Any]:
        """One document; a failed attempt is retried once, within the same ``timeout``."""
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        for attempt in range(2):
            try:
                left = deadline - time.monotonic()
                with self.session.get(url, timeout=exchange_timeout(left), allow_redirects=False,
                                      stream=True, headers={"Accept": "application/json"}) as r:
                    if r.status_code >= 500:
                        raise _FetchError(f"HTTP {r.status_code}")
                    if r.status_code != 200:
                        raise _FetchError(f"HTTP {r.status_code}", retry=False)
                    body = read_body(r, MAX_DOCUMENT_BYTES, deadline)
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise _FetchError("document too large", retry=False)
                doc = json.loads(body)
                if not isinstance(doc, dict):
                    raise _FetchError("not a JSON object", retry=False)
                return doc
            except _FetchError as exc:
                last = exc
                if not exc.retry:
                    break
            except (requests.RequestException, OSError) as exc:
                last = _FetchError(type(exc).__name__)
            except ValueError:
                last = _FetchError("invalid JSON")
                break
            if attempt == 0:
                if deadline - time.monotonic() <= 0.25:
                    break  # no time left for a retry
                time.sleep(0.25)
        raise last if isinstance(last, _FetchError) else _FetchError("fetch failed")

    # -- introspection for tests and docs ---------------------------------------------------------

    def discovery(self, url: str) -> dict[str, Any] | None:
        """The cached discovery document of a configured discovery URL (``None`` before the
        first fetch)."""
        return self._entries[url].discovery


class _FetchError(Exception):
    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry
