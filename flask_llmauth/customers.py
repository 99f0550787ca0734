"""Customers (LiteLLM's end users): the service behind ``/customer/*`` and the guard that
names the end user of each LLM request.

An end user is whoever the calling application serves; it never authenticates. A request
names it (first match wins, as in LiteLLM):

1. the principal's ``end_user_id`` (a verified JWT claim, trusted proxy headers, a custom
   auth hook) — what the credential asserts beats what the request body says;
2. the ``x-litellm-customer-id`` and ``x-litellm-end-user-id`` headers;
3. the headers of ``LLMAUTH_USER_HEADER_MAPPINGS`` with role ``customer``, then the
   deprecated ``LLMAUTH_USER_HEADER_NAME``;
4. the body's ``user``, ``litellm_metadata.user``, ``metadata.user_id`` (Anthropic),
   ``safety_identifier`` (OpenAI Responses).

The guard looks the end user's row up (cached, dropped on change by the ``customer:<id>``
tag, in every process), refuses a blocked one with 403 and hands the row to the other
guards (:class:`~flask_llmauth.guards.Admission`). It never writes: an end user without a
row stays row-less (see :func:`end_user_budget` for the default budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import peewee
from flask import Flask, Request

from .audit import write_audit
from .authz.routes import RouteInfo
from .bodies import form
from .budgets import set_window
from .durations import isoformat, utcnow
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .guards import Admission
from .money import to_usd
from .principal import Principal, Role
from .store.records import CustomerRecord, from_values
from .store.tables import Customer
from .usage import Usage

if TYPE_CHECKING:
    from .config import Settings
    from .extension import LLMAuthState

#: Headers LiteLLM always reads for the end-user id.
STANDARD_HEADERS = ("x-litellm-customer-id", "x-litellm-end-user-id")
_MAX_ID = 255
_PLAIN_FIELDS = ("alias", "blocked", "max_budget", "soft_budget", "spend", "tpm_limit",
                 "rpm_limit", "max_parallel_requests", "allowed_model_region",
                 "default_model", "metadata")
_BUDGET_FIELDS = ("max_budget", "soft_budget", "tpm_limit", "rpm_limit",
                  "max_parallel_requests", "budget_duration")


def customer_info(customer: Any) -> dict[str, Any]:
    """LiteLLM's end-user object (``LiteLLM_EndUserTable``), budget fields also flat."""
    budget = {
        "max_budget": to_usd(customer.max_budget),
        "soft_budget": to_usd(customer.soft_budget),
        "tpm_limit": customer.tpm_limit,
        "rpm_limit": customer.rpm_limit,
        "max_parallel_requests": customer.max_parallel_requests,
        "budget_duration": customer.budget_duration,
        "budget_reset_at": isoformat(customer.budget_reset_at),
    }
    has_budget = any(getattr(customer, name) is not None for name in _BUDGET_FIELDS)
    return {
        "user_id": customer.user_id,
        "alias": customer.alias,
        "spend": to_usd(customer.spend),
        "blocked": bool(customer.blocked),
        "allowed_model_region": customer.allowed_model_region,
        "default_model": customer.default_model,
        "budget_id": None,
        **budget,
        "litellm_budget_table": budget if has_budget else None,
        "metadata": dict(customer.metadata or {}),
        "created_at": isoformat(customer.created_at),
        "updated_at": isoformat(customer.updated_at),
    }


def end_user_budget(customer: CustomerRecord | None, settings: Settings) -> int | None:
    """The budget (units) that binds an end user: its row's ``max_budget``, else
    ``LLMAUTH_MAX_END_USER_BUDGET`` (also for an end user with no row); ``None``: none."""
    if customer is not None and customer.max_budget is not None:
        return customer.max_budget
    return settings.max_end_user_budget


def _insert(customer: Customer) -> None:
    """Insert a new row; a concurrent insert of the same id is a 409, not a 500."""
    try:
        with Customer._meta.database.atomic():  # a savepoint: the transaction survives
            customer.save(force_insert=True)
    except peewee.IntegrityError:
        raise Conflict(f"Customer {customer.user_id} was created concurrently; retry.",
                       param="user_id", reason="customer_conflict") from None


