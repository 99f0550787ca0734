"""Per-request guards: admission before the view, settlement when the response ends.

A guard (budgets, rate limits) sees every authorized request it :meth:`Guard.wants`:

1. ``admit(admission)`` runs after authorization, before the view. It may refuse with an
   :class:`~flask_llmauth.errors.LLMAuthError` (429 ...) and may reserve capacity (budget,
   parallel slots) in ``admission.scratch``. If a later guard refuses, every guard already
   admitted is settled with ``failed=True`` so it releases what it reserved.
2. ``settle(admission, usage, failed)`` runs exactly once per admitted request (a guard
   whose ``settles``, below, answers false is left out after the view): after the
   response for plain responses; when a streamed body ends — also when the client
   disconnects; or as soon as the view (or a hook) raises (Flask's
   ``got_request_exception``). The after-response step is registered per admitted request
   (``after_this_request``), so requests no guard wants pay for no hook. ``usage`` is what
   the host reported with :func:`record_usage`, else what the response (JSON or SSE)
   reported, else an estimate.
   ``settle`` must not raise; failures are logged.
3. ``headers(admission)`` may add response headers; or ``admit`` puts ``(name, value)``
   pairs in ``admission.header_pairs`` (a :class:`HeaderPairs`, as the rate-limit guard
   does for ``x-ratelimit-*``), added to the response when it is ready.

No guard runs for a request none of them wants, so unconfigured features cost nothing.
``wants(principal, route, unsafe)`` must answer from the principal, the route and
``unsafe`` (the request's method is not safe, or the route counts every method as unsafe),
nothing else: the answers are kept per principal object (a principal is an immutable
snapshot; a changed key, user or team gets a new one). A guard
whose headers are always empty declares ``adds_headers = False``; one whose ``admit`` does
nothing declares ``admits = False`` (it is not called). A guard may have a method
``settles(principal, route, unsafe, wanted)``: ``False`` when its ``settle`` has nothing to
do after the view for such requests that name no end user, with the guards ``wanted`` with
it (it is then not called there; a request refused by a later guard is still settled).
The answer is kept per principal object too.

Guards run in the order of :data:`flask_llmauth.extension.GUARD_INSTALLERS` — customers,
rate limits, budgets, spend — so cheap refusals happen before money is reserved. The customers
guard runs first and fills two slots later guards read:

* ``admission.end_user_id`` — the end user (customer) the request is for: from the
  principal (a JWT claim), a configured header (``user_header_mappings``) or the body's
  ``user`` field; ``None`` when the request names none;
* ``admission.customer`` — that end user's :class:`~flask_llmauth.store.records.CustomerRecord`
  with its budget tier's fields filled in (``rpm_limit``, ``tpm_limit``,
  ``max_parallel_requests``, ``max_budget``...), or ``None`` when the end user has no row.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, ClassVar, NamedTuple, Protocol

from flask import Flask, Response, g, has_app_context
from flask.json.provider import DefaultJSONProvider, JSONProvider

try:  # the app context's variable, read without the ``g`` proxy
    from flask.globals import _cv_app
except ImportError:  # pragma: no cover - a Flask without it: JSON responses are parsed
    _cv_app = None  # type: ignore[assignment]

from .authz.routes import RouteInfo
from .principal import Principal
from .usage import (
    MEDIA_TOKENS,
    UNDECIDED,
    StreamUsage,
    Usage,
    body_sizes,
    usage_from_json,
    usage_from_object,
)

log = logging.getLogger("flask_llmauth")


class _RequestIds:
    """Unique request ids without a system call per request: 64 random bits drawn once per
    process (again in a forked child) followed by a 64-bit counter, as 32 hex digits."""

    def __init__(self) -> None:
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        #: From 2**64: ``hex(n)[3:]`` is the counter as 16 digits (cheaper than a format).
        self.counter = itertools.count(1 << 64)

    def next(self) -> str:
        return self.prefix + hex(next(self.counter))[3:]


_request_ids = _RequestIds()


class Admission:
    """One authorized request on its way through the guards."""

    __slots__ = ("principal", "route", "model", "body", "started", "scratch", "usage",
                 "end_user_id", "customer", "request_id", "_unsettled", "_sizes", "written",
                 "guards", "settling", "header_guards", "header_pairs")

    def __init__(self, principal: Principal, route: RouteInfo, model: str | None,
                 body: Any, guards: tuple[Guard, ...] = (), settling: tuple[Guard, ...] = (),
                 header_guards: tuple[Guard, ...] = ()) -> None:
        self.principal = principal
        self.route = route
        self.model = model
        #: The parsed JSON request body (``None`` when there is none).
        self.body = body
        self.started = time.time()
        #: Per-guard working state, keyed by guard name.
        self.scratch: dict[str, Any] = {}
        #: Usage reported by the host with :func:`record_usage`.
        self.usage: Usage | None = None
        #: Set by the customers guard (first guard to run); see the module docstring.
        self.end_user_id: str | None = None
        self.customer: Any = None
        #: A unique id for this request (spend rows are keyed by it, so a retried write
        #: never counts twice): ``_request_ids.next()``, inline.
        ids = _request_ids
        self.request_id = ids.prefix + hex(next(ids.counter))[3:]
        #: Holds one token until settlement claims it (``list.pop`` is atomic).
        self._unsettled = [True]
        self._sizes: tuple[int, int] | None = None
        #: ``(body list, body bytes, usage)`` of the last JSON response Flask's JSON
        #: provider wrote during the request, the usage read from the object it wrote
        #: (:func:`capture_json_responses`).
        self.written: tuple[list[bytes], bytes, Usage | None] | None = None
        #: The guards that want the request, in order.
        self.guards = guards
        #: Those of them settled after the view (see ``Guard.settles``).
        self.settling = settling
        #: Those of them whose ``headers`` may add something to the response.
        self.header_guards = header_guards
        #: ``(name, value)`` pairs a guard put here in ``admit`` for the response.
        self.header_pairs: HeaderPairs | None = None

    def sizes(self, media: int) -> tuple[int, int]:
        """``(prompt estimate, max tokens asked or 0)`` of the request body, in tokens
        (:func:`~flask_llmauth.usage.estimate_prompt_tokens` and
        :func:`~flask_llmauth.usage.requested_max_tokens`), computed once for every guard;
        ``media``: the app's ``LLMAUTH_PROMPT_MEDIA_TOKENS`` (every guard passes the same)."""
        sizes = self._sizes
        if sizes is None:
            sizes = self._sizes = body_sizes(self.body, media)
        return sizes

    def claim_settlement(self) -> bool:
        """True for the first caller only: settlement happens exactly once."""
        try:
            self._unsettled.pop()
        except IndexError:
            return False
        return True

    @property
    def settled(self) -> bool:
        return not self._unsettled


