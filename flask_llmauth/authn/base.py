"""The authenticator protocol and the chain that runs authenticators in order.

An authenticator looks at the request's credential and answers with a :class:`Principal`
(decisive: this is the caller), ``None`` (not mine: let the next one try) or raises an
:class:`~flask_llmauth.errors.LLMAuthError` (decisive: refuse). The chain never turns a
failure into an anonymous identity: an exception that is not an auth error, a returned
object that is not a principal, or a principal without an identity are all a 401.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple, Protocol

from flask import Request

from ..authz.routes import RouteInfo
from ..credentials import Credentials
from ..errors import LLMAuthError, Unauthenticated
from ..principal import Principal, Role

log = logging.getLogger("flask_llmauth")


class AuthContext(NamedTuple):
    """What an authenticator may look at (immutable; one per request)."""

    request: Request
    credentials: Credentials
    route: RouteInfo


#: ``new_context((request, credentials, route))``: an :class:`AuthContext` built without the
#: Python-level ``__new__`` of a named tuple (one is built per request).
new_context = partial(tuple.__new__, AuthContext)


class Authenticator(Protocol):
    #: Name used in ``LLMAUTH_AUTH_ORDER`` and as ``Principal.method``.
    name: str

    def authenticate(self, ctx: AuthContext) -> Principal | None: ...


def has_identity(principal: object) -> bool:
    """A principal must carry a role and someone it stands for."""
    return (
        isinstance(principal, Principal)
        and isinstance(principal.role, Role)
        and bool(principal.method)
        and bool(principal.user_id or principal.team_id or principal.key_id
                 or principal.end_user_id)
    )


class Chain:
    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the steps run per request (again whenever a callback is registered).

        An authenticator with an ``active_step()`` method answers which object runs for it
        now: itself, a cheaper equivalent (a wrapper whose hook is not registered answers
        with what it wraps) or ``None`` (idle: a custom-auth method with no hook would
        return ``None`` on every request). Each step is ``(authenticator, checked)``: the
        principal of an authenticator that declares ``yields_identity = True`` (built-ins
        whose principals always carry one) is not checked again per request; every other
        one is.
        """
        steps = []
        for authenticator in self.authenticators:
            active_step = getattr(authenticator, "active_step", None)
            step = authenticator if active_step is None else active_step()
            if step is not None:
                steps.append((step, not getattr(step, "yields_identity", False)))
        self._steps: tuple[tuple[Authenticator, bool], ...] = tuple(steps)
        #: The authenticator tried first (``None`` when no step is active).
        self.first: Authenticator | None = steps[0][0] if steps else None

    def authenticate(self, ctx: AuthContext) -> Principal:
        for authenticator, checked in self._steps:
            try:
                result = authenticator.authenticate(ctx)
            except LLMAuthError as error:
                if error.status < 400:  # an "error" that would answer 2xx/3xx is a deny
                    raise Unauthenticated(reason=f"{authenticator.name}_bad_error") from None
                raise
            except Exception as exc:
                log.error("llmauth: authenticator %s failed: %s", authenticator.name,
                          type(exc).__name__)
                raise Unauthenticated(reason=f"{authenticator.name}_error") from None
            if result is None:
                continue
            if checked and not has_identity(result):
                raise Unauthenticated(reason=f"{authenticator.name}_empty_identity")
            return result
        if ctx.credentials.token is None:
            raise Unauthenticated("Authentication Error, No api key passed in.",
                                  reason="no_credentials")
        raise Unauthenticated(reason="unrecognised_credential")
