"""The response bodies of the public API, as pydantic models, for the OpenAPI document.

The handlers build plain dicts (orjson serialises them); these models say what
those dicts hold, and ``tests/edge/test_schemathesis.py`` checks every answer
the server sends against them. Unknown keys are allowed, as in OpenAI's
schemas: a client must ignore fields it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.registry import ModelDefaults, ModelLimits, StylePreset


class _Reply(BaseModel):
    model_config = ConfigDict(extra="allow")


# Errors ------------------------------------------------------------------------------------------


class ErrorDetail(_Reply):
    message: str = Field(
        description="What went wrong, safe to show (quotes at most ~100 characters of input)."
    )
    type: str = Field(description="The contract's error type, e.g. invalid_request_error.")
    param: str | None = Field(description="Always null (OpenAI's field; the message names the parameter).")
    code: str | None = Field(description="Always null (OpenAI's field; `type` is the machine-readable one).")


class ErrorResponse(_Reply):
    """The error envelope of every route."""

    error: ErrorDetail


# Images ------------------------------------------------------------------------------------------


class Timing(_Reply):
    """Milliseconds: queue, inference and encode measured by the service; store and total here."""

    queue_ms: float
    inference_ms: float
    encode_ms: float
    store_ms: float
    total_ms: float


class ImageData(_Reply):
    url: str | None = Field(None, description="The stored image (response_format url or both).")
    b64_json: str | None = Field(None, description="The image, base64 (response_format b64_json or both).")
    revised_prompt: None = Field(None, description="Always null: prompts are used as given (the contract).")


class ImagesResponse(_Reply):
    created: int
    data: list[ImageData]
    seed: int = Field(description="The seed used; the same seed and inputs give the same image.")
    timing: Timing


class BatchImagesResponse(_Reply):
    data: list[ImagesResponse | ErrorResponse] = Field(
        description="One entry per request, in order: its images, or its error envelope."
    )


class SegmentationMask(_Reply):
    url: str
    b64_json: str
    score: float
    coverage: float


class SegmentationResponse(_Reply):
    created: int
    found: bool
    data: list[SegmentationMask]


class UpscaleData(_Reply):
    url: str | None = None
    b64_json: str | None = None


class UpscaleResponse(_Reply):
    created: int
    data: list[UpscaleData]
    method: str
    scale: int
    timing: Timing


class StyleList(_Reply):
    object: Literal["list"]
    data: list[StylePreset]


# Chat --------------------------------------------------------------------------------------------


class ChatMessageOut(_Reply):
    role: Literal["assistant"]
    content: str
    refusal: None = Field(description="Always null: the model's answer is the content.")


class ChatChoice(_Reply):
    index: int
    message: ChatMessageOut
    logprobs: None = Field(description="Always null: log probabilities are not offered.")
    finish_reason: Literal["stop", "length"]


class ChatUsage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChunkDelta(_Reply):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Reply):
    index: int
    delta: ChunkDelta
    logprobs: None = Field(description="Always null.")
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(_Reply):
    """One ``data:`` event of a streamed chat (``stream: true``); ``data: [DONE]`` ends it."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice] = Field(description="Empty in the usage chunk.")
    usage: ChatUsage | None = Field(None, description="Only in the last chunk, with include_usage.")


class ChatCompletion(_Reply):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage


# Audio, music, video -----------------------------------------------------------------------------


class Voice(_Reply):
    id: str
    aliases: list[str]
    language: str
    description: str


class VoiceList(_Reply):
    object: Literal["list"]
    data: list[Voice]
    created: int


class CloneModel(_Reply):
    id: str
    languages: list[str]
    sample_rate: int


class CloneLanguages(_Reply):
    object: Literal["list"]
    data: list[CloneModel]
    default_language: str


class MusicDescription(_Reply):
    """The stored song (``?response_format=json``, or the ``result`` event)."""

    id: str
    url: str
    audio_format: str
    content_type: str
    duration: float
    sample_rate: int
    channels: int
    seed: int
    model: str
    num_inference_steps: int
    credits_charged: str
    timing: Timing


class VideoEntry(_Reply):
    id: str
    object: Literal["video"]
    url: str
    model: str
    prompt: str
    created: int
    created_at_ms: int
    num_frames: int
    fps: float
    width: int
    height: int
    duration: float
    size_bytes: int
    content_type: str


class GeneratedVideo(VideoEntry):
    seed: int
    num_steps: int
    resolution: str
    use_ode: bool
    credits_charged: str
    timing: Timing


class VideoList(_Reply):
    object: Literal["list"]
    data: list[VideoEntry]
    total: int
    limit: int
    offset: int
    has_more: bool


