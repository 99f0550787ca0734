"""Custom auth: a hook of the host application decides who is calling.

The hook is ``hook(request, api_key)`` (``api_key`` is the credential the request carries,
``""`` when it carries none), registered with ``@llmauth.custom_auth`` or named in
``LLMAUTH_CUSTOM_AUTH`` / YAML ``general_settings.custom_auth`` as ``"module.function"``. A
coroutine function works too (it runs in a fresh event loop per call, so a plain function
is cheaper). What it may answer:

* a :class:`~flask_llmauth.principal.Principal`: used as given (its ``method`` becomes
  ``"custom"``); when it carries no records its user and team are loaded, so blocked flags
  and team models apply;
* a mapping of principal fields (see :data:`MAPPING_FIELDS`): validated strictly and built
  into a principal like any other method's;
* a string: in mode ``auto`` it is validated as a virtual key (the key's own principal,
  never the master key); in mode ``on`` it is a 401;
* ``None``: in mode ``auto`` the other methods of the chain decide; in mode ``on`` a 401;
* raising an :class:`~flask_llmauth.errors.LLMAuthError`: its status and body are sent.

Anything else (another exception, a malformed mapping, a principal without identity, any
other type) is a 401 — never an anonymous principal. The reason is logged, the hook's
exception message is not (it may hold the credential).

``custom_key_validate`` is a second hook, ``hook(request, principal) -> bool``, run after
every successful virtual-key authentication; anything but ``True`` refuses with 403.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..credentials import Credentials
from ..errors import ConfigurationError, Forbidden, LLMAuthError, Unauthenticated
from ..principal import Principal, Role
from .base import AuthContext, Authenticator, has_identity
from .fields import (
    IDENTITY_FIELDS,
    LIMIT_FIELDS,
    build_principal,
    identity_value,
    limit_value,
    string_list,
)

if TYPE_CHECKING:
    from ..extension import LLMAuth, LLMAuthState

log = logging.getLogger("flask_llmauth")

#: Keys a hook's mapping may hold (``user_role`` is LiteLLM's name for ``role``).
MAPPING_FIELDS = frozenset(IDENTITY_FIELDS + LIMIT_FIELDS + (
    "role", "user_role", "models", "allowed_routes", "scopes", "metadata",
))
HOOK_MODULE_PREFIX = "_llmauth_hooks."


# -- resolving "module.function" ---------------------------------------------------------------


def resolve_hook(ref: Any, config_file: str | None, setting_key: str) -> Callable[..., Any] | None:
    """Turn a setting value into a callable, at ``init_app`` (errors name the setting).

    ``"pkg.module.func"`` is looked up as ``pkg/module.py`` next to the YAML config file
    first (as LiteLLM resolves ``custom_auth``), then imported from the import path.
    """
    if ref is None or callable(ref):
        return ref
    module_name, _, func_name = str(ref).rpartition(".")
    if not module_name or not func_name:
        raise ConfigurationError(f"{setting_key}: {ref!r} must be 'module.function'")
    module: ModuleType | None = None
    if config_file:
        base = os.path.dirname(os.path.abspath(config_file))
        path = os.path.join(base, *module_name.split(".")) + ".py"
        if os.path.isfile(path):
            module = _load_file(module_name, path, setting_key)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ConfigurationError(
                f"{setting_key}: cannot import module {module_name!r} "
                f"({type(exc).__name__}: {exc})") from None
    hook = getattr(module, func_name, None)
    if not callable(hook):
        raise ConfigurationError(
            f"{setting_key}: module {module_name!r} has no function {func_name!r}")
    return hook


def _load_file(module_name: str, path: str, setting_key: str) -> ModuleType:
    name = HOOK_MODULE_PREFIX + module_name
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"{setting_key}: cannot load {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise ConfigurationError(
            f"{setting_key}: loading {path!r} failed ({type(exc).__name__}: {exc})") from None
    return module


def call_hook(hook: Callable[..., Any], *args: Any) -> Any:
    """Call a hook; await it when it is a coroutine function."""
    result = hook(*args)
    if inspect.isawaitable(result):
        result = _run(result)
    return result


def _run(awaitable: Any) -> Any:
    async def wait() -> Any:
        return await awaitable

    coroutine = wait()
    try:
        return asyncio.run(coroutine)
    except RuntimeError:
        coroutine.close()
        if hasattr(awaitable, "close"):
            awaitable.close()
        raise


# -- the authenticator --------------------------------------------------------------------------


class CustomAuthenticator:
    name = "custom"

    def __init__(self, state: LLMAuthState, ext: LLMAuth,
                 configured: Callable[..., Any] | None, mode: str) -> None:
        self.state = state
        self.callbacks = ext.callbacks
        self.configured = configured
        self.auto = mode == "auto"

    def active_step(self) -> CustomAuthenticator | None:
        """Idle (``None``) while no hook is configured or registered (see :class:`~.base.Chain`)."""
        return self if self.callbacks.get("custom_auth") or self.configured else None

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        hook = self.callbacks.get("custom_auth") or self.configured
        if hook is None:
            return None
        try:
            result = call_hook(hook, ctx.request, ctx.credentials.token or "")
        except LLMAuthError:
            raise
        except Exception as exc:
            log.warning("llmauth: custom auth hook raised %s", type(exc).__name__)
            raise Unauthenticated(reason="custom_auth_raised") from None
        return self.interpret(result, ctx)

    def interpret(self, result: Any, ctx: AuthContext) -> Principal | None:
        if result is None:
            if self.auto:
                return None
            raise Unauthenticated(reason="custom_auth_returned_none")
        if isinstance(result, Principal):
            return self._from_principal(result)
        if isinstance(result, str):
            if not self.auto:
                raise Unauthenticated(reason="custom_auth_returned_string_in_mode_on")
            return self._as_virtual_key(result, ctx)
        if isinstance(result, Mapping):
            return principal_from_mapping(self.state, result)
        log.warning("llmauth: custom auth hook returned a %s", type(result).__name__)
        raise Unauthenticated(reason="custom_auth_bad_return")

    def _from_principal(self, principal: Principal) -> Principal:
        if not has_identity(principal):
            raise Unauthenticated(reason="custom_auth_empty_identity")
        if principal.key is None and principal.user is None and principal.team is None:
            rebuilt = build_principal(
                self.state.identities, self.name, role=principal.role,
                user_id=principal.user_id, user_email=principal.user_email,
                team_id=principal.team_id, org_id=principal.org_id,
                end_user_id=principal.end_user_id, models=principal.models,
                allowed_routes=principal.allowed_routes, scopes=principal.scopes,
                limits=principal.limits, claims=principal.claims, metadata=principal.metadata,
            )
            return rebuilt.replace(key_id=principal.key_id, key_name=principal.key_name,
                           key_alias=principal.key_alias)
        return principal.replace(method=self.name)

    def _as_virtual_key(self, key: str, ctx: AuthContext) -> Principal:
        if not key or len(key) > self.state.settings.max_credential_length:
            raise Unauthenticated(reason="custom_auth_bad_key_string")
        inner = AuthContext(ctx.request, Credentials(key, "custom_auth"), ctx.route)
        principal = self.state.authenticators["virtual_key"].authenticate(inner)
        if principal is None:
            raise Unauthenticated(reason="custom_auth_bad_key_string")
        return principal


def principal_from_mapping(state: LLMAuthState, data: Mapping[str, Any]) -> Principal:
    """Build a principal from a hook's mapping; any unknown key or bad value is a 401."""
    unknown = [str(k)[:40] for k in data if k not in MAPPING_FIELDS]
    if unknown:
        log.warning("llmauth: custom auth hook returned unknown field(s) %s", sorted(unknown))
        raise Unauthenticated(reason="custom_auth_unknown_fields")
    try:
        values = _mapping_values(data)
    except (ValueError, TypeError) as exc:
        log.warning("llmauth: custom auth hook returned a bad value: %s", exc)
        raise Unauthenticated(reason="custom_auth_bad_field") from None
    return build_principal(state.identities, "custom", **values)


