"""Validation of management-API input: every field typed, unknown fields refused.

Each field is a parser that returns the clean value or raises ``ValueError`` with a short
reason; :func:`validate` turns that into a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flask import request

from ..bodies import require_json_object
from ..durations import parse_duration
from ..errors import BadRequest
from ..money import to_units
from ..network import parse_networks
from ..principal import USER_ROLES, Role

Parser = Callable[[Any], Any]
_MAX_LIST = 1000
_MAX_JSON_TEXT = 64_000
#: How deep an object field (``metadata``...) may nest: a few hundred levels fit in a few
#: kB, and every recursive reader of the stored value (the audit row's) would run out of stack.
MAX_JSON_DEPTH = 32
#: The last page a list endpoint serves: page x page size is the query's OFFSET, which must
#: fit a 64-bit database integer.
MAX_PAGE = 2**31 - 1


class Field:
    """A field's parser. ``nullable=False``: ``null`` is a 400 (a value stored as never
    empty); ``when_null``: what ``null`` stands for (``dict`` for "the empty object")."""

    __slots__ = ("parse", "required", "nullable", "when_null")

    def __init__(self, parse: Parser, *, required: bool = False, nullable: bool = True,
                 when_null: Callable[[], Any] | None = None) -> None:
        self.parse = parse
        self.required = required
        self.nullable = nullable and not required
        self.when_null = when_null


def validate(data: Any, fields: Mapping[str, Field], *, source: str = "body") -> dict[str, Any]:
    """Check ``data`` against ``fields``; return only the fields that were given."""
    if not isinstance(data, Mapping):
        raise BadRequest("Request body must be a JSON object.", reason="body_not_object")
    for name in data:
        if name not in fields:
            raise BadRequest(f"Unknown field '{str(name)[:64]}' in {source}.",
                             param=str(name)[:64], reason="unknown_field")
    clean: dict[str, Any] = {}
    for name, spec in fields.items():
        if name not in data:
            if spec.required:
                raise BadRequest(f"Missing required field '{name}'.", param=name,
                                 reason="missing_field")
            continue
        value = data[name]
        if value is None:
            if not spec.nullable:
                raise BadRequest(f"Field '{name}' must not be null.", param=name,
                                 reason="null_field")
            clean[name] = None if spec.when_null is None else spec.when_null()
            continue
        try:
            clean[name] = spec.parse(value)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"Invalid value for '{name}': {exc}", param=name,
                             reason="invalid_field") from None
    return clean


def json_body() -> Any:
    """The request's JSON object body (parsed once); ``{}`` when empty. 400 for a wrong
    ``Content-Type``, invalid JSON or a value that is not an object; 413 when too large."""
    return require_json_object(request)


def query_args() -> dict[str, Any]:
    """Query parameters as a plain dict (a repeated parameter is refused)."""
    args: dict[str, Any] = {}
    for name, values in request.args.lists():
        if len(values) > 1:
            raise BadRequest(f"Query parameter '{name[:64]}' given more than once.",
                             param=name[:64])
        args[name] = values[0]
    return args


# -- parsers ---------------------------------------------------------------------------------------


def string(max_length: int = 255) -> Parser:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("must be a string")
        if not value or len(value) > max_length:
            raise ValueError(f"must be 1 to {max_length} characters")
        if not value.isprintable():
            raise ValueError("must be printable text")
        return value

    return parse


def strings(max_length: int = 512) -> Parser:
    """A list of strings of at most ``max_length`` characters each."""
    item = string(max_length)

    def parse(value: Any) -> list[str]:
        if not isinstance(value, list) or len(value) > _MAX_LIST:
            raise ValueError("must be a list of strings")
        return [item(v) for v in value]

    return parse


string_list = strings()
#: A list of user, team or end-user ids (their columns hold 255 characters).
id_list = strings(255)


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("must be true or false")


def query_boolean(value: Any) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no"):
        return False
    return boolean(value)


def integer(minimum: int = 0, maximum: int = 2**62) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("must be an integer")
        if not minimum <= value <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}")
        return value

    return parse


def rate_limit(maximum: int = 2**62) -> Parser:
    """An rpm, tpm or parallel limit: at least 1. A 0 is refused, not stored: here it would
    set no limit (see ``ratelimits.limit_value``), while in LiteLLM it refuses every
    request, so a caller meant to be stopped would run unlimited."""
    number = integer(0, maximum)

    def parse(value: Any) -> int:
        try:
            value = number(value)
        except ValueError as error:
            if str(error).startswith("must be between"):
                raise ValueError(f"must be between 1 and {maximum}") from None
            raise
        if not value:
            raise ValueError("must be at least 1 (0 is not a limit here; LiteLLM refuses every "
                             "request at 0): send null for no limit, or block the caller "
                             "to stop it")
        return value

    return parse


#: ``rpm_limit``, ``tpm_limit`` and the per-model limits.
limit = rate_limit()
#: ``max_parallel_requests``: Postgres keeps it in a 32-bit column.
parallel_limit = rate_limit(2**31 - 1)


#: A 1-based page number (see :data:`MAX_PAGE`).
page = integer(1, MAX_PAGE)


def money(value: Any) -> int:
    """A non-negative USD amount → integer storage units."""
    return to_units(value)


def duration(value: Any) -> Any:
    return parse_duration(value)


def key_duration(value: Any) -> Any:
    """A key's ``duration``: a duration string, or ``"-1"`` for "never expires" (→ None)."""
    if value in ("-1", -1):
        return None
    return parse_duration(value)


