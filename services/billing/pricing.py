"""Prices: the one function every quote goes through, and the bulk discounts.

Image generation
    The price of one image, in credits, comes from the model's
    :class:`~services.common.registry.PriceSpec`::

        per_image = (base + per_megapixel * width * height / 1_000_000) * steps / reference_steps

    (``reference_steps = 0``: no step factor, e.g. a flat 0.5 credits per edited
    image for the FLUX.2-klein models, or 0.25 per segmented image or video
    frame for SAM3) rounded **up** to a whole unit (0.01 credit). An item of ``count`` images
    (0 means 1) costs ``count * per_image``, so n images always cost n times
    the price of one, as ``GET /v1/models`` describes it. Everything is
    computed in :class:`~decimal.Decimal`; results are integer units
    (hundredths of a credit, see :mod:`services.common.money`).

    Example, z-image-turbo (base 0.25, per_megapixel 0.5, reference_steps 8),
    1024x1024 at 8 steps: 0.25 + 0.5 * 1.048576 = 0.774288 -> 0.78 credits
    (78 units) per image.

Premium
    Premium accounts pay 0 for everything. A model whose price says
    ``premium_only`` refuses other accounts with ``premium_required``.

Credit purchases
    1,000 credits or more are 10% off, 10,000 or more 20% off. What was paid
    is recorded in units too (100 units = 1 credit = $0.01), rounded down to
    a whole unit in the buyer's favour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from services.common.errors import InvalidRequest, PremiumRequired, quoted
from services.common.money import UNITS_PER_CREDIT
from services.common.registry import ModelSpec, Registry

PREMIUM_ONLY_MESSAGE = "This model requires a premium subscription."
_MEGAPIXEL = Decimal(1_000_000)

#: (minimum credits, percent off), largest first.
BULK_DISCOUNTS: tuple[tuple[Decimal, int], ...] = ((Decimal(10_000), 20), (Decimal(1_000), 10))


@dataclass(frozen=True)
class ImageGenerationItem:
    """One image request (text-to-image or edit) to price; the servicer converts the proto's usage."""

    model: str
    width: int = 0
    height: int = 0
    steps: int = 0
    count: int = 1


Usage = ImageGenerationItem


def _model(registry: Registry, model_id: str) -> ModelSpec:
    spec = registry.get(model_id) if model_id else None
    if spec is None:
        supported = ", ".join(m.id for m in registry.models)
        raise InvalidRequest(f"Invalid model ID '{quoted(model_id)}'. Supported models: {supported}")
    return spec


def _check(usage: ImageGenerationItem, spec: ModelSpec) -> None:
    """The sizes and steps the model's price depends on must be given."""
    needed = []
    if spec.price.per_megapixel:
        needed += [("width", usage.width), ("height", usage.height)]
    if spec.price.reference_steps:
        needed.append(("steps", usage.steps))
    for name, value in needed:
        if value <= 0:
            raise InvalidRequest(f"'{name}' must be a positive integer to price an image, got {value}")
    if usage.count < 0:
        raise InvalidRequest(f"'count' must not be negative, got {usage.count}")


def image_price_units(spec: ModelSpec, *, width: int, height: int, steps: int) -> int:
    """The list price of one image, in units, rounded up to a whole unit."""
    price = spec.price
    megapixels = Decimal(width) * Decimal(height) / _MEGAPIXEL
    credits = price.base + price.per_megapixel * megapixels
    if price.reference_steps:  # 0: the price does not depend on the steps
        credits = credits * Decimal(steps) / Decimal(price.reference_steps)
    return int((credits * UNITS_PER_CREDIT).to_integral_value(rounding=ROUND_CEILING))


def price_units(usage: Usage, registry: Registry) -> int:
    """The list price of one usage item, in units (ignores premium; see :func:`quote`)."""
    spec = _model(registry, usage.model)
    _check(usage, spec)
    count = usage.count or 1
    return count * image_price_units(spec, width=usage.width, height=usage.height, steps=usage.steps)


def quote(usages: Sequence[Usage], registry: Registry, *, premium: bool) -> list[int]:
    """What an account pays for each item, in units: list prices, or 0 for premium accounts.

    Raises InvalidRequest for an empty list, bad dimensions or an unknown
    model, and PremiumRequired when a non-premium account asks for a
    premium-only model.
    """
    if not usages:
        raise InvalidRequest("At least one usage item is required to price a request.")
    amounts: list[int] = []
    for usage in usages:
        amount = price_units(usage, registry)
        if premium:
            amounts.append(0)
            continue
        price = _model(registry, usage.model).price
        if price.premium_only:
            raise PremiumRequired(price.premium_message or PREMIUM_ONLY_MESSAGE)
        amounts.append(amount)
    return amounts


def bulk_discount_percent(credits: Decimal) -> int:
    """Percent off a purchase of ``credits`` credits."""
    for minimum, percent in BULK_DISCOUNTS:
        if credits >= minimum:
            return percent
    return 0


def purchase_paid_units(credits_units: int) -> tuple[int, int]:
    """(discount percent, units paid) for a purchase of ``credits_units`` units of credit."""
    percent = bulk_discount_percent(Decimal(credits_units) / UNITS_PER_CREDIT)
    paid = (Decimal(credits_units) * (100 - percent) / 100).to_integral_value(rounding=ROUND_FLOOR)
    return percent, int(paid)
