"""Credit amounts. Money is an integer number of hundredths of a credit.

1 credit = $0.01, so one unit is $0.0001. Prices such as 0.25 credits are 25
units. Nothing here uses floats.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

UNITS_PER_CREDIT = 100


def credits_to_units(credits: Decimal | int | str, *, rounding: str = ROUND_CEILING) -> int:
    """Converts a credit amount to units, rounding a fraction of a unit up by default."""
    value = Decimal(str(credits)) * UNITS_PER_CREDIT
    return int(value.to_integral_value(rounding=rounding))


def units_to_credits(units: int) -> Decimal:
    """The exact credit amount of a number of units."""
    return Decimal(units) / UNITS_PER_CREDIT


def format_credits(units: int) -> str:
    """Formats units as credits without trailing zeros: 1000 -> "10", 25 -> "0.25"."""
    text = format(units_to_credits(units), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text