class Guard(Protocol):
    name: str

    def wants(self, principal: Principal, route: RouteInfo, unsafe: bool) -> bool: ...

    def admit(self, admission: Admission) -> None: ...

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None: ...

    def headers(self, admission: Admission) -> Mapping[str, str]: ...


def _settle_all(guards: Iterable[Guard], admission: Admission, usage: Usage | None,
                failed: bool) -> None:
    for guard in guards:
        try:
            guard.settle(admission, usage, failed)
        except Exception:
            log.exception("llmauth: guard %s failed to settle request %s", guard.name,
                          admission.request_id)


class _Plan(NamedTuple):
    """Which guards one principal meets on one route (computed once per principal object)."""

    principal: Principal
    route: RouteInfo
    #: Guards that want every such request.
    wanted: tuple[Guard, ...]
    #: The other guards that may still want it for its end user (``wants_end_user``).
    by_end_user: tuple[Guard, ...]
    #: The request's method is not safe, or the route counts every method as unsafe.
    unsafe: bool
    #: Those of ``wanted`` whose ``headers`` may add something.
    with_headers: tuple[Guard, ...] = ()
    #: Those of ``wanted`` whose ``admit`` does something (``admits``, default true).
    admitting: tuple[Guard, ...] = ()
    #: Those of ``wanted`` settled after the view of a request naming no end user
    #: (``settles``, default true).
    settling: tuple[Guard, ...] = ()


_new_plan: Callable[[tuple[Any, ...]], _Plan] = partial(tuple.__new__, _Plan)


