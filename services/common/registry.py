"""The model registry: which models exist, their aliases, limits, defaults and prices.

Every process reads the same registry file (``KILN_REGISTRY_PATH``): image_gen
for engines and weights, billing for prices, the edge for aliases, limits and
``GET /v1/models``. The request rules below are the single place where a
generation request is checked and its defaults filled, so the edge and a
direct gRPC caller of image_gen are held to the same rules.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

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
#: Sizes the contract lists for ``image_size`` / ``size``.
IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1024x1792", "1792x1024")
DEFAULT_IMAGE_SIZE = "1024x1024"
#: ``aspect_ratio`` values and ``resolution`` tiers (the long side in pixels).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "16:9": (16, 9),
    "9:16": (9, 16),
    "4:3": (4, 3),
    "3:4": (3, 4),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "21:9": (21, 9),
    "9:21": (9, 21),
}
RESOLUTIONS: dict[str, int] = {"1K": 1024, "2K": 2048, "4K": 4096}
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MIN_IMAGE_SIDE = 64
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


@dataclass(frozen=True)
class GenerationParams:
    """An image request (text-to-image or edit) with every default filled in and every rule checked.

    ``prompt`` and ``negative_prompt`` already carry the style preset, if any.
    """

    model: ModelSpec
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int | None
    count: int
    output_format: str = "png"
    embed_metadata: bool = False
    style_preset: str = ""
    #: Encoded input images of an edit (empty for text-to-image).
    inputs: tuple[bytes, ...] = ()
    #: Encoded mask of an edit (empty: edit the whole image).
    mask: bytes = b""

    @property
    def capability(self) -> str:
        return IMAGE_EDIT if self.inputs else TEXT_TO_IMAGE


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

    def output_size(
        self,
        spec: ModelSpec,
        *,
        width: int | None = None,
        height: int | None = None,
        aspect_ratio: str | None = None,
        resolution: str | None = None,
        size: str | None = None,
        first_input: tuple[int, int] | None = None,
        match_image_size: bool = False,
    ) -> tuple[int, int]:
        """The output size a request asks for, by the first rule that applies.

        ``match_image_size`` (the first input's size), then ``width``/``height``,
        then ``aspect_ratio``/``resolution`` (the tier is the long side; 1K by
        default), then ``size``, then the first input's size (edits), then
        1024x1024. An input's size is scaled down to fit the model's limits and
        rounded down to its multiple. Sizes from different rules may not be mixed.
        """
        given = [
            name
            for name, present in (
                ("width/height", width is not None or height is not None),
                ("aspect_ratio/resolution", aspect_ratio is not None or resolution is not None),
                ("size", size is not None),
            )
            if present
        ]
        if len(given) > 1:
            raise InvalidRequest(f"Give the output size one way only, not {' and '.join(given)}")
        if match_image_size:
            if first_input is None:
                raise InvalidRequest("'match_image_size' needs an input image")
            return _fit(spec, *first_input)
        if width is not None or height is not None:
            if width is None or height is None:
                raise InvalidRequest("Give both 'width' and 'height'")
            return width, height
        if aspect_ratio is not None or resolution is not None:
            ratio = ASPECT_RATIOS.get(aspect_ratio or "1:1")
            if ratio is None:
                raise InvalidRequest(
                    f"Invalid aspect_ratio '{aspect_ratio}'. Supported ratios: {', '.join(ASPECT_RATIOS)}"
                )
            tier = resolution or "1K"
            long_side = RESOLUTIONS.get(tier)
            if long_side is None:
                raise InvalidRequest(
                    f"Invalid resolution '{resolution}'. Supported resolutions: {', '.join(RESOLUTIONS)}"
                )
            w, h = _sides(long_side, ratio, spec.limits.multiple_of)
            limits = spec.limits
            if w > limits.max_width or h > limits.max_height:
                raise InvalidRequest(
                    f"The resolution {tier} at {aspect_ratio or '1:1'} ({w}x{h}) exceeds the maximum allowed "
                    f"for the {spec.id} model ({limits.max_width}x{limits.max_height})"
                )
            return w, h
        if size is not None:
            return parse_size(size)
        if first_input is not None:
            return _fit(spec, *first_input)
        return parse_size(DEFAULT_IMAGE_SIZE)

    def generation_params(self, *, model: str | None, **kw: Any) -> GenerationParams:
        """Checks a text-to-image request against its model and fills the defaults."""
        spec = self.resolve(model, TEXT_TO_IMAGE, DEFAULT_IMAGE_MODEL)
        return self._params(spec, **kw)

    def edit_params(self, *, model: str | None, inputs: Sequence[bytes], **kw: Any) -> GenerationParams:
        """Checks an edit against its model (1 to max_input_images inputs) and fills the defaults."""
        spec = self.resolve(model, IMAGE_EDIT, DEFAULT_EDIT_MODEL)
        self.check_input_count(spec, len(inputs))
        return self._params(spec, inputs=tuple(inputs), **kw)

    @staticmethod
    def check_input_count(spec: ModelSpec, count: int) -> None:
        """An edit gives 1 to the model's max_input_images input images."""
        if count < 1:
            raise InvalidRequest("An edit needs at least one input image ('input_images' or 'image')")
        most = spec.limits.max_input_images
        if count > most:
            raise InvalidRequest(
                f"Too many input images: {count}; the {spec.id} model accepts at most {most}"
            )

    def _params(
        self,
        spec: ModelSpec,
        *,
        prompt: str,
        width: int,
        height: int,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        count: int | None = None,
        output_format: str = "png",
        embed_metadata: bool = False,
        style_preset: str | None = None,
        inputs: tuple[bytes, ...] = (),
        mask: bytes = b"",
        max_prompt_chars: int = 4000,
    ) -> GenerationParams:
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
        if width % limits.multiple_of or height % limits.multiple_of:
            raise InvalidRequest(
                f"The dimensions {width}x{height} must be multiples of {limits.multiple_of} "
                f"for the {spec.id} model"
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
        if output_format not in OUTPUT_FORMATS:
            raise InvalidRequest(
                f"Invalid format '{output_format}'. Supported formats: {', '.join(OUTPUT_FORMATS)}"
            )
        negative = spec.defaults.negative_prompt if negative_prompt is None else negative_prompt
        if style_preset:
            prompt, negative = self.style(style_preset).apply(prompt, negative)
        return GenerationParams(
            model=spec,
            prompt=prompt,
            negative_prompt=negative,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            count=count,
            output_format=output_format,
            embed_metadata=embed_metadata,
            style_preset=style_preset or "",
            inputs=inputs,
            mask=mask,
        )


@dataclass(frozen=True)
class UpscaleParams:
    """An upscale request with its method's rules checked."""

    model: ModelSpec
    scale: int
    output_width: int
    output_height: int


def upscale_params(
    registry: Registry, *, method: str, scale: int | None, width: int, height: int, face_enhance: bool = False
) -> UpscaleParams:
    """Checks an upscale: a known method, a scale it supports (``options.scale`` is its own,
    ``min_scale``..``max_scale`` the range it accepts) and an output within its limits."""
    if not method:
        raise InvalidRequest("Missing required parameter: 'method'")
    spec = registry.get(method)
    if spec is None or not spec.serves(UPSCALE):
        methods = ", ".join(m.id for m in registry.for_capability(UPSCALE))
        raise InvalidRequest(f"Invalid upscaling method '{method}'. Supported methods: {methods}")
    own = int(spec.options.get("scale", 2))
    low, high = int(spec.options.get("min_scale", own)), int(spec.options.get("max_scale", own))
    chosen = own if scale is None else scale
    if not low <= chosen <= high:
        allowed = f"{own} only" if low == high else f"{low} to {high}"
        raise InvalidRequest(f"The method '{spec.id}' upscales by {allowed}; 'scale' {scale} does not fit it")
    if face_enhance and not registry.for_capability(FACE_RESTORATION):
        raise InvalidRequest(
            "'face_enhance' needs a face restoration model (such as GFPGAN or CodeFormer), and none is "
            "installed on this server; send face_enhance=false"
        )
    out_w, out_h = width * chosen, height * chosen
    limits = spec.limits
    if out_w > limits.max_width or out_h > limits.max_height:
        raise InvalidRequest(
            f"The output {out_w}x{out_h} ({width}x{height} x{chosen}) exceeds the maximum allowed for "
            f"the {spec.id} method ({limits.max_width}x{limits.max_height})"
        )
    return UpscaleParams(spec, chosen, out_w, out_h)


def _sides(long_side: int, ratio: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Width and height for a long side and an aspect ratio, rounded to the multiple."""
    rw, rh = ratio
    short = long_side * min(rw, rh) / max(rw, rh)
    short_px = max(multiple, int(short // multiple) * multiple)
    return (long_side, short_px) if rw >= rh else (short_px, long_side)


def _fit(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """An input's size, scaled down (keeping its shape) to the model's limits, rounded down."""
    limits = spec.limits
    scale = min(1.0, limits.max_width / width, limits.max_height / height)
    m = limits.multiple_of
    w = max(m, int(width * scale) // m * m)
    h = max(m, int(height * scale) // m * m)
    return w, h


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
    styles = [StylePreset.model_validate(entry) for entry in data.get("styles", [])]
    return Registry(models, Path(path).resolve(), styles)