# System ------------------------------------------------------------------------------------------


class ModelPricing(_Reply):
    formula: str
    base_credits: str
    credits_per_megapixel: str
    reference_steps: int
    premium_only: bool


class ModelEntry(_Reply):
    id: str
    object: Literal["model"]
    created: int = Field(description="Unix time the model entered the registry (OpenAI's field).")
    owned_by: str
    description: str
    capability: str
    capabilities: list[str]
    aliases: list[str]
    limits: ModelLimits
    defaults: ModelDefaults
    pricing: ModelPricing


class ModelList(_Reply):
    object: Literal["list"]
    data: list[ModelEntry]


class PriceItem(_Reply):
    """One priced item of a dry run, with the fields billing prices it by (those set: width,
    height, steps, count, frames, output_width, output_height, input_images)."""

    __pydantic_extra__: dict[str, int]

    kind: str = Field(description="The kind of work: image_generation, image_edit, segmentation, ...")
    model: str = Field(description="The model (or method, voice) it runs on.")
    cost: float = Field(description="Credits, exact (at most two decimals).")
    cost_hundredths: int = Field(description="The same in hundredths of a credit.")


class PricePreview(_Reply):
    """A dry run's answer (``dry_run: true`` or ``?dry_run=true``): what the real call would hold."""

    object: Literal["price_preview"]
    dry_run: Literal[True]
    cost: float = Field(
        description="Credits the real call holds, exact (at most two decimals); 0 for premium."
    )
    cost_hundredths: int = Field(description="The same in hundredths of a credit.")
    items: list[PriceItem]
    balance_sufficient: bool = Field(description="Whether the balance covers the cost now (else a 402).")


class TaskProgress(_Reply):
    step: int
    total_steps: int


class TaskObject(_Reply):
    """A task (``GET /v1/tasks/{task_id}``, the 202 of ``Prefer: respond-async``, webhooks)."""

    task_id: str
    status: Literal["pending", "processing", "completed", "failed", "cancelled"]
    model: str
    created_at: int = Field(description="Unix seconds.")
    started_at: int | None
    completed_at: int | None
    credits_held: str = Field(description="Credits held for the task, a decimal string.")
    credits_charged: str = Field(description="Credits charged (on completion), a decimal string.")
    progress: TaskProgress | None = None
    output: dict[str, Any] | None = Field(
        None,
        description="On completion: the synchronous route's JSON answer, or {url, content_type, size_bytes}.",
    )
    error: ErrorResponse | None = Field(None, description="On failure or cancellation: the error envelope.")
    callback_url: str | None = None
    webhook: dict[str, Any] | None = Field(None, description="The webhook's delivery state.")


class TaskEnvelope(_Reply):
    """Seed 003's answer on the tasks routes."""

    code: int
    success: Literal[True]
    data: dict[str, Any]


class TaskErrorData(_Reply):
    message: str
    request_id: str


class TaskError(_Reply):
    """Seed 003's error shape, on the tasks routes only."""

    success: Literal[False]
    code: int
    data: TaskErrorData


class Account(_Reply):
    id: str
    name: str
    premium: bool
    balance: str = Field(description="Credits, a decimal string (hundredths).")
    held: str = Field(description="Credits held by requests in flight.")


class Health(_Reply):
    status: Literal["ok"]


class ModelReadiness(_Reply):
    """One model's load state, as its service reports it."""

    service: str = Field(description="The catalog name of the service that serves it.")
    state: Literal["new", "loading", "ready", "unavailable", "closed", "unknown"]
    unavailable_reason: str | None = Field(description="Why it cannot serve, when it cannot.")
    running_jobs: int
    waiting_jobs: int


class Readiness(_Reply):
    status: Literal["ready", "not_ready"]
    services: dict[str, bool]
    models: dict[str, ModelReadiness] = Field(
        default_factory=dict,
        description="Each model's load state, by model id (services that did not answer list none).",
    )


class Progress(_Reply):
    """A ``progress`` event of a long request (``Accept: text/event-stream``)."""

    step: int
    total_steps: int


@dataclass(frozen=True)
class EventStream:
    """A ``text/event-stream`` body: each event's ``data`` is JSON, one of ``data``'s models;
    ``events`` are the event names it uses (none: unnamed); ``done`` when ``data: [DONE]``
    ends it (OpenAI's convention)."""

    data: tuple[type[BaseModel], ...]
    events: tuple[str, ...] = ()
    done: bool = False


#: A binary body (an image, audio or video file).
BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
#: A streamed chat: chunks, then ``[DONE]``; an error after the headers is an error event.
CHAT_EVENTS = EventStream((ChatCompletionChunk, ErrorResponse), done=True)
