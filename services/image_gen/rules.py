"""The rules of an image request (text-to-image or edit): checked, defaults filled, output size chosen.

Torch-free, so the edge checks a request with the same code as image_gen
before it reserves credits, and a direct gRPC caller of image_gen is held to
the same rules. Each broken rule is an
:class:`~services.common.errors.InvalidRequest` naming the field.

* **Output size** (:func:`output_size`), by the first rule that applies:
  ``match_image_size`` (the first input's size), ``width``/``height``,
  ``aspect_ratio``/``resolution`` (:data:`ASPECT_RATIOS`; the tier of
  :data:`RESOLUTIONS` is the long side, 1K by default), ``size`` (one of
  :data:`IMAGE_SIZES`), the first input's size (edits), then
  :data:`DEFAULT_IMAGE_SIZE`. An input's size is scaled down to the model's
  limits and rounded down to its multiple. Sizes from different rules may not
  be mixed.
* **The rest** (:func:`generation_params`, :func:`edit_params`): a prompt that
  is not blank, prompts within ``max_prompt_chars``, sides from
  :data:`MIN_IMAGE_SIDE` to the model's limits and multiples of its
  ``multiple_of``, steps, count and guidance within range, a seed from 0 to
  ``MAX_SEED``, a format of :data:`OUTPUT_FORMATS`, and an edit's 1 to
  ``max_input_images`` inputs. The style preset is applied here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidRequest
from services.common.registry import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_IMAGE_MODEL,
    IMAGE_EDIT,
    MAX_SEED,
    TEXT_TO_IMAGE,
    ModelSpec,
    Registry,
)

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


def output_size(
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
    """The output size a request asks for, by the first rule that applies (see the module doc)."""
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


def generation_params(registry: Registry, *, model: str | None, **kw: Any) -> GenerationParams:
    """Checks a text-to-image request against its model and fills the defaults."""
    spec = registry.resolve(model, TEXT_TO_IMAGE, DEFAULT_IMAGE_MODEL)
    return _params(registry, spec, **kw)


def edit_params(
    registry: Registry, *, model: str | None, inputs: Sequence[bytes], **kw: Any
) -> GenerationParams:
    """Checks an edit against its model (1 to max_input_images inputs) and fills the defaults."""
    spec = registry.resolve(model, IMAGE_EDIT, DEFAULT_EDIT_MODEL)
    check_input_count(spec, len(inputs))
    return _params(registry, spec, inputs=tuple(inputs), **kw)


def check_input_count(spec: ModelSpec, count: int) -> None:
    """An edit gives 1 to the model's max_input_images input images."""
    if count < 1:
        raise InvalidRequest("An edit needs at least one input image ('input_images' or 'image')")
    most = spec.limits.max_input_images
    if count > most:
        raise InvalidRequest(f"Too many input images: {count}; the {spec.id} model accepts at most {most}")


def _params(
    registry: Registry,
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
        prompt, negative = registry.style(style_preset).apply(prompt, negative)
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
