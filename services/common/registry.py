"""The model registry: which models exist, their aliases, limits, defaults and prices.

Every process reads the same registry file (``KILN_REGISTRY_PATH``): image_gen
for engines and weights, billing for prices, the edge for aliases, limits and
``GET /v1/models``. The request rules that check a request against its model
live with each capability, torch-free (e.g. :mod:`services.image_gen.rules`,
:mod:`services.upscale.rules`, :mod:`services.video.rules`).
"""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import InvalidRequest, quoted

DEFAULT_IMAGE_MODEL = "z-image-turbo"
DEFAULT_EDIT_MODEL = "black-forest-labs/FLUX.2-klein-4B"
TEXT_TO_IMAGE = "text-to-image"
IMAGE_EDIT = "image-edit"
SEGMENTATION = "segmentation"
DEFAULT_SEGMENTATION_MODEL = "sam3"
UPSCALE = "upscale"
CHAT = "chat"
SPEECH = "speech"
DEFAULT_SPEECH_MODEL = "piper-joe"
VOICE_CLONE = "voice-clone"
DEFAULT_CLONE_MODEL = "qwen3-tts-base"
MUSIC = "music"
DEFAULT_MUSIC_MODEL = "ace-step-v1.5"
IMAGE_TO_VIDEO = "image-to-video"
DEFAULT_VIDEO_MODEL = "turbodiffusion-wan2.2-i2v"
DEFAULT_CHAT_MODEL = "Qwen/Qwen3.5-4B"
FACE_RESTORATION = "face-restoration"
SPECIAL_WEIGHTS = ("tiny", "package", "none")
MAX_SEED = 2**63 - 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelLimits(_Frozen):
    max_width: int = Field(gt=0)
    max_height: int = Field(gt=0)
    max_count: int = Field(4, gt=0)
    max_steps: int = Field(50, gt=0)
    #: Width and height must be multiples of this (VAE scale x patch size).
    multiple_of: int = Field(16, gt=0)
    #: Most input images an edit may give.
    max_input_images: int = Field(4, ge=0)
    #: Videos: most frames and seconds accepted (0: the model takes no video).
    max_frames: int = Field(0, ge=0)
    max_duration_seconds: float = Field(0, ge=0)


class ModelDefaults(_Frozen):
    steps: int = Field(1, gt=0)
    guidance_scale: float = 0.0
    negative_prompt: str = ""
    #: Videos: frames generated when a request gives none (0: not a video model).
    num_frames: int = Field(0, ge=0)


class PriceSpec(_Frozen):
    """Price of one output: ``(base + per_megapixel * MP) * steps / reference_steps`` credits.

    ``reference_steps = 0`` means the price does not depend on the steps.
    """

    base: Decimal = Decimal(0)
    per_megapixel: Decimal = Decimal(0)
    reference_steps: int = Field(1, ge=0)
    premium_only: bool = False
    #: The premium_required message for this model (a default when empty).
    premium_message: str = ""

    def describe(self) -> str:
        steps = f" x steps / {self.reference_steps}" if self.reference_steps else ""
        return (
            f"({self.base} + {self.per_megapixel} x megapixels){steps} "
            "credits per image, rounded up to 0.01; premium accounts pay 0"
        )


class StylePreset(_Frozen):
    """A named prompt template (``{prompt}`` is the caller's prompt)."""

    id: str
    name: str
    prompt: str
    negative_prompt: str = ""

    def apply(self, prompt: str, negative_prompt: str) -> tuple[str, str]:
        styled = self.prompt.replace("{prompt}", prompt)
        negative = ", ".join(p for p in (negative_prompt, self.negative_prompt) if p)
        return styled, negative


class ModelSpec(_Frozen):
    id: str
    capability: str
    #: Other capabilities the same weights serve (e.g. an edit model that also draws).
    extra_capabilities: tuple[str, ...] = ()
    description: str = ""
    aliases: tuple[str, ...] = ()
    engine: str
    weights: str = "tiny"
    limits: ModelLimits
    defaults: ModelDefaults = ModelDefaults()
    price: PriceSpec = PriceSpec()
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return (self.capability, *self.extra_capabilities)

    def serves(self, capability: str) -> bool:
        return capability in self.capabilities

    def weights_path(self, registry_file: Path) -> Path | None:
        """The weights directory; None for the special values ``tiny`` (a tiny random-weight
        build), ``package`` (weights shipped in a Python package, the engine knows which)
        and ``none`` (no weights: a classical algorithm)."""
        if self.weights in SPECIAL_WEIGHTS:
            return None
        path = Path(self.weights).expanduser()
        return path if path.is_absolute() else (registry_file.parent / path).resolve()


class Registry:
    """The parsed registry file."""

    def __init__(self, models: list[ModelSpec], path: Path, styles: list[StylePreset] | None = None) -> None:
        self.path = path
        self.models = tuple(models)
        self.styles = {style.id: style for style in styles or ()}
        self._by_name: dict[str, ModelSpec] = {}
        for spec in self.models:
            for name in (spec.id, *spec.aliases):
                if name.lower() in self._by_name:
                    raise ValueError(f"registry {path}: the name {name!r} is used twice")
                self._by_name[name.lower()] = spec

    def for_capability(self, capability: str) -> list[ModelSpec]:
        return [m for m in self.models if m.serves(capability)]

    def get(self, model_id: str) -> ModelSpec | None:
        return self._by_name.get(model_id.lower())

    def resolve(self, name: str | None, capability: str, default: str) -> ModelSpec:
        """The model a request names (an id or alias), or the contract's error."""
        spec = self._by_name.get((name or default).lower())
        if spec is None or not spec.serves(capability):
            supported = ", ".join(m.id for m in self.for_capability(capability))
            raise InvalidRequest(f"Invalid model ID '{quoted(name or '')}'. Supported models: {supported}")
        return spec

    def style(self, style_id: str) -> StylePreset:
        style = self.styles.get(style_id)
        if style is None:
            raise InvalidRequest(
                f"Unknown style_preset '{style_id}'. Supported presets: {', '.join(self.styles)} "
                "(GET /v1/images/styles)"
            )
        return style


def load_registry(path: Path) -> Registry:
    """Reads and checks a registry file."""
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    models = [ModelSpec.model_validate(entry) for entry in data.get("models", [])]
    styles = [StylePreset.model_validate(entry) for entry in data.get("styles", [])]
    return Registry(models, Path(path).resolve(), styles)
