"""Request bodies of the public API, checked with pydantic.

Types are strict (a string is not an integer), and unknown fields are refused
with OpenAI's message ("Unrecognized request argument supplied: x") rather than
silently dropped. A few OpenAI fields that change nothing here (``user``,
``quality``, ``style``) are accepted and ignored, so clients written for
OpenAI keep working.

Every string field has a length bound (:data:`Name`, :data:`Text`,
:data:`ChatText`, :data:`Data`), which pydantic-core checks as it reads the
string, before any other check on it (there are no "before" validators here);
lists are bounded too. The bounds are far above what any setting allows (the
settings, e.g. ``max_prompt_chars``, are checked later, with their own
messages): they only keep hostile sizes away from everything after parsing.
Files sent as base64 are bounded by the request body limit and checked in
linear time.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import InvalidRequest
from services.common.media.image import probe_image
from services.common.registry import (
    DEFAULT_EDIT_MODEL,
    DEFAULT_IMAGE_MODEL,
    IMAGE_EDIT,
    MAX_SEED,
    TEXT_TO_IMAGE,
    Registry,
)
from services.common.settings import Settings
from services.image_gen.rules import (
    ASPECT_RATIOS,
    RESOLUTIONS,
    GenerationParams,
    check_input_count,
    edit_params,
    generation_params,
    output_size,
)
from services.llm.rules import MAX_STOP, MAX_TEMPERATURE, MAX_TOP_P
from services.music.rules import MAX_BPM, MIN_BPM
from services.tts.rules import MAX_SPEED, MIN_SPEED

M = TypeVar("M", bound=BaseModel)
#: The largest value of a protobuf int32 field: counts that travel as one are bounded by it.
INT32_MAX = 2**31 - 1

#: Ids, names and options (model, size, voice, language, ...).
NAME_CHARS = 256
#: Prompts, lyrics, texts to speak (the settings allow a few thousand characters).
TEXT_CHARS = 32 * 1024
#: One chat message's text (a long context, still far below 1 MiB).
CHAT_TEXT_CHARS = 256 * 1024
#: A file as base64 or a data: URL (the request body limit applies first).
DATA_CHARS = 128 * 1024 * 1024
Name = Annotated[str, Field(max_length=NAME_CHARS)]
Text = Annotated[str, Field(max_length=TEXT_CHARS)]
ChatText = Annotated[str, Field(max_length=CHAT_TEXT_CHARS)]
Data = Annotated[str, Field(max_length=DATA_CHARS)]
#: Lists: far above what the checks after parsing allow (4 images, 5 requests, 4 stops).
MAX_LIST_ITEMS = 64
MAX_CHAT_MESSAGES = 1024
MAX_CHAT_PARTS = 256
#: Most strings (keys included) a JSON body may hold, counted from its quotes before it is
#: parsed: a long chat has a few thousand. pydantic reports every unknown key and every bad
#: list item; a body of a million unknown keys (12 MiB) held the event loop for 7 s, one of
#: 10,000 takes 33 ms. Lists stop at their first bad item (``fail_fast``).
MAX_JSON_STRINGS = 10_000

EDITS_ONLY_FIELDS = ("image", "mask", "input_images")
MAX_BATCH_REQUESTS = 5


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DryRun(BaseModel):
    """The ``dry_run`` field of every paid request (``edge.flow``). A mixin with no
    configuration of its own: the model's other base decides strictness and extra fields."""

    dry_run: bool = Field(
        False,
        description="Check the request and answer its price (a price_preview) without running, "
        "holding or charging anything; the same as ?dry_run=true.",
    )


