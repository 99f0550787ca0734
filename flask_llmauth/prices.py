"""Model prices: tokens → cost in integer nano-dollar units, with exact integer math.

Prices are per token, in USD, input (prompt) and output (completion), named as LiteLLM
names them (``input_cost_per_token``, ``output_cost_per_token``). They come from, in order:

1. ``LLMAUTH_MODEL_PRICES`` (``{model: {input_cost_per_token, output_cost_per_token}}``);
2. ``model_list[].model_info`` / ``model_list[].litellm_params`` of a LiteLLM config
   (``input_cost_per_token`` / ``output_cost_per_token`` there, by ``model_name``);
3. the table shipped with the package (``prices.json``: common OpenAI, Anthropic and
   Gemini models at their public list prices);
4. ``LLMAUTH_UNKNOWN_MODEL_PRICE`` for any other model (default free, with one warning
   per model name).

A model name is looked up as given, then without a provider prefix (``openai/gpt-4o``),
then by its longest known prefix ending at a ``-`` (``gpt-4o-2099-01-01`` → ``gpt-4o``).

Internally a price is an integer number of 10⁻¹⁵ USD per token (exact for any price
with up to 15 decimals), so a cost is ``ceil((prompt × in + completion × out) / 10⁶)``
units: exact, and never rounded down to free.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from importlib import resources
from typing import Any, NamedTuple

from .usage import (
    MEDIA_TOKENS,
    Usage,
    estimate_prompt_tokens,
    refuse_unreadable_cap,
    requested_max_tokens,
)

log = logging.getLogger("flask_llmauth")

#: A price's unit: 10⁻¹⁵ USD (a femto-dollar) per token; 10⁶ of them are one money unit.
FEMTO_PER_USD = 10**15
FEMTO_PER_UNIT = 10**6
PRICE_FIELDS = ("input_cost_per_token", "output_cost_per_token")
#: Largest price accepted: 1 USD per token (no model costs more than a thousandth of that).
_MAX_PRICE = Decimal(1)
#: Model names remembered for lookups and unknown-model warnings (a hostile client can send
#: any name a wildcard key allows; the memo never grows past this).
_MEMO_LIMIT = 4096


class Price(NamedTuple):
    """Per-token prices in femto-dollars (10⁻¹⁵ USD)."""

    input: int
    output: int


FREE = Price(0, 0)


def parse_price_value(value: Any) -> int:
    """A USD-per-token amount (number or numeric string) as integer femto-dollars.

    Raises ``ValueError`` for anything else (negative, not finite, above 1 USD per token).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError("must be a number (USD per token)")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError("must be a number (USD per token)") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("must be a non-negative finite number (USD per token)")
    if amount > _MAX_PRICE:
        raise ValueError("must be at most 1 (USD per token)")
    return int((amount * FEMTO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def parse_price(value: Any) -> Price:
    """``{input_cost_per_token, output_cost_per_token}`` → :class:`Price` (a missing
    field is 0; at least one must be given)."""
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping with input_cost_per_token/output_cost_per_token")
    unknown = sorted(str(k) for k in value if k not in PRICE_FIELDS)
    if unknown:
        raise ValueError(f"unknown price field(s) {', '.join(unknown)[:100]}; use "
                         "input_cost_per_token and output_cost_per_token")
    if not any(k in value for k in PRICE_FIELDS):
        raise ValueError("needs input_cost_per_token and/or output_cost_per_token")
    parts = []
    for name in PRICE_FIELDS:
        try:
            parts.append(parse_price_value(value.get(name, 0)))
        except ValueError as exc:
            raise ValueError(f"{name} {exc}") from None
    return Price(*parts)


def shipped_prices() -> dict[str, Price]:
    """The price table shipped with the package."""
    text = resources.files(__package__).joinpath("prices.json").read_text(encoding="utf-8")
    return {name: parse_price(entry) for name, entry in json.loads(text).items()}


def _model_list_prices(model_list: Any) -> dict[str, Price]:
    prices: dict[str, Price] = {}
    for entry in model_list or ():
        name = entry.get("model_name")
        for section in (entry.get("litellm_params"), entry.get("model_info")):
            if isinstance(section, Mapping) and any(k in section for k in PRICE_FIELDS):
                try:
                    prices[name] = parse_price({k: section[k] for k in PRICE_FIELDS
                                                if k in section})
                except ValueError as exc:
                    raise ValueError(f"model_list entry {name!r}: {exc}") from None
    return prices


class PriceTable:
    """Every known price of one app, and the price of unknown models."""

    def __init__(self, prices: Mapping[str, Price], unknown: Price = FREE) -> None:
        self.prices = dict(prices)
        self.unknown = unknown
        #: Model name -> its price, or ``None`` when the table does not know it (what
        #: :meth:`lookup` found; a hot path may read it first).
        self.memo: dict[str, Price | None] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._highest: Price | None = None

    @property
    def highest(self) -> Price:
        """The highest input and output prices of the table, the unknown-model price
        included: the most a token can be charged, whatever model a response reports."""
        found = self._highest
        if found is None:
            every = [*self.prices.values(), self.unknown]
            found = self._highest = Price(max(price.input for price in every),
                                          max(price.output for price in every))
        return found

    @classmethod
    def from_settings(cls, settings: Any) -> PriceTable:
        prices = shipped_prices()
        prices.update(_model_list_prices(getattr(settings, "model_list", ())))
        for name, entry in (getattr(settings, "model_prices", None) or {}).items():
            prices[name] = parse_price(entry)
        unknown = getattr(settings, "unknown_model_price", None)
        return cls(prices, parse_price(unknown) if unknown else FREE)

    def lookup(self, model: str | None) -> Price | None:
        """The price of ``model``, or ``None`` when the table does not know it."""
        if not model:
            return None
        try:
            return self.memo[model]
        except KeyError:
            pass
        price = self._find(model)
        if len(self.memo) < _MEMO_LIMIT:
            self.memo[model] = price
        return price

    def _find(self, model: str) -> Price | None:
        prices = self.prices
        candidates = [model]
        if "/" in model:
            candidates.append(model.rsplit("/", 1)[1])
        for name in candidates:
            if name in prices:
                return prices[name]
        for name in candidates:  # longest known prefix ending at a "-"
            cut = name.rfind("-")
            while cut > 0:
                if name[:cut] in prices:
                    return prices[name[:cut]]
                cut = name.rfind("-", 0, cut)
        return None

    def price(self, *models: str | None) -> Price:
        """The price of the first of ``models`` the table knows, else the unknown-model
        price (with one warning per model name)."""
        for model in models:
            price = self.lookup(model)
            if price is not None:
                return price
        name = next((m for m in models if m), None) or "<no model>"
        if name not in self._warned:
            with self._lock:
                if name not in self._warned and len(self._warned) < _MEMO_LIMIT:
                    self._warned.add(name)
                    log.warning("llmauth: no price for model %r: it costs the unknown-model "
                                "price (LLMAUTH_UNKNOWN_MODEL_PRICE); set LLMAUTH_MODEL_PRICES",
                                name[:100])
        return self.unknown


def alias_price(table: PriceTable, names: Sequence[str]) -> Price | None:
    """The price of a name the table does not know that stands for other models (a key or
    team alias, a ``model_list`` name: ``names[1:]``, as
    :meth:`~flask_llmauth.authz.models.ModelAccess.names_for` answers): the highest input
    and output prices of those the table knows, or ``None`` when it knows none."""
    known = [price for price in map(table.lookup, names[1:]) if price is not None]
    if not known:
        return None
    return Price(max(price.input for price in known), max(price.output for price in known))


def settled_price(table: PriceTable, model: str | None, reported: str | None,
                  names_for: Callable[[str], Sequence[str]]) -> Price:
    """The price a finished request is charged at: the requested name's, else the name the
    response reported, else — for an alias no table knows answered by a model no table
    knows (a private deployment name) — the price the alias stands for
    (:func:`alias_price`, the price its worst case was reserved at), else the
    unknown-model price."""
    price = table.lookup(model)
    if price is None:
        price = table.lookup(reported)
        if price is None and model:
            price = alias_price(table, names_for(model))
        if price is None:
            price = table.price(model, reported)
    return price


def reserved_price(table: PriceTable, model: str | None, names: Sequence[str]) -> Price:
    """The price a request's worst case is reserved at: never below the price
    :func:`settled_price` can charge it at.

    The requested name's, when a table knows it (the request is charged at it, whatever
    the response reports); else, for a name that stands for other models (``names[1:]``: a
    key or team alias, a ``model_list`` name), the highest price of those the tables know
    (:func:`alias_price`: the upstream reports one of them, or a name no table knows);
    else — a name that stands for no priced model, or no name — the highest price of the
    whole table (:attr:`PriceTable.highest`): the response may report any model, and is
    charged at that model's price. (Reserved at the unknown-model price, free by default,
    such a request reserved nothing, and a response reporting a priced model was charged
    money no reservation held.)"""
    price = table.lookup(model)
    if price is not None:
        return price
    price = alias_price(table, names)
    if price is not None:
        return price
    table.price(model)  # the unknown-model warning, once per name
    return table.highest


def _units(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    femto = prompt_tokens * price.input + completion_tokens * price.output
    return -(-femto // FEMTO_PER_UNIT)  # ceil


def prices_for(settings: Any) -> PriceTable:
    """The :class:`PriceTable` of ``settings`` (built once, kept on the settings object)."""
    table = getattr(settings, "_price_table", None)
    if table is None:
        table = PriceTable.from_settings(settings)
        object.__setattr__(settings, "_price_table", table)
    return table


def cost_units(model: str | None, usage: Usage, settings: Any) -> int:
    """What ``usage`` costs in money units (nano-dollars), rounded up.

    The price is that of ``model`` (the name the request asked for, which config prices
    are keyed by), else of ``usage.model`` (the name the response reported).
    """
    price = prices_for(settings).price(model, usage.model)
    return _units(price, usage.prompt_tokens, usage.completion_tokens)


def worst_case_units(model: str | None, body: Any, settings: Any) -> int:
    """The most a request can cost: its prompt estimate plus ``max_tokens`` (or
    ``LLMAUTH_DEFAULT_MAX_TOKENS`` when it asks for none) at ``model``'s price (for a name
    no table knows, the table's highest: :func:`reserved_price`)."""
    table = prices_for(settings)
    price = table.memo.get(model) if model else None
    if price is None:
        price = reserved_price(table, model, ())
    completion = requested_max_tokens(body) or int(getattr(settings, "default_max_tokens", 0))
    if completion < 0:
        refuse_unreadable_cap(body)
    media = getattr(settings, "prompt_media_tokens", MEDIA_TOKENS)
    femto = estimate_prompt_tokens(body, media) * price.input + completion * price.output
    return -(-femto // FEMTO_PER_UNIT)  # _units, inline
