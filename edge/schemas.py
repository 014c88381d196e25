"""Request bodies of the public API, checked with pydantic.

Types are strict (a string is not an integer), and unknown fields are refused
with OpenAI's message ("Unrecognized request argument supplied: x") rather than
silently dropped. A few OpenAI fields that change nothing here (``user``,
``quality``, ``style``) are accepted and ignored, so clients written for
OpenAI keep working.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import InvalidRequest
from services.common.registry import DEFAULT_IMAGE_SIZE, GenerationParams, Registry, parse_size

M = TypeVar("M", bound=BaseModel)

EDITS_ONLY_FIELDS = ("image", "mask", "input_images")
MAX_BATCH_REQUESTS = 5


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageGenerationRequest(_Body):
    """``POST /v1/images/generations``."""

    model: str | None = Field(
        None, min_length=1, description='Model id or alias; "z-image-turbo" by default.'
    )
    prompt: str = Field(description="Text description for image generation.")
    negative_prompt: str | None = Field(
        None,
        description='Things to avoid; default "blurry, distorted, low quality, bad anatomy, text, '
        'watermark, signature".',
    )
    image_size: str | None = Field(None, description='One of the supported sizes; "1024x1024" by default.')
    size: str | None = Field(None, description="OpenAI's name for image_size.")
    seed: int | None = Field(None, description="Random seed for reproducible results.")
    batch_size: int | None = Field(None, description="Number of images to generate (1 by default).")
    n: int | None = Field(None, description="OpenAI's name for batch_size.")
    num_inference_steps: int | None = Field(None, description="Inference steps (8 by default).")
    guidance_scale: float | None = Field(None, description="Guidance scale; the model's default when null.")
    cfg: float | None = Field(None, description="CFG scale (alternative to guidance_scale).")
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="Return only `url` or only `b64_json`; both when omitted."
    )
    # Accepted for OpenAI compatibility; no effect.
    user: str | None = None
    quality: str | None = None
    style: str | None = None
    # Refused with a pointer to /v1/images/edits.
    image: Any = None
    mask: Any = None
    input_images: Any = None

    def to_params(self, registry: Registry, *, max_prompt_chars: int) -> GenerationParams:
        """Checks the request against its model; fills every default."""
        for name in EDITS_ONLY_FIELDS:
            if getattr(self, name) is not None:
                raise InvalidRequest(
                    f"The '{name}' parameter is not supported on /v1/images/generations. "
                    "Use POST /v1/images/edits for image editing."
                )
        size = _one_of("image_size", self.image_size, "size", self.size) or DEFAULT_IMAGE_SIZE
        width, height = parse_size(size)
        return registry.generation_params(
            model=self.model,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            steps=self.num_inference_steps,
            guidance_scale=_one_of("guidance_scale", self.guidance_scale, "cfg", self.cfg),
            seed=self.seed,
            count=_one_of("batch_size", self.batch_size, "n", self.n),
            max_prompt_chars=max_prompt_chars,
        )


class BatchImageGenerationRequest(_Body):
    """``POST /v1/images/generations/batch``."""

    requests: list[ImageGenerationRequest] = Field(
        description=f"Image generation requests (1 to {MAX_BATCH_REQUESTS})."
    )


def _one_of(name_a: str, a: Any, name_b: str, b: Any) -> Any:
    """Two names for one parameter: either may be given; both only if they agree."""
    if a is not None and b is not None and a != b:
        raise InvalidRequest(f"'{name_a}' and '{name_b}' are the same parameter; give one of them")
    return a if a is not None else b


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else (f".{item}" if parts else str(item)))
    return "".join(parts) or "body"


def invalid_request_from(err: ValidationError) -> InvalidRequest:
    """A clear message for the first problem pydantic found."""
    first = err.errors(include_url=False)[0]
    where = _location(tuple(first["loc"]))
    kind = first["type"]
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {where}")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{where}'")
    if kind == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        if not first["loc"]:
            return InvalidRequest("The request body must be a JSON object.")
        return InvalidRequest(f"Invalid type for '{where}': expected a JSON object")
    return InvalidRequest(f"Invalid value for '{where}': {first['msg']}")


def parse_body(model: type[M], raw: bytes) -> M:
    """Parses and checks a JSON body, or raises InvalidRequest."""
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise invalid_request_from(err) from None
