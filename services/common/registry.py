"""The model registry: which models exist, their aliases, limits, defaults and prices.

Every process reads the same registry file (``KILN_REGISTRY_PATH``): image_gen
for engines and weights, billing for prices, the edge for aliases, limits and
``GET /v1/models``. The request rules below are the single place where a
generation request is checked and its defaults filled, so the edge and a
direct gRPC caller of image_gen are held to the same rules.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import InvalidRequest

DEFAULT_IMAGE_MODEL = "z-image-turbo"
#: Sizes the contract lists for ``image_size`` / ``size``.
IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1024x1792", "1792x1024")
DEFAULT_IMAGE_SIZE = "1024x1024"
MIN_IMAGE_SIDE = 64
MAX_SEED = 2**63 - 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelLimits(_Frozen):
    max_width: int = Field(gt=0)
    max_height: int = Field(gt=0)
    max_count: int = Field(4, gt=0)
    max_steps: int = Field(50, gt=0)


class ModelDefaults(_Frozen):
    steps: int = Field(gt=0)
    guidance_scale: float = 0.0
    negative_prompt: str = ""


class PriceSpec(_Frozen):
    """Price of one output: ``(base + per_megapixel * MP) * steps / reference_steps`` credits."""

    base: Decimal = Decimal(0)
    per_megapixel: Decimal = Decimal(0)
    reference_steps: int = Field(1, gt=0)
    premium_only: bool = False

    def describe(self) -> str:
        return (
            f"({self.base} + {self.per_megapixel} x megapixels) x steps / {self.reference_steps} "
            "credits per image, rounded up to 0.01; premium accounts pay 0"
        )


class ModelSpec(_Frozen):
    id: str
    capability: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    engine: str
    weights: str = "tiny"
    limits: ModelLimits
    defaults: ModelDefaults
    price: PriceSpec = PriceSpec()
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)

    def weights_path(self, registry_file: Path) -> Path | None:
        """The weights directory, or None for a tiny random-weight model."""
        if self.weights == "tiny":
            return None
        path = Path(self.weights).expanduser()
        return path if path.is_absolute() else (registry_file.parent / path).resolve()


@dataclass(frozen=True)
class GenerationParams:
    """A text-to-image request with every default filled in and every rule checked."""

    model: ModelSpec
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int | None
    count: int


class Registry:
    """The parsed registry file."""

    def __init__(self, models: list[ModelSpec], path: Path) -> None:
        self.path = path
        self.models = tuple(models)
        self._by_name: dict[str, ModelSpec] = {}
        for spec in self.models:
            for name in (spec.id, *spec.aliases):
                if name.lower() in self._by_name:
                    raise ValueError(f"registry {path}: the name {name!r} is used twice")
                self._by_name[name.lower()] = spec

    def for_capability(self, capability: str) -> list[ModelSpec]:
        return [m for m in self.models if m.capability == capability]

    def get(self, model_id: str) -> ModelSpec | None:
        return self._by_name.get(model_id.lower())

    def resolve(self, name: str | None, capability: str, default: str) -> ModelSpec:
        """The model a request names (an id or alias), or the contract's error."""
        spec = self._by_name.get((name or default).lower())
        if spec is None or spec.capability != capability:
            supported = ", ".join(m.id for m in self.for_capability(capability))
            raise InvalidRequest(f"Invalid model ID '{name}'. Supported models: {supported}")
        return spec

    def generation_params(
        self,
        *,
        model: str | None,
        prompt: str,
        width: int,
        height: int,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        count: int | None = None,
        max_prompt_chars: int = 4000,
    ) -> GenerationParams:
        """Checks a text-to-image request against its model and fills the defaults."""
        spec = self.resolve(model, "text-to-image", DEFAULT_IMAGE_MODEL)
        if not prompt or not prompt.strip():
            raise InvalidRequest("'prompt' is required and must not be empty")
        for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
            if len(text) > max_prompt_chars:
                raise InvalidRequest(f"'{name}' is longer than {max_prompt_chars} characters")
        if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
            raise InvalidRequest(
                f"The dimensions {width}x{height} are below the minimum of {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"
            )
        limits = spec.limits
        if width > limits.max_width or height > limits.max_height:
            raise InvalidRequest(
                f"The dimensions {width}x{height} exceed the maximum allowed for the {spec.id} model "
                f"({limits.max_width}x{limits.max_height})"
            )
        steps = spec.defaults.steps if steps is None else steps
        if not 1 <= steps <= limits.max_steps:
            raise InvalidRequest(f"'num_inference_steps' must be between 1 and {limits.max_steps}")
        count = 1 if count is None else count
        if not 1 <= count <= limits.max_count:
            raise InvalidRequest(f"The number of images must be between 1 and {limits.max_count}")
        guidance = spec.defaults.guidance_scale if guidance_scale is None else guidance_scale
        if not 0.0 <= guidance <= 30.0:
            raise InvalidRequest("'guidance_scale' must be between 0 and 30")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise InvalidRequest(f"'seed' must be between 0 and {MAX_SEED}")
        return GenerationParams(
            model=spec,
            prompt=prompt,
            negative_prompt=spec.defaults.negative_prompt if negative_prompt is None else negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            count=count,
        )


def parse_size(size: str) -> tuple[int, int]:
    """Parses one of the contract's sizes ("1024x1024") into (width, height)."""
    if size not in IMAGE_SIZES:
        raise InvalidRequest(f"Invalid image size '{size}'. Supported sizes: {', '.join(IMAGE_SIZES)}")
    width, height = size.split("x")
    return int(width), int(height)


def load_registry(path: Path) -> Registry:
    """Reads and checks a registry file."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    models = [ModelSpec.model_validate(entry) for entry in data.get("models", [])]
    return Registry(models, Path(path).resolve())