def _mapping_values(data: Mapping[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in IDENTITY_FIELDS:
        if data.get(name) is not None:
            try:
                values[name] = identity_value(data[name])
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None
    if "role" in data and "user_role" in data:
        raise ValueError("both role and user_role given")
    role = data.get("role", data.get("user_role"))
    if role is not None:
        values["role"] = Role.parse(role)
    for name in ("models", "allowed_routes"):
        if data.get(name) is not None:
            values[name] = string_list(data[name], split=False)
    scopes = data.get("scopes")
    if scopes is not None:
        if isinstance(scopes, (set, frozenset)):
            scopes = sorted(scopes)
        values["scopes"] = string_list(scopes.split() if isinstance(scopes, str) else scopes,
                                       split=False)
    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise ValueError("metadata must be a mapping")
        values["metadata"] = dict(metadata)
    limits = {}
    for name in LIMIT_FIELDS:
        if data.get(name) is not None:
            try:
                limits[name] = limit_value(name, data[name], from_text=False)
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None
    team_alias = values.pop("team_alias", None)
    if team_alias is not None:
        values["metadata"] = {**values.get("metadata", {}), "team_alias": team_alias}
    if limits:
        values["limits"] = limits
    if not (values.get("user_id") or values.get("team_id") or values.get("end_user_id")):
        raise ValueError("names no user_id, team_id or end_user_id")
    return values


# -- custom_key_validate ----------------------------------------------------------------------


class KeyValidation:
    """Wraps the virtual-key authenticator: every key principal passes the hook or is a 403."""

    #: A key's principal always names its key (see :class:`~.base.Chain`).
    yields_identity = True

    def __init__(self, inner: Authenticator, ext: LLMAuth,
                 configured: Callable[..., Any] | None) -> None:
        self.inner = inner
        self.name = inner.name
        self.callbacks = ext.callbacks
        self.configured = configured

    def __getattr__(self, name: str) -> Any:  # the wrapped authenticator's API (cache, load)
        return getattr(self.inner, name)

    def active_step(self) -> Authenticator:
        """The wrapped authenticator itself while no hook is configured or registered."""
        return self if self.callbacks.get("custom_key_validate") or self.configured else self.inner

    def authenticate(self, ctx: AuthContext) -> Principal | None:
        principal = self.inner.authenticate(ctx)
        hook = self.callbacks.get("custom_key_validate") or self.configured
        if principal is None or hook is None:
            return principal
        try:
            verdict = call_hook(hook, ctx.request, principal)
        except LLMAuthError:
            raise
        except Exception as exc:
            log.warning("llmauth: custom key validation hook raised %s", type(exc).__name__)
            raise Forbidden("This key was refused by the key validation policy.",
                            reason="custom_key_validate_raised") from None
        if verdict is not True:
            raise Forbidden("This key was refused by the key validation policy.",
                            reason="custom_key_validate_refused")
        return principal


# -- factories (wired in extension.AUTHENTICATOR_FACTORIES) --------------------------------------


def custom_factory(state: LLMAuthState, ext: LLMAuth) -> Authenticator | None:
    settings = state.settings
    if settings.custom_auth_mode == "off":
        return None
    hook = resolve_hook(settings.custom_auth, settings.config_file, "LLMAUTH_CUSTOM_AUTH")
    return CustomAuthenticator(state, ext, hook, settings.custom_auth_mode)


def with_key_validation(inner: Authenticator, state: LLMAuthState, ext: LLMAuth) -> Authenticator:
    settings = state.settings
    hook = resolve_hook(settings.custom_key_validate, settings.config_file,
                        "LLMAUTH_CUSTOM_KEY_VALIDATE")
    return KeyValidation(inner, ext, hook)
