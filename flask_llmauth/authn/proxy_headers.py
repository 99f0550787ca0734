"""OAuth2-proxy header auth: an authenticating reverse proxy names the caller in headers.

For deployments behind oauth2-proxy, Apache ``mod_auth_openidc``, Authelia and the like.
``oauth2_config_mappings`` maps principal fields to the headers the proxy sets, e.g.
``{"user_id": "X-Forwarded-User", "user_email": "X-Forwarded-Email"}``.

Trust model:

* Headers are believed only when the **direct TCP peer** (``REMOTE_ADDR`` as the server saw
  it, before any ``ProxyFix`` rewrite; never ``X-Forwarded-For``) is inside
  ``LLMAUTH_TRUSTED_PROXY_RANGES``, which is required and may not be ``0.0.0.0/0``.
* A request from any other peer that carries a mapped header is refused with 401: someone
  outside the trust boundary is asserting an identity. Without mapped headers such a request
  is "not mine" and the other methods (keys, JWT...) decide.
* From a trusted peer, a request with no mapped header (or only empty ones) is also "not
  mine", so the proxy can pass machine clients with their own keys through.
* Every mapped header must be set by the proxy, which must also remove any copy the client
  sent: a header the proxy merely forwards is chosen by the client. A header sent twice, or a
  value holding a comma (how servers merge two copies), is a 401.
* Identity fields (``user_id``, ``user_email``, ``team_id``, ``team_alias``, ``org_id``,
  ``end_user_id``, ``models``) may be mapped freely. Privilege fields (``user_role`` and the
  budget and rate-limit fields) are refused at ``init_app`` unless
  ``LLMAUTH_OAUTH2_PROXY_SETS_PRIVILEGE_HEADERS`` declares that the proxy strips and sets
  them; then their values are parsed strictly and a malformed one is a 401.

The caller's user and team records are loaded as for every method (a team that does not
exist → 403, blocked → 401, team and user models apply); with no ``user_id`` header the
email is the user id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Request

from ..errors import ConfigurationError, Unauthenticated
from ..identities import IdentityLoader
from ..network import Network, in_networks
from ..principal import Principal, Role
from .base import AuthContext
from .fields import IDENTITY_FIELDS, LIMIT_FIELDS, build_principal, identity_value, limit_value
from .fields import string_list as parse_list

if TYPE_CHECKING:
    from ..extension import LLMAuth, LLMAuthState

log = logging.getLogger("flask_llmauth")

IDENTITY_HEADER_FIELDS = frozenset(IDENTITY_FIELDS + ("models",))
PRIVILEGE_HEADER_FIELDS = frozenset(("user_role",) + LIMIT_FIELDS)
#: Headers that carry credentials or routing; never an identity source.
_RESERVED_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "host", "x-litellm-api-key", "api-key",
    "x-api-key", "x-goog-api-key", "x-forwarded-for", "content-length", "content-type",
})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,99}$")


def direct_peer(request: Request) -> str | None:
    """The TCP peer's address as the WSGI server reported it (``ProxyFix`` keeps the
    original in ``werkzeug.proxy_fix.orig``)."""
    environ = request.environ
    original = environ.get("werkzeug.proxy_fix.orig")
    if isinstance(original, Mapping) and original.get("REMOTE_ADDR"):
        return str(original["REMOTE_ADDR"])
    return environ.get("REMOTE_ADDR")


def check_mapping(mapping: Mapping[str, Any], trusted: tuple[Network, ...],
                  privilege_opt_in: bool) -> dict[str, str]:
    """Validate the configuration at ``init_app``; return ``{field: header}``."""
    if not mapping:
        raise ConfigurationError(
            "LLMAUTH_OAUTH2_CONFIG_MAPPINGS: proxy-header auth is enabled but maps no "
            "field to a header (e.g. {\"user_id\": \"X-Forwarded-User\"})")
    if not trusted:
        raise ConfigurationError(
            "LLMAUTH_TRUSTED_PROXY_RANGES: required with proxy-header auth: list the "
            "addresses of the proxies that set the identity headers")
    for network in trusted:
        if network.prefixlen == 0:
            raise ConfigurationError(
                f"LLMAUTH_TRUSTED_PROXY_RANGES: {network} trusts every address, which makes "
                "the identity headers forgeable; list the proxies' own addresses")
    clean: dict[str, str] = {}
    for field, header in mapping.items():
        if field in PRIVILEGE_HEADER_FIELDS:
            if not privilege_opt_in:
                raise ConfigurationError(
                    f"LLMAUTH_OAUTH2_CONFIG_MAPPINGS: {field!r} is a privilege field; taking it "
                    "from a header lets whoever sets that header raise their own rights. Set "
                    "LLMAUTH_OAUTH2_PROXY_SETS_PRIVILEGE_HEADERS=True only if the proxy removes "
                    "any client copy of the header and sets it itself")
        elif field not in IDENTITY_HEADER_FIELDS:
            raise ConfigurationError(
                f"LLMAUTH_OAUTH2_CONFIG_MAPPINGS: unknown field {str(field)[:40]!r}; identity "
                f"fields: {sorted(IDENTITY_HEADER_FIELDS)}; privilege fields: "
                f"{sorted(PRIVILEGE_HEADER_FIELDS)}")
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            raise ConfigurationError(
                f"LLMAUTH_OAUTH2_CONFIG_MAPPINGS: {field}: {str(header)[:60]!r} is not a "
                "header name")
        if header.lower() in _RESERVED_HEADERS:
            raise ConfigurationError(
                f"LLMAUTH_OAUTH2_CONFIG_MAPPINGS: {field}: {header!r} cannot carry an identity")
        clean[str(field)] = header
    return clean


class ProxyHeaderAuthenticator:
    name = "oauth2_proxy"

    def __init__(self, identities: IdentityLoader, mapping: Mapping[str, str],
                 trusted: tuple[Network, ...]) -> None:
        self.identities = identities
        self.mapping = tuple(mapping.items())
        self.trusted = trusted

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        headers = ctx.request.headers
        present = [(field, header) for field, header in self.mapping if header in headers]
        if not present:
            return None
        peer = direct_peer(ctx.request)
        if not in_networks(peer, self.trusted):
            raise Unauthenticated(reason="proxy_headers_from_untrusted_peer")
        values: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        for field, header in present:
            copies = headers.getlist(header)
            if len(copies) != 1:
                raise Unauthenticated(reason="proxy_header_repeated")
            raw = copies[0].strip()
            if not raw:
                continue
            try:
                if field == "models":
                    values["models"] = parse_list(raw, split=True)
                elif field == "user_role":
                    values["role"] = Role.parse(raw)
                elif field in PRIVILEGE_HEADER_FIELDS:
                    limits[field] = limit_value(field, raw, from_text=True)
                else:
                    values[field] = identity_value(raw)
            except ValueError:
                log.warning("llmauth: proxy header %s (%s) has a malformed value", header, field)
                raise Unauthenticated(reason="proxy_header_malformed") from None
        if not (values.get("user_id") or values.get("user_email") or values.get("team_id")
                or values.get("end_user_id")):
            if values or limits:
                raise Unauthenticated(reason="proxy_headers_without_identity")
            return None
        values.setdefault("user_id", values.get("user_email"))
        team_alias = values.pop("team_alias", None)
        return build_principal(
            self.identities, self.name, limits=limits,
            metadata={"team_alias": team_alias} if team_alias else None, **values,
        )


def proxy_headers_factory(state: LLMAuthState, ext: LLMAuth) -> ProxyHeaderAuthenticator | None:
    settings = state.settings
    if not settings.enable_oauth2_proxy_auth:
        return None
    mapping = check_mapping(settings.oauth2_config_mappings, settings.trusted_proxy_ranges,
                            settings.oauth2_proxy_sets_privilege_headers)
    return ProxyHeaderAuthenticator(state.identities, mapping, settings.trusted_proxy_ranges)