class ImageOptions(_Body):
    """Output options shared by generations and edits (the best of the peer APIs)."""

    width: int | None = Field(None, description="Output width in pixels (with height).")
    height: int | None = Field(None, description="Output height in pixels (with width).")
    aspect_ratio: Name | None = Field(
        None, description=f"One of {', '.join(ASPECT_RATIOS)}; with `resolution` (1K by default)."
    )
    resolution: Name | None = Field(
        None, description=f"Resolution tier, the long side: {', '.join(RESOLUTIONS)} ({RESOLUTIONS})."
    )
    format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="Output file format; png by default."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="OpenAI's name for format."
    )
    return_binary: bool = Field(
        False, description="Answer with the image bytes instead of JSON (one image only)."
    )
    embed_exif_metadata: bool = Field(
        False, description="Write prompt, negative prompt, model, seed and steps into the file's metadata."
    )
    variants: int | None = Field(None, description="Number of images (1-4); another name for n.")
    n: int | None = Field(None, description="OpenAI's name for the number of images.")
    style_preset: Name | None = Field(None, description="A style preset id from GET /v1/images/styles.")
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="Return only `url` or only `b64_json`; both when omitted."
    )
    # Accepted for OpenAI compatibility; no effect.
    user: Name | None = None
    quality: Name | None = None
    style: Name | None = None

    def output(self) -> dict[str, Any]:
        """The registry keyword arguments these options decide."""
        return {
            "output_format": _one_of(format=self.format, output_format=self.output_format) or "png",
            "embed_metadata": self.embed_exif_metadata,
            "style_preset": self.style_preset,
        }

    def check_binary(self, count: int) -> None:
        if self.return_binary and count != 1:
            raise InvalidRequest(
                f"'return_binary' returns a single image file; this request makes {count} images. "
                "Ask for one image, or leave return_binary off to get JSON."
            )


class ImageGenerationItem(ImageOptions):
    """One text-to-image request: ``POST /v1/images/generations``'s body, or one of a batch's."""

    model: Name | None = Field(
        None, min_length=1, description='Model id or alias; "z-image-turbo" by default.'
    )
    prompt: Text = Field(description="Text description for image generation.")
    negative_prompt: Text | None = Field(
        None,
        description='Things to avoid; default "blurry, distorted, low quality, bad anatomy, text, '
        'watermark, signature".',
    )
    image_size: Name | None = Field(None, description='One of the supported sizes; "1024x1024" by default.')
    size: Name | None = Field(None, description="OpenAI's name for image_size.")
    seed: int | None = Field(None, description="Random seed for reproducible results.")
    batch_size: int | None = Field(None, description="Number of images to generate (1 by default).")
    num_inference_steps: int | None = Field(None, description="Inference steps (8 by default).")
    guidance_scale: float | None = Field(None, description="Guidance scale; the model's default when null.")
    cfg: float | None = Field(None, description="CFG scale (alternative to guidance_scale).")
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
        spec = registry.resolve(self.model, TEXT_TO_IMAGE, DEFAULT_IMAGE_MODEL)
        width, height = output_size(
            spec,
            width=self.width,
            height=self.height,
            aspect_ratio=self.aspect_ratio,
            resolution=self.resolution,
            size=_one_of(image_size=self.image_size, size=self.size),
        )
        params = generation_params(
            registry,
            model=spec.id,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            width=width,
            height=height,
            steps=self.num_inference_steps,
            guidance_scale=_one_of(guidance_scale=self.guidance_scale, cfg=self.cfg),
            seed=self.seed,
            count=_one_of(batch_size=self.batch_size, n=self.n, variants=self.variants),
            max_prompt_chars=max_prompt_chars,
            **self.output(),
        )
        self.check_binary(params.count)
        return params


class ImageGenerationRequest(ImageGenerationItem, DryRun):
    """``POST /v1/images/generations``."""


class BatchImageGenerationRequest(_Body, DryRun):
    """``POST /v1/images/generations/batch`` (``dry_run`` prices the whole batch)."""

    requests: list[ImageGenerationItem] = Field(
        max_length=MAX_LIST_ITEMS, description=f"Image generation requests (1 to {MAX_BATCH_REQUESTS})."
    )


