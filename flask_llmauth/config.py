"""Every setting of the extension, in one table.

Each field of :class:`Settings` is one ``LLMAUTH_<NAME>`` Flask config key. Its metadata
names the LiteLLM YAML paths and environment variables that also set it, whether it is a
secret (masked by ``show-config``), and its documentation row (``docs/configuration.md``
is generated from this table by ``python docs/generate.py``).

Precedence: constructor argument > Flask config > YAML (``LLMAUTH_CONFIG_FILE``) >
secret loader (secrets only) > environment > default. Invalid values raise
:class:`~flask_llmauth.errors.ConfigurationError` at ``init_app``, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import logging
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .crypto import MIN_KEY_ENTROPY_BYTES
from .durations import Duration, parse_duration
from .errors import ConfigurationError
from .money import to_units, to_usd
from .network import parse_networks

log = logging.getLogger("flask_llmauth")

PREFIX = "LLMAUTH_"
SecretLoader = Callable[[str], "str | None"]
Parser = Callable[[Any], Any]


# -- value parsers: each takes a raw value (YAML/env/config) and returns the typed value ---------


def _str(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off", ""}:
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError("must be a boolean")


def _number(kind: type, minimum: float | None = None) -> Parser:
    what = "an integer" if kind is int else "a finite number"

    def parse(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"must be {what}")
        number: int | float
        if isinstance(value, str):
            text = value.strip()
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise ValueError(f"must be {what}") from None
        else:
            number = value
        if isinstance(number, float):
            if not math.isfinite(number) or (kind is int and not number.is_integer()):
                raise ValueError(f"must be {what}")
        number = int(number) if kind is int else float(number)
        if minimum is not None and number < minimum:
            raise ValueError(f"must be at least {minimum:g}")
        return number

    return parse


#: The smallest ``max_request_size_mb``: 1 KiB (a smaller bound would refuse any JSON call).
MIN_REQUEST_SIZE_MB = 1 / 1024


def _megabytes(value: Any) -> float | None:
    """A size in MB (LiteLLM's ``max_request_size_mb``), at least 1 KiB; ``""``: unset."""
    if value is None or value == "":
        return None
    number = _number(float)(value)
    if number < MIN_REQUEST_SIZE_MB:
        raise ValueError(f"must be at least {MIN_REQUEST_SIZE_MB:g} (1 KiB)")
    return float(number)


def _fraction(value: Any) -> float:
    number = _number(float)(value)
    if number is None or not 0 < number <= 1:
        raise ValueError("must be a number above 0 and at most 1")
    return float(number)


def _nonempty_str(value: Any) -> str:
    text = _str(value)
    if not text or not text.strip():
        raise ValueError("must be a non-empty string")
    return text


def _optional_str(value: Any) -> str | None:
    """A string where ``""`` means unset (as an empty environment variable does)."""
    text = _str(value)
    return text if text else None


def _present_str(hint: str) -> Callable[[Any], str | None]:
    """A string that, when given, is not empty or blank: for settings whose empty value would
    silently stand for something else (``LLMAUTH_REDIS_URL=""`` would count per process and
    hide ``REDIS_URL``; an empty salt key would hide ``LITELLM_SALT_KEY`` and change every
    key hash). ``hint`` says what to give instead."""

    def convert(value: Any) -> str | None:
        text = _str(value)
        if text is not None and not text.strip():
            raise ValueError(f"is empty: {hint}, or leave the key out")
        return text

    return convert


#: RFC 9110 field-name characters (``token``).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _header_name(value: Any) -> str | None:
    text = _optional_str(value)
    if text is not None and not _HEADER_NAME.match(text):
        raise ValueError("must be an HTTP header name (letters, digits and - _ . only)")
    return text


def _url_prefix(value: Any) -> str:
    text = _str(value) or ""
    if text and (not text.startswith("/") or text.endswith("/") or "//" in text
                 or not text.isprintable() or " " in text):
        raise ValueError("must be empty or a path such as /llm (leading /, no trailing /)")
    return text


def _cli_name(value: Any) -> str:
    text = _nonempty_str(value)
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", text):
        raise ValueError("must be a lower-case command name such as llmauth")
    return text


#: Database URL schemes the store supports (migrations are tested on these).
DATABASE_SCHEMES = ("sqlite", "postgres", "postgresql", "postgres+pool", "postgresql+pool")


def _database_url(value: Any) -> str | None:
    """A database URL. Error messages never repeat the URL: it may hold a password.

    An empty value is an error, not the default: ``LLMAUTH_DATABASE_URL=""`` (an empty
    variable copied into the config) would start the app on an empty SQLite file while the
    deploy meant a database, and would hide ``DATABASE_URL`` from the environment.
    """
    text = _str(value)
    if text is None:
        return None
    if not text.strip():
        raise ValueError(
            "is empty: give a database URL (sqlite:///path, postgresql://user@host/dbname), "
            "or leave the key out (then DATABASE_URL from the environment is used, else an "
            "SQLite file in the instance folder)")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in DATABASE_SCHEMES:
        raise ValueError("must be a sqlite:///path or postgresql://user@host/dbname URL")
    try:
        path = urlsplit(text).path
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if not path.strip("/"):
        raise ValueError("has no database name (sqlite:///path, postgresql://host/dbname)")
    return text


def _auth_order(value: Any) -> tuple[str, ...]:
    names = _str_list(value)
    if not names:
        raise ValueError("must name at least one authenticator")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"names {', '.join(duplicates)} more than once")
    return names


def _route_list(value: Any) -> tuple[str, ...]:
    """Route entries: paths (``/x``, ``/x/*``, ``/x/{param}``) or route-group names. A
    misspelt group would silently match nothing, so unknown names are refused."""
    from .authz.routes import group_name

    entries = _str_list(value)
    for entry in entries:
        if entry.startswith("/"):
            if not entry.isprintable() or " " in entry:
                raise ValueError(f"{entry[:64]!r} is not a route path")
            continue
        if group_name(entry) is None:
            raise ValueError(
                f"{entry[:64]!r} is neither a path (starting with /) nor a route group "
                "name such as openai_routes or LiteLLMRoutes.public_routes")
    return entries


def _model_groups(value: Any) -> dict[str, Any]:
    groups = _mapping(value)
    for name, models in groups.items():
        if not isinstance(name, str) or not isinstance(models, (list, tuple)) or not all(
            isinstance(m, str) for m in models
        ):
            raise ValueError("must map each group name to a list of model names")
    return groups


def _string_map(value: Any) -> dict[str, Any]:
    mapping = _mapping(value)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError("must map strings to strings")
    return mapping


def _model_list(value: Any) -> tuple[dict[str, Any], ...]:
    entries = _list_of_mappings(value)
    for index, entry in enumerate(entries):
        if not isinstance(entry.get("model_name"), str) or not entry["model_name"]:
            raise ValueError(f"entry {index} has no model_name string")
        info = entry.get("model_info")
        if info is not None and not isinstance(info, Mapping):
            raise ValueError(f"entry {index}: model_info must be a mapping")
    return entries


def _str_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            value = json.loads(stripped)
        else:
            return tuple(part.strip() for part in stripped.split(",") if part.strip())
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of strings (or a comma-separated string)")
    return tuple(value)


