"""The pricing formula, its rounding, premium pricing and the bulk discounts."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from services.billing.pricing import (
    ImageGenerationItem,
    bulk_discount_percent,
    price_units,
    purchase_paid_units,
    quote,
)
from services.common.errors import InvalidRequest, PremiumRequired
from services.common.registry import ModelSpec, Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY


@pytest.fixture(scope="module")
def registry() -> Registry:
    base = load_registry(DEFAULT_REGISTRY)
    vip = ModelSpec.model_validate(
        {
            "id": "vip-model",
            "capability": "text-to-image",
            "engine": "zimage",
            "limits": {"max_width": 1024, "max_height": 1024},
            "defaults": {"steps": 4},
            "price": {"base": "1", "per_megapixel": "0", "reference_steps": 4, "premium_only": True},
        }
    )
    return Registry([*base.models, vip], Path("test-registry.toml"))


def item(model: str = "z-image-turbo", width: int = 1024, height: int = 1024, steps: int = 8, count: int = 1):
    return ImageGenerationItem(model=model, width=width, height=height, steps=steps, count=count)


def test_price_follows_the_documented_formula(registry: Registry) -> None:
    # (0.25 + 0.5 * 1.048576) * 8 / 8 = 0.774288 credits -> 0.78 -> 78 units
    assert price_units(item(), registry) == 78


def test_price_of_a_fraction_of_a_unit_is_rounded_up(registry: Registry) -> None:
    # 64x64: 0.25 + 0.5 * 0.004096 = 0.252048 credits -> 25.2048 units -> 26
    assert price_units(item(width=64, height=64), registry) == 26
    # 512x512: 0.25 + 0.5 * 0.262144 = 0.381072 credits -> 39 units
    assert price_units(item(width=512, height=512), registry) == 39


def test_price_scales_with_steps_relative_to_the_reference(registry: Registry) -> None:
    # 16 steps: 2 * 0.774288 = 1.548576 -> 155 units; 4 steps: 0.387144 -> 39 units
    assert price_units(item(steps=16), registry) == 155
    assert price_units(item(steps=4), registry) == 39


def test_price_multiplies_the_rounded_image_price_by_the_count(registry: Registry) -> None:
    # 512x512 at 8 steps: 0.381072 credits -> 39 units per image; 3 images: 3 * 39 = 117
    # (rounding the sum instead, 3 * 0.381072 = 1.143216 -> 115, would be wrong)
    assert price_units(item(width=512, height=512, count=3), registry) == 117


def test_a_count_of_zero_is_priced_as_one_image(registry: Registry) -> None:
    # 512x512 at 8 steps: 39 units (see above)
    assert price_units(item(width=512, height=512, count=0), registry) == 39


def test_price_is_an_exact_integer(registry: Registry) -> None:
    assert isinstance(price_units(item(width=1792, height=1024), registry), int)
    # 1792x1024 = 1.835008 MP: 0.25 + 0.917504 = 1.167504 -> 117 units
    assert price_units(item(width=1792, height=1024), registry) == 117


@pytest.mark.parametrize(
    ("alias", "units"),
    [
        ("dall-e-3", 78),  # z-image-turbo, 1024x1024 at 8 steps: 0.774288 -> 78 units
        ("flux-2-klein-4b", 50),  # FLUX.2-klein-4B: a flat 0.5 credits per image
        ("facebook/sam3", 25),  # sam3: a flat 0.25 credits per image
    ],
)
def test_aliases_are_priced_as_their_model(registry: Registry, alias: str, units: int) -> None:
    assert price_units(item(model=alias), registry) == units


def test_unknown_model_is_an_invalid_request_naming_the_supported_models(registry: Registry) -> None:
    with pytest.raises(InvalidRequest) as info:
        price_units(item(model="nope"), registry)
    assert info.value.message.startswith("Invalid model ID 'nope'. Supported models: z-image-turbo")


@pytest.mark.parametrize(
    ("width", "height", "steps", "count"), [(0, 64, 8, 1), (64, -1, 8, 1), (64, 64, 0, 1), (64, 64, 8, -2)]
)
def test_nonsense_dimensions_are_invalid_requests(
    registry: Registry, width: int, height: int, steps: int, count: int
) -> None:
    with pytest.raises(InvalidRequest):
        price_units(item(width=width, height=height, steps=steps, count=count), registry)


def test_quote_lists_each_items_own_price_in_order(registry: Registry) -> None:
    items = [
        item(),  # z-image-turbo 1024x1024, 8 steps: 0.774288 -> 78 units
        item(width=512, height=512, count=3),  # 0.381072 -> 39 units per image, 3 images: 117
        item(model="black-forest-labs/FLUX.2-klein-4B", steps=4, count=2),  # flat 0.5 credits, 2: 100
        item(model="sam3", width=0, height=0, steps=0, count=3),  # 0.25 per image, 3 images: 75
    ]
    assert quote(items, registry, premium=False) == [78, 117, 100, 75]


def test_premium_accounts_pay_nothing(registry: Registry) -> None:
    assert quote([item(), item(model="vip-model")], registry, premium=True) == [0, 0]


def test_premium_only_model_refuses_other_accounts(registry: Registry) -> None:
    with pytest.raises(PremiumRequired) as info:
        quote([item(model="vip-model", steps=4)], registry, premium=False)
    assert info.value.message == "This model requires a premium subscription."


def test_quote_of_nothing_is_an_invalid_request(registry: Registry) -> None:
    with pytest.raises(InvalidRequest):
        quote([], registry, premium=False)


@pytest.mark.parametrize(
    ("credits", "percent"),
    [("999", 0), ("999.99", 0), ("1000", 10), ("9999.99", 10), ("10000", 20), ("250000", 20)],
)
def test_bulk_discount_thresholds(credits: str, percent: int) -> None:
    assert bulk_discount_percent(Decimal(credits)) == percent


@pytest.mark.parametrize(
    ("credits_units", "percent", "paid_units"),
    [
        (99_900, 0, 99_900),  # 999 credits: $9.99
        (100_000, 10, 90_000),  # 1,000 credits: $9.00
        (1_000_000, 20, 800_000),  # 10,000 credits: $80.00
        (100_025, 10, 90_022),  # 1,000.25 credits: 90,022.5 units rounded down
    ],
)
def test_purchase_price_applies_the_discount_in_units(
    credits_units: int, percent: int, paid_units: int
) -> None:
    assert purchase_paid_units(credits_units) == (percent, paid_units)


def test_an_edit_on_flux2_klein_costs_half_a_credit_per_image_whatever_the_steps(registry: Registry) -> None:
    for model, steps in (
        ("black-forest-labs/FLUX.2-klein-4B", 4),
        ("black-forest-labs/FLUX.2-klein-base-4B", 50),
    ):
        assert price_units(item(model=model, steps=steps), registry) == 50
        assert price_units(item(model=model, steps=steps, width=2048, height=2048, count=2), registry) == 100


def test_segmentation_costs_a_quarter_credit_per_image_or_frame(registry: Registry) -> None:
    assert price_units(item(model="sam3", width=0, height=0, steps=0, count=1), registry) == 25
    assert price_units(item(model="sam3", width=0, height=0, steps=0, count=240), registry) == 6000
    with pytest.raises(InvalidRequest, match="'width' must be a positive integer"):
        price_units(item(width=0), registry)