class ImageEditRequest(ImageOptions, DryRun):
    """``POST /v1/images/edits`` as JSON (the contract's body)."""

    model: Name | None = Field(
        None,
        min_length=1,
        description='"black-forest-labs/FLUX.2-klein-4B" (distilled, the default) or '
        '"black-forest-labs/FLUX.2-klein-base-4B" (base).',
    )
    prompt: Text = Field(description="Text description for the edit.")
    negative_prompt: Text | None = Field(
        None, description='Things to avoid; "blurry, distorted, low quality".'
    )
    input_images: list[Data] = Field(
        max_length=MAX_LIST_ITEMS, fail_fast=True, description="1 to 4 images: base64, or data: URLs."
    )
    mask: Data | None = Field(None, description="Optional mask (base64): transparent pixels are repainted.")
    match_image_size: Literal[0, 1] = Field(
        0, description="0 = use the given size, 1 = match the first input image."
    )
    size: Name | None = Field(None, description="One of the supported sizes (OpenAI).")
    num_steps: int | None = Field(None, description="Inference steps: 4 distilled / 50 base by default.")
    guidance: float | None = Field(None, description="Guidance scale: 1.0 distilled / 4.0 base by default.")
    seed: int | None = Field(None, description="Random seed for reproducible results.")

    def to_params(self, registry: Registry, settings: Settings) -> GenerationParams:
        inputs = [decode_base64_file(data, f"input_images[{i}]") for i, data in enumerate(self.input_images)]
        mask = decode_base64_file(self.mask, "mask") if self.mask is not None else b""
        return _check_edit(registry, settings, self, inputs=inputs, mask=mask)


class ImageEditForm(ImageOptions, DryRun):
    """``POST /v1/images/edits`` as OpenAI's multipart form (files are passed apart)."""

    model_config = ConfigDict(extra="forbid", strict=False)

    model: Name | None = Field(None, min_length=1)
    prompt: Text
    negative_prompt: Text | None = None
    size: Name | None = None
    seed: int | None = None
    num_steps: int | None = None
    guidance: float | None = None
    match_image_size: bool = False
    # OpenAI gpt-image fields that change nothing here.
    background: Name | None = None
    input_fidelity: Name | None = None
    output_compression: int | None = None
    partial_images: int | None = None
    stream: bool | None = None

    def to_params(
        self, registry: Registry, settings: Settings, *, inputs: list[bytes], mask: bytes
    ) -> GenerationParams:
        if self.stream:
            raise InvalidRequest("Streaming image edits are not supported; leave 'stream' off.")
        return _check_edit(registry, settings, self, inputs=inputs, mask=mask)


def _check_edit(
    registry: Registry,
    settings: Settings,
    body: ImageEditRequest | ImageEditForm,
    *,
    inputs: list[bytes],
    mask: bytes,
) -> GenerationParams:
    """Checks an edit before anything is reserved: the inputs' headers (format, pixels,
    bytes; nothing is decoded here), the size rules and every model rule."""
    spec = registry.resolve(body.model, IMAGE_EDIT, DEFAULT_EDIT_MODEL)
    check_input_count(spec, len(inputs))
    infos = []
    named = [(f"Input image {index + 1}", data) for index, data in enumerate(inputs)]
    for name, data in [*named, *([("Mask", mask)] if mask else [])]:
        try:
            infos.append(
                probe_image(
                    data, max_pixels=settings.max_input_image_pixels, max_bytes=settings.max_input_image_bytes
                )
            )
        except InvalidRequest as err:
            raise InvalidRequest(f"{name}: {err.message}") from None
    width, height = output_size(
        spec,
        width=body.width,
        height=body.height,
        aspect_ratio=body.aspect_ratio,
        resolution=body.resolution,
        size=body.size,
        first_input=(infos[0].width, infos[0].height),
        match_image_size=bool(body.match_image_size),
    )
    params = edit_params(
        registry,
        model=spec.id,
        inputs=inputs,
        mask=mask,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=body.num_steps,
        guidance_scale=body.guidance,
        seed=body.seed,
        count=_one_of(n=body.n, variants=body.variants),
        max_prompt_chars=settings.max_prompt_chars,
        **body.output(),
    )
    body.check_binary(params.count)
    return params


