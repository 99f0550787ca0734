"""Money is stored and summed as integer nano-dollars, so totals are exact.

The API speaks floats in USD like LiteLLM; conversion happens only at the edges.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

#: Storage units per US dollar (1 unit = 1e-9 USD; a BIGINT holds more than 9e9 USD).
UNITS_PER_USD = 1_000_000_000
_MAX_USD = Decimal(9_000_000_000)


def to_units(value: object, *, allow_negative: bool = False) -> int:
    """Convert a USD amount (int, float, str or Decimal) to integer units.

    Raises ``ValueError`` for anything that is not a finite number in range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError("must be a number")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("must be a number") from None
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount < 0 and not allow_negative:
        raise ValueError("must not be negative")
    if abs(amount) > _MAX_USD:
        raise ValueError("is too large")
    return int((amount * UNITS_PER_USD).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def to_usd(units: int | None) -> float | None:
    """Convert integer units back to a float USD amount for JSON responses."""
    if units is None:
        return None
    return float(Decimal(units) / UNITS_PER_USD)