class CustomerService:
    """``/customer/*``: only a proxy admin changes customers; admins and admin viewers read."""

    def __init__(self, state: LLMAuthState) -> None:
        self.state = state

    @staticmethod
    def _require_admin(actor: Principal, what: str) -> None:
        if not actor.is_admin:
            raise Forbidden(f"Only a proxy admin can {what}.", reason="admin_required")

    @staticmethod
    def _require_reader(actor: Principal) -> None:
        if not (actor.is_admin or actor.role is Role.PROXY_ADMIN_VIEWER):
            raise Forbidden("Only proxy admins can view customers.", reason="admin_required")

    @staticmethod
    def _get(user_id: str, param: str = "user_id") -> Customer:
        customer = Customer.get_or_none(Customer.user_id == user_id)
        if customer is None:
            raise NotFound(f"Customer not found: user_id={user_id}", param=param)
        return customer

    @staticmethod
    def _apply(customer: Customer, params: Mapping[str, Any]) -> None:
        now = utcnow()
        for name, value in params.items():
            if name == "budget_duration":
                set_window(customer, value, now)
            elif name in _PLAIN_FIELDS:
                if name in ("blocked", "spend") and value is None:
                    raise BadRequest(f"Field '{name}' must not be null.", param=name)
                setattr(customer, name, {} if name == "metadata" and value is None else value)
        customer.updated_at = now

    def create(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(actor, "create customers")
        state = self.state
        params = dict(params)
        user_id = params.pop("user_id")
        with state.store.use() as db, db.atomic():
            if Customer.get_or_none(Customer.user_id == user_id) is not None:
                raise BadRequest(f"Customer already exists, passed user_id={user_id}. Please "
                                 "pass a new user_id.", param="user_id",
                                 reason="customer_exists")
            customer = Customer(user_id=user_id, created_at=utcnow())
            self._apply(customer, params)
            _insert(customer)
            info = customer_info(customer)
            write_audit(state.settings.store_audit_logs, actor, "created", "customer", user_id,
                        after=info)
        state.invalidate(f"customer:{user_id}")
        return info

    def info(self, actor: Principal, user_id: str) -> dict[str, Any]:
        self._require_reader(actor)
        with self.state.store.use():
            return customer_info(self._get(user_id, "end_user_id"))

    def update(self, actor: Principal, params: dict[str, Any]) -> dict[str, Any]:
        self._require_admin(actor, "update customers")
        state = self.state
        params = dict(params)
        user_id = params.pop("user_id")
        with state.store.use() as db, db.atomic():
            customer = self._get(user_id)
            before = customer_info(customer)
            self._apply(customer, params)
            customer.save()
            info = customer_info(customer)
            write_audit(state.settings.store_audit_logs, actor, "updated", "customer", user_id,
                        before=before, after=info)
        state.invalidate(f"customer:{user_id}")
        return info

    def delete(self, actor: Principal, user_ids: list[str]) -> dict[str, Any]:
        """Delete customers, all or none (404 naming the ones that do not exist)."""
        self._require_admin(actor, "delete customers")
        state = self.state
        ids = list(dict.fromkeys(user_ids))
        with state.store.use() as db, db.atomic():
            found = {c.user_id: c for c in Customer.select().where(Customer.user_id.in_(ids))}
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"End User Id(s)={', '.join(missing)} do not exist in db",
                               param="user_ids")
            for user_id in ids:
                write_audit(state.settings.store_audit_logs, actor, "deleted", "customer",
                            user_id, before=customer_info(found[user_id]))
            Customer.delete().where(Customer.user_id.in_(ids)).execute()
        state.invalidate(*(f"customer:{i}" for i in ids))
        return {"deleted_customers": len(ids),
                "message": f"Successfully deleted customers with ids: {ids}"}

    def set_blocked(self, actor: Principal, user_ids: list[str], blocked: bool
                    ) -> dict[str, Any]:
        """Block (creating a row for an end user that has none, as LiteLLM does) or
        unblock (404 for an end user without a row) customers, all or none."""
        verb = "block" if blocked else "unblock"
        self._require_admin(actor, f"{verb} customers")
        state = self.state
        ids = list(dict.fromkeys(user_ids))
        now = utcnow()
        with state.store.use() as db, db.atomic():
            found = {c.user_id: c for c in Customer.select().where(Customer.user_id.in_(ids))}
            missing = [i for i in ids if i not in found]
            if missing and not blocked:
                raise NotFound(f"End User Id(s)={', '.join(missing)} do not exist in db",
                               param="user_ids")
            out = []
            for user_id in ids:
                customer = found.get(user_id)
                before = None if customer is None else customer_info(customer)
                if customer is None:
                    customer = Customer(user_id=user_id, created_at=now)
                    customer.blocked = True
                    customer.updated_at = now
                    _insert(customer)
                else:
                    customer.blocked = blocked
                    customer.updated_at = now
                    customer.save()
                info = customer_info(customer)
                write_audit(state.settings.store_audit_logs, actor, f"{verb}ed", "customer",
                            user_id, before=before, after=info)
                out.append(info)
        state.invalidate(*(f"customer:{i}" for i in ids))
        return {"blocked_users" if blocked else "unblocked_users": out}

    def list(self, actor: Principal, query: Mapping[str, Any]) -> Any:
        """Every customer (LiteLLM's plain list); with ``page``/``page_size``, one page."""
        self._require_reader(actor)
        with self.state.store.use():
            select = Customer.select().order_by(Customer.created_at, Customer.id)
            if query.get("page") is None and query.get("page_size") is None:
                return [customer_info(c) for c in select]
            page, size = query.get("page") or 1, query.get("page_size") or 100
            total = select.count()
            return {"customers": [customer_info(c) for c in select.paginate(page, size)],
                    "total": total, "page": page, "page_size": size,
                    "total_pages": math.ceil(total / size) if total else 0}