_DATA_URL = re.compile(r"^data:(?:image|audio)/[A-Za-z0-9.+-]+;base64,", re.ASCII)


def decode_base64_file(data: str, name: str) -> bytes:
    """The bytes of a base64 file (an image, or audio) or ``data:`` URL; InvalidRequest when it is neither."""
    text = _DATA_URL.sub("", data.strip(), count=1)
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"'{name}' is not valid base64 (or a data: URL with base64)") from None
    if not decoded:
        raise InvalidRequest(f"'{name}' is empty")
    return decoded


def _one_of(**named: Any) -> Any:
    """Several names for one parameter: any may be given; more than one only if they agree."""
    given = {name: value for name, value in named.items() if value is not None}
    if len(set(map(repr, given.values()))) > 1:
        names = " and ".join(f"'{name}'" for name in given)
        raise InvalidRequest(f"{names} are the same parameter; give one of them")
    return next(iter(given.values()), None)


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else (f".{item}" if parts else str(item)))
    return "".join(parts) or "body"


def invalid_request_from(err: ValidationError) -> InvalidRequest:
    """A clear message for the first problem pydantic found."""
    first = err.errors(include_url=False, include_input=False, include_context=False)[0]
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
    if (raw.count(b'"') - raw.count(b'\\"')) // 2 > MAX_JSON_STRINGS:  # escaped quotes are text
        raise InvalidRequest(f"The request body holds more than {MAX_JSON_STRINGS} strings.")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        raise invalid_request_from(err) from None


class _Form(BaseModel):
    """Text fields of a multipart form (values arrive as strings, so types are lax)."""

    model_config = ConfigDict(extra="forbid", strict=False)


class SegmentationForm(_Form, DryRun):
    """``POST /v1/images/segmentations`` (multipart, with a ``file`` upload)."""

    prompt: Text = Field("", description="What to segment; optional when point_coords are given.")
    point_coords: Text | None = Field(None, description="JSON [[x, y], ...] in the image's pixels.")
    point_labels: Text | None = Field(None, description="JSON [1, 0, ...]: 1 foreground, 0 background.")
    multimask_output: bool = Field(False, description="Up to 3 candidate masks (with points only).")
    output: Literal["cutout", "mask"] = Field(
        "cutout", description="cutout: the object on transparency; mask: a grey mask (255 inside)."
    )
    model: Name | None = Field(None, min_length=1, description='"sam3" by default.')


class BackgroundRemovalForm(_Form, DryRun):
    """``POST /v1/images/remove-background`` and ``/v1/videos/remove-background`` (multipart)."""

    prompt: Text = Field(description="The object to keep; everything else becomes transparent.")
    model: Name | None = Field(None, min_length=1, description='"sam3" by default.')


def parse_form(model: type[M], fields: dict[str, str]) -> M:
    """Checks a form's text fields, or raises InvalidRequest. Types are lax (the values
    arrive as strings), also for a JSON body's model used for its form variant."""
    try:
        return model.model_validate(fields, strict=False)
    except ValidationError as err:
        raise invalid_request_from(err) from None


class UpscaleRequest(_Body, DryRun):
    """``POST /v1/images/upscale``."""

    image: Data = Field(description="The image: base64, or a data: URL.")
    method: Name = Field(
        description="realesrgan_2x, realesrgan_4x, realesrgan_4x_anime, swin2sr or lanczos (GET /v1/models)."
    )
    scale: int | None = Field(
        None,
        description="lanczos 2-8, swin2sr 2-4; the others are fixed by the method (a different one is a 400).",
    )
    face_enhance: bool = Field(False, description="Restore faces (needs a face restoration model).")
    format: Literal["png", "jpeg", "webp"] | None = Field(
        None, description="Output file format; png by default."
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="Return only `url` or only `b64_json`; both when omitted."
    )
    user: Name | None = None