class Guards:
    """The guards of one app, run around each request."""

    def __init__(self, guards: Iterable[Guard] = (), media: int = MEDIA_TOKENS) -> None:
        self.guards: tuple[Guard, ...] = tuple(guards)
        #: Prompt tokens an image, audio clip, video or file counts in a request's
        #: estimate (``LLMAUTH_PROMPT_MEDIA_TOKENS``).
        self.media = media
        #: ``finisher(admission)``: the after-request function of one admitted request (for
        #: ``after_this_request``), :meth:`finish` with the admission bound — a ``partial``
        #: of the plain function, made by a ``partial`` (no Python frame per request). Flask
        #: asks each after-request function whether it is a coroutine function (it unwraps a
        #: partial to the plain function inside); a partial costs one frame less when it
        #: runs than a closure, and less to make.
        self.finisher: Callable[[Admission], Callable[[Response], Response]] = partial(
            partial, type(self).finish, self)
        #: Names the end user before the guards are asked (the customers guard sets it).
        self.end_users: Any = None
        #: Guards whose ``headers`` may add something (``adds_headers``, default true).
        self._with_headers: frozenset[int] = frozenset()
        #: Guards whose ``admit`` does nothing (``admits = False``); any other is called.
        self._not_admitting: frozenset[int] = frozenset()
        #: Guards with a ``wants_end_user`` method.
        self._by_end_user: frozenset[int] = frozenset()
        #: Guards with a ``settles`` method.
        self._may_skip_settle: frozenset[int] = frozenset()
        #: One tuple object per combination of guards that plans name (see :meth:`_shared`).
        self._combinations: dict[tuple[Guard, ...], tuple[Guard, ...]] = {}
        #: Puts the JSON provider's watch in place (:func:`capture_json_responses`), if any.
        self.arm_json_watch: Callable[[], None] | None = None

    def add(self, guard: Guard) -> None:
        self.guards += (guard,)
        self._with_headers = frozenset(
            id(g) for g in self.guards if getattr(g, "adds_headers", True))
        self._not_admitting = frozenset(
            id(g) for g in self.guards if not getattr(g, "admits", True))
        self._by_end_user = frozenset(
            id(g) for g in self.guards if hasattr(g, "wants_end_user"))
        self._may_skip_settle = frozenset(
            id(g) for g in self.guards if hasattr(g, "settles"))

    def plan(self, principal: Principal, route: RouteInfo, unsafe: bool) -> _Plan:
        """Which guards want ``principal`` on ``route`` (asked anew: callers keep the answer
        per principal object: the extension keeps it in its per-request verdict)."""
        wanted: list[Guard] = []
        by_end_user: list[Guard] = []
        may_want_end_user = self._by_end_user
        for guard in self.guards:  # a loop, not generators: a cold key meets this per request
            if guard.wants(principal, route, unsafe):
                wanted.append(guard)
            elif id(guard) in may_want_end_user:
                by_end_user.append(guard)
        # Built positionally (a cold key meets this once per request).
        shared = self._shared(wanted)
        return _new_plan((principal, route, shared, self._shared(by_end_user),
                          unsafe, self._headers_of(wanted) if wanted else (),
                          self._admitting_of(wanted) if wanted else (),
                          self._settling_of(principal, route, unsafe, shared)
                          if wanted else ()))

    def _shared(self, guards: Iterable[Guard]) -> tuple[Guard, ...]:
        """``tuple(guards)``, the same object for every plan naming the same guards: a
        tuple of guards stays tracked by the cyclic garbage collector, and every cold key
        keeps a plan (a few combinations exist: at most one per subset of the guards)."""
        found = tuple(guards)
        return self._combinations.setdefault(found, found)

    def _headers_of(self, guards: Iterable[Guard]) -> tuple[Guard, ...]:
        with_headers = self._with_headers
        return self._shared(guard for guard in guards if id(guard) in with_headers)

    def _admitting_of(self, guards: Iterable[Guard]) -> tuple[Guard, ...]:
        idle = self._not_admitting
        return self._shared(guard for guard in guards if id(guard) not in idle)

    def _settling_of(self, principal: Principal, route: RouteInfo, unsafe: bool,
                     wanted: tuple[Guard, ...]) -> tuple[Guard, ...]:
        may_skip = self._may_skip_settle
        return self._shared(
            guard for guard in wanted if id(guard) not in may_skip
            or guard.settles(principal, route, unsafe, wanted))  # type: ignore[attr-defined]

    def admit_planned(self, plan: _Plan, model: str | None, body: Callable[[], Any],
                      environ: Mapping[str, Any]) -> Admission | None:
        """Run ``admit`` of every guard of ``plan`` that wants this request; ``None`` if
        none does. ``body`` returns the parsed JSON request body; it is called only when
        needed. On LLM routes the end user is resolved first (``end_users.resolve``, which
        may refuse a blocked one); when the request names one, a guard that does not want
        the request is also asked ``wants_end_user(principal, route, customer, unsafe)`` (if it has
        that method): a limit or budget may exist for the end user alone."""
        principal, route = plan.principal, plan.route
        end_user = None
        resolver = self.end_users
        if resolver is not None and route.is_llm:
            end_user = resolver.resolve(principal, environ, body)
        wanted, with_headers, admitting = plan.wanted, plan.with_headers, plan.admitting
        settling = plan.settling
        if end_user is not None:
            settling = wanted  # ``settles`` answers for requests naming no end user
            if plan.by_end_user:
                customer = end_user[1]
                extra = [guard for guard in plan.by_end_user
                         if guard.wants_end_user(principal, route, customer, plan.unsafe)]  # type: ignore[attr-defined]
                if extra:
                    wanted = settling = tuple(guard for guard in self.guards
                                              if guard in wanted or guard in extra)
                    with_headers = self._headers_of(wanted)
                    admitting = self._admitting_of(wanted)
        if not wanted:
            return None
        admission = Admission(principal, route, model, body(), wanted, settling, with_headers)
        if self.arm_json_watch is not None:
            self.arm_json_watch()
        if end_user is not None:
            admission.end_user_id, admission.customer = end_user
        guard = None
        try:
            for guard in admitting:
                guard.admit(admission)
        except BaseException:
            admission.scratch["_refused"] = True  # never reached the view
            if admission.claim_settlement():  # the guards before the refusing one admitted
                _settle_all(reversed(wanted[:wanted.index(guard)]), admission, None, True)
            raise
        return admission

    def finish(self, admission: Admission, response: Response) -> Response:
        """Add the guards' headers; settle now, or when the streamed body ends."""
        items = getattr(response.headers, "_list", None)  # Werkzeug's own (name, value) list
        if type(items) is not list:
            items = None
        pairs = admission.header_pairs
        if pairs is not None:
            try:
                # _set_headers(response, pairs), inline: appended at once when the response
                # has none of their names
                if items is not None:
                    names = pairs.names
                    for name, _ in items:  # a response has a few headers
                        if name.lower() in names:
                            _set_headers(response, pairs)
                            break
                    else:
                        items += pairs
                else:
                    _set_headers(response, pairs)
            except Exception:
                log.exception("llmauth: could not add the guards' headers")
        for guard in admission.header_guards:
            try:
                headers = guard.headers(admission)
                if headers:
                    _set_headers(response, headers)
            except Exception:
                log.exception("llmauth: guard %s failed to add headers", guard.name)
        unsettled = admission._unsettled
        if not unsettled:  # settled already (``admission.settled``)
            return response
        # Flask's own Response keeps its status in ``_status_code`` (what ``status_code``
        # answers); a subclass may compute it
        failed = (response._status_code if type(response) is Response
                  else response.status_code) >= 400
        body = response.response
        # a list is never streamed (``is_streamed`` asks for a length)
        if type(body) is not list and response.is_streamed and not failed:
            stream = StreamUsage(admission.model, admission.sizes(self.media)[0])
            response.response = _ObservedStream(
                body, stream.feed,
                lambda failed: self.settle(admission, admission.usage or stream.result(),
                                           failed),
            )
            return response
        usage = admission.usage
        # _is_json(response), its memo of a first header read first
        if usage is None and not failed and (
                (items and _JSON_FIRST.get(items[0])) or _is_json(response)):
            written = admission.written
            if (written is not None and written[0] is body and len(body) == 1
                    and body[0] is written[1]):
                usage = written[2]  # the body is the very text written from that object
            else:
                # _body_bytes(response), inline: one bytes object as ``jsonify`` makes it
                usage = usage_from_json(
                    body[0] if type(body) is list and len(body) == 1 and type(body[0]) is bytes
                    else response.get_data(), admission.model)
        # self.settle(admission, usage, failed), inline: claim the settlement, settle all
        try:
            unsettled.pop()
        except IndexError:
            return response
        for guard in admission.settling:
            try:
                guard.settle(admission, usage, failed)
            except Exception:
                log.exception("llmauth: guard %s failed to settle request %s", guard.name,
                              admission.request_id)
        return response

    def settle(self, admission: Admission, usage: Usage | None, failed: bool) -> None:
        if admission.claim_settlement():
            _settle_all(admission.settling, admission, usage, failed)

    def teardown(self, admission: Admission) -> None:
        """The request failed with an exception (Flask's ``got_request_exception``): settle
        as failed unless a response took care of it. A streamed body wrapped before the
        exception (a later after-request hook raised) is never sent — Flask answers 500
        instead, or the exception propagates — so it is not waited for."""
        if not admission.settled:
            self.settle(admission, admission.usage, True)