# -- the guard ---------------------------------------------------------------------------------


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def _header_names(settings: Settings) -> tuple[str, ...]:
    names = list(STANDARD_HEADERS)
    names += [m["header_name"] for m in settings.user_header_mappings
              if m["litellm_user_role"] == "customer"]
    if settings.user_header_name:
        names.append(settings.user_header_name)
    return tuple(dict.fromkeys(n.lower() for n in names))


def _checked(value: Any, param: str) -> str | None:
    """A request-supplied end-user id: ``None`` when absent or empty, else a printable
    string of at most 255 characters (400 otherwise)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > _MAX_ID or not value.isprintable():
        raise BadRequest(f"`{param}` (the end user) must be a printable string of at most "
                         f"{_MAX_ID} characters.", param=param, reason="invalid_end_user")
    return value


def body_may_name_end_user(body: dict[str, Any]) -> bool:
    """Whether a JSON object has a field :func:`end_user_from_body` reads (nothing else
    checked: four membership tests answer the common body that names no end user; the
    authorization hook has them inline)."""
    return ("user" in body or "safety_identifier" in body or "metadata" in body
            or "litellm_metadata" in body)


def end_user_from_body(body: Any) -> str | None:
    """The end user a JSON body names (LiteLLM's order), or ``None``."""
    found = end_user_field_of_body(body)
    return None if found is None else found[0]


def end_user_field_of_body(body: Any) -> tuple[str, str] | None:
    """``(end user, the field naming it)`` for a JSON body that names one (LiteLLM's
    order: ``user``, ``litellm_metadata.user``, ``metadata.user_id``,
    ``safety_identifier``), else ``None``."""
    if type(body) is not dict:
        return None
    if not body_may_name_end_user(body):  # most bodies name none
        return None
    found = body.get("user")
    if found is not None and (found := _checked(found, "user")) is not None:
        return found, "user"
    for container, name in _BODY_CONTAINERS:
        inner = body.get(container)
        if type(inner) is dict and inner.get(name) is not None:
            field = f"{container}.{name}"
            found = _checked(inner[name], field)
            if found is not None:
                return found, field
    found = body.get("safety_identifier")
    if found is None or (found := _checked(found, "safety_identifier")) is None:
        return None
    return found, "safety_identifier"


_BODY_CONTAINERS = (("litellm_metadata", "user"), ("metadata", "user_id"))


_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def require_user_param(request: Request, info: RouteInfo, parsed: Any) -> None:
    """``enforce_user_param``: a POST to an LLM route (MCP routes excepted, as in LiteLLM)
    names its end user in its body — ``user``, or another field LiteLLM reads it from
    (``metadata.user_id``, as the Anthropic SDK sends it, ...) — or in a form body's
    ``user`` field. ``parsed`` is the JSON body the policy read."""
    if "mcp_routes" in info.groups:
        return
    if isinstance(parsed, Mapping):
        named = end_user_field_of_body(dict(parsed)) is not None
    elif request.mimetype in _FORM_TYPES:
        named = _checked(form(request).get("user"), "user") is not None
    else:
        named = False
    if not named:
        raise BadRequest("'user' param not passed in. 'enforce_user_param'=True",
                         param="user", reason="user_param_required")


class CustomersGuard:
    """Names the end user of each LLM request (see the module docstring).

    It is the first guard, but it admits nothing itself: :meth:`resolve` runs before the
    other guards are asked whether they want the request, so a rate limit or budget that
    exists only for the end user is found, and a request naming no end user costs a few
    dictionary reads.
    """

    name = "customers"
    #: :meth:`headers` adds nothing (see :class:`~flask_llmauth.guards.Guards`).
    adds_headers = False
    #: :meth:`admit` does nothing: not called (see :class:`~flask_llmauth.guards.Guards`).
    admits = False

    def __init__(self, state: LLMAuthState) -> None:
        self.store = state.store
        self.cache = state.customer_cache
        self.ttl = state.settings.cache_ttl
        self.header_keys = tuple((_environ_key(h), h) for h in _header_names(state.settings))
        #: The WSGI environ keys of :attr:`header_keys` (the authorization hook skips an
        #: end-user-only plan when none is present and the body names no end user).
        self.header_environ_keys = tuple(key for key, _ in self.header_keys)
        self._header_environ_set = frozenset(self.header_environ_keys)

    # -- Guard protocol (nothing to reserve or settle) -----------------------------------------

    def wants(self, principal: Principal, route: RouteInfo, unsafe: bool) -> bool:
        return False

    def admit(self, admission: Admission) -> None:
        return None

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None:
        return None

    def headers(self, admission: Admission) -> Mapping[str, str]:
        return {}

    # -- resolution ------------------------------------------------------------------------------

    def resolve(self, principal: Principal, environ: Mapping[str, Any],
                body: Callable[[], Any]) -> tuple[str, CustomerRecord | None] | None:
        """``(end_user_id, row or None)`` for a request that names an end user, else
        ``None``; 403 for a blocked one, 400 for a malformed id."""
        end_user_id = principal.end_user_id
        source: str | None = None  # the request field naming the end user (the error's param)
        if end_user_id is None:
            # most requests send none of the headers: one C-level test first
            for key, header in (() if environ.keys().isdisjoint(self._header_environ_set)
                                else self.header_keys):
                value = environ.get(key)
                if value and (end_user_id := _checked(value, header)) is not None:
                    source = header
                    break
            else:
                value = body()
                if type(value) is not dict or not (  # body_may_name_end_user, inline
                        "user" in value or "safety_identifier" in value
                        or "metadata" in value or "litellm_metadata" in value):
                    return None  # most bodies name none
                found = end_user_field_of_body(value)
                if found is None:
                    return None
                end_user_id, source = found
        customer = self.lookup(end_user_id)
        if customer is not None and customer.blocked:
            raise Forbidden(f"End user={end_user_id} is blocked. Update via "
                            "`/customer/unblock` if you're an admin.",
                            param=source, reason="end_user_blocked")
        return end_user_id, customer

    def lookup(self, end_user_id: str) -> CustomerRecord | None:
        """The end user's row (cached, also its absence), or ``None``."""
        cache_key = ("customer", end_user_id)
        hit = self.cache.get(cache_key)
        if hit is not None:
            return hit[0]
        generation = self.cache.generation
        with self.store.use():
            row = Customer.get_or_none(Customer.user_id == end_user_id)
        record = None if row is None else from_values(CustomerRecord, row.__data__)
        self.cache.set(cache_key, (record,), self.ttl, (f"customer:{end_user_id}",),
                       generation=generation)
        return record


def install(state: LLMAuthState, app: Flask) -> None:
    """Add the customers guard (first) and make it the end-user resolver (``init_app``)."""
    guard = CustomersGuard(state)
    state.customers = guard
    state.guards.add(guard)
    state.guards.end_users = guard