class ImageUrl(_Body):
    url: Data = Field(description="A data: URL or an https:// URL of a PNG, JPEG or WebP image.")
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: ChatText


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageUrl


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is taken as system (OpenAI's newer name)."
    )
    content: (
        ChatText | Annotated[list[TextPart | ImagePart], Field(max_length=MAX_CHAT_PARTS, fail_fast=True)]
    ) = Field(description="A string, or text and image_url parts.")
    name: Name | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body, DryRun):
    """``POST /v1/chat/completions`` (OpenAI's chat schema)."""

    model: Name | None = Field(
        None, min_length=1, description='A chat model id or alias; "Qwen/Qwen3.5-4B" by default.'
    )
    messages: list[ChatMessage] = Field(
        max_length=MAX_CHAT_MESSAGES, fail_fast=True, description="The conversation."
    )
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description=f"0 to {MAX_TEMPERATURE}; 0 is greedy."
    )
    top_p: float | None = Field(None, ge=0, le=MAX_TOP_P, description=f"Nucleus sampling, 0 to {MAX_TOP_P}.")
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=INT32_MAX, description="OpenAI's newer name for max_tokens."
    )
    stream: bool = Field(False, description="Stream chat.completion.chunk events (text/event-stream).")
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="Random seed for sampling.")
    stop: Text | Annotated[list[Text], Field(max_length=MAX_LIST_ITEMS, fail_fast=True)] | None = Field(
        None, description=f"Up to {MAX_STOP} stop sequences."
    )
    n: int | None = Field(None, description="Only 1 is supported.")
    user: Name | None = None

    def answer_limit(self) -> int | None:
        return _one_of(max_tokens=self.max_tokens, max_completion_tokens=self.max_completion_tokens)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise InvalidRequest(f"'stop' takes up to {MAX_STOP} non-empty strings")
        return stops


#: OpenAI's speech model names; every one is served by the voice the request names.
SPEECH_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "piper")


class SpeechRequest(_Body, DryRun):
    """``POST /v1/audio/speech`` (OpenAI's schema)."""

    model: Name = Field(description=f"One of {', '.join(SPEECH_MODELS)}; all are served by the voice.")
    input: Text = Field(description="The text to speak (at most 4096 characters).")
    voice: Name = Field(description="A voice from GET /v1/audio/voices (OpenAI's voice names are aliases).")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field(
        "mp3", description="The audio format (mp3 by default, as OpenAI's)."
    )
    speed: float = Field(
        1.0, ge=MIN_SPEED, le=MAX_SPEED, description=f"Speaking rate, {MIN_SPEED} to {MAX_SPEED}."
    )
    instructions: Text | None = Field(None, description="Accepted for OpenAI compatibility; no effect.")
    stream_format: Literal["audio"] | None = Field(None, description="Only 'audio' (raw audio) is supported.")


class VoiceCloneRequest(_Body, DryRun):
    """``POST /v1/audio/clone`` (the contract's schema, plus ``seed``)."""

    text: Text = Field(description="The text to synthesize using the cloned voice.")
    ref_audio: Data = Field(
        description="Base64 encoded reference audio file (WAV recommended; FLAC, MP3 and Ogg too), "
        "or a data: URL; at most 60 seconds."
    )
    ref_text: Text = Field(description="The text spoken in the reference audio (must match it).")
    language: Name = Field(
        "English", description="Language of the synthesized speech (GET /v1/audio/clone/languages)."
    )
    stream: bool = Field(
        False,
        description="Stream the WAV as it is synthesized (chunked); the finished file is stored for "
        "Range requests at the Content-Location URL.",
    )
    seed: int | None = Field(None, ge=1, le=2**63 - 1, description="Kiln extension: a repeatable result.")


#: Audio formats of the music endpoints (the contract's list).
MUSIC_FORMATS = ("wav", "mp3", "flac", "opus", "aac")