#: No argument given (:func:`capture_json_responses`).
_NOTHING: Any = object()


def capture_json_responses(app: Flask) -> Callable[[], None] | None:
    """Read a guarded request's usage from the object Flask's JSON provider writes (a view
    returning a dict, ``jsonify(obj)``) instead of parsing the written body again.

    Only Flask's own :class:`~flask.json.provider.DefaultJSONProvider` (no subclass, its
    ``dumps`` and ``_prepare_response_obj`` not replaced, no ``response`` of its own on the
    instance) writing one positional object into Flask's own :class:`~flask.Response` is
    watched: the body is then ``json.dumps(obj)`` and a newline in one ``bytes`` object, and
    :func:`~flask_llmauth.usage.usage_from_object` answers for that text (read when it is
    written, so a later change to the object does not count). :meth:`Guards.finish` uses
    the answer only when the response's body is still that list holding that ``bytes``
    object — the same text — and parses the body otherwise (replaced or changed by a hook,
    another response returned, streamed, or written while the watch was not in place).

    Returns the function that puts the watch in place (``None`` when nothing is watched).
    An admission puts it in place; the first response written for a request without one
    takes it away again, so requests without guards (the master key, the management API,
    unguarded routes) write their JSON unwatched while no guarded request comes between.
    """
    provider = app.json
    attributes = provider.__dict__
    if type(provider) is not DefaultJSONProvider or _cv_app is None or "response" in attributes:
        return None
    write = provider.response
    default_dumps, default_prepare = DefaultJSONProvider.dumps, JSONProvider._prepare_response_obj

    def response(obj: Any = _NOTHING, /, *args: Any, **kwargs: Any) -> Any:
        if obj is _NOTHING or args or kwargs:  # not one positional object: as it was
            return write(*args, **kwargs) if obj is _NOTHING else write(obj, *args, **kwargs)
        written = write(obj)
        context = _cv_app.get(None)
        admission = None if context is None else context.g.__dict__.get("_llmauth_admission")
        if admission is None:
            if context is not None and attributes.get("response") is response:
                attributes.pop("response", None)  # until the next admission
            return written
        if (type(written) is not Response
                or len(attributes) != 2 and ("dumps" in attributes  # "_app", "response"
                                             or "_prepare_response_obj" in attributes)
                or DefaultJSONProvider.dumps is not default_dumps
                or DefaultJSONProvider._prepare_response_obj is not default_prepare):
            return written
        body = written.response
        if type(body) is list and len(body) == 1:
            usage = usage_from_object(obj, admission.model)
            if usage is not UNDECIDED:
                admission.written = (body, body[0], usage)
        return written

    def arm() -> None:
        if "response" not in attributes:  # absent, or ours; the host's own is left alone
            attributes["response"] = response

    return arm


