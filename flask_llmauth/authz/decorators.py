"""View decorators: ``@require_role``, ``@require_scope``, ``@require_model_access``.

Put them *below* ``@app.route`` so the route registers the checked view. ``require_role``
also tells the request hook that this view's roles replace the LiteLLM role table; a proxy
admin passes every role check. The request hook checks the roles and scopes too, also when
the decorator sat above the route decorator (it then warns, see ``ATTR_UNAPPLIED``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any, TypeVar

from flask import request

from ..bodies import INVALID, form, get_json
from ..errors import BadRequest, Forbidden
from ..principal import Role
from .policy import MAX_MODEL_NAME
from .routes import ATTR_ROLES, ATTR_SCOPES, ATTR_UNAPPLIED

F = TypeVar("F", bound=Callable[..., Any])


def _no_collections(name: str, args: tuple[Any, ...], example: str) -> None:
    """``require_role(["a", "b"])`` is a common slip (other libraries take a list)."""
    if any(isinstance(a, (list, tuple, set, frozenset)) for a in args):
        raise ValueError(f"{name} takes each one as its own argument, not a list: "
                        f"@{name}({example})")


def require_role(*roles: str | Role) -> Callable[[F], F]:
    """Allow the view only to principals holding one of ``roles`` (names or values)."""
    if not roles:
        raise ValueError("require_role needs at least one role")
    _no_collections("require_role", roles, "'PROXY_ADMIN', 'internal_user'")
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
        _mark_unapplied(view, "require_role", ATTR_ROLES, allowed)
        return wrapper  # type: ignore[return-value]

    return decorator


def require_scope(*scopes: str) -> Callable[[F], F]:
    """Allow the view only to principals whose token carries every one of ``scopes``
    (the master key passes; a virtual key carries no scopes)."""
    _no_collections("require_scope", scopes, "'reports:read', 'reports:write'")
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

        setattr(wrapper, ATTR_SCOPES, needed | getattr(view, ATTR_SCOPES, frozenset()))
        _mark_unapplied(view, "require_scope", ATTR_SCOPES,
                        needed | getattr(view, ATTR_SCOPES, frozenset()))
        return wrapper  # type: ignore[return-value]

    return decorator


def _mark_unapplied(view: Any, name: str, attr: str | None = None, value: Any = None) -> None:
    """Mark the undecorated ``view``: if Flask registered it (the decorator sat above the
    route decorator) the request hook still enforces ``attr`` (the roles or scopes) and
    warns. Set after ``wraps`` copied the view's attributes, so the wrapper has no mark."""
    try:
        if attr is not None:
            setattr(view, attr, value)
        setattr(view, ATTR_UNAPPLIED, (*getattr(view, ATTR_UNAPPLIED, ()), name))
    except AttributeError:  # a callable object that takes no attributes: nothing to mark
        pass


def check_model_access(model: str) -> None:
    """Raise 403 unless the current principal may call ``model`` (for views that pick a
    model themselves, e.g. a default model when the body names none)."""
    from ..extension import require_principal, state

    denial = state().models.denial(require_principal(), model)
    if denial is not None:
        raise denial


def require_model_access(field: str = "model") -> Callable[[F], F]:
    """Check the body's ``field`` (default ``model``) against the principal's models.

    The request hook already does this for LLM routes; use it on other views that take a
    model. The body is read as the hook reads ``model``: as JSON whatever its
    ``Content-Type``, or its form fields; a value that is not a model name is a 400.
    """
    def decorator(view: F) -> F:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for model in _named_models(field):
                check_model_access(model)
            return view(*args, **kwargs)

        _mark_unapplied(view, "require_model_access")
        return wrapper  # type: ignore[return-value]

    return decorator


def _named_models(field: str) -> list[str]:
    """Every value of ``field`` in the request body (a lenient view, reading JSON sent as
    ``text/plain``, must not see one the check did not)."""
    mimetype = request.mimetype
    if mimetype.startswith("multipart/") or mimetype == "application/x-www-form-urlencoded":
        values: list[Any] = form(request).getlist(field)
    else:
        body = get_json(request, force=True)
        if body is INVALID and request.is_json:
            raise BadRequest("Invalid JSON in request body.", reason="invalid_json")
        value = body.get(field) if isinstance(body, Mapping) else None
        values = [] if value is None else [value]
    for value in values:
        if not isinstance(value, str) or not value or len(value) > MAX_MODEL_NAME:
            raise BadRequest(f"`{field}` must be a non-empty string.", param=field,
                             reason="invalid_model_field")
    return values


def allowed_models(candidates: list[str]) -> list[str]:
    """The subset of ``candidates`` the current principal may call (for ``/v1/models``)."""
    from ..extension import require_principal, state

    return state().models.allowed_models(require_principal(), candidates)