class MusicOptions(_Body, DryRun):
    """Fields shared by ``/v1/music/generate``, ``/cover`` and ``/repaint``.

    The music service checks the values (key, time signature, bpm and duration
    ranges) and its messages name these fields.
    """

    prompt: Text = Field(description="The style: genre, instruments, mood, vocals.")
    lyrics: Text = Field(
        "", description='Lyrics with section tags ("[verse]", "[chorus]"); empty when instrumental.'
    )
    bpm: int | None = Field(
        None,
        ge=MIN_BPM,
        le=MAX_BPM,
        description=f"Beats per minute, {MIN_BPM} to {MAX_BPM}; the model chooses when absent.",
    )
    key_scale: Name = Field(
        "", description='Key and scale, e.g. "C Major", "F# minor"; the model chooses when empty.'
    )
    time_signature: Name = Field("", description='e.g. "4/4", "3/4", "6/8"; the model chooses when empty.')
    vocal_language: Name = Field("", description='ISO 639 code of the lyrics ("en" when empty).')
    instrumental: bool = Field(False, description="No vocals.")
    audio_format: Literal["wav", "mp3", "flac", "opus", "aac"] = Field(
        "wav", description="The output format."
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed and inputs, same audio.")
    num_inference_steps: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Denoising steps (8 by default, at most 50)."
    )
    model: Name | None = Field(None, min_length=1, description='"ace-step-v1.5" by default.')


class MusicGenerateRequest(MusicOptions):
    """``POST /v1/music/generate`` (the contract's JSON body)."""

    duration: float | None = Field(None, description="Seconds of music, 1 to 600 (30 when absent).")


class MusicCoverRequest(MusicOptions):
    """``POST /v1/music/cover``: JSON with base64 ``audio``, or multipart with an ``audio`` file."""

    audio: Data | None = Field(
        None, description="The source song, base64 or a data: URL (WAV, MP3, FLAC, Ogg, AAC); 1 to 600 s."
    )
    audio_cover_strength: float | None = Field(
        None, description="How closely the cover follows the source's structure, 0 to 1 (1 when absent)."
    )


class MusicRepaintRequest(MusicOptions):
    """``POST /v1/music/repaint``: JSON with base64 ``audio``, or multipart with an ``audio`` file."""

    audio: Data | None = Field(None, description="The source song, base64 or a data: URL; 1 to 600 s.")
    start: float = Field(description="Where the region to regenerate starts, in seconds (0 or more).")
    end: float | None = Field(
        None, description="Where it ends, in seconds (the end of the song when absent)."
    )


class ImageToVideoForm(_Form, DryRun):
    """``POST /v1/images/img2video`` (multipart, with an ``image`` file)."""

    prompt: Text = Field(description="How the picture should move.")
    negative_prompt: Text | None = Field(None, description="What to avoid.")
    num_frames: int | None = Field(
        None, ge=1, le=INT32_MAX, description="Frames, 4k+1 (81 by default: 5 s at 16 fps)."
    )
    num_steps: int | None = Field(None, ge=1, le=INT32_MAX, description="Denoising steps (4 by default).")
    resolution: Literal["480p", "720p", "1080p"] = Field(
        "480p", description="Output tier; the aspect is kept."
    )
    use_ode: bool = Field(False, description="Deterministic sampler: the same seed gives the same video.")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Random seed (drawn and returned when absent)."
    )
    guidance_scale: float | None = Field(None, description="Classifier-free guidance (the model's default).")
    model: Name | None = Field(
        None, min_length=1, description="The image-to-video model (the default when absent)."
    )


class TaskCreateRequest(BaseModel):
    """``POST /v1/tasks`` (seed 003): any paid route's request, queued as a task."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Name = Field(min_length=1, description="A model id or alias of GET /v1/models.")
    input: dict[str, Any] = Field(
        description="The body the model's synchronous route takes (files as base64 or data: URLs)."
    )
    callback_url: str | None = Field(
        None, max_length=2048, description="Where the task object is POSTed when it ends (signed webhook)."
    )
    dry_run: bool = Field(False, description="Validate and answer the price without queueing anything.")
    operation: Name | None = Field(
        None,
        description="Which of the model's routes: generate/edit (images), segment/remove-background/"
        "remove-video-background (segmentation), generate/cover/repaint (music); inferred when absent.",
    )