def json_object(value: Any) -> dict[str, Any]:
    import json

    if not isinstance(value, dict):
        raise ValueError("must be an object")
    if not _depth_within(value, MAX_JSON_DEPTH):
        raise ValueError(f"is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        text = json.dumps(value, allow_nan=False)  # NaN/Infinity are not JSON
    except (TypeError, ValueError):
        raise ValueError("must be JSON-serialisable") from None
    if len(text) > _MAX_JSON_TEXT:
        raise ValueError("is too large")
    return value


def _depth_within(value: Any, limit: int) -> bool:
    """Whether objects and arrays nest at most ``limit`` levels in ``value`` (iteratively:
    no recursion on the value a client chose)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(
            item, list) else None
        if children is None:
            continue
        if depth > limit:
            return False
        pending += [(child, depth + 1) for child in children]
    return True


_MODEL_BUDGET_FIELDS = {
    "budget_limit": money, "max_budget": money, "time_period": parse_duration,
    "budget_duration": parse_duration, "rpm_limit": limit, "tpm_limit": limit,
}


def model_budgets(value: Any) -> dict[str, Any]:
    """A key's ``model_max_budget``: ``{model: {"budget_limit": USD, "time_period": "1d",
    "rpm_limit": n, "tpm_limit": n}}`` (``max_budget``/``budget_duration`` as aliases).
    Stored as given; a typo here would otherwise leave the model without its budget."""
    value = json_object(value)
    for model, spec in value.items():
        model_name(model)
        if not isinstance(spec, dict) or not spec:
            raise ValueError(f"{str(model)[:64]!r} must map to an object such as "
                             '{"budget_limit": 5.0, "time_period": "1d"}')
        for name, item in spec.items():
            parse = _MODEL_BUDGET_FIELDS.get(name)
            if parse is None:
                raise ValueError(f"{str(model)[:64]!r}: unknown field {str(name)[:64]!r}")
            try:
                parse(item)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{str(model)[:64]!r}: {name} {exc}") from None
    return value


_model_name = string(512)


def model_name(value: Any) -> str:
    """A model name in a map (a key of ``model_rpm_limit``, an alias or its target): the
    rule of ``models``' entries."""
    try:
        return _model_name(value)
    except ValueError as exc:
        raise ValueError(f"model names {exc}") from None


def string_map(value: Any) -> dict[str, str]:
    """``{model: model}`` (aliases)."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("must be an object of strings")
    return {model_name(k): model_name(v) for k, v in value.items()}


def int_map(value: Any) -> dict[str, int]:
    """``{model: n}`` (per-model limits, each at least 1: see :func:`rate_limit`)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError("must be an object of integers")
    return {model_name(k): limit(v) for k, v in value.items()}


def user_role(value: Any) -> Role:
    expected = "; expected one of " + ", ".join(r.value for r in USER_ROLES)
    try:
        role = Role.parse(value)
    except ValueError:  # its message lists team and customer, which a user cannot be
        raise ValueError(f"unknown role {str(value)[:40]!r}{expected}") from None
    if role not in USER_ROLES:
        raise ValueError(f"a user cannot have the role {role.value!r}{expected}")
    return role


def ip_list(value: Any) -> list[str]:
    items = string_list(value)
    parse_networks(items)
    return items


def choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return str(value)

    return parse


def member(value: Any) -> dict[str, Any]:
    fields = {"user_id": Field(string()), "user_email": Field(string(320)),
              "role": Field(choice("admin", "user"))}
    try:
        clean = validate(value, fields, source="member")
    except BadRequest as exc:
        raise ValueError(exc.message) from None
    if not clean.get("user_id") and not clean.get("user_email"):
        raise ValueError("Either user id or user email must be provided")
    return clean


def members(value: Any) -> Any:
    if isinstance(value, list):
        if not value or len(value) > _MAX_LIST:
            raise ValueError("must be a member object or a non-empty list of them")
        return [member(v) for v in value]
    return member(value)