class HeaderPairs(list[tuple[str, str]]):
    """``(name, value)`` pairs a guard built from constants and numbers: no CR or LF in
    them, and every name, lower-cased, in the subclass's ``names``. :func:`_set_headers`
    appends them to the response's header list at once when it has none of those names.
    (A subclass per guard, so making one costs no Python ``__init__``.)"""

    __slots__ = ()
    names: ClassVar[frozenset[str]] = frozenset()


def _set_headers(response: Response,
                 headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
    """``response.headers[name] = value`` for each header (a mapping or ``(name, value)``
    pairs): the first header of that name replaced, the others dropped, else added."""
    target = response.headers
    if isinstance(headers, HeaderPairs):
        items = getattr(target, "_list", None)  # Werkzeug's own list of (name, value)
        if type(items) is list:
            names = headers.names
            for name, _ in items:  # a response has a few headers
                if name.lower() in names:
                    break
            else:
                items += headers
                return
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    for name, value in pairs:
        target[name] = value


def _body_bytes(response: Response) -> bytes:
    """The body of a response that is not streamed: what ``get_data()`` answers, without
    its conversions when the body is one ``bytes`` object (as ``jsonify`` makes it)."""
    body = response.response
    if type(body) is list and len(body) == 1 and type(body[0]) is bytes:
        return body[0]
    return response.get_data()


def _is_json(response: Response) -> bool:
    """Whether the response's media type is ``application/json`` (read without parsing
    the header's parameters; the header list is walked directly when it is Werkzeug's)."""
    headers = response.headers
    items = getattr(headers, "_list", None)
    first = None
    if type(items) is list:
        if items:
            first = items[0]
            known = _JSON_FIRST.get(first)  # a Content-Type header first, as it usually is
            if known is not None:
                return known
        for name, value in items:
            if len(name) == 12 and name.lower() == "content-type":
                content_type = value
                break
        else:
            return False
    else:
        content_type = headers.get("Content-Type")
    if not content_type:
        return False
    known = _JSON_TYPES.get(content_type)
    if known is None:
        known = content_type.partition(";")[0].strip().lower() == "application/json"
        if len(_JSON_TYPES) < 256:
            _JSON_TYPES[content_type] = known
    if (type(first) is tuple and len(first) == 2 and type(first[0]) is str
            and type(first[1]) is str and len(first[0]) == 12
            and first[0].lower() == "content-type" and len(_JSON_FIRST) < 256):
        _JSON_FIRST[first] = known  # the first header is the Content-Type: it decides
    return known


#: ``Content-Type`` values seen -> whether their media type is ``application/json`` (a
#: few distinct values: a response's type is the host's choice, not the client's).
_JSON_TYPES: dict[str, bool] = {}
#: First headers ``(name, value)`` seen that are a ``Content-Type`` header -> whether their
#: media type is ``application/json`` (when first, such a header decides :func:`_is_json`).
_JSON_FIRST: dict[tuple[str, str], bool] = {}


class _ObservedStream:
    """Passes a streamed body through, feeding each chunk to ``on_chunk``; calls
    ``on_end(failed)`` once when the stream is exhausted (``failed=False``), is closed early
    — the client went away — (``False``: what was sent was still produced), or raises
    (``True``: the stream broke off; the guards still charge what it produced)."""

    def __init__(self, inner: Iterable[Any], on_chunk: Callable[[Any], None],
                 on_end: Callable[[bool], None]) -> None:
        self._inner = inner
        self._on_chunk = on_chunk
        self._on_end = on_end
        self._ended = False

    def __iter__(self) -> Iterator[Any]:
        failed = False
        try:
            for chunk in self._inner:
                try:
                    self._on_chunk(chunk)
                except Exception:
                    log.exception("llmauth: could not read usage from a stream chunk")
                yield chunk
        except Exception:  # not GeneratorExit: a generator closed early did not fail
            failed = True
            raise
        finally:
            self._end(failed)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._end(False)

    def _end(self, failed: bool) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(failed)


#: Holds one item once record_usage has warned about a call outside an app context.
_warned_no_context: list[bool] = []


def current_admission() -> Admission | None:
    """The current request's admission, or ``None`` (no guard runs, no request, no app
    context at all)."""
    try:
        return g.get("_llmauth_admission")
    except RuntimeError:  # outside an app context: Flask's "working outside" error
        return None


def record_usage(prompt_tokens: int = 0, completion_tokens: int = 0, *,
                 model: str | None = None) -> None:
    """Report the tokens a view used (overrides what the response or stream reports).

    Call it from a host view that does not return an OpenAI/Anthropic-shaped body; outside a
    guarded request it does nothing. Outside any app context (a generator streamed without
    ``stream_with_context``) it does nothing either, and logs a warning once.
    """
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer")
    if not has_app_context():
        if not _warned_no_context:
            _warned_no_context.append(True)
            log.warning("llmauth: record_usage() called outside an app context (a stream "
                        "without stream_with_context?): the usage is not recorded")
        return
    admission = current_admission()
    if admission is not None:
        admission.usage = Usage(prompt_tokens, completion_tokens, model or admission.model)


