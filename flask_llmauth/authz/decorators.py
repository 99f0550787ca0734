"""View decorators: ``@require_role``, ``@require_scope``, ``@require_model_access``.

Put them *below* ``@app.route`` so the route registers the checked view. ``require_role``
also tells the request hook that this view's roles replace the LiteLLM role table; a proxy
admin passes every role check.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import request

from ..errors import Forbidden
from ..principal import Role
from .routes import ATTR_ROLES

F = TypeVar("F", bound=Callable[..., Any])


def require_role(*roles: str | Role) -> Callable[[F], F]:
    """Allow the view only to principals holding one of ``roles`` (names or values)."""
    if not roles:
        raise ValueError("require_role needs at least one role")
    allowed = frozenset(Role.parse(r).value for r in roles)

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from ..extension import require_principal

            principal = require_principal()
            if not principal.is_admin and principal.role.value not in allowed:
                raise Forbidden(
                    f"This route needs one of the roles {sorted(allowed)}; your role is "
                    f"{principal.role.value}.", reason="required_role_missing",
                )
            return view(*args, **kwargs)

        setattr(wrapper, ATTR_ROLES, allowed)
        return wrapper  # type: ignore[return-value]

    return decorator


def require_scope(*scopes: str) -> Callable[[F], F]:
    """Allow the view only to principals whose token carries every one of ``scopes``
    (the master key passes; a virtual key carries no scopes)."""
    if not scopes or not all(isinstance(s, str) and s for s in scopes):
        raise ValueError("require_scope needs at least one scope, each a non-empty string")
    needed = frozenset(scopes)

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from ..extension import require_principal

            principal = require_principal()
            missing = needed - principal.scopes
            if missing and not principal.is_master_key:
                raise Forbidden(f"Missing required scope(s): {sorted(missing)}",
                                error_type="insufficient_scope", reason="scope_missing")
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def check_model_access(model: str) -> None:
    """Raise 403 unless the current principal may call ``model`` (for views that pick a
    model themselves, e.g. a default model when the body names none)."""
    from ..extension import require_principal, state

    denial = state().models.denial(require_principal(), model)
    if denial is not None:
        raise denial


def require_model_access(field: str = "model") -> Callable[[F], F]:
    """Check the JSON body's ``field`` (default ``model``) against the principal's models.

    The request hook already does this for LLM routes; use it on other views that take a
    model.
    """
    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            body = request.get_json(silent=True)
            model = body.get(field) if isinstance(body, dict) else None
            if isinstance(model, str):
                check_model_access(model)
            return view(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorator


def allowed_models(candidates: list[str]) -> list[str]:
    """The subset of ``candidates`` the current principal may call (for ``/v1/models``)."""
    from ..extension import require_principal, state

    return state().models.allowed_models(require_principal(), candidates)