def _mapping(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping")
    return dict(value)


def _list_of_mappings(value: Any) -> tuple[dict[str, Any], ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise ValueError("must be a list of mappings")
    return tuple(dict(v) for v in value)


def _networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return parse_networks(_str_list(value))


def _optional_networks(value: Any) -> tuple[Any, ...] | None:
    return None if value is None else _networks(value)


def _duration(value: Any) -> Duration | None:
    if value is None or value == "":
        return None
    return parse_duration(value)


def _money(value: Any) -> int | None:
    """A non-negative USD amount → integer units (:mod:`flask_llmauth.money`)."""
    if value is None or value == "":
        return None
    return to_units(value)


def _user_header_mappings(value: Any) -> tuple[dict[str, Any], ...]:
    """LiteLLM's ``user_header_mappings``: ``[{header_name, litellm_user_role}]``."""
    entries = _entries(value, ("header_name", "litellm_user_role"),
                       ("header_name", "litellm_user_role"))
    for index, entry in enumerate(entries):
        if not _HEADER_NAME.match(entry["header_name"]):
            raise ValueError(f"entry {index}: header_name must be an HTTP header name")
        if entry["litellm_user_role"] not in ("customer", "internal_user"):
            raise ValueError(f"entry {index}: litellm_user_role must be customer or "
                             "internal_user")
    return entries


def _choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)

    return parse


def _limit_string(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError("must be a rate limit string such as '30/minute'")
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError:
        raise ValueError(f"{value[:60]!r} is not a rate limit string such as '30/minute'"
                         ) from None
    return value


def _ipv6_prefix(value: Any) -> int:
    number = _number(int)(value)
    if number is None or not 1 <= number <= 128:
        raise ValueError("must be a prefix length from 1 to 128")
    return int(number)


def _storage_uri(value: Any) -> str | None:
    text = _str(value)
    if text is None or text == "":
        return None
    from limits.storage import SCHEMES

    scheme = text.partition("://")[0] if "://" in text else ""
    if scheme not in SCHEMES or scheme.startswith("async+"):
        raise ValueError("must be a `limits` storage URI such as memory://, redis://host:6379/0, "
                         "redis+cluster://..., redis+sentinel://.../service "
                         f"(unknown scheme {scheme[:20]!r})")
    return text


def _storage_options(value: Any) -> dict[str, Any]:
    options = _mapping(value)
    if not all(isinstance(k, str) for k in options):
        raise ValueError("must map option names to values")
    return options


def setting(
    default: Any,
    parse: Parser,
    doc: str,
    *,
    yaml: tuple[str, ...] = (),
    env: tuple[str, ...] = (),
    secret: bool = False,
) -> Any:
    """Declare one setting (a dataclass field carrying its parser and provenance)."""
    meta = {"parse": parse, "doc": doc, "yaml": yaml, "env": env, "secret": secret}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples or factories for mutable defaults")
    return field(default=default, metadata=meta)


# -- parsers of the spend section (issue 4) ---------------------------------------------------


def _model_prices(value: Any) -> dict[str, Any]:
    """``{model: {input_cost_per_token, output_cost_per_token}}`` (USD per token)."""
    from .prices import parse_price

    prices = _mapping(value)
    for name, entry in prices.items():
        if not isinstance(name, str) or not name:
            raise ValueError("must map model names to prices")
        try:
            parse_price(entry)
        except ValueError as exc:
            raise ValueError(f"model {name[:100]!r}: {exc}") from None
    return prices


def _price(value: Any) -> dict[str, Any] | None:
    """``{input_cost_per_token, output_cost_per_token}`` (USD per token), or unset."""
    from .prices import parse_price

    if value is None or value == "":
        return None
    price = _mapping(value)
    parse_price(price)
    return price


# -- parsers of the budgets section (issue 4) --------------------------------------------------


def _budget(value: Any) -> int | None:
    """Like :func:`_money`, but 0 means no budget (LiteLLM's ``max_budget``)."""
    return _money(value) or None


def _duration_text(value: Any) -> str | None:
    """A ``budget_duration`` string (``30s``, ``10m``, ``24h``, ``7d``, ``30d``, ``1mo``)."""
    if value is None or value == "":
        return None
    return parse_duration(value).text


# -- parsers of the OAuth2 / proxy-header / custom-auth section (issue 3) ------------------------


def _hook(value: Any) -> Any:
    """A hook: ``"module.func"`` (resolved at ``init_app``) or the callable itself."""
    if value is None or callable(value):
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError('must be "module.function" or a callable')


def _role_name(value: Any) -> str | None:
    if value is None or value == "":
        return None
    from .principal import Role

    return Role.parse(value).value


def _http_url(value: Any) -> str | None:
    value = _str(value)
    if value is None or value == "":
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    return value


# -- parsers of the JWT / OIDC section (issue 3) ------------------------------------------------

#: Signature algorithms a JWT may use (asymmetric only: no HS*, never "none").
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                  "ES512", "EdDSA")
JWT_ROLE_TARGETS = ("proxy_admin", "team", "internal_user")
JWT_ISSUER_FIELDS = ("issuer", "jwks_url", "audience", "disable_audience_validation",
                     "user_id_jwt_field", "user_email_jwt_field", "team_id_jwt_field",
                     "team_ids_jwt_field", "org_id_jwt_field", "end_user_id_jwt_field",
                     "user_id_prefix")


def _claim_path(value: Any) -> str | None:
    """A claim name or dot path (``realm_access.roles``); list indexes are not supported."""
    text = _optional_str(value)
    if text is None:
        return None
    parts = text.split(".")
    if "[" in text or any(not p or p.isdigit() or not p.isprintable() for p in parts):
        raise ValueError(f"{text[:64]!r} is not a claim name or dot path (list indexes such "
                         "as `roles.0` or `roles[0]` are not supported: a list claim gives "
                         "its first item)")
    return text


def _url_list(value: Any) -> tuple[str, ...]:
    urls = _str_list(value)
    for url in urls:
        _http_url(url)
    return urls


def _jwt_algorithms(value: Any) -> tuple[str, ...]:
    algs = _str_list(value)
    if not algs:
        raise ValueError("must name at least one algorithm")
    bad = [a for a in algs if a not in JWT_ALGORITHMS]
    if bad:
        raise ValueError(f"{bad} not allowed: only asymmetric algorithms "
                         f"({', '.join(JWT_ALGORITHMS)})")
    return algs


def _leeway(value: Any) -> float:
    seconds = _number(float, 0)(value)
    if seconds > 300:
        raise ValueError("must be at most 300 seconds")
    return float(seconds)


def _required_claims(value: Any) -> tuple[str, ...]:
    claims = _str_list(value)
    unknown = sorted(set(claims) - {"exp", "iat", "nbf", "iss", "aud", "sub", "jti"})
    if unknown:
        raise ValueError(f"unknown registered claim(s) {unknown}")
    return claims


def _email_domain(value: Any) -> str | None:
    text = _optional_str(value)
    if text is None:
        return None
    domain = text.strip().lstrip("@").lower()
    if not domain or "@" in domain or " " in domain or "." not in domain:
        raise ValueError("must be an email domain such as example.com")
    return domain


def _entries(value: Any, required: tuple[str, ...],
             allowed: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    entries = _list_of_mappings(value)
    for index, entry in enumerate(entries):
        unknown = sorted(str(k) for k in set(entry) - set(allowed))
        if unknown:
            raise ValueError(f"entry {index} has unknown field(s) {unknown}")
        for name in required:
            if not isinstance(entry.get(name), str) or not entry[name]:
                raise ValueError(f"entry {index} needs a `{name}` string")
    return entries


def _role_mappings(value: Any) -> tuple[dict[str, Any], ...]:
    entries = _entries(value, ("role", "internal_role"), ("role", "internal_role"))
    for index, entry in enumerate(entries):
        if entry["internal_role"] not in JWT_ROLE_TARGETS:
            raise ValueError(f"entry {index}: internal_role must be one of "
                             f"{', '.join(JWT_ROLE_TARGETS)}")
    return entries


def _scope_mappings(value: Any) -> tuple[dict[str, Any], ...]:
    entries = _entries(value, ("scope",), ("scope", "models", "routes"))
    for index, entry in enumerate(entries):
        for name, parse in (("models", _str_list), ("routes", _route_list)):
            if entry.get(name) is not None:
                try:
                    parse(entry[name])
                except ValueError as exc:
                    raise ValueError(f"entry {index}: {name}: {exc}") from None
    return entries


def _jwt_issuers(value: Any) -> tuple[dict[str, Any], ...]:
    entries = _entries(value, ("issuer",), JWT_ISSUER_FIELDS)
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        issuer = entry["issuer"]
        if issuer in seen:
            raise ValueError(f"entry {index}: issuer {issuer!r} is listed twice")
        seen.add(issuer)
        disabled = entry.get("disable_audience_validation", False)
        if not isinstance(disabled, bool):
            raise ValueError(f"entry {index}: disable_audience_validation must be a boolean")
        audience = entry.get("audience")
        if audience is not None:
            try:
                audience = _str_list(audience)
            except ValueError:
                raise ValueError(f"entry {index}: audience must be a string or a list of "
                                 "strings") from None
        if not audience and not disabled:
            raise ValueError(f"entry {index} ({issuer}): set `audience` (or "
                             "`disable_audience_validation: true`)")
        if entry.get("jwks_url") is not None:
            _url_list(entry["jwks_url"])
        for name in JWT_ISSUER_FIELDS:
            if name.endswith("_jwt_field") and entry.get(name) is not None:
                try:
                    _claim_path(entry[name])
                except ValueError as exc:
                    raise ValueError(f"entry {index}: {name}: {exc}") from None
        if not isinstance(entry.get("user_id_prefix", ""), str):
            raise ValueError(f"entry {index}: user_id_prefix must be a string")
    return entries


DEFAULT_AUTH_ORDER = ("custom", "oauth2_proxy", "jwt", "oauth2", "master_key", "virtual_key")
DEFAULT_PUBLIC_ROUTES = ("/health/liveliness", "/health/liveness", "/health/readiness")


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one app (``app.extensions["llmauth"].settings``)."""

    # -- core ---------------------------------------------------------------------------------
    config_file: str | None = setting(
        None, _optional_str,
        "Path of a LiteLLM `config.yaml` (a relative path is opened from the working "
        "directory); the entries of the *LiteLLM YAML* column are read from it "
        "(`general_settings`, `litellm_settings`, `router_settings`, `model_list`).",
    )
    master_key: str | None = setting(
        None, _optional_str,
        "The admin credential (proxy_admin): at least 32 random characters. Missing, short, "
        "low-entropy or well-known example keys (`sk-1234`) refuse to start unless "
        "`LLMAUTH_INSECURE_DEV_MODE` is set.",
        yaml=("general_settings.master_key",), env=("LITELLM_MASTER_KEY",), secret=True,
    )
    insecure_dev_mode: bool = setting(
        False, _bool,
        "Allow a missing or weak master key (development only; logs a loud warning).",
        yaml=("general_settings.dangerously_permit_weak_or_unset_master_key",),
        env=("LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",),
    )
    salt_key: str | None = setting(
        None, _present_str("give at least 32 random characters"),
        "Server secret from which key-hash and other per-purpose secrets are derived (HKDF). "
        "Defaults to the master key; set it so the master key can be rotated without "
        "invalidating every virtual key. At least 32 random characters.",
        env=("LITELLM_SALT_KEY",), secret=True,
    )
    proxy_admin_name: str = setting(
        "default_user_id", _nonempty_str,
        "`user_id` of master-key requests (LiteLLM's admin name).",
        yaml=("general_settings.litellm_proxy_admin_name",),
    )
    master_key_alias: str = setting(
        "litellm-proxy-master-key", _nonempty_str,
        "`key_name` of the master key's principal (signals, hooks); audit and spend rows "
        "record master-key requests as `LLMAUTH_PROXY_ADMIN_NAME`.",
        env=("LITELLM_PROXY_MASTER_KEY_ALIAS",),
    )

    # -- storage ------------------------------------------------------------------------------
    database_url: str | None = setting(
        None, _database_url,
        "Peewee database URL (`postgresql://...`, `sqlite:///path`). Default: SQLite file "
        "`llmauth.db` in the app's instance folder, created owner-only (mode 0600; the folder, "
        "when created for it, 0700). An empty value is an error (leave the key out for the "
        "default or `DATABASE_URL`).",
        yaml=("general_settings.database_url",), env=("DATABASE_URL",), secret=True,
    )
    auto_migrate: bool = setting(
        True, _bool, "Apply pending database migrations at `init_app`.",
    )
    redis_url: str | None = setting(
        None, _present_str("give a Redis URL (redis://host:6379/0)"),
        "Redis URL for shared counters, rate limits and cross-process cache invalidation. "
        "Without `REDIS_URL`, LiteLLM's `REDIS_HOST` (a host name or IP address; + "
        "`REDIS_PORT`, default 6379, and `REDIS_PASSWORD`) give "
        "`redis://[:password@]host:port/0`; without those, LiteLLM's YAML "
        "`litellm_settings.cache_params` (`type: redis`, `host`, `port`, `password`), "
        "else `router_settings.redis_host` (+ `redis_port`, `redis_password`) do.",
        env=("REDIS_URL",), secret=True,
    )

    # -- credentials and the chain ------------------------------------------------------------
    auth_order: tuple[str, ...] = setting(
        DEFAULT_AUTH_ORDER, _auth_order,
        "Order in which enabled authenticators run; the first decisive one wins.",
    )
    key_header_name: str | None = setting(
        None, _header_name,
        "Header that carries the key instead of the standard ones: when set, only this header "
        "is read (bare or `Bearer `).",
        yaml=("general_settings.litellm_key_header_name",),
    )
    max_credential_length: int = setting(
        8192, _number(int, 64), "Credentials longer than this are refused (401) unparsed.",
    )
    public_routes: tuple[str, ...] = setting(
        DEFAULT_PUBLIC_ROUTES, _route_list,
        "Routes that need no credential: paths, `/prefix/*` wildcards or route-group names. "
        "A value replaces the default (unlike LiteLLM, which adds to its built-in public "
        "routes): list the health paths in it to keep your probes public.",
        yaml=("general_settings.public_routes",),
    )
    trusted_proxy_ranges: tuple[Any, ...] = setting(
        (), _networks,
        "CIDRs of reverse proxies whose `X-Forwarded-For` (and identity headers) are trusted.",
        yaml=("general_settings.trusted_proxy_ranges",),
    )

    # -- authorization ------------------------------------------------------------------------
    allowed_routes: tuple[str, ...] = setting(
        (), _route_list, "Deployment-wide route allow-list (empty: no restriction).",
        yaml=("general_settings.allowed_routes",),
    )
    admin_only_routes: tuple[str, ...] = setting(
        (), _route_list,
        "Routes only proxy admins may call (an entry matching no route is logged at the "
        "first request).",
        yaml=("general_settings.admin_only_routes",),
    )
    allowed_ips: tuple[Any, ...] | None = setting(
        None, _optional_networks, "Client IP allow-list for every request (403 otherwise).",
        yaml=("general_settings.allowed_ips",),
    )
    model_access_groups: dict[str, Any] = setting(
        None, _model_groups,
        "Access groups: `{group: [model, ...]}`; also read from `model_list[].model_info`.",
    )
    model_alias_map: dict[str, Any] = setting(
        None, _string_map, "Global model aliases `{alias: model}`.",
        yaml=("litellm_settings.model_alias_map", "router_settings.model_group_alias"),
    )
    model_list: tuple[dict[str, Any], ...] = setting(
        (), _model_list,
        "LiteLLM `model_list`: model names, deployments (`litellm_params.model`), access "
        "groups and prices are read; other `litellm_params` (provider keys, endpoints) are "
        "not, and their `os.environ/NAME` references stay as written (the variable need not "
        "be set).",
        yaml=("model_list",),
    )
    default_team_member_permissions: tuple[str, ...] = setting(
        ("/key/info", "/key/health"), _route_list,
        "Key-management routes plain team members may call on their team's keys.",
    )

    # -- keys and cache -----------------------------------------------------------------------
    key_entropy_bytes: int = setting(
        32, _number(int, MIN_KEY_ENTROPY_BYTES),
        "Random bytes in a generated key (`sk-` + url-safe base64).",
        env=("LENGTH_OF_LITELLM_GENERATED_KEY",),
    )
    key_rotation_grace_period: Duration | None = setting(
        None, _duration, "Default `grace_period` of `/key/regenerate` (old secret keeps working).",
        env=("LITELLM_KEY_ROTATION_GRACE_PERIOD",),
    )
    cache_ttl: float = setting(
        60.0, _number(float, 0), "Seconds a looked-up key stays in the in-process cache.",
        yaml=("general_settings.user_api_key_cache_ttl",),
    )
    cache_max_size: int = setting(
        100_000, _number(int, 1), "Entries kept in the in-process key cache.",
        yaml=("general_settings.user_api_key_cache_max_size",),
    )
    negative_cache_ttl: float = setting(
        5.0, _number(float, 0),
        "Seconds an unknown key, and an opaque token the OAuth2 provider refused, is "
        "remembered as such.",
    )
    cache_sync_interval: float = setting(
        1.0, _number(float, 0.05),
        "Seconds between polls of the invalidation log (other processes' key changes).",
    )
    last_used_flush_interval: float = setting(
        30.0, _number(float, 0.05), "Seconds between batched writes of `last_used_at`.",
    )
    store_audit_logs: bool = setting(
        True, _bool, "Write an audit row for every key, user and team change.",
        yaml=("litellm_settings.store_audit_logs",), env=("LITELLM_STORE_AUDIT_LOGS",),
    )

    # -- JWT / OIDC (issue 3) -------------------------------------------------------------------
    enable_jwt_auth: bool = setting(
        False, _bool,
        "Accept JWTs (tokens with three dot-separated parts) signed by the configured "
        "identity provider(s). See docs/jwt.md.",
        yaml=("general_settings.enable_jwt_auth",),
    )
    jwt_public_key_url: tuple[str, ...] = setting(
        (), _url_list,
        "JWKS URL(s) or OIDC discovery URL(s) (`.../.well-known/openid-configuration`), "
        "comma-separated; a token's `kid` is looked up in each, in order.",
        yaml=("general_settings.jwt_public_key_url",), env=("JWT_PUBLIC_KEY_URL",),
    )
    jwt_audience: tuple[str, ...] = setting(
        (), _str_list,
        "Accepted `aud` values (comma-separated); when set, `aud` is required and verified.",
        yaml=("general_settings.jwt_audience",), env=("JWT_AUDIENCE",),
    )
    jwt_issuer: str | None = setting(
        None, _optional_str,
        "Expected `iss` (exact match); when set, `iss` is required and verified.",
        yaml=("general_settings.jwt_issuer",), env=("JWT_ISSUER",),
    )
    jwt_admin_scope: str | None = setting(
        "litellm_proxy_admin", _optional_str,
        "Scope (in `scope`/`scp`) that makes the caller proxy admin; empty disables it.",
        yaml=("general_settings.litellm_jwtauth.admin_jwt_scope",
              "general_settings.jwt_admin_scope"),
    )
    jwt_admin_allowed_routes: tuple[str, ...] = setting(
        ("management_routes", "spend_tracking_routes", "global_spend_tracking_routes",
         "info_routes"), _route_list,
        "Routes (paths, `/x/*`, group names) a JWT admin may call; LLM routes are not in "
        "the default, as in LiteLLM.",
        yaml=("general_settings.litellm_jwtauth.admin_allowed_routes",),
    )
    jwt_team_id_field: str | None = setting(
        None, _claim_path,
        "Claim (dot path) holding the caller's team id; a list value gives its first item. "
        "The team must exist (403) unless `team_id_upsert` creates it.",
        yaml=("general_settings.litellm_jwtauth.team_id_jwt_field",),
    )
    jwt_team_ids_field: str | None = setting(
        None, _claim_path,
        "Claim (dot path) holding a list of team ids; the first existing team that may "
        "call the requested model and route is used.",
        yaml=("general_settings.litellm_jwtauth.team_ids_jwt_field",),
    )
    jwt_team_id_default: str | None = setting(
        None, _optional_str, "Team id used when the team claim is missing (must exist).",
        yaml=("general_settings.litellm_jwtauth.team_id_default",),
    )
    jwt_team_id_upsert: bool = setting(
        False, _bool, "Create the team named by the token's team claim when it does not exist.",
        yaml=("general_settings.litellm_jwtauth.team_id_upsert",),
    )
    jwt_team_allowed_routes: tuple[str, ...] = setting(
        ("openai_routes", "info_routes", "mcp_routes"), _route_list,
        "Routes a JWT team principal may call.",
        yaml=("general_settings.litellm_jwtauth.team_allowed_routes",),
    )
    jwt_enforce_team_based_model_access: bool = setting(
        False, _bool, "Refuse (403) non-admin tokens that resolve to no team.",
        yaml=("general_settings.litellm_jwtauth.enforce_team_based_model_access",),
    )
    jwt_user_id_field: str | None = setting(
        None, _claim_path,
        "Claim (dot path) holding the user id; unset: the email claim is the id.",
        yaml=("general_settings.litellm_jwtauth.user_id_jwt_field",),
    )
    jwt_user_email_field: str | None = setting(
        None, _claim_path, "Claim (dot path) holding the user's email (default `email`).",
        yaml=("general_settings.litellm_jwtauth.user_email_jwt_field",),
    )
    jwt_user_allowed_email_domain: str | None = setting(
        None, _email_domain,
        "Only users whose email is in this domain are accepted (403 otherwise, also when "
        "the email is missing).",
        yaml=("general_settings.litellm_jwtauth.user_allowed_email_domain",
              "general_settings.user_allowed_email_domain"),
    )
    jwt_require_verified_email: bool = setting(
        True, _bool,
        "A token whose `email_verified` claim is false cannot name its user by its `email` "
        "(the user id by default) or pass `user_allowed_email_domain` with it: 403. Where "
        "another claim names the user, such an email is ignored (never stored). Off: "
        "LiteLLM's behaviour (the claim is not read).",
    )
    jwt_user_id_upsert: bool = setting(
        False, _bool, "Create the user (role internal_user) on first sight.",
        yaml=("general_settings.litellm_jwtauth.user_id_upsert",),
    )
    jwt_user_roles_field: str | None = setting(
        None, _claim_path,
        "Claim (dot path) with the user's IdP roles; with `user_allowed_roles`, a user "
        "token must carry one of them.",
        yaml=("general_settings.litellm_jwtauth.user_roles_jwt_field",),
    )
    jwt_user_allowed_roles: tuple[str, ...] = setting(
        (), _str_list, "IdP roles that make a token an internal_user.",
        yaml=("general_settings.litellm_jwtauth.user_allowed_roles",),
    )
    jwt_org_id_field: str | None = setting(
        None, _claim_path, "Claim (dot path) holding the organization id.",
        yaml=("general_settings.litellm_jwtauth.org_id_jwt_field",),
    )
    jwt_end_user_id_field: str | None = setting(
        None, _claim_path, "Claim (dot path) holding the end-user (customer) id.",
        yaml=("general_settings.litellm_jwtauth.end_user_id_jwt_field",),
    )
    jwt_roles_field: str | None = setting(
        None, _claim_path, "Claim (dot path) with roles matched against `role_mappings`.",
        yaml=("general_settings.litellm_jwtauth.roles_jwt_field",),
    )
    jwt_role_mappings: tuple[dict[str, Any], ...] = setting(
        (), _role_mappings,
        "`[{role, internal_role}]`: the first IdP role found maps the token to `proxy_admin`, "
        "`team` or `internal_user` (after the admin scope, team and user rules).",
        yaml=("general_settings.litellm_jwtauth.role_mappings",),
    )
    jwt_object_id_field: str | None = setting(
        None, _claim_path,
        "Claim (dot path) whose value becomes the team id (role `team`) or user id (role "
        "`internal_user`) of a token mapped by `role_mappings`.",
        yaml=("general_settings.litellm_jwtauth.object_id_jwt_field",),
    )
    jwt_scope_mappings: tuple[dict[str, Any], ...] = setting(
        (), _scope_mappings,
        "`[{scope, models, routes}]`: with `enforce_scope_based_access`, a token may call "
        "only the models and routes its scopes map to.",
        yaml=("general_settings.litellm_jwtauth.scope_mappings",),
    )
    jwt_enforce_scope_based_access: bool = setting(
        False, _bool, "Enforce `scope_mappings` (must be set together).",
        yaml=("general_settings.litellm_jwtauth.enforce_scope_based_access",),
    )
    jwt_enforce_rbac: bool = setting(
        False, _bool,
        "A token must map to a proxy admin, team or user through the configured fields "
        "(403 otherwise); without it such a token is an internal_user named by its `sub`.",
        yaml=("general_settings.litellm_jwtauth.enforce_rbac", "general_settings.enforce_rbac"),
    )
    jwt_custom_validate: Any = setting(
        None, _hook,
        "Hook `(claims) -> bool` (`\"module.function\"` or a callable; "
        "`@llmauth.jwt_claims_validator` registers one too): any answer but `True` is a 403.",
        yaml=("general_settings.litellm_jwtauth.custom_validate",),
    )
    jwt_issuers: tuple[dict[str, Any], ...] = setting(
        (), _jwt_issuers,
        "Several issuers, chosen by the token's `iss`: `[{issuer, jwks_url, audience | "
        "disable_audience_validation, user_id_jwt_field, ..., user_id_prefix}]`.",
        yaml=("general_settings.litellm_jwtauth.issuers",),
    )
    jwt_public_key_ttl: float = setting(
        600.0, _number(float, 1), "Seconds a fetched JWKS is used before it is refreshed.",
        yaml=("general_settings.litellm_jwtauth.public_key_ttl",),
    )
    jwt_public_key_stale_ttl: float = setting(
        3600.0, _number(float, 0),
        "Seconds after `public_key_ttl` during which the last JWKS is still served while "
        "the identity provider cannot be reached (then: 503).",
        yaml=("general_settings.litellm_jwtauth.public_key_stale_ttl",),
    )
    jwt_kid_refetch_cooldown: float = setting(
        30.0, _number(float, 0),
        "Least seconds between two refetches of a JWKS caused by an unknown `kid`.",
    )
    jwt_fetch_failure_backoff: float = setting(
        30.0, _number(float, 0),
        "Seconds a failed JWKS or discovery fetch is not retried (the stale copy or a 503 "
        "answers meanwhile).",
    )
    jwt_http_timeout: float = setting(
        5.0, _number(float, 0.1),
        "Timeout (seconds) of a request to the identity provider: the whole exchange "
        "(connect, answer and body; a JWKS fetch's retry included), not each socket read.",
    )
    jwt_allow_insecure_http: bool = setting(
        False, _bool,
        "Allow plain-http key, discovery and userinfo URLs on non-loopback hosts.",
    )
    jwt_algorithms: tuple[str, ...] = setting(
        ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
         "EdDSA"), _jwt_algorithms,
        "Accepted signature algorithms (asymmetric only; the key decides which one applies).",
    )
    jwt_leeway: float = setting(
        0.0, _leeway, "Clock skew (seconds, at most 300) allowed on exp/nbf/iat.",
        yaml=("general_settings.litellm_jwtauth.leeway",),
    )
    jwt_max_lifetime: float = setting(
        86400.0, _number(float, 0),
        "Longest accepted token lifetime `exp - iat` in seconds (401 beyond it; 0: no cap).",
    )
    jwt_required_claims: tuple[str, ...] = setting(
        ("exp", "iat"), _required_claims,
        "Claims every token must carry (`exp` is always required).",
    )
    jwt_require_at_jwt_typ: bool = setting(
        False, _bool,
        "Require the header `typ: at+jwt` (RFC 9068 access tokens; ID tokens are refused).",
    )
    jwt_max_token_length: int = setting(
        8192, _number(int, 256), "Longest JWT accepted (characters); longer ones are a 401.",
    )
    jwt_cache_ttl: float = setting(
        300.0, _number(float, 0),
        "Seconds a verified token's claims, and the principal they resolve to (at most "
        "`LLMAUTH_CACHE_TTL`), are reused (never beyond its `exp`).",
    )
    jwt_oidc_userinfo_enabled: bool = setting(
        False, _bool,
        "Send opaque (non-JWT, non-`sk-`) bearer tokens to the OIDC userinfo endpoint and "
        "use its answer as the claims.",
        yaml=("general_settings.litellm_jwtauth.oidc_userinfo_enabled",),
    )
    jwt_oidc_userinfo_endpoint: str | None = setting(
        None, _http_url, "The OIDC userinfo endpoint.",
        yaml=("general_settings.litellm_jwtauth.oidc_userinfo_endpoint",),
    )
    jwt_oidc_userinfo_cache_ttl: float = setting(
        300.0, _number(float, 0), "Seconds a userinfo answer is reused for the same token.",
        yaml=("general_settings.litellm_jwtauth.oidc_userinfo_cache_ttl",),
    )


    # -- OAuth2 introspection, OAuth2-proxy headers, custom auth (issue 3) -----------------------
    custom_auth: Any = setting(
        None, _hook,
        "Custom auth hook `(request, api_key)`: `\"module.function\"` (looked up next to the "
        "YAML file first, then on the import path) or a callable; `@llmauth.custom_auth` "
        "registers one too. See docs/oauth2.md for what it may return.",
        yaml=("general_settings.custom_auth",),
    )
    custom_auth_mode: str = setting(
        "on", _choice("on", "off", "auto"),
        "`on`: the hook decides every request (no answer is a 401). `auto`: the hook may "
        "also return a virtual key string (validated as a key) or `None` to let the other "
        "methods decide. `off`: the hook is not called.",
        yaml=("general_settings.custom_auth_settings.mode",),
    )
    custom_key_validate: Any = setting(
        None, _hook,
        "Hook `(request, principal) -> bool` run after every successful virtual-key "
        "authentication; anything but `True` is a 403. `@llmauth.custom_key_validate` "
        "registers one too.",
    )
    enable_oauth2_proxy_auth: bool = setting(
        False, _bool,
        "Accept identity headers set by an authenticating reverse proxy (oauth2-proxy, "
        "mod_auth_openidc), only from a direct peer inside `LLMAUTH_TRUSTED_PROXY_RANGES` "
        "(required).",
        yaml=("general_settings.enable_oauth2_proxy_auth",),
    )
    oauth2_config_mappings: dict[str, Any] = setting(
        None, _mapping,
        "Principal field → header name for proxy-header auth. Identity fields: `user_id`, "
        "`user_email`, `team_id`, `team_alias`, `org_id`, `end_user_id`, `models`. Privilege "
        "fields (`user_role`, `max_budget`, `soft_budget`, `budget_duration`, `tpm_limit`, "
        "`rpm_limit`, `max_parallel_requests`) need `LLMAUTH_OAUTH2_PROXY_SETS_PRIVILEGE_HEADERS`.",
        yaml=("general_settings.oauth2_config_mappings",),
    )
    oauth2_proxy_sets_privilege_headers: bool = setting(
        False, _bool,
        "Declare that the proxy strips any client copy of the mapped privilege headers and "
        "sets them itself; without it, mapping a privilege field fails `init_app`.",
    )
    enable_oauth2_auth: bool = setting(
        False, _bool,
        "Validate opaque bearer tokens on LLM and info routes with the IdP's introspection "
        "(RFC 7662) or token-info endpoint.",
        yaml=("general_settings.enable_oauth2_auth",),
    )
    oauth2_token_info_endpoint: str | None = setting(
        None, _http_url,
        "Introspection or token-info URL (https; plain http only to a loopback address).",
        yaml=("general_settings.oauth_token_info_endpoint",),
        env=("OAUTH_TOKEN_INFO_ENDPOINT",),
    )
    oauth2_allow_insecure_http: bool = setting(
        False, _bool,
        "Allow a plain-http token-info/introspection URL to a host that is not loopback "
        "(tokens and the client secret then cross the network unencrypted).",
    )
    oauth2_mode: str = setting(
        "auto", _choice("auto", "introspection", "token_info"),
        "`introspection`: POST `token=` with HTTP Basic client auth; `token_info`: GET with "
        "the bearer token; `auto`: introspection when the URL contains `introspect` and a "
        "client id and secret are set (LiteLLM's rule), else token-info.",
    )
    oauth2_client_id: str | None = setting(
        None, _optional_str, "Client id for introspection (HTTP Basic).",
        yaml=("general_settings.oauth_client_id",), env=("OAUTH_CLIENT_ID",),
    )
    oauth2_client_secret: str | None = setting(
        None, _optional_str, "Client secret for introspection (HTTP Basic).",
        yaml=("general_settings.oauth_client_secret",), env=("OAUTH_CLIENT_SECRET",),
        secret=True,
    )
    oauth2_audience: tuple[str, ...] = setting(
        (), _str_list,
        "Accepted `aud` values of the introspection/token-info answer (comma-separated): "
        "when set, the answer's `aud` (a string or a list) must name one, else 401. Without "
        "it, a token the provider issued for any other client or API is accepted.",
    )
    oauth2_user_id_field_name: str = setting(
        "sub", _nonempty_str, "Response field (dot path allowed) holding the user id.",
        yaml=("general_settings.oauth_user_id_field_name",), env=("OAUTH_USER_ID_FIELD_NAME",),
    )
    oauth2_user_role_field_name: str = setting(
        "role", _nonempty_str, "Response field (dot path allowed) holding a LiteLLM role.",
        yaml=("general_settings.oauth_user_role_field_name",),
        env=("OAUTH_USER_ROLE_FIELD_NAME",),
    )
    oauth2_user_team_id_field_name: str = setting(
        "team_id", _nonempty_str, "Response field (dot path allowed) holding the team id.",
        yaml=("general_settings.oauth_user_team_id_field_name",),
        env=("OAUTH_USER_TEAM_ID_FIELD_NAME",),
    )
    oauth2_unknown_role_default: str | None = setting(
        None, _role_name,
        "Role given when the response names a role that is not a LiteLLM role (default: "
        "such a token is refused with 401).",
        env=("LITELLM_OAUTH2_UNKNOWN_ROLE_DEFAULT",),
    )
    oauth2_cache_ttl: float = setting(
        60.0, _number(float, 0),
        "Seconds an introspection result is reused (never past the token's `exp`); also how "
        "long a revoked token may keep working. 0 disables the cache.",
    )
    oauth2_timeout: float = setting(
        5.0, _number(float, 0.1),
        "Seconds a call to the introspection/token-info endpoint may take in all (connect, "
        "answer and body), not per socket read.",
    )

    # -- budgets, spend, customers (issue 4) ----------------------------------------------------
    user_header_mappings: tuple[dict[str, Any], ...] = setting(
        (), _user_header_mappings,
        "Headers that name the caller's end user (customer): `[{header_name, "
        "litellm_user_role}]`; entries with role `customer` are read (after the "
        "`x-litellm-customer-id` and `x-litellm-end-user-id` headers, before the body's "
        "`user`). `internal_user` entries are accepted and not used: internal users are "
        "identified only by an authenticator.",
        yaml=("general_settings.user_header_mappings",),
    )
    enforce_user_param: bool = setting(
        False, _bool,
        "Every POST to an LLM API route must name its end user in its body (`user`, or "
        "`metadata.user_id` and the other body fields end users are read from; a form "
        "body's `user`): 400 `invalid_request_error`, param `user`, otherwise — master key "
        "included, as in LiteLLM. A header of `LLMAUTH_USER_HEADER_MAPPINGS` does not "
        "count (docs/api.md).",
        yaml=("general_settings.enforce_user_param",),
    )
    user_header_name: str | None = setting(
        None, _header_name,
        "Deprecated LiteLLM form of `LLMAUTH_USER_HEADER_MAPPINGS`: one header naming the "
        "end user (read after the mapped ones).",
        yaml=("general_settings.user_header_name",),
    )
    max_end_user_budget: int | None = setting(
        None, _money,
        "Default budget (USD) of an end user whose customer row sets no `max_budget` (also "
        "one with no row). Enforced by the budget guard. Default: none.",
        yaml=("litellm_settings.max_end_user_budget",),
    )

    # -- prices and spend (issue 4) -------------------------------------------------------------
    model_prices: dict[str, Any] = setting(
        None, _model_prices,
        "Model prices in USD per token, `{model: {input_cost_per_token, "
        "output_cost_per_token}}`; they win over `model_list[].model_info` prices and the "
        "shipped table (docs/spend.md). Numbers or decimal strings.",
    )
    unknown_model_price: dict[str, Any] | None = setting(
        None, _price,
        "Price of a model no table knows, `{input_cost_per_token, output_cost_per_token}` "
        "(USD per token). Default: free, with one warning per model name. Budgets reserve "
        "such a request at the highest price of the tables (its answer is charged at the "
        "price of the model it reports): see docs/budgets.md, unpriced models.",
    )
    default_max_tokens: int = setting(
        4096, _number(int, 0),
        "Completion tokens assumed for a request that sets no `max_tokens` when its "
        "worst-case cost is reserved against budgets.",
    )
    prompt_media_tokens: int = setting(
        48_169, _number(int, 0),
        "Prompt tokens counted for each image, audio clip, video or file in a request's "
        "prompt when its worst-case cost is reserved against budgets (and its tpm "
        "estimate, and the charge of an answer without usage). The default covers one "
        "image on every model of the shipped price table (gpt-4o-mini: 48,169 tokens); "
        "lower it when the models served count less (GPT-4o: 1,445; Anthropic: about "
        "1,600), raise it for long audio, video or many-page files (docs/budgets.md).",
    )
    spend_enabled: bool = setting(
        True, _bool,
        "Track spend: price every LLM-API request and write it to the spend log and the "
        "key/user/team/member/customer `spend` columns (docs/spend.md).",
    )
    spend_flush_interval: float = setting(
        1.0, _number(float, 0.01),
        "Seconds between writes of queued spend events; a crash (`kill -9`) loses at most "
        "the events settled since the last write.",
    )
    spend_batch_size: int = setting(
        500, _number(int, 1), "Spend events written per database transaction.",
    )
    spend_queue_limit: int = setting(
        100_000, _number(int, 100),
        "Spend events a process queues while the database cannot be written; beyond it new "
        "events are dropped (logged).",
    )

    # -- budgets (issue 4) ----------------------------------------------------------------------
    budgets_enabled: bool = setting(
        True, _bool,
        "Enforce budgets (global, team, team member, user, key, end user, per model per key) "
        "with reservations (docs/budgets.md).",
    )
    max_budget: int | None = setting(
        None, _budget,
        "Budget of the whole deployment in USD; every LLM request is then checked against "
        "it. Unset or 0: no global budget (as LiteLLM).",
        yaml=("litellm_settings.max_budget",),
    )
    budget_duration: str | None = setting(
        None, _duration_text,
        "Window of the global budget (`30s`, `10m`, `24h`, `7d`, `30d`, `1mo`); unset: it "
        "never resets.",
        yaml=("litellm_settings.budget_duration",),
    )
    end_user_budget_duration: str | None = setting(
        None, _duration_text,
        "Window of the default end-user budget (`LLMAUTH_MAX_END_USER_BUDGET`).",
    )
    budget_reservation_ttl: int = setting(
        3600, _number(int, 10),
        "Seconds after which the reservation of a request that never settled (its process "
        "crashed) is released; keep it above your longest stream, and above the longest "
        "database outage a process should ride through (docs/budgets.md). Also how long a "
        "budget counter row that holds nothing is kept after a request last touched it "
        "(the counter sweep of `flask llmauth reset-budgets`).",
    )
    budget_reset_interval: float = setting(
        0.0, _number(float, 0),
        "Seconds between runs of the in-process budget reset job (what `flask llmauth "
        "reset-budgets` does). 0: off; windows still reset on the next request that meets "
        "them.",
    )
    budget_lease_requests: int = setting(
        100, _number(int, 0),
        "Worst cases of the request at hand a process adds to its lease of a budget when the "
        "request does not fit (one database transaction per that many requests); also "
        "bounded by `LLMAUTH_BUDGET_LEASE_FRACTION`. 0: no leases, one reservation "
        "transaction per request (docs/budgets.md).",
    )
    budget_lease_fraction: float = setting(
        0.1, _fraction,
        "Largest share (0 < x <= 1) of a budget's room left that one lease extension may "
        "take beyond the request's own worst case.",
    )
    budget_lease_idle: float = setting(
        1.0, _number(float, 0.05),
        "Seconds after which a process gives back the unused part of an idle budget lease; "
        "also how often settled spend is taken out of the leases.",
    )

    # -- rate limits (issue 4) ------------------------------------------------------------------
    ratelimit_enabled: bool = setting(
        True, _bool, "Enforce rate limits and the failed-authentication limit.",
    )
    ratelimit_storage_uri: str | None = setting(
        None, _storage_uri,
        "`limits` storage URI for rate-limit counters (`redis://`, `rediss://`, "
        "`redis+cluster://`, `redis+sentinel://`, `memory://`, ...). Default: "
        "`LLMAUTH_REDIS_URL`, else `memory://` (per process).",
        secret=True,
    )
    ratelimit_storage_options: dict[str, Any] = setting(
        None, _storage_options,
        "Extra client options for the storage (Redis: default `socket_timeout` and "
        "`socket_connect_timeout` of 1 s).",
    )
    ratelimit_key_prefix: str = setting(
        "llmauth", _nonempty_str,
        "Namespace of this app's rate-limit keys in the storage, after limits' own "
        "`LIMITS:<namespace>/` (`LIMITS:LLMAUTH/llmauth/key/<key_id>/rpm/...`): give each app "
        "that shares a Redis its own (docs/rate_limits.md).",
    )
    ratelimit_window: int = setting(
        60, _number(int, 1), "Seconds of the rpm/tpm window (fixed window).",
        env=("LITELLM_RATE_LIMIT_WINDOW_SIZE",),
    )
    ratelimit_global_rpm: int | None = setting(
        None, _number(int, 1), "Requests per window for the whole deployment.",
    )
    ratelimit_global_tpm: int | None = setting(
        None, _number(int, 1), "Tokens per window for the whole deployment.",
    )
    ratelimit_global_max_parallel_requests: int | None = setting(
        None, _number(int, 1), "Requests in flight at once for the whole deployment.",
        yaml=("general_settings.global_max_parallel_requests",),
    )
    ratelimit_token_type: str = setting(
        "total", _choice("total", "input", "output"),
        "Which tokens tpm limits count: `total`, `input` (prompt) or `output` (completion).",
    )
    ratelimit_tpm_estimate: bool = setting(
        False, _bool,
        "Refuse up front a request whose prompt estimate + `max_tokens` does not fit the "
        "tokens left in a tpm window (default: refuse only when the window is used up).",
    )
    ratelimit_headers_enabled: bool = setting(
        True, _bool, "Send `x-ratelimit-*` headers on rate-limited requests.",
    )
    ratelimit_storage_down: str = setting(
        "closed", _choice("closed", "open", "memory"),
        "When the storage does not answer: `closed` (503 for requests that have limits), "
        "`open` (admit them without limits) or `memory` (count per process).",
    )
    ratelimit_retry_interval: float = setting(
        5.0, _number(float, 0.05),
        "Seconds between attempts to reach a storage that stopped answering.",
    )
    ratelimit_parallel_lease: int = setting(
        600, _number(int, 1),
        "Seconds after which a `max_parallel_requests` slot a crashed process never released "
        "is freed.",
    )
    ratelimit_multiprocess_memory: str = setting(
        "warn", _choice("warn", "refuse"),
        "With `memory://` storage and several worker processes: log a loud warning at "
        "start-up, or refuse to start.",
    )
    worker_processes: int | None = setting(
        None, _number(int, 1),
        "Number of worker processes serving the app, when the server cannot be asked "
        "(gunicorn and uWSGI are detected).",
    )
    auth_failure_limit: str = setting(
        "30/minute", _limit_string,
        "Failed authentications allowed per client IP (`limits` notation, e.g. "
        "`10/minute;100/hour`); then 429 until the window ends. Empty: off.",
    )
    auth_failure_ipv6_prefix: int = setting(
        64, _ipv6_prefix,
        "Prefix length under which IPv6 clients share one failed-authentication count (a "
        "client usually holds a whole /64); 128: per address. IPv4 (and IPv4-mapped IPv6) "
        "clients are counted per address.",
    )

    # -- management API -----------------------------------------------------------------------
    api_enabled: bool = setting(True, _bool, "Register the management JSON API blueprint.")
    api_prefix: str = setting(
        "", _url_prefix,
        "URL prefix of the management API (LiteLLM paths such as `/key/generate`).",
    )
    max_api_body_size: int = setting(
        1_048_576, _number(int, 1024),
        "Largest request body (bytes) the management API reads; a larger one is refused with "
        "413 before it is read (`MAX_CONTENT_LENGTH`, when smaller, still applies).",
    )
    max_request_size_mb: float | None = setting(
        None, _megabytes,
        "Largest request body (MB of 1024 × 1024 bytes) on every route the extension "
        "guards, LLM routes included; a larger one is a 413 JSON error, refused before it "
        "is read when `Content-Length` declares it, and read up to the limit only when "
        "chunked. On the management API the smaller of this and `LLMAUTH_MAX_API_BODY_SIZE` "
        "applies (`MAX_CONTENT_LENGTH`, when smaller, still applies). Unset: off (as in "
        "LiteLLM).",
        yaml=("general_settings.max_request_size_mb",),
    )
    cli_name: str = setting("llmauth", _cli_name, "Name of the `flask` CLI group.")

    @classmethod
    def table(cls) -> tuple[dataclasses.Field[Any], ...]:
        return tuple(f for f in dataclasses.fields(cls) if "parse" in f.metadata)

    def masked(self) -> dict[str, Any]:
        """Every setting as ``LLMAUTH_NAME -> value`` with secrets masked (for show-config).

        Secret settings are masked whole; inside mappings and lists (``model_list`` carries
        provider ``api_key`` values in LiteLLM configs) every value under a secret-looking
        name is masked too.
        """
        out: dict[str, Any] = {}
        for f in self.table():
            value = getattr(self, f.name)
            if f.metadata["parse"] in _MONEY_PARSERS:
                value = to_usd(value)  # held as integer units, configured in USD
            if f.metadata["secret"] and value:
                value = mask_secret(str(value))
            out[PREFIX + f.name.upper()] = _mask_nested(_jsonable(value))
        return out

    @property
    def max_request_body_bytes(self) -> int | None:
        """``max_request_size_mb`` in bytes (``None``: no bound)."""
        size = self.max_request_size_mb
        return None if size is None else int(size * 1024 * 1024)

    def source(self, name: str) -> str:
        """Where setting ``name`` came from (``"LLMAUTH_X"``, ``"YAML ..."``, ``"default"``)."""
        return getattr(self, "_sources", {}).get(name, "default")


#: Parsers of settings given in USD and held as integer units.
_MONEY_PARSERS = (_money, _budget)

#: Names whose values are secrets wherever they appear in a nested setting.
_SECRET_NAME = re.compile(
    r"(api_?key|secret|password|passwd|pwd|token|credential|private_?key|master_?key|"
    r"salt_?key|auth)", re.IGNORECASE)


def mask_secret(value: str) -> str:
    """Show that a secret is set without revealing it (`sk-...abcd` style, or `****`).

    URLs keep their scheme, host and path; a password in the authority and every
    secret-looking query parameter are masked.
    """
    if "://" in value:
        return _mask_url(value)
    if len(value) >= 16:
        return f"{value[:3]}...{value[-4:]}"
    return "****"


def _mask_url(value: str) -> str:
    from urllib.parse import parse_qsl, urlencode

    try:
        parts = urlsplit(value)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "****@" + netloc.rsplit("@", 1)[1]
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "****" if _SECRET_NAME.search(k) or k.lower() in (
                "pass", "user") else v) for k, v in pairs], safe="*")
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        return value.split("://", 1)[0] + "://****"


def _mask_nested(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (_mask_value(v) if isinstance(k, str) and _SECRET_NAME.search(k)
                    else _mask_nested(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_nested(v) for v in value]
    return value


def _mask_value(value: Any) -> Any:
    if value in (None, "", [], {}):
        return value
    if isinstance(value, str) and value.startswith("os.environ/"):
        return value  # a reference to a secret, not the secret
    return mask_secret(value) if isinstance(value, str) else "****"


def _jsonable(value: Any) -> Any:
    if callable(value):  # a hook given as a callable
        return f"<{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}>"
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, Duration):
        return value.text
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return value


# -- loading ------------------------------------------------------------------------------------

_FIELDS = {f.name: f for f in Settings.table()}
_BY_KEY = {PREFIX + name.upper(): name for name in _FIELDS}
#: Flask config keys under our prefix that belong to the test harness, not to the extension.
_IGNORED_KEYS = ("LLMAUTH_TEST_",)
_MISSING = object()


def load_settings(
    config: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    secret_loader: SecretLoader | None = None,
    warn: bool = True,
) -> Settings:
    """Resolve every setting for one app and validate it.

    ``warn=False`` leaves out the warnings about the config (a LiteLLM setting not honoured,
    a misspelt key, an unread environment variable), not the errors: for a look at the
    settings before ``init_app``, which warns about the same config again."""
    overrides = dict(overrides or {})
    environ = os.environ if environ is None else environ
    unknown = [name for name in overrides if name not in _FIELDS]
    if unknown:
        raise ConfigurationError(f"LLMAuth() got unknown option(s): {', '.join(sorted(unknown))}")
    for key in config:
        if key.startswith(PREFIX) and key not in _BY_KEY and not key.startswith(_IGNORED_KEYS):
            close = difflib.get_close_matches(key, _BY_KEY, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigurationError(f"{key}: unknown setting{hint}")

    config_file = overrides.get("config_file") or config.get(PREFIX + "CONFIG_FILE")
    try:
        yaml_doc = _read_yaml(_optional_str(config_file))
    except ValueError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        raise ConfigurationError(f"LLMAUTH_CONFIG_FILE: {exc}") from None
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, f in _FIELDS.items():
        key = PREFIX + name.upper()
        raw, source = _lookup(name, f, key, config, overrides, yaml_doc, environ, secret_loader)
        if raw is _MISSING and name in _FROM_PARTS:
            raw, source = _FROM_PARTS[name](key, yaml_doc, environ)
        sources[name] = source
        if raw is _MISSING:
            values[name] = f.default if f.default is not None else f.metadata["parse"](None)
            continue
        try:
            values[name] = f.metadata["parse"](raw)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"{key} (from {source}): {exc}") from None
    if yaml_doc:
        _warn_unknown_general_settings(yaml_doc, warn)
        _check_unimplemented_litellm_settings(yaml_doc, warn)
        _check_jwtauth_block(yaml_doc)
    if warn:
        _warn_unread_environment(config, overrides, environ)
    settings = Settings(**values)
    object.__setattr__(settings, "_sources", sources)
    return settings


#: Master keys LiteLLM's docs use as examples; never acceptable outside dev mode.
WEAK_MASTER_KEYS = frozenset({"sk-1234", "sk-12345", "sk-123456", "sk-master", "changeme"})
MIN_SECRET_LENGTH = 32
#: A secret with fewer distinct characters than this is a pattern, not a random string.
MIN_DISTINCT_CHARACTERS = 10


def secret_weakness(secret: str) -> str | None:
    """Why a server secret is weak, or ``None`` (never says anything about its value)."""
    if secret in WEAK_MASTER_KEYS or secret.lower().startswith(("sk-1234", "changeme")):
        return "is a well-known example value"
    if len(secret) < MIN_SECRET_LENGTH:
        return f"is shorter than {MIN_SECRET_LENGTH} characters"
    if len(set(secret)) < MIN_DISTINCT_CHARACTERS:
        return "is not random (too few distinct characters)"
    return None


def check_secrets(settings: Settings) -> None:
    """Refuse a missing or weak master key unless dev mode is on, and a weak salt key
    (``init_app`` calls it after :func:`load_settings`).

    The messages name the setting and where it came from; they never contain the value.
    """
    key = settings.master_key
    source = settings.source("master_key")
    problem = "no master key is configured" if not key else None
    if key:
        weakness = secret_weakness(key)
        if weakness is not None:
            problem = f"the master key {weakness}"
    if problem is not None:
        if not settings.insecure_dev_mode:
            where = "" if source == "default" else f" (from {source})"
            raise ConfigurationError(
                f"LLMAUTH_MASTER_KEY{where}: {problem}. Use at least {MIN_SECRET_LENGTH} "
                "random characters (e.g. 'sk-' + secrets.token_urlsafe(32)) in the Flask "
                "config key LLMAUTH_MASTER_KEY or the environment variable LITELLM_MASTER_KEY, "
                "or set LLMAUTH_INSECURE_DEV_MODE=True for development only."
            )
        log.warning("llmauth: INSECURE DEV MODE (LLMAUTH_INSECURE_DEV_MODE): %s. Anyone who "
                    "can guess the master key is proxy admin. Never run this in production.",
                    problem)
    salt = settings.salt_key
    if salt is not None:
        weakness = secret_weakness(salt)
        if weakness is not None:
            raise ConfigurationError(
                f"LLMAUTH_SALT_KEY (from {settings.source('salt_key')}): the salt key "
                f"{weakness}; use at least {MIN_SECRET_LENGTH} random characters.")


def _lookup(
    name: str,
    f: dataclasses.Field[Any],
    key: str,
    config: Mapping[str, Any],
    overrides: Mapping[str, Any],
    yaml_doc: Mapping[str, Any],
    environ: Mapping[str, str],
    secret_loader: SecretLoader | None,
) -> tuple[Any, str]:
    """The raw value of one setting and where it came from; ``None`` counts as unset."""
    if overrides.get(name) is not None:
        return overrides[name], f"LLMAuth({name}=...)"
    if config.get(key) is not None:
        return config[key], key
    for path in f.metadata["yaml"]:
        value = _dig(yaml_doc, path)
        if value is not _MISSING and value is not None:
            return _resolve_env_refs(value, environ, key, path), f"YAML {path}"
    if f.metadata["secret"] and secret_loader is not None:
        try:
            value = secret_loader(key)
        except Exception as exc:
            raise ConfigurationError(
                f"{key} (from secret loader): the secret loader failed with "
                f"{type(exc).__name__}") from None
        if value is not None:
            return value, "secret loader"
    for env_name in f.metadata["env"]:
        if environ.get(env_name) not in (None, ""):
            return environ[env_name], f"environment {env_name}"
    return _MISSING, "default"


def _redis_url_of(key: str, host: Any, port: Any, password: Any,
                  where: Callable[[str], str]) -> str:
    """``redis://[:password@]host:port/0`` (the password percent-encoded); errors name
    ``where(field)`` the value came from, never the password or the host."""
    if not isinstance(host, str) or not host.strip():
        raise ConfigurationError(f"{key} (from {where('host')}): the host must be a string")
    host = _url_host(host.strip())
    if host is None:
        raise ConfigurationError(f"{key} (from {where('host')}): not a host name or IP "
                                 "address (give a whole URL in REDIS_URL)")
    port = "6379" if port in (None, "") else str(port).strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(f"{key} (from {where('port')}): not a port number")
    if password not in (None, "") and not isinstance(password, str):
        raise ConfigurationError(f"{key} (from {where('password')}): the password must be a "
                                 "string")
    auth = f":{urllib.parse.quote(password, safe='')}@" if password else ""
    return f"redis://{auth}{host}:{int(port)}/0"


#: A host name or IPv4 address (an IPv6 address has colons, and is checked as one).
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _url_host(host: str) -> str | None:
    """``host`` as the host part of a URL (an IPv6 address bracketed), or ``None`` when it is
    no host name or IP address (a port, a URL, a path: not echoed, a URL may hold a
    password)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            return f"[{ipaddress.IPv6Address(bare)}]"
        except ValueError:
            return None
    return host if bare == host and _HOST_NAME.fullmatch(host) else None


def _redis_url_from_parts(key: str, yaml_doc: Mapping[str, Any],
                          environ: Mapping[str, str]) -> tuple[Any, str]:
    """The Redis a LiteLLM deployment names when nothing names a URL: ``REDIS_HOST`` (+
    ``REDIS_PORT``, ``REDIS_PASSWORD``), else YAML ``litellm_settings.cache_params`` (``type:
    redis``, ``host``, ``port``, ``password``), else ``router_settings.redis_host`` (+
    ``redis_port``, ``redis_password``); ``_MISSING`` when none does."""
    host = environ.get("REDIS_HOST", "").strip()
    if host:
        return _redis_url_of(key, host, environ.get("REDIS_PORT"),
                             environ.get("REDIS_PASSWORD"),
                             lambda name: f"environment REDIS_{name.upper()}"
                             ), "environment REDIS_HOST"
    for path, prefix in (("litellm_settings.cache_params", ""), ("router_settings", "redis_")):
        block = _dig(yaml_doc, path)
        if not isinstance(block, Mapping) or block.get(prefix + "host") in (None, ""):
            continue
        if not prefix and block.get("type") != "redis":
            continue  # a local, disk or S3 cache names no Redis
        where = f"YAML {path}" + (".redis_host" if prefix else "")
        host, port, password = (_resolve_env_refs(block.get(prefix + name), environ, key,
                                                  f"{path}.{prefix}{name}")
                                for name in ("host", "port", "password"))
        return _redis_url_of(key, host, port, password,
                             f"YAML {path}.{prefix}".__add__), where
    return _MISSING, "default"


#: Settings that, when nothing else sets them, are built from several values (environment
#: variables, then LiteLLM YAML entries).
_FROM_PARTS: dict[str, Callable[[str, Mapping[str, Any], Mapping[str, str]],
                                tuple[Any, str]]] = {
    "redis_url": _redis_url_from_parts,
}


def _warn_unread_environment(config: Mapping[str, Any], overrides: Mapping[str, Any],
                             environ: Mapping[str, str]) -> None:
    """Warn about ``LLMAUTH_*`` environment variables: they name Flask config keys, which
    the extension reads from ``app.config`` only (an ``LLMAUTH_DATABASE_URL`` exported in
    the shell would otherwise leave the app on its SQLite default without a word)."""
    unread = sorted(name for name in environ if name in _BY_KEY and name not in config
                    and _BY_KEY[name] not in overrides)
    if unread:
        log.warning(
            "llmauth: environment variable(s) %s not read: LLMAUTH_* names are Flask config "
            "keys (put them in app.config, e.g. app.config.from_prefixed_env() reads "
            "FLASK_LLMAUTH_*); the environment variables read directly are listed in "
            "docs/configuration.md", ", ".join(unread))


def _dig(doc: Mapping[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


#: The ``litellm_params`` of a ``model_list`` entry this library reads. The others (provider
#: credentials, endpoints...) are the LiteLLM proxy's: kept as written, ``os.environ/NAME``
#: unresolved, so a gateway need not hold its providers' keys to share LiteLLM's config.
_READ_LITELLM_PARAMS = frozenset({"model", "input_cost_per_token", "output_cost_per_token"})


def _resolve_env_refs(value: Any, environ: Mapping[str, str], key: str, path: str) -> Any:
    """Replace LiteLLM's ``os.environ/NAME`` references with the environment's values."""
    if isinstance(value, str) and value.startswith("os.environ/"):
        env_name = value[len("os.environ/"):]
        if env_name not in environ:
            raise ConfigurationError(
                f"{key} (from YAML {path}): environment variable {env_name} is not set")
        return environ[env_name]
    if isinstance(value, list):
        return [_resolve_env_refs(v, environ, key, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        unread = path.startswith("model_list[") and path.endswith("].litellm_params")
        return {k: v if unread and k not in _READ_LITELLM_PARAMS
                else _resolve_env_refs(v, environ, key, f"{path}.{k}")
                for k, v in value.items()}
    return value


def _read_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
    except OSError as exc:
        where = ("" if os.path.isabs(path)
                 else f" (from the working directory: {os.path.abspath(path)})")
        raise ConfigurationError(
            f"LLMAUTH_CONFIG_FILE: cannot read {path!r}{where}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(
            f"LLMAUTH_CONFIG_FILE: {path!r} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigurationError(f"LLMAUTH_CONFIG_FILE: {path!r} must hold a mapping")
    return doc


def _known_general_settings(section: str = "general_settings") -> set[str]:
    known = set()
    for f in _FIELDS.values():
        for path in f.metadata["yaml"]:
            parts = path.split(".")
            if parts[0] == section and len(parts) > 1:
                known.add(parts[1])
    return known


#: How alike an unread YAML key and a read one must be to be called a misspelling of it
#: (``master_kye``: 0.9); LiteLLM's own keys that flask_llmauth does not read stay below it
#: (``max_parallel_requests`` beside ``global_max_parallel_requests``: 0.86).
_TYPO_CUTOFF = 0.88


def _warn_unknown_general_settings(doc: Mapping[str, Any], warn: bool = True) -> None:
    """Keys of ``general_settings`` / ``litellm_settings`` this library does not read are
    LiteLLM's business (logged at INFO); one that looks like a misspelling of a key it
    reads is a warning naming that key, since the setting it meant is silently unset."""
    for section in ("general_settings", "litellm_settings"):
        block = doc.get(section) or {}
        if not isinstance(block, Mapping):
            raise ConfigurationError(f"LLMAUTH_CONFIG_FILE: {section} must be a mapping")
        if not warn:
            continue
        known = _known_general_settings(section)
        ignored = sorted(str(k) for k in set(block) - known)
        for name in ignored:
            close = difflib.get_close_matches(name, known, n=1, cutoff=_TYPO_CUTOFF)
            if close:
                log.warning("llmauth: %s.%s in LLMAUTH_CONFIG_FILE is not read "
                            "(did you mean %s.%s?)", section, name[:80], section, close[0])
        if ignored and section == "general_settings":
            log.info("llmauth: general_settings keys not used by flask_llmauth: %s", ignored)


#: LiteLLM settings that add a check flask_llmauth does not make, with what to do instead.
#: Set to anything but an off value (null, false, 0, empty) they refuse to start: ignored,
#: the deployment would run without a protection its operator configured.
UNIMPLEMENTED_PROTECTIONS: dict[str, str] = {
    "general_settings.reject_clientside_metadata_tags":
        "drop or refuse `metadata.tags` in your view",
    "general_settings.max_response_size_mb": "bound the upstream answer in your view",
    "general_settings.role_permissions":
        "limit routes and models per key, team or user (allowed_routes, models)",
    "general_settings.custom_key_generate": "wrap /key/generate in your app",
    "general_settings.custom_key_update": "wrap /key/update in your app",
    "general_settings.custom_key_policy": "wrap the key endpoints in your app",
    "general_settings.enforce_fallback_model_access":
        "check each fallback with the model-access helper before calling it",
    "general_settings.pass_through_endpoints":
        "write the pass-through views in your app (they are authenticated as any route)",
    "litellm_settings.upperbound_key_generate_params": "wrap /key/generate in your app",
    "litellm_settings.key_generation_settings": "wrap /key/generate in your app",
    "litellm_settings.max_internal_user_budget": "set max_budget on each user",
}
#: LiteLLM settings that relax a check; flask_llmauth keeps the check (a warning says so).
UNIMPLEMENTED_RELAXATIONS: dict[str, str] = {
    "general_settings.allow_requests_on_db_unavailable":
        "a database outage is a 503, never an unchecked request",
    "general_settings.allow_client_side_credentials":
        "the gateway decides which body fields reach a provider",
    "general_settings.use_x_forwarded_for":
        "X-Forwarded-For is trusted only from LLMAUTH_TRUSTED_PROXY_RANGES",
}


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == 0 or value in ("", [], {})


def _check_unimplemented_litellm_settings(doc: Mapping[str, Any], warn: bool = True) -> None:
    """Refuse a LiteLLM protection this library lacks; warn about a relaxation it ignores."""
    for path, instead in UNIMPLEMENTED_PROTECTIONS.items():
        value = _dig(doc, path)
        if value is not _MISSING and not _is_off(value):
            raise ConfigurationError(
                f"YAML {path}: not supported by flask_llmauth, so the check it asks for "
                f"would be missing; remove it and {instead} (docs/configuration.md)")
    for path, kept in UNIMPLEMENTED_RELAXATIONS.items():
        value = _dig(doc, path)
        if warn and value is not _MISSING and not _is_off(value):
            log.warning("llmauth: YAML %s is not supported by flask_llmauth and has no "
                        "effect: %s", path, kept)


JWTAUTH_PATH = "general_settings.litellm_jwtauth"
#: LiteLLM ``litellm_jwtauth`` fields this library does not implement (refused, never ignored).
JWTAUTH_UNSUPPORTED = frozenset({
    "team_alias_jwt_field", "org_alias_jwt_field", "team_claim_fallback",
    "fallback_to_db_teams", "jwt_litellm_role_map", "sync_user_role_and_teams",
    "public_allowed_routes", "virtual_key_claim_field", "virtual_key_mapping_cache_ttl",
    "unregistered_jwt_client_behavior", "routing_overrides", "agent_id_jwt_field",
})


def _check_jwtauth_block(doc: Mapping[str, Any]) -> None:
    """Unknown keys under ``litellm_jwtauth`` are an error at ``init_app``, as in LiteLLM."""
    block = _dig(doc, JWTAUTH_PATH)
    if block is _MISSING or block is None:
        return
    if not isinstance(block, Mapping):
        raise ConfigurationError(f"YAML {JWTAUTH_PATH}: must be a mapping")
    prefix = JWTAUTH_PATH + "."
    known = {path[len(prefix):] for f in _FIELDS.values() for path in f.metadata["yaml"]
             if path.startswith(prefix)}
    unsupported = sorted(set(block) & JWTAUTH_UNSUPPORTED)
    if unsupported:
        raise ConfigurationError(
            f"YAML {JWTAUTH_PATH}: {unsupported} not supported by flask_llmauth")
    unknown = sorted(str(k) for k in set(block) - known)
    if unknown:
        raise ConfigurationError(
            f"YAML {JWTAUTH_PATH}: Invalid arguments provided: {unknown} (known: "
            f"{sorted(known)})")


def documentation_table() -> str:
    """The Markdown configuration table (docs/configuration.md is generated from it)."""
    rows = [
        "| Flask config key | default | LiteLLM YAML | environment | description |",
        "|---|---|---|---|---|",
    ]
    for f in Settings.table():
        default = _jsonable(f.default)
        shown = "—" if default in (None, (), [], "") else f"`{json.dumps(default)}`"
        yaml_paths = ", ".join(f"`{p}`" for p in f.metadata["yaml"]) or "—"
        env = ", ".join(f"`{e}`" for e in f.metadata["env"]) or "—"
        doc = f.metadata["doc"] + (" *(secret)*" if f.metadata["secret"] else "")
        rows.append(f"| `{PREFIX}{f.name.upper()}` | {shown} | {yaml_paths} | {env} | {doc} |")
    return "\n".join(rows) + "\n" + _unimplemented_section()


def _unimplemented_section() -> str:
    """The docs section on the LiteLLM YAML settings this library does not implement."""
    lines = [
        "",
        "## LiteLLM settings flask_llmauth does not implement",
        "",
        "A LiteLLM setting that adds a check flask_llmauth does not make refuses to start when "
        "it is on (any value but null, false, 0 or empty), naming the key: ignored, it would "
        "leave the deployment without a protection its operator configured.",
        "",
        "| LiteLLM YAML | instead |",
        "|---|---|",
        *(f"| `{path}` | {instead} |" for path, instead in UNIMPLEMENTED_PROTECTIONS.items()),
        "",
        "A LiteLLM setting that relaxes a check is not honoured (the check stays); `init_app` "
        "logs a warning naming it.",
        "",
        "| LiteLLM YAML | what happens |",
        "|---|---|",
        *(f"| `{path}` | {kept} |" for path, kept in UNIMPLEMENTED_RELAXATIONS.items()),
        "",
        "`litellm_jwtauth` fields flask_llmauth does not implement are refused too "
        "(docs/jwt.md). Other `general_settings` and `litellm_settings` keys (routing, "
        "caching, logging, alerting, UI, `max_parallel_requests` — the LiteLLM router's "
        "per-deployment cap; the deployment-wide one is `global_max_parallel_requests`) are "
        "the LiteLLM proxy's and are not read (`general_settings` ones are listed at INFO); "
        "one that looks like a misspelling of a key flask_llmauth reads is a warning.",
    ]
    return "\n".join(lines) + "\n"
